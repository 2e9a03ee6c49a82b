"""rema_single.py run end to end in a subprocess with the tiny model: every mode trains a few steps, parameters
change, metrics are finite, a run resumes from its checkpoint, and `accelerate launch` runs 2 CPU processes."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from utils.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rollout_batch_size", "4", "--num_generations", "4", "--reas_samples_per_plan", "2",
        "--prompt_filter.pool_size", "8", "--prompt_filter.num_samples", "2", "--prompt_filter.eps_min", "0", "--prompt_filter.eps_max", "1",
        "--prompt_filter.plans_per_question", "1", "--meta_max_completion_length", "12", "--reas_max_completion_length", "12",
        "--eval_limit", "6", "--num_update_iterations", "1", "--num_train_epochs", "2", "--save_every", "0", "--grading.workers", "1",
        "--learning_rate", "1e-3"]


def run(tmp_path: Path, model: Path, *extra: str, launcher: list[str] | None = None, name: str = "run") -> Path:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "rema_single.py"), "--model", str(model),
                                            "--output_dir", str(tmp_path), "--exp_name", name, *TINY, *extra]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "REMA_CACHE": os.environ.get("REMA_CACHE", str(Path.home() / ".cache" / "rema"))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    (tmp_path / f"{name}.out").write_text(proc.stdout + proc.stderr)  # what a person watching the run saw
    return tmp_path / name


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_finite_training_metrics(rows: list[dict], prefixes: set[str]) -> None:
    train_rows = [r for r in rows if any(k.endswith("/reward") for k in r)]
    assert train_rows, "no training step was logged"
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), f"step {row['step']}: {key} = {value}"
    trained = {k.split("/")[0] for r in train_rows for k in r if k.endswith("/reward")}
    assert trained == prefixes
    for prefix in prefixes:
        for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length", "clip_ratio/region_mean"):
            assert any(f"{prefix}/{key}" in r for r in train_rows), f"{prefix}/{key} never logged"
    assert any("eval/accuracy" in r for r in rows)


def lora_b_norms(ckpt: Path, agent: str) -> float:
    """LoRA B matrices start at zero, so a non-zero norm means the agent's adapter was trained."""
    weights = load_file(ckpt / "adapters" / agent / "adapter_model.safetensors")
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert b, f"no lora_B tensors saved for {agent}"
    return sum(float(w.float().norm()) for w in b)


def changed_tensors(initial: Path, trained: Path) -> int:
    before, after = load_file(initial / "model.safetensors"), load_file(trained / "model.safetensors")
    return sum(not torch.equal(before[k], after[k]) for k in after if k in before)


def test_rema_lora_reinforce_pp_with_kl(tmp_path, tiny_model):
    run_dir = run(tmp_path, tiny_model, "--param_mode", "lora", "--beta", "0.05", "--transcripts_every", "1")
    rows = metrics(run_dir)
    assert_finite_training_metrics(rows, {"meta", "reas"})
    assert any("meta/kl" in r for r in rows) and any("filter/kept" in r for r in rows)
    ckpt = find_checkpoint(run_dir)
    assert lora_b_norms(ckpt, "meta_thinking") > 0
    assert lora_b_norms(ckpt, "reasoning") > 0
    transcripts = [json.loads(x) for x in (run_dir / "transcripts.jsonl").read_text().splitlines()]
    assert transcripts and {"question", "plan", "solution", "reward"} <= transcripts[0].keys()


def test_rema_full_parameters_grpo(tmp_path, tiny_model):
    run_dir = run(tmp_path, tiny_model, "--param_mode", "full", "--advantage_estimator", "grpo", "--beta", "0.05",
                  "--first_agent", "meta_thinking")
    assert_finite_training_metrics(metrics(run_dir), {"meta", "reas"})
    # the header, a line per phase, and the summary line with the accuracy before and after and the checkpoint
    shown = (tmp_path / "run.out").read_text()
    assert "run: rema on math (arithmetic)" in shown and f"tensorboard --logdir {run_dir}/tensorboard" in shown
    assert "phase 1/2 (meta_thinking)" in shown and "phase 2/2 (reasoning)" in shown
    last = [r["step"] for r in metrics(run_dir)][-1]
    assert re.search(rf"done: eval/accuracy \d\.\d{{3}} -> \d\.\d{{3}} \(step 0 -> {last}\) in [\d.]+ min; "
                     rf"checkpoint {run_dir}/checkpoints/step_{last:06d}", shown), shown[-2000:]
    assert re.search(r"; change [+-]\d\.\d{3}, standard error \d\.\d{3} over 6 questions: (within|beyond) noise", shown)
    ckpt = find_checkpoint(run_dir)
    assert changed_tensors(tiny_model, ckpt / "meta_thinking") > 0
    assert changed_tensors(tiny_model, ckpt / "reasoning") > 0


def test_vrp_baseline_rloo_minibatches(tmp_path, tiny_model):
    run_dir = run(tmp_path, tiny_model, "--mode", "vrp", "--param_mode", "lora", "--advantage_estimator", "rloo", "--mini_batch_size", "8",
                  "--num_iterations", "2", "--micro_batch_size", "3", "--loss_type", "dapo")
    assert_finite_training_metrics(metrics(run_dir), {"policy"})
    assert lora_b_norms(find_checkpoint(run_dir), "policy") > 0


def test_mrp_baseline_switch_schedule_and_resume(tmp_path, tiny_model):
    args = ["--mode", "mrp", "--schedule", "switch", "--no-filter", "--switch_freq", "2"]
    run_dir = run(tmp_path, tiny_model, *args, "--total_steps", "2")
    state = json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["step"] == 2
    run(tmp_path, tiny_model, *args, "--total_steps", "4", "--resume", str(run_dir))
    rows = metrics(run_dir)
    train_steps = [r["step"] for r in rows if "policy/reward" in r]
    assert train_steps == [1, 2, 3, 4]  # the resumed run continued at step 3, it did not start over
    # its training time (what --max_minutes counts) continued from the checkpoint's too
    assert 0 < state["training_seconds"] < next(r["time/training"] for r in rows if r["step"] == 3 and "policy/reward" in r)
    assert json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())["step"] == 4
    assert_finite_training_metrics(rows, {"policy"})


def test_rema_switch_schedule_consistency_reward(tmp_path, tiny_model):
    run_dir = run(tmp_path, tiny_model, "--schedule", "switch", "--no-filter", "--total_steps", "4", "--switch_freq", "2",
                  "--meta_reward", "consistency", "--loss_type", "dr_grpo")
    rows = metrics(run_dir)
    agents = [r["train/agent"] for r in rows if "train/agent" in r]
    assert agents == [0.0, 0.0, 1.0, 1.0]  # MTA for switch_freq steps, then the RA
    assert_finite_training_metrics(rows, {"meta", "reas"})


def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_model):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml")]
    # 7 candidates and 5 eval questions over 2 processes: uneven shares are padded, and the padding dropped
    run_dir = run(tmp_path, tiny_model, "--param_mode", "lora", "--prompt_filter.pool_size", "7", "--eval_limit", "5",
                  launcher=launcher)
    assert_finite_training_metrics(metrics(run_dir), {"meta", "reas"})
    ckpt = find_checkpoint(run_dir)
    assert lora_b_norms(ckpt, "meta_thinking") > 0 and lora_b_norms(ckpt, "reasoning") > 0
    assert len(list((ckpt / "accelerate_state").glob("random_states_*.pkl"))) == 2  # both ranks' RNG states
    log = (run_dir / "config.json").read_text()
    assert '"rollout_batch_size": 4' in log
    # the kept items were gathered from both ranks, without the padding copy: 7 questions x 1 plan
    filters = [r for r in metrics(run_dir) if "filter/items" in r]
    assert filters and all(r["filter/candidates"] == 7 and r["filter/items"] == 7 for r in filters)


def test_bad_data_row_stops_before_training(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "What is 2 + 2?"}\n')
    cmd = [sys.executable, str(ROOT / "rema_single.py"), "--model", str(tiny_model), "--output_dir", str(tmp_path),
           "--train_dataset", str(bad), *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "bad.jsonl" in proc.stderr and "line 2" in proc.stderr and "answer" in proc.stderr
    assert not (tmp_path / "rema_single" / "metrics.jsonl").exists()


def test_track_logs_to_weights_and_biases_offline(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B writes its run locally: no network, no account
    run_dir = run(tmp_path, tiny_model, "--mode", "vrp", "--track", "--num_update_iterations", "1")
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(f.stat().st_size > 0 for f in offline_runs[0].glob("*.wandb"))
