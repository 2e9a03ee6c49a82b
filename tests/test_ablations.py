"""The forks of docs/ablations.md: each diff is cut out of the page with the page's own command, applied with
`git apply` to a copy of the repository, its changed function checked directly (forks 1, 2, 4 and 5 against
hand-computed numbers, fork 4's prompt filter with a fake sampler), and the patched script trained end to end with
the tiny model (fork 6: with the optimizer steps each agent takes). A diff
that no longer applies, a fork that crashes, or a run that does not use the fork's option fails here."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from tests.test_e2e import TINY, assert_finite_training_metrics, changed_tensors, metrics
from tests.test_multiturn_e2e import TINY as MULTITURN_TINY
from tests.test_multiturn_e2e import copy_task  # noqa: F401 (a fixture: the tiny model taught the multi-turn format)
from utils.checkpoint import find_checkpoint
from utils.config import FilterArgs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ablations.md"
EXTRACT = "awk -v n=1 '/^```diff$/ {k++; on = (k == n); next} /^```$/ {on = 0} on' docs/ablations.md > fork.patch"
# after TINY: 4 questions, 1 plan each, 4 per step, 1 epoch: one step of each agent; 2 held-out questions; float32
# without recomputed activations (on CPU the update is about 7x faster than with bf16 autocast and checkpointing)
QUICK = ["--prompt_filter.pool_size", "4", "--num_train_epochs", "1", "--eval_limit", "2", "--no-bf16",
         "--no-gradient_checkpointing"]


def test_page_holds_six_diffs_and_the_command_tested_here():
    text = DOC.read_text()
    assert len(re.findall(r"^```diff$", text, flags=re.M)) == 6
    assert EXTRACT in text  # the command the page tells readers to run is the one these tests run


def patched_copy(tmp_path: Path, n: int) -> Path:
    """The repository's files as they are now (tracked, or untracked and not ignored: no .venv, no runs), copied to
    tmp_path/repo, with fork n of the page applied by `git apply`. Asserts the fork touches exactly one file."""
    repo = tmp_path / "repo"
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in names:
        if name and (ROOT / name).is_file():  # (a tracked file deleted in the working tree is skipped)
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # the copy is its own repository root for git apply
    subprocess.run(["bash", "-c", EXTRACT.replace("n=1", f"n={n}")], cwd=repo, check=True)
    assert (repo / "fork.patch").read_text().startswith("--- a/"), f"fork {n}: no diff block cut out of {DOC}"
    for check in (["--check"], []):
        proc = subprocess.run(["git", "apply", *check, "fork.patch"], cwd=repo, capture_output=True, text=True)
        assert proc.returncode == 0, f"docs/ablations.md fork {n} no longer applies:\n{proc.stderr}"
    numstat = subprocess.run(["git", "apply", "--numstat", "fork.patch"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert len(numstat) == 1, f"fork {n} should touch one file: {numstat}"
    return repo


def load(path: Path, name: str):
    """A module from the patched copy (its `utils` imports resolve to this repository's, the same files)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(repo: Path, model: Path, out: Path, *extra: str) -> tuple[Path, dict]:
    """The patched copy's rema_single.py, run in the copy: (run directory, its config.json)."""
    cmd = [sys.executable, str(repo / "rema_single.py"), "--model", str(model), "--output_dir", str(out),
           "--exp_name", "fork", *TINY, *QUICK, *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # `utils` must come from the copy (fork 3)
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    run_dir = out / "fork"
    assert_finite_training_metrics(metrics(run_dir), {"meta", "reas"})
    return run_dir, json.loads((run_dir / "config.json").read_text())


class OneProcess:
    def reduce(self, tensor, reduction):  # accelerator.reduce over one process: the tensor itself
        return tensor


def test_fork1_batch_mean_estimator(tmp_path, tiny_model):
    repo = patched_copy(tmp_path, 1)
    forked = load(repo / "rema_single.py", "fork1_rema_single")
    # rewards 1, 0, 0, -0.5: batch mean 0.125 -> 0.875, -0.125, -0.125, -0.625 on every unmasked token
    # (RLOO over groups of 2 would give 1, -1, 0.5, -0.5)
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 4)  # (N, C)
    adv = forked.ESTIMATORS["batch_mean"].fn(torch.tensor([1.0, 0.0, 0.0, -0.5]), mask, None, None, 2, None, OneProcess())
    assert torch.allclose(adv, torch.tensor([[0.875], [-0.125], [-0.125], [-0.625]]) * mask)
    assert not forked.ESTIMATORS["batch_mean"].needs_group

    run_dir, config = train(repo, tiny_model, tmp_path / "runs", "--advantage_estimator", "batch_mean")
    assert config["advantage_estimator"] == "batch_mean"  # (an unknown name stops the run in validate())
    ckpt = find_checkpoint(run_dir)
    assert changed_tensors(tiny_model, ckpt / "meta_thinking") > 0 and changed_tensors(tiny_model, ckpt / "reasoning") > 0


def test_fork2_concise_meta_reward(tmp_path, tiny_model):
    repo = patched_copy(tmp_path, 2)
    forked = load(repo / "rema_single.py", "fork2_rema_single")

    def words(texts, add_special_tokens):  # a tokenizer whose tokens are words
        return {"input_ids": [t.split() for t in texts]}

    task = SimpleNamespace(tokenizer=words)
    # correct in 48 tokens: 1 - 0.5 * 48/96 = 0.75; correct in 200 (past 96): 0.5; wrong: 0 -> mean 1.25 / 3
    solutions = ["w " * 48, "w " * 200, "w " * 5]
    assert abs(forked.META_SCORES["concise"](solutions, [1.0, 1.0, 0.0], task) - 1.25 / 3) < 1e-9

    run_dir, config = train(repo, tiny_model, tmp_path / "runs", "--meta_reward", "concise")
    assert config["meta_reward"] == "concise"  # (an unknown name stops the run in validate())
    assert any("filter/kept" in r and r.get("train/agent") == 0.0 for r in metrics(run_dir))  # D_h was filtered
    assert changed_tensors(tiny_model, find_checkpoint(run_dir) / "meta_thinking") > 0


def test_fork3_plan_in_system_prompt(tmp_path, tiny_model):
    repo = patched_copy(tmp_path, 3)
    prompts = load(repo / "utils" / "prompts.py", "fork3_prompts")
    system, user = prompts.reas_messages("What is 2 + 3?", "Add the two numbers.")
    assert system["role"] == "system" and "Add the two numbers." in system["content"]
    assert user["role"] == "user" and "What is 2 + 3?" in user["content"] and "Add the two" not in user["content"]

    run_dir, _ = train(repo, tiny_model, tmp_path / "runs")
    assert changed_tensors(tiny_model, find_checkpoint(run_dir) / "reasoning") > 0


def word_tokenizer(texts, add_special_tokens):  # a tokenizer whose tokens are words
    return {"input_ids": [t.split() for t in texts]}


class FilterSampler:
    """Plans of 8 words; every answer right."""
    def __call__(self, agent, prompts, temperature, desc, keys=None):
        texts = ["w " * 8 if "plans" in desc else "\\boxed{1}" for _ in prompts]
        return [None] * len(texts), texts

    def timed(self, name):
        return contextlib.nullcontext()


def test_fork4_plan_length_penalty_moves_reward_and_filter(tmp_path, tiny_model):
    repo = patched_copy(tmp_path, 4)
    forked = load(repo / "rema_single.py", "fork4_rema_single")
    task = SimpleNamespace(tokenizer=word_tokenizer)
    # accuracy 1/2 under a 4-token plan with a 16-token budget: 0.5 - 0.5 * 4/16 = 0.375; past the budget: - 0.5
    options = SimpleNamespace(meta_max_completion_length=16)
    assert abs(forked.META_SCORES["short_plan"](["a", "b"], [1.0, 0.0], task, "w w w w", options) - 0.375) < 1e-9
    assert abs(forked.META_SCORES["short_plan"](["a"], [1.0], task, "w " * 40, options) - 0.5) < 1e-9

    # the D_h filter scores with the same entry: always-right answers under 8-token plans, bounds [0, 0.8]:
    # accuracy scores every question 1 (dropped), short_plan 1 - 0.5 * 8/16 = 0.75 (kept)
    fake_task = SimpleNamespace(tokenizer=word_tokenizer, meta_prompt=lambda q: q["question"],
                                reas_prompt=lambda q, m: q["question"] + m, score=lambda answers, items: [1.0] * len(answers))
    questions = [{"question": f"q{i}", "answer": "1"} for i in range(2)]
    found = {}
    for score in ("accuracy", "short_plan"):
        args = forked.Args(meta_reward=score, meta_max_completion_length=16,
                           prompt_filter=FilterArgs(num_samples=2, pool_size=None, eps_min=0.0, eps_max=0.8))
        dataset, stats = forked.build_dataset("meta_thinking", 0, questions, {"meta_thinking": None, "reasoning": None},
                                              FilterSampler(), fake_task, args, SimpleNamespace(process_index=0, num_processes=1))
        found[score] = (len(dataset), stats["filter/mean_succ"])
    assert found == {"accuracy": (0, 1.0), "short_plan": (2, 0.75)}

    run_dir, config = train(repo, tiny_model, tmp_path / "runs", "--meta_reward", "short_plan", "--no-filter")
    assert config["meta_reward"] == "short_plan"  # (an unknown name stops the run in validate())
    assert changed_tensors(tiny_model, find_checkpoint(run_dir) / "meta_thinking") > 0


def test_fork5_per_turn_discount(tmp_path, copy_task):  # noqa: F811 (the fixture)
    repo = patched_copy(tmp_path, 5)
    forked = load(repo / "rema_multiturn.py", "fork5_rema_multiturn")
    # one sequence, turns 0 and 1 of one token each, ratio 1, A = 1: turn t's loss is -gamma^(1 - t) A
    logp, turn_ids = torch.zeros(1, 2), torch.tensor([[0, 1]])
    kw = dict(clip_mode="turn", ratio_form="geometric", agg_mode="turn", eps_low=0.2, eps_high=0.2, dual_clip=3.0,
              log_ratio_cap=3.0)
    total, _ = forked.turn_policy_loss(logp, logp, torch.tensor([1.0]), turn_ids, turn_discount=0.5, **kw)
    assert abs(total.item() - (-0.5 - 1.0)) < 1e-6
    total, _ = forked.turn_policy_loss(logp, logp, torch.tensor([1.0]), turn_ids, turn_discount=1.0, **kw)
    assert abs(total.item() - (-1.0 - 1.0)) < 1e-6  # gamma = 1: the unforked loss

    model, data = copy_task
    cmd = [sys.executable, str(repo / "rema_multiturn.py"), "--model", str(model), "--train_dataset", str(data),
           "--eval_dataset", str(data), "--output_dir", str(tmp_path / "runs"), "--exp_name", "fork", *MULTITURN_TINY,
           "--turn_discount", "0.5", "--no-bf16"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    run_dir = tmp_path / "runs" / "fork"
    assert json.loads((run_dir / "config.json").read_text())["turn_discount"] == 0.5
    assert changed_tensors(model, find_checkpoint(run_dir) / "policy") > 0


def test_fork6_both_agents_learn_from_every_rollout(tmp_path, tiny_model):
    repo = patched_copy(tmp_path, 6)
    # one block of MTA steps; B x G = 4 x 4 = 16 sequences per optimizer step: the MTA's 16 plans take 1 step, the
    # RA's 16 x K = 32 solutions take 2, with pi_old recomputed (the trap the fork's rule 4 closes)
    run_dir, _ = train(repo, tiny_model, tmp_path / "runs", "--schedule", "switch", "--no-filter", "--switch_freq", "2",
                       "--total_steps", "2", "--mini_batch_size", "16")
    steps = [r for r in metrics(run_dir) if "meta/reward" in r]
    assert len(steps) == 2
    assert all(r["meta/optimizer_steps"] == 1 and r["reas/optimizer_steps"] == 2 for r in steps)
    # the RA's second step saw the weights its first changed, against a recomputed pi_old (not recomputed, the ratio
    # would be exactly 1); the MTA's single step trains on pi_old = the policy itself
    assert all(r["meta/log_ratio_abs_mean"] == 0 and r["reas/log_ratio_abs_mean"] > 0 for r in steps)
    ckpt = find_checkpoint(run_dir)
    assert changed_tensors(tiny_model, ckpt / "meta_thinking") > 0 and changed_tensors(tiny_model, ckpt / "reasoning") > 0
