"""rema_multiturn.py run end to end in a subprocess with a tiny model: shared and separate parameters, the loss
variants, resume, 2 CPU processes under `accelerate launch`, a start from an sft.py output, and a bad data row.

The task is "Repeat n." -> n (n = 1..9). The tiny model is taught the format only: the MTA says "Say it. [FINISH]"
and the RA answers `\\boxed{n}`, right about one time in nine, so conversations finish and rewards (0 or 1) vary."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_tiny_model
from tests.test_e2e import changed_tensors, lora_b_norms, metrics
from utils import prompts
from utils.checkpoint import find_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rollout_batch_size", "4", "--num_generations", "4", "--max_turns", "2", "--max_completion_length", "12",
        "--eval_limit", "6", "--total_steps", "2", "--save_every", "0", "--grading.workers", "1",
        "--learning_rate", "1e-3", "--weight_decay", "0", "--micro_batch_size", "8",
        # the update and reward these tests were written for (the cpu preset's values before it took the example
        # exchange): 4 optimizer steps per rollout, so pi_old is recomputed and the ratio clipped; no mask
        "--mini_batch_size", "8", "--no-one_shot", "--no-mask_unfinished_reward", "--no-stop_when_truncated"]
REASONS = ("normal", "max_turns", "context_exceeded", "truncated")


def copy_example(rng, tokenizer):
    n = rng.randint(1, 9)
    if rng.random() < 0.5:
        return prompts.multiturn_meta_messages(f"Repeat {n}."), "Say it. [FINISH]"
    return prompts.multiturn_reas_messages(f"Repeat {n}.", "Say it. [FINISH]"), f"\\boxed{{{n}}}"


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny model, data file): 120 supervised steps teach the format reliably (33 of 36 plans end with [FINISH])."""
    root = tmp_path_factory.mktemp("copy_task")
    data = root / "copy.jsonl"
    data.write_text("".join(json.dumps({"question": f"Repeat {n}.", "answer": str(n)}) + "\n" for n in range(1, 10)))
    return build_tiny_model(root / "model", sft_steps=120, example=copy_example), data


def run(tmp_path: Path, task: tuple[Path, Path], *extra: str, launcher: list[str] | None = None, name: str = "run",
        model: Path | None = None) -> Path:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "rema_multiturn.py"), "--model", str(model or task[0]),
                                            "--train_dataset", str(task[1]), "--eval_dataset", str(task[1]),
                                            "--output_dir", str(tmp_path), "--exp_name", name, *TINY, *extra]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return tmp_path / name


def assert_sane(rows: list[dict], train_prefix: str = "train", needs_gradient: bool = True) -> list[dict]:
    """Every metric finite, finish-reason fractions summing to 1, the training metrics present; returns train rows."""
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), f"step {row['step']}: {key} = {value}"
        for prefix in ("rollout", "eval"):
            if f"{prefix}/reward" in row:
                assert sum(row[f"{prefix}/finish/{r}"] for r in REASONS) == 1.0
                assert 0 <= row[f"{prefix}/mean_turns"] <= 2
    train_rows = [r for r in rows if "rollout/reward" in r]
    assert train_rows, "no training step was logged"
    if needs_gradient:  # weight decay is off, so parameters change only through a non-zero policy gradient
        assert any(r.get(f"{train_prefix}/grad_norm", 0) > 0 for r in train_rows), "no step had a gradient"
    for key in ("loss", "grad_norm", "entropy", "clip_ratio/region_mean", "clip_ratio/dual_mean"):
        assert any(k.endswith(key) and k.startswith(train_prefix) for r in train_rows for k in r), f"{key} never logged"
    assert rows[-1].keys() >= {"eval/accuracy", "eval/mean_turns", "eval/finish/normal"}
    return train_rows


def test_shared_parameters_turn_ratio_with_reward_mask(tmp_path, copy_task):
    run_dir = run(tmp_path, copy_task, "--mask_unfinished_reward", "--stop_when_truncated", "--transcripts_every", "1",
                  "--total_steps", "3")
    train_rows = assert_sane(metrics(run_dir))
    # the tiny model was taught to end with [FINISH]: some conversations finish normally, and only those are rewarded
    assert any(r["rollout/finish/normal"] > 0 for r in train_rows)
    assert all(r["rollout/reward"] <= r["rollout/finish/normal"] + 1e-9 for r in train_rows)
    assert changed_tensors(copy_task[0], find_checkpoint(run_dir) / "policy") > 0
    transcript = json.loads((run_dir / "transcripts.jsonl").read_text().splitlines()[0])
    assert transcript["finish"] in REASONS and list(transcript["conversation"][0]) == ["meta_thinking"]


def test_separate_parameters_switch_agents(tmp_path, copy_task):
    # two steps per agent: a step whose 4 groups all got equal rewards (likely: 1 answer in 9 is right) has no gradient
    run_dir = run(tmp_path, copy_task, "--no-param_sharing", "--mini_batch_size", "4", "--param_mode", "lora", "--switch_freq", "2",
                  "--learning_rate", "1e-2", "--total_steps", "4")
    rows = metrics(run_dir)
    assert [r["train/agent"] for r in rows if "train/agent" in r] == [0.0, 0.0, 1.0, 1.0]  # MTA, MTA, RA, RA
    assert_sane(rows, "train/meta")
    assert_sane(rows, "train/reas")
    ckpt = find_checkpoint(run_dir)
    assert lora_b_norms(ckpt, "meta_thinking") > 0 and lora_b_norms(ckpt, "reasoning") > 0


def test_token_ratio_token_mean_one_step_per_rollout(tmp_path, copy_task):
    run_dir = run(tmp_path, copy_task, "--clip_mode", "token", "--agg_mode", "token", "--mini_batch_size", "32",
                  "--num_iterations", "2", "--no-stop_when_truncated")
    assert_sane(metrics(run_dir))
    assert changed_tensors(copy_task[0], find_checkpoint(run_dir) / "policy") > 0


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_other_advantage_estimators_train(tmp_path, copy_task, estimator):
    """The single-turn registry's other names work here too: every metric finite, the parameters changed."""
    run_dir = run(tmp_path, copy_task, "--advantage_estimator", estimator)
    assert_sane(metrics(run_dir))
    assert changed_tensors(copy_task[0], find_checkpoint(run_dir) / "policy") > 0


def test_arithmetic_ratio_turn_mean_and_resume(tmp_path, copy_task):
    args = ["--ratio_form", "arithmetic", "--agg_mode", "turn"]
    run_dir = run(tmp_path, copy_task, *args)
    assert json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())["step"] == 2
    run(tmp_path, copy_task, *args, "--total_steps", "4", "--resume", str(run_dir))
    rows = metrics(run_dir)
    assert [r["step"] for r in rows if "rollout/reward" in r] == [1, 2, 3, 4]  # continued, did not start over
    assert_sane(rows)


def test_accelerate_launch_two_cpu_processes(tmp_path, copy_task):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml")]
    run_dir = run(tmp_path, copy_task, "--eval_limit", "5", launcher=launcher)  # 5 eval questions: uneven shares
    assert_sane(metrics(run_dir))
    ckpt = find_checkpoint(run_dir)
    assert changed_tensors(copy_task[0], ckpt / "policy") > 0
    assert len(list((ckpt / "accelerate_state").glob("random_states_*.pkl"))) == 2


def test_starts_from_an_sft_output(tmp_path, copy_task):
    data = tmp_path / "sft.jsonl"
    row = {"system": "You are a meta-think agent.", "history": [["What is 2 + 3?", "Add."], ["5", "Good."]],
           "instruction": "5", "input": "", "output": "Done. [FINISH]"}
    data.write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    cmd = [sys.executable, str(ROOT / "sft.py"), "--model", str(copy_task[0]), "--datasets", str(data),
           "--output_dir", str(tmp_path / "sft"), "--num_train_epochs", "1", "--batch_size", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = run(tmp_path, copy_task, "--total_steps", "1", model=tmp_path / "sft" / "model")
    assert_sane(metrics(run_dir), needs_gradient=False)  # 4 SFT rows may have undone the format: rewards may all be 0


def test_bad_data_row_stops_before_training(tmp_path, copy_task):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"answer": "4"}\n')
    cmd = [sys.executable, str(ROOT / "rema_multiturn.py"), "--model", str(copy_task[0]), "--output_dir", str(tmp_path),
           "--train_dataset", str(bad), *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "bad.jsonl" in proc.stderr and "line 2" in proc.stderr and "question" in proc.stderr
    assert not (tmp_path / "rema_multiturn" / "metrics.jsonl").exists()
