"""Tests for utils/judge_data.py: RewardBench pairs to pair-ranking items, the strict / loose balanced splits, row
validation, the hub path and the command line (read back by eval.py's judge loader).

The synthetic table below has four subsets of unequal sizes, and two of them repeat prompts (two pairs per prompt),
as RewardBench does (alpacaeval-easy/-hard, mt-bench-*), so that the strict and loose splits differ."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import eval as ev
from utils.data import DataError
from utils.judge_data import build_splits, load_rewardbench, pair_items, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
JUDGEBENCH = ROOT.parent / "shared" / "data" / "judgebench_gpt4o.jsonl"

# subset: (pairs, pairs per prompt). Items (2 per pair): chat 12, code 20, math 6, safety 8; 46 in all.
TABLE = {"chat": (6, 2), "code": (10, 1), "math": (3, 1), "safety": (4, 2)}


def rewardbench_rows() -> list[dict]:
    rows = []
    for subset, (pairs, per_prompt) in TABLE.items():
        for k in range(pairs):
            rows.append({"prompt": f"{subset} prompt {k // per_prompt}", "chosen": f"{subset} good {k}",
                         "rejected": f"{subset} bad {k}", "chosen_model": "m1", "rejected_model": "m2",
                         "subset": subset, "id": len(rows)})
    return rows


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def per_subset(items: list[dict]) -> dict[str, int]:
    return dict(Counter(item["subset"] for item in items))


def triples(items: list[dict]) -> set[tuple[str, str, str]]:
    return {(item["question"], item["response_A"], item["response_B"]) for item in items}


# --------------------------------------------------------------------------------------------------
# Items and splits
# --------------------------------------------------------------------------------------------------


def test_both_orders_with_their_labels():
    row = rewardbench_rows()[0]
    assert pair_items([row]) == [
        {"question": "chat prompt 0", "response_A": "chat good 0", "response_B": "chat bad 0", "label": "A>B",
         "subset": "chat", "id": 0, "pair_id": "0:A>B"},
        {"question": "chat prompt 0", "response_A": "chat bad 0", "response_B": "chat good 0", "label": "B>A",
         "subset": "chat", "id": 0, "pair_id": "0:B>A"},
    ]


@pytest.mark.parametrize("mode, train_size, test_size", [("strict", 26, 20), ("loose", 17, 29)])
def test_all_items_used_once_in_both_orders(mode, train_size, test_size):
    rows = rewardbench_rows()
    train, test = build_splits(rows, mode, train_size, test_size, seed=0)
    assert (len(train), len(test)) == (train_size, test_size)
    by_id = {row["id"]: row for row in rows}
    seen = Counter()
    for item in train + test:
        row = by_id[item["id"]]
        chosen, rejected = (item["response_A"], item["response_B"]) if item["label"] == "A>B" else (item["response_B"], item["response_A"])
        assert (item["question"], chosen, rejected, item["subset"]) == (row["prompt"], row["chosen"], row["rejected"], row["subset"])
        assert item["pair_id"] == f"{item['id']}:{item['label']}"
        seen[item["pair_id"]] += 1
    assert seen == Counter(f"{i}:{label}" for i in range(23) for label in ("A>B", "B>A"))


def test_strict_split_balance_and_no_shared_prompt():
    # Units are a prompt's items: 4 for chat and safety, 2 for code and math. Round-robin (fewest first, ties
    # alphabetical): chat 4, code 2, math 2, safety 4 (12); code 4, math 4 (16); chat 8 (20). Whatever the seed.
    for seed in range(3):
        train, test = build_splits(rewardbench_rows(), "strict", 26, 20, seed=seed)
        assert per_subset(test) == {"chat": 8, "code": 4, "math": 4, "safety": 4}
        assert per_subset(train) == {"chat": 4, "code": 16, "math": 2, "safety": 4}
        assert not {item["question"] for item in train} & {item["question"] for item in test}


def test_loose_split_balance_no_identical_item_but_shared_prompts():
    # One-item units: an equal quota per subset. Six rounds of four give 24 (math is then exhausted at 6); then
    # chat, code, safety reach 7 (27); chat and code reach 8 (29).
    train, test = build_splits(rewardbench_rows(), "loose", 17, 29, seed=0)
    assert per_subset(test) == {"chat": 8, "code": 8, "math": 6, "safety": 7}
    assert per_subset(train) == {"chat": 4, "code": 12, "safety": 1}
    assert not triples(train) & triples(test)
    # what makes it loose: prompts (and even the two orders of one pair) can sit on both sides
    assert {item["question"] for item in train} & {item["question"] for item in test}
    assert {item["id"] for item in train} & {item["id"] for item in test}


def test_strict_keeps_a_prompt_shared_by_two_subsets_on_one_side():
    rows = [{"prompt": p, "chosen": f"good {i}", "rejected": f"bad {i}", "subset": s, "id": i}
            for i, (s, p) in enumerate([("a", "shared"), ("b", "shared"), ("a", "x"), ("b", "y")])]
    for seed in range(5):
        train, test = build_splits(rows, "strict", 4, 4, seed=seed)
        assert sorted({item["question"] for item in train} | {item["question"] for item in test}) == ["shared", "x", "y"]
        assert {item["question"] for item in test} in ({"shared"}, {"x", "y"})  # the 4 "shared" items stay together


def test_same_seed_same_splits_other_seed_other_test_set():
    rows = rewardbench_rows()
    assert build_splits(rows, "loose", 17, 29, seed=0) == build_splits(rows, "loose", 17, 29, seed=0)
    for mode, train_size, test_size in (("loose", 17, 29), ("strict", 26, 20)):
        test_0, test_1 = (build_splits(rows, mode, train_size, test_size, seed=seed)[1] for seed in (0, 1))
        assert {item["pair_id"] for item in test_0} != {item["pair_id"] for item in test_1}


def test_source_too_small_is_a_clear_error():
    with pytest.raises(DataError, match=r"23 pairs = 46 items .*train_size \+ test_size = 30 \+ 17"):
        build_splits(rewardbench_rows(), "loose", 30, 17)
    # strict units are whole prompts (2 or 4 items): an odd test size cannot be met exactly
    with pytest.raises(DataError, match=r"test split could be filled with only 20 of test_size=21 items"):
        build_splits(rewardbench_rows(), "strict", 10, 21)
    with pytest.raises(ValueError, match="mode must be 'strict' or 'loose'"):
        build_splits(rewardbench_rows(), "tight", 10, 10)


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def test_jsonl_json_and_parquet_load_the_same_rows(tmp_path):
    rows = rewardbench_rows()
    jsonl = write_rows(tmp_path / "rb.jsonl", rows)
    (tmp_path / "rb.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    for path in (jsonl, tmp_path / "rb.json", tmp_path / "rb.parquet"):
        assert load_rewardbench(str(path)) == rows


@pytest.mark.parametrize(
    "bad_row, words",
    [
        ({"prompt": "p", "chosen": "c", "subset": "s", "id": 9}, ["missing field 'rejected'"]),
        ({"prompt": "p", "chosen": ["c"], "rejected": "r", "subset": "s", "id": 9}, ["'chosen' must be a string", "list"]),
        ({"prompt": "  ", "chosen": "c", "rejected": "r", "subset": "s", "id": 9}, ["'prompt' is empty"]),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "id": 9}, ["missing field 'subset'"]),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "subset": "s", "id": 0}, ["'id' is 0", "line 1"]),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, bad_row, words):
    path = write_rows(tmp_path / "rb.jsonl", rewardbench_rows()[:2] + [bad_row])
    with pytest.raises(DataError) as error:
        load_rewardbench(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} line 3: ")
    for word in words:
        assert word in message


def test_bad_json_line_and_missing_file(tmp_path):
    path = tmp_path / "rb.jsonl"
    path.write_text(json.dumps(rewardbench_rows()[0]) + "\n" + '{"prompt": "p", "chosen"\n')
    with pytest.raises(DataError, match=rf"^{path} line 2: not valid JSON"):
        load_rewardbench(str(path))
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_rewardbench(str(tmp_path / "nope.jsonl"))


def test_hub_id_reads_the_filtered_split(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return rewardbench_rows()[:2] + [{"prompt": "p", "chosen": "c", "rejected": None, "subset": "s", "id": 7}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"^hub dataset allenai/reward-bench \(split filtered\) row 3: field 'rejected'"):
        load_rewardbench("allenai/reward-bench")
    assert calls == [("allenai/reward-bench", "filtered")]


# --------------------------------------------------------------------------------------------------
# Command line, read back by eval.py
# --------------------------------------------------------------------------------------------------


def test_cli_writes_splits_that_eval_reads(tmp_path):
    source = write_rows(tmp_path / "rb.jsonl", rewardbench_rows())
    out = tmp_path / "judge"
    proc = subprocess.run([sys.executable, "-m", "utils.judge_data", "--source", str(source), "--mode", "strict",
                           "--out", str(out), "--train_size", "26", "--test_size", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert (train, test) == build_splits(rewardbench_rows(), "strict", 26, 20, seed=0)
    assert list(test[0]) == ["question", "response_A", "response_B", "label", "subset", "id", "pair_id"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "strict" and manifest["seed"] == 0
    assert manifest["subset_counts"]["test"] == {"chat": 8, "code": 4, "math": 4, "safety": 4}

    # eval.py --task judge: the whole file is one benchmark named after it, or one per subset with --dataset_field
    questions = ev.load_questions(ev.Args(task="judge", datasets=(str(out / "test.jsonl"),)))
    assert [(q["benchmark"], q["question"], q["answer"]) for q in questions] == [
        ("test", item["question"], item["label"][0]) for item in test]
    by_subset = ev.load_questions(ev.Args(task="judge", datasets=(str(out / "test.jsonl"),), dataset_field="subset"))
    assert Counter(q["benchmark"] for q in by_subset) == {"chat": 8, "code": 4, "math": 4, "safety": 4}


def test_cli_too_small_exits_with_the_sizes(tmp_path):
    source = write_rows(tmp_path / "rb.jsonl", rewardbench_rows())
    proc = subprocess.run([sys.executable, "-m", "utils.judge_data", "--source", str(source), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "46 items" in proc.stderr and "5000 + 970" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_items_and_judgebench_share_the_fields_eval_reads(tmp_path):
    if not JUDGEBENCH.exists():
        pytest.skip(f"{JUDGEBENCH} not present")
    ours = tmp_path / "rewardbench970.jsonl"
    write_jsonl(ours, build_splits(rewardbench_rows(), "loose", 17, 29)[1])
    questions = ev.load_questions(ev.Args(task="judge", datasets=(str(ours), str(JUDGEBENCH))))
    assert Counter(q["benchmark"] for q in questions) == {"rewardbench970": 29, "judgebench_gpt4o": 350}
    assert all(set(q) == {"benchmark", "index", "question", "answer", "response_A", "response_B"} for q in questions)
