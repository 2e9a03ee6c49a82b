"""Faults a long run meets, each provoked for real with the tiny model (issue: reliability):

- SIGKILL at a random moment, then --resume: the same parameters (bitwise) and the same metrics as a run that was
  never interrupted; a checkpoint cut off while being written leaves the last good one readable.
- SIGTERM: the step finishes, a checkpoint is saved, the process exits 0, and --resume continues from it.
- A non-finite loss / gradient: the optimizer step is skipped, counted and logged; repeated, the run stops with a
  message and its last checkpoint intact.
- Two processes: the same parameters as one process on the same global batch and seed; a rank that dies takes the
  whole launch down instead of hanging.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import test_multiturn_e2e as multiturn
from tests.test_multiturn_e2e import copy_task  # noqa: F401  (a fixture)
from tests.test_e2e import ROOT, TINY, changed_tensors, metrics, run
from utils.checkpoint import find_checkpoint
from utils.faults import NonFiniteGuard

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml")]


def single_cmd(model: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "rema_single.py"), "--model", str(model), "--output_dir", str(out),
            "--exp_name", name, *TINY, *extra]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every safetensors tensor of a checkpoint's Hugging Face copies, keyed by file and name."""
    return {f"{f.relative_to(ckpt)}:{k}": v for f in sorted(ckpt.rglob("*.safetensors")) for k, v in load_file(f).items()}


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without wall-clock times, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before the moment the test waits for"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"time/step"' in line for line in path.read_text().splitlines())


# ---------------------------------------------------------------------------------------------------------------
# Interruption
# ---------------------------------------------------------------------------------------------------------------
# ReMA with prompt filtering (both agents, both phases) and a checkpoint after every step
KILL_ARGS = ["--save_every", "1", "--keep_checkpoints", "2", "--transcripts_every", "1"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    reference = run(tmp_path, tiny_model, *KILL_ARGS, name="uninterrupted")
    ref_rows = metrics(reference)
    steps = max(r["step"] for r in ref_rows)
    assert steps >= 3, f"the run is too short to be interrupted mid-way ({steps} steps)"

    rng = random.Random()
    run_dir = tmp_path / "killed"
    kills = 0
    while True:
        cmd = single_cmd(tiny_model, tmp_path, "killed", *KILL_ARGS)
        if (run_dir / "checkpoints" / "latest").exists():
            cmd += ["--resume", str(run_dir)]
        log = open(tmp_path / f"killed-{kills}.log", "w")  # a file: a full pipe would stall the run
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if kills < 2:  # kill twice, each time once the next step is logged (and step 1's checkpoint exists)
            target = max(logged_steps(run_dir) + 1, 2)
            try:
                wait_for(lambda: logged_steps(run_dir) >= target, proc)
            except AssertionError:
                break  # it finished before the moment came: nothing more to interrupt
            # the first kill lands right after a step's row is logged, before its checkpoint is complete (the rows
            # after the last checkpoint must be dropped on resume); the second at a random moment
            time.sleep(0.0 if kills == 0 else rng.uniform(0.0, 3.0))
            os.killpg(proc.pid, signal.SIGKILL)  # the process and its grader workers, as a lost machine
            proc.wait()
            kills += 1
            # whatever the moment, the last complete checkpoint can be found and read
            ckpt = find_checkpoint(run_dir)
            assert json.loads((ckpt / "trainer_state.json").read_text())["step"] >= 1
            assert all(torch.isfinite(t).all() for t in weights(ckpt).values())
            continue
        proc.wait(timeout=900)
        assert proc.returncode == 0, (tmp_path / f"killed-{kills}.log").read_text()[-4000:]
        break
    assert kills >= 1
    final, final_ref = find_checkpoint(run_dir), find_checkpoint(reference)
    assert json.loads((final / "trainer_state.json").read_text())["step"] == steps
    ours, theirs = weights(final), weights(final_ref)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "the resumed run's parameters differ"
    assert comparable(metrics(run_dir)) == comparable(ref_rows)  # one row per step, as if never interrupted


def test_logger_rewind_drops_rows_after_the_checkpoint_and_a_cut_line(tmp_path):
    from utils.tracking import RunLogger

    logger = RunLogger(tmp_path, {}, enabled=True)
    for step in range(6):
        logger.log({"reward": float(step)}, step)
        logger.log_transcripts([{"question": f"q{step}"}], step)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')  # a row cut off by a kill
    logger = RunLogger(tmp_path, {}, enabled=True)
    logger.rewind(3)
    logger.log({"reward": 40.0}, 4)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    shows = [json.loads(line) for line in (tmp_path / "transcripts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in shows] == [0, 1, 2, 3]


def test_max_minutes_counts_the_training_before_a_resume(tmp_path):
    """A resumed run starts with the training time of its checkpoint: --max_minutes is the run's budget, not each
    process's (a run resumed after a crash would otherwise train its whole budget again); evaluation never counts."""
    from accelerate import Accelerator

    from utils.tracking import RunProgress

    accelerator = Accelerator(cpu=True)
    progress = RunProgress(tmp_path, 5, 90.0, enabled=False, header={})
    assert 90.0 <= progress.training_time() < 95.0
    assert progress.time_is_up(accelerator, 1.5) and not progress.time_is_up(accelerator, 2.0)
    progress.evaluated(lambda: time.sleep(0.2) or {})
    assert progress.training_time() < 90.2
    fresh = RunProgress(tmp_path, 0, 0.0, enabled=False, header={})
    assert fresh.training_time() < 5.0 and not fresh.time_is_up(accelerator, 1.5)


def test_checkpoint_cut_off_mid_write_leaves_the_last_good_one(tmp_path, tiny_model):
    """A save that dies half-way (here: the second model's files cannot be written) leaves `latest` on the previous
    checkpoint, which still loads."""
    from accelerate import Accelerator

    from utils.checkpoint import load_checkpoint, save_checkpoint
    from utils.models import load_model, load_tokenizer

    accelerator = Accelerator(cpu=True)
    model = load_model(str(tiny_model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    tokenizer = load_tokenizer(str(tiny_model))
    save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, {"policy": model}, tokenizer, keep=2)

    class Unwritable(torch.nn.Module):
        def save_pretrained(self, *args, **kwargs):
            raise OSError("No space left on device")

    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # step 2's weights differ from step 1's
    with pytest.raises(OSError):
        save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, {"policy": model, "broken": Unwritable()}, tokenizer, 2)
    assert (tmp_path / "checkpoints" / "step_000002.tmp").is_dir()  # the partial write is there, and ignored
    ckpt = find_checkpoint(tmp_path)
    assert ckpt.name == "step_000001"
    saved = load_file(ckpt / "policy" / "model.safetensors")
    current = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items() if k in saved}
    assert any(not torch.equal(saved[k], v) for k, v in current.items())  # step 2's weights never got there
    assert load_checkpoint(accelerator, ckpt) == {"step": 1}  # and step 1 restores
    restored = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(saved[k], restored[k]) for k in current)


@pytest.mark.parametrize("script", ["rema_single", "rema_multiturn"])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model, script, copy_task):
    if script == "rema_single":
        cmd = single_cmd(tiny_model, tmp_path, "run", "--mode", "vrp", "--schedule", "switch", "--no-filter",
                         "--switch_freq", "50")
    else:
        model, data = copy_task
        cmd = [sys.executable, str(ROOT / "rema_multiturn.py"), "--model", str(model), "--train_dataset", str(data),
               "--eval_dataset", str(data), "--output_dir", str(tmp_path), "--exp_name", "run", *multiturn.TINY]
    run_dir = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([*cmd, "--total_steps", "50"], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: logged_steps(run_dir) >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: saved the checkpoint of step" in out
    state = json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 50 and state["step"] == logged_steps(run_dir)  # stopped after the step it was in
    # and the run continues from there
    stopped = state["step"]
    resumed = subprocess.run([*cmd, "--total_steps", str(stopped + 1), "--resume", str(run_dir)], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [r["step"] for r in metrics(run_dir) if "time/step" in r] == list(range(1, stopped + 2))


def eval_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum('"eval/accuracy"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_inside_the_filter_and_inside_an_evaluation_resumes_bitwise(tmp_path, tiny_model):
    """SIGTERM while the prompt filter runs (right after the first evaluation) and while an evaluation runs (right
    after a step is logged, with an evaluation after every step): each time the run stops at once (generation stops
    between batches), saves the last completed step and exits 0; resumed, it ends bitwise where an uninterrupted run
    ends, with the same metric rows."""
    args = ["--eval_every", "1", "--prompt_filter.pool_size", "16", "--prompt_filter.num_samples", "4",
            "--generation_batch_size", "4", "--transcripts_every", "1"]
    reference = run(tmp_path, tiny_model, *args, name="uninterrupted")
    run_dir, stops = tmp_path / "stopped", []
    for moment in ("filter", "evaluation", None):
        cmd = single_cmd(tiny_model, tmp_path, "stopped", *args)
        if (run_dir / "checkpoints" / "latest").exists():
            cmd += ["--resume", str(run_dir)]
        log_path = tmp_path / f"stopped-{len(stops)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
            if moment == "filter":  # the step-0 evaluation is logged: the filter of D_l starts
                wait_for(lambda: eval_rows(run_dir) >= 1, proc)
            elif moment == "evaluation":  # step 1 is logged: the evaluation of step 1 starts
                wait_for(lambda: logged_steps(run_dir) >= 1, proc)
            if moment is not None:
                proc.send_signal(signal.SIGTERM)
                t0 = time.time()
            proc.wait(timeout=600)
        out = log_path.read_text()
        assert proc.returncode == 0, out[-4000:]
        if moment is not None:
            stops.append((moment, time.time() - t0))
            state = json.loads((find_checkpoint(run_dir) / "trainer_state.json").read_text())
            assert "SIGTERM: saved the checkpoint of step" in out
            assert state["step"] == logged_steps(run_dir)  # the last completed step, nothing half done
            if moment == "filter":
                assert state["step"] == 0 and state["dataset"] is None  # the filter is redone on resume
            else:
                assert state["evaluated_at"] != state["step"] and eval_rows(run_dir) == state["step"]  # evaluations 0..step-1
    print("seconds from SIGTERM to exit:", stops)
    assert all(seconds < 60 for _, seconds in stops), stops
    ours, theirs = weights(find_checkpoint(run_dir)), weights(find_checkpoint(reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert comparable(metrics(run_dir)) == comparable(metrics(reference))


def test_checkpoint_cadence_in_minutes(tmp_path, tiny_model):
    """--save_every 0 with --save_every_minutes: a checkpoint at the first step end after that many minutes."""
    run_dir = run(tmp_path, tiny_model, "--mode", "vrp", "--schedule", "switch", "--no-filter", "--total_steps", "3",
                  "--switch_freq", "3", "--save_every_minutes", "0.0001", "--keep_checkpoints", "5")
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved == ["step_000001", "step_000002", "step_000003"]


# ---------------------------------------------------------------------------------------------------------------
# Non-finite loss / gradient
# ---------------------------------------------------------------------------------------------------------------
def test_non_finite_guard():
    guard = NonFiniteGuard(max_in_a_row=3, script="x.py")
    assert guard.step_ok(1.5, 1, False)
    assert not guard.step_ok(math.nan, 2, False) and not guard.step_ok(math.inf, 3, False)
    assert guard.step_ok(0.0, 4, False)  # a good step resets the count in a row
    assert not guard.step_ok(-math.inf, 5, False) and not guard.step_ok(math.nan, 6, False)
    assert guard.skipped == 4 and guard.in_a_row == 2
    with pytest.raises(SystemExit, match="3 optimizer steps in a row had a non-finite"):
        guard.step_ok(math.nan, 7, False)


def poisoned_run(tmp_path: Path, model: Path, bad_calls: str, *extra: str) -> subprocess.CompletedProcess:
    """rema_single.py with its update-phase log-probs turned to NaN on the given calls ("1": the first forward of
    the first update; "all": every one): a non-finite loss, hence a non-finite gradient."""
    driver = tmp_path / "poisoned.py"
    driver.write_text(f'''
import sys
sys.path.insert(0, {str(ROOT)!r})
import tyro
import rema_single

original, calls = rema_single.completion_logprobs, [0]

def poisoned(model, batch, temperature, autocast, with_entropy=False):
    logp, entropy = original(model, batch, temperature, autocast, with_entropy)
    if with_entropy:  # the forward of the update (pi_old is computed without it)
        calls[0] += 1
        if {bad_calls!r} == "all" or calls[0] in {{int(c) for c in {bad_calls!r}.split(",")}}:
            logp = logp * float("nan")
    return logp, entropy

rema_single.completion_logprobs = poisoned
rema_single.main(tyro.cli(rema_single.Args))
''')
    cmd = [sys.executable, str(driver), "--model", str(model), "--output_dir", str(tmp_path), "--exp_name", "run",
           *TINY, "--mode", "vrp", "--schedule", "switch", "--no-filter", "--micro_batch_size", "16", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, tiny_model):
    proc = poisoned_run(tmp_path, tiny_model, "1", "--total_steps", "3", "--switch_freq", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 1: gradient norm nan; optimizer step skipped" in proc.stdout
    rows = [r for r in metrics(tmp_path / "run") if "time/step" in r]
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 1.0, 1.0]
    for row in rows:  # nothing non-finite reaches the logs
        assert all(math.isfinite(v) for v in row.values()), row
    assert changed_tensors(tiny_model, find_checkpoint(tmp_path / "run") / "policy") > 0  # steps 2 and 3 applied


def test_repeated_non_finite_steps_stop_the_run_with_its_checkpoint_intact(tmp_path, tiny_model):
    proc = poisoned_run(tmp_path, tiny_model, "2,3,4,5,6,7,8,9", "--total_steps", "10", "--switch_freq", "10",
                        "--max_skipped_steps", "3", "--save_every", "1")
    assert proc.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in proc.stderr
    ckpt = find_checkpoint(tmp_path / "run")
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3  # saved before the run stopped
    assert all(torch.isfinite(t).all() for t in weights(ckpt).values())  # and never touched by a NaN update
    assert changed_tensors(tiny_model, ckpt / "policy") > 0  # step 1 was applied


# ---------------------------------------------------------------------------------------------------------------
# Many processes
# ---------------------------------------------------------------------------------------------------------------
def test_two_processes_match_one_process(tmp_path, tiny_model):
    """Same global batch, seed and schedule: every sample is seeded by (step, question, sample), so both runs draw the
    same completions and get the same rewards; the parameters then differ only by the order of float sums (the
    gradient is reduced over processes)."""
    args = ["--mode", "vrp", "--schedule", "switch", "--no-filter", "--total_steps", "3", "--switch_freq", "3", "--no-bf16"]
    one = run(tmp_path, tiny_model, *args, name="one")
    two = run(tmp_path, tiny_model, *args, name="two", launcher=LAUNCH_2)
    rows1, rows2 = metrics(one), metrics(two)
    for key in ("policy/reward", "policy/accuracy", "policy/completions/mean_length", "eval/accuracy"):
        assert [r.get(key) for r in rows1] == [r.get(key) for r in rows2], key  # the very same samples
    w1, w2 = weights(find_checkpoint(one)), weights(find_checkpoint(two))
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    print(f"largest parameter difference, 2 processes vs 1: {worst:.2e}")
    assert worst < 1e-5, worst  # float32 rounding, compounded over 3 Adam steps
    assert changed_tensors(tiny_model, find_checkpoint(one) / "policy") > 0


def test_a_dead_rank_takes_the_launch_down(tmp_path, tiny_model):
    cmd = [*LAUNCH_2, str(ROOT / "rema_single.py"), "--model", str(tiny_model), "--output_dir", str(tmp_path),
           "--exp_name", "run", *TINY, "--mode", "vrp", "--schedule", "switch", "--no-filter", "--total_steps", "100",
           "--switch_freq", "100"]
    log = open(tmp_path / "launch.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: logged_steps(tmp_path / "run") >= 1, proc)
        victim = rank_pid(proc.pid, 1)
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        proc.wait(timeout=180)  # down within 3 minutes, not hung on a collective
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "launch.log").read_text()
    assert proc.returncode != 0
    assert "rema_single.py FAILED" in out or "ChildFailedError" in out, out[-3000:]
    print(f"launch down {elapsed:.1f} s after rank 1 was killed")


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the worker process with RANK=rank among the launcher's descendants (Linux /proc)."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            env = (proc_dir / "environ").read_bytes().split(b"\0")
            cmdline = (proc_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"rema_single.py" in cmdline and b"accelerate" not in cmdline:
            pid = int(proc_dir.name)
            if descends_from(pid, launcher_pid):
                found.append(pid)
    assert len(found) == 1, f"worker of rank {rank}: found {found}"
    return found[0]


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False
