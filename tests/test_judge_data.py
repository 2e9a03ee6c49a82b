"""Tests for utils/judge_data.py: RewardBench pairs to pair-ranking items, the strict / loose balanced splits, row
validation, the hub path and the command line (read back by eval.py's judge loader); the one split definition and
its checks (the split leak); the built-in arithmetic pairs.

The synthetic table below has four subsets of unequal sizes, and two of them repeat prompts (two pairs per prompt),
as RewardBench does (alpacaeval-easy/-hard, mt-bench-*), so that the strict and loose splits differ. The split-leak
tests use a table of RewardBench's own shape (2985 pairs, 23 subsets), so that the default sizes 5000 / 970 apply."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import eval as ev
from utils.data import ArithmeticConfig, DataError, arithmetic_examples
from utils.judge_data import (SPLIT_SEED, Args, SplitSpec, arithmetic_pairs, build_splits, check_disjoint,
                              check_same_split, is_rewardbench, load_judge_examples, load_judge_train_eval,
                              load_rewardbench, main, pair_items, read_split_spec, write_jsonl)

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
    assert manifest["mode"] == "strict" and manifest["split_seed"] == 0  # the flag --seed is now --split_seed
    assert manifest["split"] == {"source": str(source.resolve()), "mode": "strict", "train_size": 26, "test_size": 20,
                                 "split_seed": SPLIT_SEED}
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
    assert all(set(q) == {"benchmark", "index", "question", "answer", "response_A", "response_B", "pair", "swap"}
               for q in questions)
    # the loose split holds both orders of most of its pairs, and of some only one (the other is a training item):
    # every item is judged as given, never swapped into a training item; JudgeBench gives each pair once: swapped too
    ours_q = [q for q in questions if q["benchmark"] == "rewardbench970"]
    assert not any(q["swap"] for q in ours_q) and all(q["swap"] for q in questions if q["benchmark"] == "judgebench_gpt4o")
    sizes = Counter(Counter(q["pair"] for q in ours_q).values())
    assert set(sizes) == {1, 2} and sizes[1] + 2 * sizes[2] == 29


# --------------------------------------------------------------------------------------------------
# One split definition: the split leak and its checks
# --------------------------------------------------------------------------------------------------

# RewardBench v1 "filtered": 23 subsets, 2985 pairs = 5970 items = 5000 + 970. As in RewardBench, alpacaeval-* ask
# the same prompts in three subsets, and mt-bench-* and math-prm ask each prompt twice (two pairs).
RB_SIZES = {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
            "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
            "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "refusals-dangerous": 100,
            "refusals-offensive": 100, "xstest-should-refuse": 154, "xstest-should-respond": 250, "donotanswer": 136,
            "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
            "math-prm": 447}


def rewardbench_like_rows() -> list[dict]:
    rows = []
    for subset, pairs in RB_SIZES.items():
        for k in range(pairs):
            if subset.startswith("alpacaeval"):
                prompt = f"alpacaeval prompt {k}"
            elif subset.startswith("mt-bench") or subset == "math-prm":
                prompt = f"{subset} prompt {k // 2}"
            else:
                prompt = f"{subset} prompt {k}"
            rows.append({"prompt": prompt, "chosen": f"{subset} good {k}", "rejected": f"{subset} bad {k}",
                         "subset": subset, "id": len(rows)})
    return rows


@pytest.fixture(scope="module")
def rewardbench_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rb") / "reward_bench.jsonl", rewardbench_like_rows())


def questions(items: list[dict]) -> set[str]:
    return {item["question"] for item in items}


def test_rewardbench_like_table_has_rewardbench_shape():
    rows = rewardbench_like_rows()
    assert (len(rows), len(RB_SIZES), 2 * len(rows)) == (2985, 23, 5000 + 970)
    assert len({row["prompt"] for row in rows}) < len(rows)  # some prompts are shared, within and across subsets


def test_the_leak_two_split_seeds_share_most_instructions(rewardbench_file):
    """The mechanism of the issue: training split RewardBench with its training --seed (1), the command line wrote
    test.jsonl with seed 0. Two draws of the same table share most instructions, and check_disjoint says so."""
    rows = load_rewardbench(str(rewardbench_file))
    train_seed_1 = build_splits(rows, "strict", seed=1)[0]
    test_seed_0 = build_splits(rows, "strict", seed=0)[1]
    shared = questions(train_seed_1) & questions(test_seed_0)
    leaked = [item for item in test_seed_0 if item["question"] in shared]
    print(f"\nstrict, train seed 1 vs test seed 0: {len(shared)} shared instructions, {len(leaked)} of 970 test items leak")
    assert len(shared) > 0 and len(leaked) > 0
    with pytest.raises(DataError, match=rf"shares {len(shared)} instruction\(s\) .*\({len(leaked)} of its 970 items\)"):
        check_disjoint(train_seed_1, test_seed_0, "strict", "train", "test")

    loose_train, loose_test = build_splits(rows, "loose", seed=1)[0], build_splits(rows, "loose", seed=0)[1]
    identical = triples(loose_train) & triples(loose_test)
    print(f"loose, train seed 1 vs test seed 0: {len(identical)} of 970 test items are training items")
    assert len(identical) > 0
    with pytest.raises(DataError, match=rf"shares {len(identical)} identical item\(s\)"):
        check_disjoint(loose_train, loose_test, "loose", "train", "test")


@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_readme_workflow_shares_nothing(rewardbench_file, tmp_path, mode):
    """The README's workflow: the command line with its defaults writes test.jsonl; a training run splits RewardBench
    itself, as the scripts do (split seed SPLIT_SEED, default sizes). No instruction (strict) / item (loose) is shared."""
    out = tmp_path / f"judge_{mode}"
    proc = subprocess.run([sys.executable, "-m", "utils.judge_data", "--source", str(rewardbench_file), "--mode", mode,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    test = load_judge_examples(str(out / "test.jsonl"), "test")
    train = load_judge_examples(str(rewardbench_file), "train", mode=mode, split_seed=SPLIT_SEED)
    assert (len(train), len(test)) == (5000, 970)
    if mode == "strict":
        assert len(questions(train) & questions(test)) == 0
    else:
        assert len(triples(train) & triples(test)) == 0
        assert questions(train) & questions(test)  # loose: prompts may sit on both sides
    assert read_split_spec(str(out / "test.jsonl")) == SplitSpec(str(rewardbench_file), mode, 5000, 970, SPLIT_SEED)
    # the training scripts' one call gives the same items, checked; the train.jsonl beside it works too
    assert load_judge_train_eval(str(rewardbench_file), str(out / "test.jsonl"), mode=mode) == (train, test)
    assert load_judge_train_eval(str(out / "train.jsonl"), str(out / "test.jsonl"), mode=mode) == (train, test)
    # the old mismatch (the training seed as split seed) is refused before any training, naming both splits
    with pytest.raises(DataError, match=rf"belongs to the {mode} split .*split seed 0.*this run uses the {mode} split "
                                        r".*split seed 1\b.*split_seed 1 vs 0"):
        load_judge_train_eval(str(rewardbench_file), str(out / "test.jsonl"), mode=mode, split_seed=1)


def test_check_disjoint_names_count_example_and_fix():
    def item(q, a="x", b="y"):
        return {"question": q, "response_A": a, "response_B": b, "label": "A>B"}

    train = [item("p1"), item("p2"), item("p3")]
    test = [item("p1", "other", "answers"), item("p2"), item("p2", "y", "x"), item("p9")]
    with pytest.raises(DataError) as error:
        check_disjoint(train, test, "strict", "the training set T", "the held-out set H")
    message = str(error.value)
    for words in ("the held-out set H shares 2 instruction(s) with the training set T", "(3 of its 4 items)",
                  "e.g. 'p1'", "test.jsonl written together with the training split", "--judge.split_seed"):
        assert words in message
    with pytest.raises(DataError, match=r"shares 1 identical item\(s\) .*\(1 of its 4 items\), e\.g\. \('p2', 'x', 'y'\)"):
        check_disjoint(train, test, "loose", "train", "test")
    check_disjoint(train, [item("p1", "other", "answers"), item("p2", "y", "x")], "loose", "train", "test")  # no raise
    check_disjoint(train, [item("p9")], "strict", "train", "test")
    with pytest.raises(ValueError, match="mode"):
        check_disjoint(train, test, "tight", "train", "test")


def test_split_spec_from_the_manifest_and_refused_mismatches(tmp_path):
    source = write_rows(tmp_path / "rb.jsonl", rewardbench_rows())
    main(Args(source=str(source), mode="strict", out=str(tmp_path / "s"), train_size=26, test_size=20))
    spec = read_split_spec(str(tmp_path / "s" / "test.jsonl"))
    assert spec == read_split_spec(str(tmp_path / "s" / "train.jsonl"))
    assert spec == SplitSpec(str(source.resolve()), "strict", 26, 20, SPLIT_SEED)
    assert spec == SplitSpec(str(source), "strict", 26, 20, 0)  # a relative or absolute path names one source
    assert spec.describe() == f"strict split of {source.resolve()} (26 train / 20 test items, split seed 0)"
    check_same_split(SplitSpec(str(source), "strict", 26, 20, 0), spec, "test.jsonl")  # the same split: no raise
    check_same_split(SplitSpec(str(source), "loose", 1, 1, 7), None, "judgebench.jsonl")  # nothing to compare
    for other, field in ((SplitSpec(str(source), "strict", 26, 20, 1), "split_seed 1 vs 0"),
                         (SplitSpec(str(source), "loose", 26, 20, 0), "mode 'loose' vs 'strict'"),
                         (SplitSpec(str(source), "strict", 30, 16, 0), "train_size 30 vs 26; test_size 16 vs 20"),
                         (SplitSpec("allenai/reward-bench", "strict", 26, 20, 0), "source 'allenai/reward-bench' vs")):
        with pytest.raises(DataError) as error:
            check_same_split(other, spec, "data/judge/test.jsonl")
        message = str(error.value)
        assert message.startswith(f"data/judge/test.jsonl belongs to the {spec.describe()}, but this run uses the "
                                  f"{other.describe()}")
        assert field in message and "python -m utils.judge_data" in message
    # a run whose split flags disagree with the file is refused before it trains
    with pytest.raises(DataError, match="train_size 30 vs 26"):
        load_judge_train_eval(str(source), str(tmp_path / "s" / "test.jsonl"), train_size=30, test_size=16)


def test_read_split_spec_other_files_old_and_damaged_manifests(tmp_path):
    write_jsonl(tmp_path / "j" / "test.jsonl", [{"question": "q", "response_A": "a", "response_B": "b", "label": "A>B"}])
    assert read_split_spec(str(tmp_path / "j" / "test.jsonl")) is None  # no manifest beside it
    assert read_split_spec("allenai/reward-bench") is None and read_split_spec("arithmetic") is None
    if JUDGEBENCH.exists():
        assert read_split_spec(str(JUDGEBENCH)) is None
    manifest = tmp_path / "j" / "manifest.json"
    manifest.write_text(json.dumps({"source": "allenai/reward-bench", "mode": "loose", "train_size": 5000,
                                    "test_size": 970, "seed": 3, "subset_counts": {}}))  # written before SplitSpec
    assert read_split_spec(str(tmp_path / "j" / "test.jsonl")) == SplitSpec("allenai/reward-bench", "loose", 5000, 970, 3)
    manifest.write_text('{"split": {"source": "x", "mode": "strict"}}')
    with pytest.raises(DataError, match=r"manifest.json: the split is missing or malformed \(fields train_size, test_size, split_seed\)"):
        read_split_spec(str(tmp_path / "j" / "test.jsonl"))
    manifest.write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        read_split_spec(str(tmp_path / "j" / "test.jsonl"))


def test_split_seed_and_its_former_name(tmp_path):
    source = str(write_rows(tmp_path / "rb.jsonl", rewardbench_rows()))
    sizes = dict(mode="loose", train_size=17, test_size=29)
    assert load_judge_examples(source, "test", **sizes) == load_judge_examples(source, "test", split_seed=SPLIT_SEED, **sizes)
    assert load_judge_examples(source, "test", seed=1, **sizes) == load_judge_examples(source, "test", split_seed=1, **sizes)
    assert load_judge_examples(source, "test", split_seed=1, **sizes) != load_judge_examples(source, "test", **sizes)
    with pytest.raises(ValueError, match="former name"):
        load_judge_examples(source, "test", seed=1, split_seed=0, **sizes)


def test_train_eval_needs_a_held_out_set_for_a_file_of_items(tmp_path):
    items = tmp_path / "items.jsonl"
    write_jsonl(items, [{"question": "q", "response_A": "a", "response_B": "b", "label": "A>B"}])
    with pytest.raises(DataError, match="is a file of items: pass a held-out source"):
        load_judge_train_eval(str(items))
    # a held-out file of another origin is still checked against the training items
    with pytest.raises(DataError, match=r"shares 1 instruction\(s\)"):
        load_judge_train_eval(str(items), str(items))


# --------------------------------------------------------------------------------------------------
# The built-in arithmetic pairs
# --------------------------------------------------------------------------------------------------

HARD = ArithmeticConfig(max_operand=9, num_operands=4, operations="+-*", parentheses=True, train_size=300, test_size=60)


def final_number(response: str) -> int:
    match = re.fullmatch(r"(?:.* = )?(-?\d+)(?:\. The answer is (-?\d+)\.)?", response)
    assert match, response
    assert match.group(2) is None or match.group(1) == match.group(2), response
    return int(match.group(1))


def test_arithmetic_pairs_shape_and_both_orders():
    cfg = ArithmeticConfig(train_size=40, test_size=10)
    questions_ = arithmetic_examples(cfg, "train", cfg.seed)
    items = arithmetic_pairs(cfg, "train")
    assert len(items) == 2 * len(questions_) == 80
    for n, (first, second) in enumerate(zip(items[::2], items[1::2])):
        assert list(first) == ["question", "response_A", "response_B", "label", "subset", "id", "pair_id", "answer"]
        assert first["question"] == second["question"] == questions_[n]["question"]
        assert (first["response_A"], first["response_B"]) == (second["response_B"], second["response_A"])
        assert (first["label"], first["answer"], second["label"], second["answer"]) == ("A>B", "A", "B>A", "B")
        assert first["subset"] == "arithmetic" and first["id"] == second["id"] == f"arithmetic-train-{n}"
        assert (first["pair_id"], second["pair_id"]) == (f"arithmetic-train-{n}:A>B", f"arithmetic-train-{n}:B>A")


@pytest.mark.parametrize("cfg", [ArithmeticConfig(train_size=50, test_size=20), HARD])
def test_arithmetic_pairs_exactly_one_right_response_and_the_label_names_it(cfg):
    for split in ("train", "test"):
        for item in arithmetic_pairs(cfg, split):
            truth = eval(item["question"][len("What is "):-1], {"__builtins__": {}})  # an independent evaluation
            right = [final_number(item[f"response_{side}"]) == truth for side in "AB"]
            assert right.count(True) == 1, item
            assert "AB"[right.index(True)] == item["answer"] == item["label"][0]


def test_arithmetic_pairs_worked_solutions_slip_only_in_the_last_step():
    for item in arithmetic_pairs(HARD, "test"):
        good, bad = (item["response_A"], item["response_B"]) if item["answer"] == "A" else (item["response_B"], item["response_A"])
        good_steps, bad_steps = good.split(". The answer")[0].split(" = "), bad.split(". The answer")[0].split(" = ")
        assert good_steps[0] == bad_steps[0] == item["question"][len("What is "):-1]
        assert good_steps[:-1] == bad_steps[:-1] and good_steps[-1] != bad_steps[-1]
        truth = int(good_steps[-1])
        assert all(eval(step, {"__builtins__": {}}) == truth for step in good_steps)  # every step keeps the value


def test_arithmetic_pairs_deterministic_disjoint_and_loaded_by_name():
    assert arithmetic_pairs(HARD, "train") == arithmetic_pairs(HARD, "train")
    train, test = arithmetic_pairs(HARD, "train"), arithmetic_pairs(HARD, "test")
    assert (len(train), len(test)) == (600, 120)
    assert not questions(train) & questions(test)
    check_disjoint(train, test, "strict", "train", "test")  # strict holds, so loose too
    assert not is_rewardbench("arithmetic")
    assert load_judge_examples("arithmetic", "test", arithmetic=HARD) == test
    assert load_judge_examples("arithmetic", "train", arithmetic=HARD, limit=5) == train[:5]
    assert load_judge_examples("arithmetic", "test")[0]["question"] == arithmetic_examples(ArithmeticConfig(), "test", 0)[0]["question"]
    assert load_judge_train_eval("arithmetic", arithmetic=HARD) == (train, test)
    # the config's seed moves the questions; the train/test draw is the arithmetic task's own
    other = arithmetic_pairs(dataclasses.replace(HARD, seed=1), "test")
    assert questions(other) != questions(test)
    with pytest.raises(DataError, match="split"):
        arithmetic_pairs(HARD, "validation")


def test_arithmetic_pairs_difficulty_knobs():
    cfg = ArithmeticConfig(train_size=200, test_size=20)
    right_and_wrong = {}
    for max_error in (1, 3, 50):
        gaps = []
        for item in arithmetic_pairs(cfg, "train", max_error=max_error)[::2]:  # the A>B order: A is right
            gaps.append(final_number(item["response_B"]) - final_number(item["response_A"]))
        assert all(0 < abs(gap) <= max_error for gap in gaps)
        right_and_wrong[max_error] = gaps
    assert set(right_and_wrong[1]) == {-1, 1}
    assert max(map(abs, right_and_wrong[50])) > 10  # a wider range is used, not just allowed
    bare = arithmetic_pairs(cfg, "test", worked=False)
    assert all(re.fullmatch(r"-?\d+", item[f"response_{side}"]) for item in bare for side in "AB")
    worked = arithmetic_pairs(cfg, "test")
    assert worked[0]["response_A"] == f"{worked[0]['question'][8:-1]} = {bare[0]['response_A']}. The answer is {bare[0]['response_A']}."
    for max_error in (0, -2, 1.5):
        with pytest.raises(DataError, match="max_error must be an integer >= 1"):
            arithmetic_pairs(cfg, "test", max_error=max_error)
