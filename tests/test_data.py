"""Tests for utils/data.py: real files, file formats, validation errors, the arithmetic task, the hub path."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from utils.data import ArithmeticConfig, DataError, arithmetic_examples, load_examples

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data file {path} not present")
    return path


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count, fields",
    [
        ("math_train_lv3to5.jsonl", 8523, {"question", "answer", "subject", "level"}),
        ("math_benchmarks.jsonl", 3221, {"question", "answer", "dataset", "level", "type", "unit"}),
        ("math_train_mini133.jsonl", 133, {"question", "answer", "subject", "level"}),
    ],
)
def test_real_files_load(name, count, fields):
    rows = load_examples(str(_shared(name)))
    assert len(rows) == count
    for row in rows:
        assert set(row) == fields
        assert isinstance(row["question"], str) and row["question"].strip()
        assert isinstance(row["answer"], str)


def test_real_benchmarks_keep_extra_fields_and_nulls():
    rows = load_examples(str(_shared("math_benchmarks.jsonl")))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["dataset"]] = counts.get(row["dataset"], 0) + 1
    assert counts == {
        "MATH500": 500, "gsm8k": 1319, "aime24": 30, "amc23": 40,
        "gaokao2023en": 385, "minerva_math": 272, "olympiadbench": 675,
    }
    assert any(row["level"] is None for row in rows)  # nulls kept as is
    assert rows[0]["question"].startswith("Convert the point $(0,3)$")
    assert rows[0]["answer"] == "(3,\\frac{\\pi}{2})"


def test_limit_keeps_first_rows():
    path = _shared("math_train_mini133.jsonl")
    full = load_examples(str(path))
    assert load_examples(str(path), limit=5) == full[:5]
    assert len(load_examples(str(path), limit=10_000)) == 133
    with pytest.raises(DataError, match="limit"):
        load_examples(str(path), limit=0)


# --------------------------------------------------------------------------------------------------
# File formats and field names
# --------------------------------------------------------------------------------------------------

ROWS = [
    {"question": "What is 1 + 1?", "answer": "2", "level": 1},
    {"question": "What is 2 + 3?", "answer": 5, "level": None},
    {"question": "Half of 3?", "answer": 1.5, "level": 2},
]
EXPECTED = [
    {"question": "What is 1 + 1?", "answer": "2", "level": 1},
    {"question": "What is 2 + 3?", "answer": "5", "level": None},
    {"question": "Half of 3?", "answer": "1.5", "level": 2},
]


def test_jsonl_skips_blank_lines_and_converts_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n   \n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n\n")
    assert load_examples(str(path)) == EXPECTED


@pytest.mark.parametrize("shape", ["list", "data"])
def test_json_both_shapes(tmp_path, shape):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS if shape == "list" else {"data": ROWS, "version": 1}, indent=2))
    assert load_examples(str(path)) == EXPECTED


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"problem": ["What is 1 + 1?", "What is 4 * 4?"], "gold": [2, 16], "subject": ["a", "b"]})
    pq.write_table(table, path)
    rows = load_examples(str(path), question_field="problem", answer_field="gold")
    assert rows == [
        {"question": "What is 1 + 1?", "answer": "2", "subject": "a"},
        {"question": "What is 4 * 4?", "answer": "16", "subject": "b"},
    ]


def test_custom_field_names_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "P1", "solution": "S1", "question": "ignored?"}])
    rows = load_examples(str(path), question_field="problem", answer_field="solution")
    # the source fields become "question"/"answer"; the renamed keys are dropped
    assert rows == [{"question": "P1", "answer": "S1"}]


def test_split_is_ignored_for_files(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_examples(str(path), split="test") == EXPECTED


# --------------------------------------------------------------------------------------------------
# Validation errors: message names file, line/row and field
# --------------------------------------------------------------------------------------------------


def _error(source) -> str:
    with pytest.raises(DataError) as info:
        load_examples(str(source))
    return str(info.value)


def test_missing_question_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad_q.jsonl", [ROWS[0], ROWS[0], {"problem": "x", "answer": "1"}])
    msg = _error(path)
    assert "bad_q.jsonl" in msg and "line 3" in msg and "'question'" in msg
    assert "'problem'" in msg  # the fields the row does have
    assert "--question_field" in msg  # the fix


def test_missing_answer_field_with_custom_names(tmp_path):
    path = _write_jsonl(tmp_path / "bad_a.jsonl", [{"problem": "x", "solution": "1"}, {"problem": "y"}])
    with pytest.raises(DataError) as info:
        load_examples(str(path), question_field="problem", answer_field="solution")
    msg = str(info.value)
    assert "bad_a.jsonl" in msg and "line 2" in msg and "'solution'" in msg and "--answer_field" in msg


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n\n" + json.dumps({"question": "q"}) + "\n")
    msg = _error(path)
    assert "blank.jsonl" in msg and "line 4" in msg and "'answer'" in msg


@pytest.mark.parametrize("question", ["", "   \n\t"])
def test_empty_question(tmp_path, question):
    path = _write_jsonl(tmp_path / "empty_q.jsonl", [ROWS[0], {"question": question, "answer": "1"}])
    msg = _error(path)
    assert "empty_q.jsonl" in msg and "line 2" in msg and "'question'" in msg and "empty" in msg


def test_non_string_question(tmp_path):
    path = _write_jsonl(tmp_path / "int_q.jsonl", [{"question": 7, "answer": "1"}])
    msg = _error(path)
    assert "int_q.jsonl" in msg and "line 1" in msg and "'question'" in msg and "int" in msg


@pytest.mark.parametrize(
    "answer, type_name", [(None, "NoneType"), (True, "bool"), ([1, 2], "list"), ({"a": 1}, "dict")]
)
def test_bad_answer_types(tmp_path, answer, type_name):
    path = _write_jsonl(tmp_path / "bad_ans.jsonl", [ROWS[0], ROWS[0], {"question": "q", "answer": answer}])
    msg = _error(path)
    assert "bad_ans.jsonl" in msg and "line 3" in msg and "'answer'" in msg and type_name in msg


def test_non_finite_float_answer(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"question": "q", "answer": NaN}\n')  # Python's json accepts NaN
    msg = _error(path)
    assert "nan.jsonl" in msg and "line 1" in msg and "'answer'" in msg


def test_truncated_last_line(tmp_path):
    path = tmp_path / "trunc.jsonl"
    good = json.dumps(ROWS[0])
    path.write_text(good + "\n" + good + "\n" + good[: len(good) // 2])
    msg = _error(path)
    assert "trunc.jsonl" in msg and "line 3" in msg and "not valid JSON" in msg


@pytest.mark.parametrize("line", ['["q", "a"]', '"just a string"', "42"])
def test_jsonl_line_not_an_object(tmp_path, line):
    path = tmp_path / "notobj.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    msg = _error(path)
    assert "notobj.jsonl" in msg and "line 2" in msg and "object" in msg


def test_json_row_errors_name_the_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": [ROWS[0], {"question": "q", "answer": None}]}))
    msg = _error(path)
    assert "rows.json" in msg and "row 2" in msg and "'answer'" in msg and "NoneType" in msg


def test_json_wrong_shape_and_invalid(tmp_path):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps({"rows": ROWS}))
    msg = _error(path)
    assert "shape.json" in msg and '{"data": [...]}' in msg and "'rows'" in msg
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"question": "q",\n  "answer": }\n]')
    msg = _error(path)
    assert "broken.json" in msg and "line 3" in msg and "not valid JSON" in msg


def test_parquet_row_errors_name_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2", "q3"], "answer": ["1", None, "3"]}), path)
    msg = _error(path)
    assert "rows.parquet" in msg and "row 2" in msg and "'answer'" in msg and "NoneType" in msg
    path = tmp_path / "noq.parquet"
    pq.write_table(pa.table({"prompt": ["q1"], "answer": ["1"]}), path)
    msg = _error(path)
    assert "noq.parquet" in msg and "row 1" in msg and "'question'" in msg and "'prompt'" in msg


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg and "file extension" in msg and "owner/name" in msg
    msg = _error("./some/dir/without_ext")
    assert "without_ext" in msg and "not found" in msg and "path" in msg and "owner/name" in msg


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,1\n")
    msg = _error(path)
    assert "d.csv" in msg and ".csv" in msg
    for ext in (".jsonl", ".json", ".parquet"):
        assert ext in msg


def test_directory_source(tmp_path):
    msg = _error(tmp_path)
    assert "directory" in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    msg = _error(path)
    assert "empty.jsonl" in msg and "no rows" in msg


def test_empty_json_list(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert "no rows" in _error(path)


def test_unrecognised_source():
    msg = _error("not_a_thing")
    assert "not_a_thing" in msg and "arithmetic" in msg and "owner/name" in msg and ".jsonl" in msg


# --------------------------------------------------------------------------------------------------
# Arithmetic task
# --------------------------------------------------------------------------------------------------

_QUESTION = re.compile(r"^What is (\d+(?: [-+*] \d+)*)\?$")


def _independent_answer(question: str) -> int:
    match = _QUESTION.match(question)
    assert match, question
    return eval(match.group(1), {"__builtins__": {}})  # Python's own precedence, as an independent check


def test_arithmetic_default_rows():
    rows = load_examples("arithmetic")
    assert len(rows) == 300  # the defaults (a + b, 1..20) have only 400 questions; the test split takes 100
    test = load_examples("arithmetic", split="test")
    assert len(test) == 100
    for row in rows + test:
        assert set(row) == {"question", "answer", "dataset"}
        assert row["dataset"] == "arithmetic"
        assert row["answer"] == str(_independent_answer(row["question"]))
        a, b = (int(x) for x in re.findall(r"\d+", row["question"]))
        assert 1 <= a <= 20 and 1 <= b <= 20


def test_arithmetic_hand_checked():
    from utils.data import _evaluate

    assert _evaluate([7, 12], ["+"]) == 19
    assert _evaluate([7, 12, 3], ["+", "-"]) == 16
    assert _evaluate([2, 3, 4], ["+", "*"]) == 14
    assert _evaluate([2, 3, 4], ["*", "-"]) == 2
    assert _evaluate([10, 2, 3, 4], ["-", "*", "*"]) == -14
    assert _evaluate([5, 6, 2, 3], ["*", "-", "*"]) == 24
    # a space small enough to be covered entirely by test + train (9**3 * 2**2 = 2916 questions)
    cfg = ArithmeticConfig(max_operand=9, num_operands=3, operations="-*", train_size=5000, test_size=100)
    rows = arithmetic_examples(cfg, "train", 1) + arithmetic_examples(cfg, "test", 1)
    assert len(rows) == 2916
    by_question = {r["question"]: r["answer"] for r in rows}
    hand_checked = {
        "What is 2 - 3 * 4?": "-10",
        "What is 2 * 3 - 4?": "2",
        "What is 9 - 9 - 9?": "-9",
        "What is 8 * 9 * 7?": "504",
        "What is 1 - 1 * 1?": "0",
    }
    for question, answer in hand_checked.items():
        assert by_question[question] == answer


def test_arithmetic_precedence_three_operands_all_ops():
    cfg = ArithmeticConfig(max_operand=12, num_operands=3, operations="+-*", train_size=500, test_size=50)
    rows = arithmetic_examples(cfg, "train", 0) + arithmetic_examples(cfg, "test", 0)
    assert len(rows) == 550
    ops_seen = set()
    for row in rows:
        assert row["answer"] == str(_independent_answer(row["question"]))
        ops_seen.update(re.findall(r" ([-+*]) ", row["question"]))
        assert len(re.findall(r"\d+", row["question"])) == 3
    assert ops_seen == {"+", "-", "*"}
    # mixed precedence actually occurs: some row where left-to-right evaluation would differ
    assert any(re.search(r"\d+ [-+] \d+ \* \d+", row["question"]) for row in rows)


def test_arithmetic_disjoint_and_deterministic():
    cfg = ArithmeticConfig()
    train, test = arithmetic_examples(cfg, "train", 3), arithmetic_examples(cfg, "test", 3)
    train_q, test_q = [r["question"] for r in train], [r["question"] for r in test]
    assert len(set(train_q)) == len(train_q) and len(set(test_q)) == len(test_q)
    assert not set(train_q) & set(test_q)
    assert arithmetic_examples(cfg, "train", 3) == train
    assert load_examples("arithmetic", split="test", seed=3, arithmetic=cfg) == test
    other = arithmetic_examples(cfg, "test", 4)
    assert [r["question"] for r in other] != test_q
    # the test set does not depend on train_size
    bigger = ArithmeticConfig(train_size=5000, max_operand=100)
    smaller = ArithmeticConfig(train_size=10, max_operand=100)
    assert arithmetic_examples(bigger, "test", 0) == arithmetic_examples(smaller, "test", 0)


def test_arithmetic_size_cap_for_small_space():
    cfg = ArithmeticConfig(max_operand=20, num_operands=2, operations="+", train_size=1000, test_size=100)
    train, test = arithmetic_examples(cfg, "train", 0), arithmetic_examples(cfg, "test", 0)
    assert len(test) == 100 and len(train) == 300  # 20 * 20 = 400 distinct questions in all
    assert len({r["question"] for r in train + test}) == 400


def test_arithmetic_test_set_cannot_be_filled():
    cfg = ArithmeticConfig(max_operand=3, num_operands=2, operations="+", test_size=10)  # 9 questions
    with pytest.raises(DataError, match="test_size"):
        arithmetic_examples(cfg, "test", 0)
    with pytest.raises(DataError, match="test_size"):
        load_examples("arithmetic", split="train", arithmetic=cfg)


def test_arithmetic_bad_config_and_split():
    with pytest.raises(DataError, match="operations"):
        arithmetic_examples(ArithmeticConfig(operations="+/"), "train", 0)
    with pytest.raises(DataError, match="num_operands"):
        arithmetic_examples(ArithmeticConfig(num_operands=1), "train", 0)
    with pytest.raises(DataError, match="split"):
        arithmetic_examples(ArithmeticConfig(), "validation", 0)


# The "decomposition" setting of the ArithmeticConfig docstring, with room for many samples
BRACKETED = ArithmeticConfig(max_operand=9, num_operands=4, operations="+-*", parentheses=True, train_size=3000, test_size=300)


def _expression(question: str) -> str:
    assert question.startswith("What is ") and question.endswith("?"), question
    return question[len("What is "):-1]


@pytest.mark.parametrize("cfg", [BRACKETED, ArithmeticConfig(max_operand=30, num_operands=5, operations="-*", parentheses=True,
                                                              train_size=1000, test_size=100)])
def test_parentheses_evaluate_like_python(cfg):
    rows = arithmetic_examples(cfg, "train", 0) + arithmetic_examples(cfg, "test", 0)
    assert len(rows) == cfg.train_size + cfg.test_size
    for row in rows:
        assert re.fullmatch(r"[\d +\-*()]+", _expression(row["question"])), row
        assert row["answer"] == str(eval(_expression(row["question"]), {"__builtins__": {}})), row
        assert len(re.findall(r"\d+", row["question"])) == cfg.num_operands
    bracketed = [row["question"] for row in rows if "(" in row["question"]]
    assert 0.3 * len(rows) < len(bracketed) < len(rows)  # most questions have parentheses, some need none
    # the parentheses change the value (not decoration): read without them, many questions give another answer
    changed = [row for row in rows if "(" in row["question"]
               and eval(_expression(row["question"]).replace("(", "").replace(")", "")) != int(row["answer"])]
    assert len(changed) > 0.2 * len(bracketed)


def test_parentheses_hand_checked():
    from utils.data import _render, _tree, _value

    assert _render(("*", ("+", 7, 12), ("-", 3, 5))) == "(7 + 12) * (3 - 5)"
    assert _value(("*", ("+", 7, 12), ("-", 3, 5))) == -38
    assert _render(("-", 9, ("*", ("-", 4, 2), 3))) == "9 - (4 - 2) * 3"
    assert _render(("-", 9, ("-", 4, 2))) == "9 - (4 - 2)" and _render(("-", ("-", 9, 4), 2)) == "9 - 4 - 2"
    assert _render(("+", 1, ("+", 2, 3))) == "1 + (2 + 3)"  # the tree is shown even where the value is the same
    assert _render(("*", ("*", 2, 3), 4)) == "2 * 3 * 4" and _render(("+", ("*", 2, 3), 4)) == "2 * 3 + 4"
    assert _tree([10, 2, 3, 4], ["-", "*", "*"]) == ("-", 10, ("*", ("*", 2, 3), 4))  # the usual reading


def test_parentheses_distinct_exact_count_disjoint_deterministic():
    # 3**3 * 2**2 = 108 questions: the count stays exact with parentheses, so all of them are drawn
    small = ArithmeticConfig(max_operand=3, num_operands=3, operations="+-", parentheses=True, train_size=1000, test_size=8)
    train, test = arithmetic_examples(small, "train", 0), arithmetic_examples(small, "test", 0)
    assert (len(train), len(test)) == (100, 8)
    assert len({row["question"] for row in train + test}) == 108
    assert {row["question"].replace("(", "").replace(")", "") for row in train + test} == {
        row["question"] for row in arithmetic_examples(dataclasses.replace(small, parentheses=False), "train", 0)
        + arithmetic_examples(dataclasses.replace(small, parentheses=False), "test", 0)}
    train, test = arithmetic_examples(BRACKETED, "train", 0), arithmetic_examples(BRACKETED, "test", 0)
    train_q, test_q = [row["question"] for row in train], [row["question"] for row in test]
    assert len(set(train_q)) == len(train_q) and len(set(test_q)) == len(test_q) and not set(train_q) & set(test_q)
    assert arithmetic_examples(BRACKETED, "train", 0) == train
    # the bracketing belongs to the expression, whatever the seed and the split
    other = arithmetic_examples(BRACKETED, "train", 5) + arithmetic_examples(BRACKETED, "test", 5)
    by_flat = {q.replace("(", "").replace(")", ""): q for q in train_q + test_q}
    common = [row["question"] for row in other if row["question"].replace("(", "").replace(")", "") in by_flat]
    assert len(common) > 20  # about 3300 * 3300 / 177147 = 61 expected
    assert all(by_flat[q.replace("(", "").replace(")", "")] == q for q in common)


def test_parentheses_space_too_small_is_still_an_error():
    cfg = ArithmeticConfig(max_operand=2, num_operands=3, operations="+", parentheses=True, test_size=9)  # 8 questions
    with pytest.raises(DataError, match=r"only 8 distinct questions .*test_size=9"):
        arithmetic_examples(cfg, "test", 0)
    assert len(arithmetic_examples(dataclasses.replace(cfg, test_size=8), "test", 0)) == 8


def test_config_seed_fixes_the_draw():
    cfg = ArithmeticConfig(max_operand=50, seed=3)
    assert load_examples("arithmetic", split="test", arithmetic=cfg) == arithmetic_examples(cfg, "test", 3)
    assert load_examples("arithmetic", split="test", arithmetic=cfg, seed=4) == arithmetic_examples(cfg, "test", 4)
    assert load_examples("arithmetic", split="test") == arithmetic_examples(ArithmeticConfig(), "test", 0)
    with pytest.raises(DataError, match="seed must be an integer"):
        arithmetic_examples(ArithmeticConfig(seed="3"), "test", 0)
    with pytest.raises(DataError, match="parentheses must be True or False"):
        arithmetic_examples(ArithmeticConfig(parentheses="yes"), "test", 0)


def test_arithmetic_steps():
    from utils.data import arithmetic_steps

    assert arithmetic_steps("What is 12 + 30?") == ["12 + 30", "42"]
    assert arithmetic_steps("What is 7 + 12 * 3?") == ["7 + 12 * 3", "7 + 36", "43"]
    assert arithmetic_steps("What is (7 + 12) * (3 - 5)?") == ["(7 + 12) * (3 - 5)", "19 * (3 - 5)", "19 * (-2)", "-38"]
    assert arithmetic_steps("What is 2 - 2 * 3 - 8?") == ["2 - 2 * 3 - 8", "2 - 6 - 8", "(-4) - 8", "-12"]
    for row in arithmetic_examples(BRACKETED, "test", 0):
        steps = arithmetic_steps(row["question"])
        assert steps[0] == _expression(row["question"]) and steps[-1] == row["answer"]
        assert len(steps) == BRACKETED.num_operands  # one operation per step
        assert all(eval(step, {"__builtins__": {}}) == int(row["answer"]) for step in steps)
    for bad in ("What is 2 / 3?", "What is x + 1?", "What is 2 +?", "How much is 2 + 3?"):
        with pytest.raises(DataError, match="not a question of the arithmetic task"):
            arithmetic_steps(bad)


# --------------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------------


def test_hub_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as info:
        load_examples("openai/gsm8k:main")
    msg = str(info.value)
    assert "pip install datasets" in msg and "openai/gsm8k" in msg


def test_hub_with_fake_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "q1", "answer": 3, "extra": "x"}, {"question": "q2", "answer": "4", "extra": "y"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_examples("owner/name:cfg", split="test")
    assert calls == [("owner/name", "cfg", "test")]
    assert rows == [{"question": "q1", "answer": "3", "extra": "x"}, {"question": "q2", "answer": "4", "extra": "y"}]
    load_examples("owner/name")
    assert calls[-1] == ("owner/name", None, "train")


def test_hub_row_errors_and_load_failures(monkeypatch):
    def bad_rows(name, config=None, split=None):
        return [{"question": "q1", "answer": "1"}, {"prompt": "q2", "answer": "2"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=bad_rows))
    msg = _error("owner/name")
    assert "owner/name" in msg and "row 2" in msg and "'question'" in msg and "'prompt'" in msg

    def failing(name, config=None, split=None):
        raise FileNotFoundError("no such dataset")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    msg = _error("owner/missing")
    assert "owner/missing" in msg and "no such dataset" in msg


# --------------------------------------------------------------------------------------------------
# The reliability issue: each bad-data case stops the run before training, and the message names the
# file, the line and the fix
# --------------------------------------------------------------------------------------------------

GOOD = json.dumps(ROWS[0])


@pytest.mark.parametrize(
    "lines, line, fix",
    [
        ([GOOD, json.dumps({"problem": "q", "answer": "1"})], 2, "--question_field"),  # missing field
        ([GOOD, json.dumps({"question": "q"})], 2, "--answer_field"),
        ([GOOD, GOOD, json.dumps({"question": "  ", "answer": "1"})], 3, "Fix or remove the row"),  # empty question
        ([GOOD, json.dumps({"question": "q", "answer": [1, 2]})], 2, "Fix or remove the row"),  # non-string answer
        ([GOOD, json.dumps({"question": "q", "answer": {"value": 1}})], 2, "--answer_field"),
        ([GOOD, json.dumps({"question": "q", "answer": None})], 2, "Fix or remove the row"),
        ([GOOD, GOOD, GOOD[:20]], 3, "fix or delete that line"),  # truncated last line
    ],
    ids=["missing-question", "missing-answer", "empty-question", "list-answer", "dict-answer", "null-answer", "truncated"],
)
def test_bad_row_message_names_file_line_and_fix(tmp_path, lines, line, fix):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))  # the last line has no newline, as in a file cut off while being written
    msg = _error(path)
    assert str(path) in msg and f"line {line}:" in msg and fix in msg


def test_numeric_answers_are_converted_not_rejected(tmp_path):
    """Ints and floats are gold answers written without quotes (the loader calls str() on them); bools are not."""
    path = _write_jsonl(tmp_path / "nums.jsonl", [{"question": "q", "answer": a} for a in (-3, 10**30, 0.25)])
    assert [r["answer"] for r in load_examples(str(path))] == ["-3", "1" + "0" * 30, "0.25"]


def test_truncated_inside_a_multibyte_character_names_the_line(tmp_path):
    """Regression: a file cut inside a UTF-8 character was reported without a line ("not valid UTF-8 text")."""
    path = tmp_path / "cut.jsonl"
    row = json.dumps({"question": "Où est é ?", "answer": "1"}, ensure_ascii=False).encode()
    path.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + row[: row.index("é".encode()) + 1])  # half of "é"
    msg = _error(path)
    assert str(path) in msg and "line 3:" in msg and "UTF-8" in msg and "fix or delete that line" in msg


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n").encode() + '{"question": "Où?", "answer": "1"}\n'.encode("latin-1") + (GOOD + "\n").encode())
    msg = _error(path)
    assert str(path) in msg and "line 2:" in msg and "Save the file as UTF-8" in msg


@pytest.mark.parametrize(
    "line",
    ['{"question": "q", "answer": ' + "7" * 5000 + "}", "[" * 100_000],
    ids=["int-over-4300-digits", "deep-nesting"],
)
def test_json_python_cannot_hold_names_the_line(tmp_path, line):
    """Regression: json.loads raises ValueError / RecursionError (not JSONDecodeError) on these valid JSON lines;
    they escaped as a bare traceback without file or line."""
    path = tmp_path / "odd.jsonl"
    path.write_text(GOOD + "\n" + line + "\n")
    msg = _error(path)
    assert str(path) in msg and "line 2:" in msg and "Fix or delete that line" in msg
    path = tmp_path / "odd.json"
    path.write_text("[" + GOOD + ", " + line + "]")
    msg = _error(path)
    assert str(path) in msg and "Fix the file" in msg


@pytest.mark.parametrize("source", ["arithmetc", "gsm8k", "MATH"])
def test_unknown_dataset_name_lists_the_accepted_forms(source):
    msg = _error(source)
    assert repr(source) in msg and "'arithmetic'" in msg and "owner/name" in msg and ".jsonl" in msg


def test_unknown_hub_dataset_fails_fast_offline(tmp_path):
    """A hub-shaped name that does not exist, with the real `datasets` library and HF offline: a DataError in
    seconds, not a hang on the network. Run in a fresh process so that the offline settings surely apply."""
    pytest.importorskip("datasets")
    code = "from utils.data import load_examples; load_examples('nobody/no-such-dataset-rema')"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DataError" in proc.stderr
    assert "nobody/no-such-dataset-rema" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr and "local file" in proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("kind", ["truncated-file", "unknown-hub-dataset"])
def test_rema_single_stops_on_bad_data_before_training(tmp_path, kind):
    """End to end: the training script exits non-zero with the message on stderr, without a traceback, before
    any training step. main() loads the data right after parsing and validating the flags, before the model."""
    if kind == "truncated-file":
        source = tmp_path / "bad.jsonl"
        source.write_text(GOOD + "\n" + GOOD + "\n" + GOOD[:20])
        expected = [str(source), "line 3:", "fix or delete that line"]
    else:
        source = "nobody/no-such-dataset-rema"
        expected = [source, "HF_HUB_OFFLINE", "local file"]
    cmd = [sys.executable, str(ROOT / "rema_single.py"), "--train_dataset", str(source), "--output_dir", str(tmp_path / "runs"),
           "--exp_name", "bad"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "data error" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()  # no training step was logged


# ---- MATH from the hub (the single-turn paper presets' train set), on rows written here ----
def test_math_examples_take_the_problem_and_the_last_box_of_the_solution():
    from utils.data import math_examples

    rows = [{"problem": " What is $1+1$? ", "solution": "So $1+1=\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
            {"problem": "Half?", "solution": "First \\boxed{1}, then $\\boxed{\\frac{1}{2}}$.", "level": "Level 3",
             "type": "Prealgebra"}]
    assert math_examples(rows, "t") == [
        {"level": "Level 1", "type": "Algebra", "question": "What is $1+1$?", "answer": "2"},
        {"level": "Level 3", "type": "Prealgebra", "question": "Half?", "answer": "\\frac{1}{2}"}]
    with pytest.raises(DataError, match="t row 2: field 'solution' has no complete"):
        math_examples([rows[0], {"problem": "x", "solution": "no box here"}], "t")
    with pytest.raises(DataError, match="t row 1: field 'problem'"):
        math_examples([{"solution": "\\boxed{1}"}], "t")


def test_hendrycks_math_loads_the_seven_subjects_of_the_split(monkeypatch):
    import datasets

    from utils.data import MATH_HUB, MATH_SUBJECTS

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"problem": f"{config} {i}?", "solution": f"\\boxed{{{i}}}", "level": "Level 5", "type": config}
                for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_examples("hendrycks_math", split="train")
    assert calls == [(MATH_HUB, subject, "train") for subject in MATH_SUBJECTS]
    assert len(rows) == 14 and rows[0] == {"level": "Level 5", "type": "algebra", "question": "algebra 0?", "answer": "0"}
