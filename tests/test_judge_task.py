"""The LLM-as-a-Judge task: its rewards and data loading against hand-computed values, and one short training run of
each script on it with a tiny model taught the verdict format (so rewards vary and parameters move)."""

import json

import pytest

import rema_single as rs
from utils.task import JudgeTask
from tests import test_e2e, test_multiturn_e2e
from tests.conftest import build_tiny_model
from utils import prompts
from utils.checkpoint import find_checkpoint
from utils.data import DataError
from utils.grading import states_verdict
from utils.judge_data import is_rewardbench, load_judge_examples


JUDGE = JudgeTask()


# ---- rewards: +1 right verdict, -0.5 wrong verdict in the format, -1 no single verdict; the MTA must not judge ----
def test_reas_reward_judge():
    assert rs.reas_reward(1.0, "A is clearer. [[A]]", JUDGE) == 1.0
    assert rs.reas_reward(0.0, "B covers more. [[B]]", JUDGE) == -0.5  # wrong, but a valid verdict
    assert rs.reas_reward(0.0, "Both are fine.", JUDGE) == -1.0  # no verdict
    assert rs.reas_reward(0.0, "[[A]] or maybe [[B]]", JUDGE) == -1.0  # two verdicts are none
    assert rs.reas_reward(0.0, "[[a]]", JUDGE) == -1.0  # lower case is not the format
    assert rs.reas_reward(0.0, "\\boxed{A}", JUDGE) == -1.0  # the math format is not the judge's


def test_meta_reward_judge_leak_and_consistency():
    assert states_verdict("Check facts, then say [[B]]") and not states_verdict("Check facts, then decide.")
    assert rs.meta_reward("Check the facts.", ["x"] * 4, [1.0, 1.0, 0.0, 0.0], "accuracy", JUDGE) == 0.5
    assert rs.meta_reward("B is right: [[B]]", ["x"] * 4, [1.0, 1.0, 0.0, 0.0], "accuracy", JUDGE) == -0.5
    assert rs.meta_reward("\\boxed{B}", ["x"] * 4, [1.0] * 4, "accuracy", JUDGE) == 1.0  # a box is no verdict
    # consistency over verdicts: [[A]] three times of 4 -> 0.75
    assert rs.meta_reward("plan", ["[[A]]", "so [[A]]", "[[A]]!", "[[B]]"], [0.0] * 4, "consistency", JUDGE) == 0.75


# ---- data ----
def rewardbench_rows(n_per_subset: int = 6) -> list[dict]:
    rows = []
    for s, subset in enumerate(("chat", "code", "math", "safety")):
        for i in range(n_per_subset):
            a, b = 3 * i + s, 2 * i + 1
            rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1}",
                         "subset": subset, "id": f"{subset}-{i}"})
    return rows


def test_load_judge_examples_items_file_and_rewardbench(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"question": "q", "response_A": "a", "response_B": "b", "label": "B>A"}) + "\n")
    assert not is_rewardbench(str(items))
    assert load_judge_examples(str(items), "test")[0]["answer"] == "B"
    rb = tmp_path / "rb.jsonl"
    rb.write_text("".join(json.dumps(r) + "\n" for r in rewardbench_rows()))
    assert is_rewardbench(str(rb)) and is_rewardbench("allenai/reward-bench")
    train = load_judge_examples(str(rb), "train", train_size=30, test_size=10)
    test = load_judge_examples(str(rb), "test", train_size=30, test_size=10)
    assert (len(train), len(test)) == (30, 10)
    assert not {t["question"] for t in train} & {t["question"] for t in test}  # strict by default
    for it in train + test:  # the chosen response is the right verdict, in either order
        right = it["response_A"] if it["answer"] == "A" else it["response_B"]
        assert int(right) == sum(int(x) for x in it["question"][8:-1].split(" + "))


def test_load_judge_examples_bad_label_names_file_line_and_field(tmp_path):
    bad = tmp_path / "items.jsonl"
    good = {"question": "q", "response_A": "a", "response_B": "b", "label": "A>B"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good | {"label": "A"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad} line 2: field 'label' must be 'A>B' or 'B>A'"):
        load_judge_examples(str(bad), "test")


# ---- end to end ----
def judge_example(rng, tokenizer):
    """A judge prompt of any method (VRP, MRP, MTA, RA; single- and multi-turn) and a verdict reply, right half the time."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    q, right, wrong = f"What is {a} + {b}?", str(a + b), str(a + b + 1)
    resp_a, resp_b, label = (right, wrong, "A") if rng.random() < 0.5 else (wrong, right, "B")
    verdict = label if rng.random() < 0.5 else {"A": "B", "B": "A"}[label]
    messages = rng.choice([prompts.judge_vrp_messages(q, resp_a, resp_b), prompts.judge_mrp_messages(q, resp_a, resp_b),
                           prompts.judge_reas_messages(q, resp_a, resp_b, "Compare."),
                           prompts.multiturn_reas_messages(prompts.judge_pair_text(q, resp_a, resp_b), "Compare.",
                                                           prompts.MULTITURN_JUDGE_REAS_SYSTEM)])
    if rng.random() < 0.25:  # plans: no verdict
        messages = rng.choice([prompts.judge_meta_messages(q),
                               prompts.multiturn_meta_messages(prompts.judge_pair_text(q, resp_a, resp_b))])
        return messages, "Compare. [FINISH]"
    return messages, f"[[{verdict}]]"


@pytest.fixture(scope="module")
def judge_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge_task")
    rb = root / "rb.jsonl"
    rb.write_text("".join(json.dumps(r) + "\n" for r in rewardbench_rows()))
    return build_tiny_model(root / "model", sft_steps=60, example=judge_example), rb


SIZES = ["--judge.train_size", "30", "--judge.test_size", "10", "--eval_limit", "4"]


@pytest.mark.parametrize("mode", ["rema", "vrp"])
def test_rema_single_judge(tmp_path, judge_task, mode):
    model, rb = judge_task
    run_dir = test_e2e.run(tmp_path, model, "--task", "judge", "--train_dataset", str(rb), "--mode", mode, *SIZES,
                           "--schedule", "switch", "--no-filter", "--total_steps", "2", "--switch_freq", "1",
                           "--weight_decay", "0")
    rows = test_e2e.metrics(run_dir)
    test_e2e.assert_finite_training_metrics(rows, {"meta", "reas"} if mode == "rema" else {"policy"})
    ckpt = find_checkpoint(run_dir)
    for agent in (["meta_thinking", "reasoning"] if mode == "rema" else ["policy"]):
        assert test_e2e.changed_tensors(model, ckpt / agent) > 0, agent
    rewards = [v for r in rows for k, v in r.items() if k.endswith("/reward")]
    assert all(-1.0 <= v <= 1.0 for v in rewards)


def test_rema_multiturn_judge(tmp_path, judge_task):
    model, rb = judge_task
    run_dir = test_multiturn_e2e.run(tmp_path, (model, rb), "--task", "judge", *SIZES, "--max_completion_length", "8")
    rows = test_e2e.metrics(run_dir)
    test_multiturn_e2e.assert_sane(rows)
    assert test_e2e.changed_tensors(model, find_checkpoint(run_dir) / "policy") > 0


def test_judge_trains_offline_on_the_builtin_pairs(tmp_path, judge_task):
    """`--task judge` with the default data: the built-in arithmetic pairs, trained and evaluated offline."""
    model, _ = judge_task
    run_dir = test_e2e.run(tmp_path, model, "--task", "judge", "--mode", "vrp", "--eval_limit", "4", "--schedule",
                           "switch", "--no-filter", "--total_steps", "2", "--switch_freq", "2", "--weight_decay", "0",
                           "--arithmetic.train_size", "40", "--arithmetic.test_size", "10")
    rows = test_e2e.metrics(run_dir)
    test_e2e.assert_finite_training_metrics(rows, {"policy"})
    assert test_e2e.changed_tensors(model, find_checkpoint(run_dir) / "policy") > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["task"] == "judge" and config["data"]["train_dataset"] == "arithmetic"


def test_training_refuses_a_test_file_of_another_split(tmp_path, judge_task):
    """The README's workflow with a mismatch: the split files were written with another split seed than the run's.
    The run stops before training, naming both splits; with the file's seed it trains."""
    import subprocess
    import sys

    model, rb = judge_task
    out = tmp_path / "split"
    subprocess.run([sys.executable, "-m", "utils.judge_data", "--source", str(rb), "--mode", "strict", "--train_size",
                    "30", "--test_size", "10", "--split_seed", "5", "--out", str(out)], cwd=test_e2e.ROOT, check=True,
                   capture_output=True)
    cmd = [sys.executable, str(test_e2e.ROOT / "rema_single.py"), "--task", "judge", "--model", str(model),
           "--train_dataset", str(rb), "--eval_dataset", str(out / "test.jsonl"), "--output_dir", str(tmp_path), *SIZES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "split seed 5" in proc.stderr and "split seed 0" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "rema_single" / "metrics.jsonl").exists()
    run_dir = test_e2e.run(tmp_path, model, "--task", "judge", "--train_dataset", str(rb), "--eval_dataset",
                           str(out / "test.jsonl"), "--judge.split_seed", "5", *SIZES, "--mode", "vrp", "--schedule",
                           "switch", "--no-filter", "--total_steps", "1", "--switch_freq", "1", name="same_split")
    assert any("eval/accuracy" in r for r in test_e2e.metrics(run_dir))
