"""Loading question/answer examples for training and evaluation.

Everything the training and evaluation scripts read goes through :func:`load_examples`, which returns a
list of plain dicts, each with at least

* ``"question"``: a non-empty ``str``;
* ``"answer"``: a ``str`` (the gold answer; numbers in the source are converted with ``str()``);

and every other field of the source row kept as is (for example ``"dataset"``, ``"level"``, ``"subject"``).
When ``question_field``/``answer_field`` name other columns (say ``"problem"``/``"solution"``), those
values are stored under ``"question"``/``"answer"`` and the original keys are dropped.

Three kinds of source are accepted:

1. ``"arithmetic"``: a built-in procedural task (``"What is 7 + 12 - 3?"`` -> ``"16"``, optionally with
   parentheses), see :class:`ArithmeticConfig` and :func:`arithmetic_examples`. Handy for smoke tests and
   learning checks. (``utils.judge_data.arithmetic_pairs`` turns it into a pair-ranking task for the judge.)
2. A local file: ``.jsonl`` (one JSON object per line, blank lines skipped), ``.json`` (a list of objects
   or ``{"data": [...]}``) or ``.parquet``.
3. A Hugging Face hub dataset id ``"owner/name"`` or ``"owner/name:config"``, loaded with
   ``datasets.load_dataset(name, config, split=split)``. The ``datasets`` library is imported only then.

Every row is validated before anything is returned, so a malformed row stops the run before training.
Problems raise :class:`DataError` (a ``ValueError``) whose message names the file, the line (``.jsonl``) or
row (``.json``, ``.parquet``, hub; 1-based) and the field, and says how to fix it.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import numbers
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["DataError", "ArithmeticConfig", "arithmetic_examples", "arithmetic_steps", "load_examples"]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")

# Extensions that make a missing source look like a file path rather than a hub id.
_DATA_FILE_EXTENSIONS = SUPPORTED_EXTENSIONS + (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx")

# "owner/name" or "owner/name:config", as on the Hugging Face hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+)?$")

_ACCEPTED_FORMS = (
    "  - 'arithmetic' (the built-in procedural task),\n"
    "  - 'hendrycks_math' (the MATH dataset from the hub, 7500 train / 5000 test problems: the paper's single-turn set),\n"
    f"  - a path to an existing local file ({', '.join(SUPPORTED_EXTENSIONS)}),\n"
    "  - a Hugging Face hub dataset id 'owner/name' or 'owner/name:config' (needs `pip install datasets`)."
)


class DataError(ValueError):
    """A data problem the user must fix. The message names the file, the line (1-based) and the field, and says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Arithmetic task
# --------------------------------------------------------------------------------------------------


@dataclass
class ArithmeticConfig:
    """The built-in arithmetic task: questions like ``"What is 7 + 12 - 3?"``.

    The space of distinct questions has ``max_operand ** num_operands * len(operations) ** (num_operands - 1)``
    elements. If it is smaller than ``test_size + train_size``, the test set is filled first and the train
    set gets all remaining questions (so it is shorter than ``train_size``); if even the test set cannot be
    filled, :func:`arithmetic_examples` raises :class:`DataError`.

    With ``parentheses=True`` every question gets one bracketing: a random binary tree over its operands, fixed
    by the question's index in the space, written with the parentheses the usual reading (``*`` first, then left
    to right) needs to give that tree: ``"What is (7 + 12) * (3 - 5)?"``, ``"What is 9 - (4 - 2) * 3?"``, and
    sometimes none. Parentheses never reorder operands or operators, so the count above stays exact.

    A setting where decomposing the question plausibly helps (a few steps, each easy):
    ``ArithmeticConfig(max_operand=9, num_operands=4, operations="+-*", parentheses=True)``.
    """

    max_operand: int = 20  # operands drawn from 1..max_operand   (difficulty knob)
    num_operands: int = 2  # a + b (2), a + b + c (3), ...        (difficulty knob)
    operations: str = "+"  # characters from "+-*", e.g. "+-"
    train_size: int = 1000
    test_size: int = 100
    parentheses: bool = False  # a random bracketing per question   (difficulty knob)
    seed: int = 0  # seed of the train/test draw: runs with other training seeds share one held-out set


_OPERATIONS = "+-*"


def _check_arithmetic_config(cfg: ArithmeticConfig) -> str:
    """Validate ``cfg``; return its operations without duplicates, in the order given."""
    problems = []
    if not _is_int(cfg.max_operand) or cfg.max_operand < 1:
        problems.append(f"max_operand must be an integer >= 1 (got {cfg.max_operand!r})")
    if not _is_int(cfg.num_operands) or cfg.num_operands < 2:
        problems.append(f"num_operands must be an integer >= 2 (got {cfg.num_operands!r})")
    ops = cfg.operations if isinstance(cfg.operations, str) else ""
    bad = sorted(set(ops) - set(_OPERATIONS))
    if not ops or bad:
        problems.append(f"operations must be a non-empty string of characters from {_OPERATIONS!r} (got {cfg.operations!r})")
    if not _is_int(cfg.train_size) or cfg.train_size < 0:
        problems.append(f"train_size must be an integer >= 0 (got {cfg.train_size!r})")
    if not _is_int(cfg.test_size) or cfg.test_size < 1:
        problems.append(f"test_size must be an integer >= 1 (got {cfg.test_size!r})")
    if not isinstance(cfg.parentheses, bool):
        problems.append(f"parentheses must be True or False (got {cfg.parentheses!r})")
    if not _is_int(cfg.seed):
        problems.append(f"seed must be an integer (got {cfg.seed!r})")
    if problems:
        raise DataError("invalid ArithmeticConfig: " + "; ".join(problems) + ".")
    return "".join(dict.fromkeys(ops))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _random_permutation(n: int, rng: random.Random) -> Iterator[int]:
    """Yield a uniformly random permutation of ``range(n)`` lazily (sparse Fisher-Yates).

    Memory and time are proportional to the number of items taken, not to ``n``, and the first ``k``
    items do not depend on how many more are taken later, so the test set does not change with train_size.
    """
    swapped: dict[int, int] = {}
    for i in range(n):
        j = rng.randrange(i, n)
        swapped[i], swapped[j] = swapped.get(j, j), swapped.get(i, i)
        yield swapped.pop(i)


def _decode(index: int, cfg: ArithmeticConfig, ops: str) -> tuple[list[int], list[str]]:
    """Map an index in ``range(space size)`` to (operands, operators), mixed radix."""
    operands, operators = [], []
    for _ in range(cfg.num_operands):
        index, r = divmod(index, cfg.max_operand)
        operands.append(r + 1)
    for _ in range(cfg.num_operands - 1):
        index, r = divmod(index, len(ops))
        operators.append(ops[r])
    return operands, operators


# An expression tree: a leaf is an int, a node is (operator, left, right).
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _tree(operands: list[int], operators: list[str], rng: random.Random | None = None):
    """The tree of ``a op b op c ...``. Without ``rng``: the usual reading, ``*`` before ``+`` and ``-``, left to
    right (the root is the last operator of the lowest precedence). With ``rng``: a random bracketing, the root
    operator drawn uniformly, then the same for each side."""
    if len(operands) == 1:
        return operands[0]
    if rng is None:
        lowest = min(_PRECEDENCE[op] for op in operators)
        k = max(k for k, op in enumerate(operators) if _PRECEDENCE[op] == lowest)
    else:
        k = rng.randrange(len(operators))
    return (operators[k], _tree(operands[: k + 1], operators[:k], rng), _tree(operands[k + 1 :], operators[k + 1 :], rng))


def _value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = _value(left), _value(right)
    return a + b if op == "+" else a - b if op == "-" else a * b


def _render(tree, top: bool = True) -> str:
    """The tree as text with only the parentheses the usual reading needs: around a left side that binds less
    tightly than its operator, and a right side that binds less or equally tightly (``9 - (4 - 2)``). A negative
    number inside an expression is bracketed too (``19 * (-2)``), as in a worked solution."""
    if isinstance(tree, int):
        return f"({tree})" if tree < 0 and not top else str(tree)
    op, left, right = tree
    a, b = _render(left, top=False), _render(right, top=False)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        a = f"({a})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        b = f"({b})"
    return f"{a} {op} {b}"


def _evaluate(operands: list[int], operators: list[str]) -> int:
    """Evaluate ``a op b op c ...`` with normal precedence: ``*`` before ``+`` and ``-``, left to right."""
    return _value(_tree(operands, operators))


def arithmetic_examples(cfg: ArithmeticConfig, split: str, seed: int) -> list[dict]:
    """Rows ``{"question": "What is 7 + 12?", "answer": "19", "dataset": "arithmetic"}`` of one split.

    Distinct expressions are drawn in a random order fixed by ``seed`` (and ``cfg``): the first
    ``test_size`` form the test split, the next ``train_size`` the train split, so the two are disjoint
    as question strings. If the space is too small, the train split holds all remaining expressions
    (fewer than ``train_size``); if the test split cannot be filled, :class:`DataError` is raised.
    Answers are integers written with ``str()`` and may be negative when ``"-"`` is among the operations.
    With ``cfg.parentheses`` each expression gets the bracketing of :class:`ArithmeticConfig`, drawn with a
    generator seeded by the expression's index (so it does not depend on ``seed`` or the split).
    The training scripts pass ``cfg.seed`` as ``seed``.
    """
    ops = _check_arithmetic_config(cfg)
    if split not in ("train", "test"):
        raise DataError(f"arithmetic: unknown split {split!r}; use 'train' or 'test'.")
    space = cfg.max_operand**cfg.num_operands * len(ops) ** (cfg.num_operands - 1)
    if space < cfg.test_size:
        raise DataError(
            f"arithmetic: only {space} distinct questions exist with max_operand={cfg.max_operand}, "
            f"num_operands={cfg.num_operands}, operations={ops!r}, fewer than test_size={cfg.test_size}. "
            "Lower test_size or raise max_operand / num_operands / add operations."
        )
    order = _random_permutation(space, random.Random(seed))
    if split == "test":
        indices = itertools.islice(order, cfg.test_size)
    else:
        indices = itertools.islice(order, cfg.test_size, cfg.test_size + cfg.train_size)
    rows = []
    for index in indices:
        operands, operators = _decode(index, cfg, ops)
        tree = _tree(operands, operators, random.Random(index) if cfg.parentheses else None)
        rows.append({"question": f"What is {_render(tree)}?", "answer": str(_value(tree)), "dataset": "arithmetic"})
    return rows


_AST_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _parse(expression: str, question: str):
    """The tree of an expression of the arithmetic task (read with Python's parser, which has the same precedence)."""

    def tree(node):
        if isinstance(node, ast.Constant) and _is_int(node.value):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPERATORS:
            return (_AST_OPERATORS[type(node.op)], tree(node.left), tree(node.right))
        raise DataError(f"{question!r} is not a question of the arithmetic task (integers, + - * and parentheses).")

    try:
        return tree(ast.parse(expression, mode="eval").body)
    except SyntaxError:
        raise DataError(f"{question!r} is not a question of the arithmetic task (integers, + - * and parentheses).") from None


def _reduce_once(tree):
    """The tree with one operation done: the leftmost one whose two sides are numbers."""
    op, left, right = tree
    if isinstance(left, int) and isinstance(right, int):
        return _value(tree)
    if not isinstance(left, int):
        return (op, _reduce_once(left), right)
    return (op, left, _reduce_once(right))


def arithmetic_steps(question: str) -> list[str]:
    """The worked solution of a question of the arithmetic task as a chain of expressions, one operation done per
    step (the leftmost one whose two sides are numbers), ending with the answer:
    ``"What is (7 + 12) * 3?"`` -> ``["(7 + 12) * 3", "19 * 3", "57"]``."""
    if not (question.startswith("What is ") and question.endswith("?")):
        raise DataError(f"{question!r} is not a question of the arithmetic task ('What is <expression>?').")
    steps = [_parse(question[len("What is ") : -1], question)]
    while not isinstance(steps[-1], int):
        steps.append(_reduce_once(steps[-1]))
    return [_render(step) for step in steps]


def arithmetic_conversations(cfg: ArithmeticConfig, split: str) -> list[dict]:
    """Multi-turn ReMA conversations that demonstrate the protocol on the arithmetic task, for `sft.py --datasets
    arithmetic`: two LlamaFactory "alpaca with history" rows per question (the meta-thinking agent's view, then the
    reasoning agent's; the shape of ../shared/data/multiturn_sft/), with the RL system prompts. Each turn does one
    step of `arithmetic_steps`: the MTA asks for the next operation, the RA does it; the MTA's last turn asks for the
    final answer and ends with [FINISH], and the RA's last turn boxes it. "What is (7 + 12) * 3?" gives

        MTA: Work out one operation of (7 + 12) * 3.            RA: (7 + 12) * 3 = 19 * 3.
        MTA: Now work out 19 * 3 and give the final answer. [FINISH]
        RA: 19 * 3 = 57. The answer is \\boxed{57}.

    so a conversation has as many turns as the question has operations."""
    from utils import prompts  # (prompts imports nothing of ours)

    rows = []
    for example in arithmetic_examples(cfg, split, cfg.seed):
        steps = arithmetic_steps(example["question"])
        meta, reas = [], []
        for i in range(len(steps) - 1):
            if i < len(steps) - 2:
                meta.append(f"Work out one operation of {steps[i]}.")
                reas.append(f"{steps[i]} = {steps[i + 1]}.")
            else:
                meta.append(f"Now work out {steps[i]} and give the final answer. {prompts.FINISH_FLAG}")
                reas.append(f"{steps[i]} = {steps[i + 1]}. The answer is \\boxed{{{steps[i + 1]}}}.")
        first = prompts.MULTITURN_REAS_FIRST_USER.format(question=example["question"], plan=meta[0])
        meta_users = [example["question"]] + reas[:-1]  # the MTA reads the RA's replies as user turns
        reas_users = [first] + meta[1:]  # the RA reads the MTA's later turns as user turns
        for system, users, replies in ((prompts.MULTITURN_META_SYSTEM, meta_users, meta),
                                       (prompts.MULTITURN_REAS_SYSTEM, reas_users, reas)):
            rows.append({"system": system, "history": [list(pair) for pair in zip(users[:-1], replies[:-1])],
                         "instruction": users[-1], "input": None, "output": replies[-1],
                         "question": users[-1], "answer": replies[-1]})
    return rows


# --------------------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------------------


def _field_flag(kind: str) -> str:
    return f"--{kind}_field <name> ({kind}_field=... in load_examples)"


def _clean_row(row: Any, where: str, question_field: str, answer_field: str) -> dict:
    """Validate one source row and return it with "question"/"answer" set. ``where`` is e.g. "a.jsonl line 3"."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (a row with fields), found {type(row).__name__}: {_short(row)}.")
    for kind, field in (("question", question_field), ("answer", answer_field)):
        if field not in row:
            raise DataError(
                f"{where}: missing {kind} field {field!r}; the row has fields {sorted(map(str, row))}. "
                f"Fix the row, or pass {_field_flag(kind)} to read the {kind} from another field."
            )

    question = row[question_field]
    if not isinstance(question, str):
        raise DataError(
            f"{where}: field {question_field!r} (the question) must be a string, found {type(question).__name__}: "
            f"{_short(question)}. Fix the row, or pass {_field_flag('question')} to use another field."
        )
    if not question.strip():
        raise DataError(f"{where}: field {question_field!r} (the question) is empty. Fix or remove the row.")

    answer = row[answer_field]
    if isinstance(answer, str):
        pass
    elif isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        if isinstance(answer, numbers.Integral):
            answer = str(int(answer))
        elif math.isfinite(answer):
            answer = str(float(answer))
        else:
            raise DataError(f"{where}: field {answer_field!r} (the answer) is {answer!r}, not a usable number. Fix or remove the row.")
    else:
        raise DataError(
            f"{where}: field {answer_field!r} (the answer) must be a string or a number, found "
            f"{type(answer).__name__}: {_short(answer)}. Fix or remove the row, or pass {_field_flag('answer')} "
            "to use another field."
        )

    out = {k: v for k, v in row.items() if k not in (question_field, answer_field)}
    out["question"] = question
    out["answer"] = answer
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean_rows(rows: Iterable[Any], label: str, unit: str, question_field: str, answer_field: str) -> list[dict]:
    """Validate rows numbered from 1 (``unit`` is "row"); ``label`` names the file or hub dataset."""
    return [_clean_row(row, f"{label} {unit} {i}", question_field, answer_field) for i, row in enumerate(rows, start=1)]


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------


def _load_jsonl(path: Path, question_field: str, answer_field: str) -> list[dict]:
    rows = []
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                fix = "Save the file as UTF-8."
                if not raw.endswith(b"\n"):  # a last line cut inside a multi-byte character
                    fix = "The line has no newline, so the file was probably cut off while being written: fix or delete that line."
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line). {fix}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); the line starts with {_short(line.strip(), 60)}. "
                    "Each line must hold one complete JSON object; a truncated last line usually means the file "
                    "was cut off while being written: fix or delete that line."
                ) from None
            except (ValueError, RecursionError) as e:  # valid JSON Python refuses: an integer over 4300 digits, deep nesting
                raise DataError(f"{where}: JSON that Python cannot read ({type(e).__name__}: {str(e)[:120]}). Fix or delete that line.") from None
            rows.append(_clean_row(row, where, question_field, answer_field))
    return rows


def _load_json(path: Path, question_field: str, answer_field: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}). Fix the file.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e}). Save the file as UTF-8.") from None
    except (ValueError, RecursionError) as e:  # valid JSON Python refuses: an integer over 4300 digits, deep nesting
        raise DataError(f"{path}: JSON that Python cannot read ({type(e).__name__}: {str(e)[:120]}). Fix the file.") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)[:10]}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f'{path}: expected a JSON list of objects or {{"data": [...]}}, found {found}. Convert the file to one of those shapes (or to .jsonl).')
    return _clean_rows(data, str(path), "row", question_field, answer_field)


def _load_parquet(path: Path, question_field: str, answer_field: str) -> list[dict]:
    import pyarrow.parquet as pq  # imported here so that importing this module stays light

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: could not read as Parquet ({type(e).__name__}: {e}). Check that the file is complete.") from None
    return _clean_rows(rows, str(path), "row", question_field, answer_field)


_LOADERS = {".jsonl": _load_jsonl, ".json": _load_json, ".parquet": _load_parquet}


def _load_file(path: Path, question_field: str, answer_field: str) -> list[dict]:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass a data file ({', '.join(SUPPORTED_EXTENSIONS)}).")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(
            f"{path}: unsupported file extension {path.suffix or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}. "
            "Convert the file to one of them."
        )
    return loader(path, question_field, answer_field)


# --------------------------------------------------------------------------------------------------
# Hugging Face hub
# --------------------------------------------------------------------------------------------------


def _load_hub(source: str, split: str, question_field: str, answer_field: str) -> list[dict]:
    name, _, config = source.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} looks like a Hugging Face hub dataset id, but the `datasets` library is not installed. "
            "Install it with `pip install datasets`, or download the data and pass a local "
            f"{'/'.join(SUPPORTED_EXTENSIONS)} file instead. (If you meant a local path: no file named {source!r} exists.)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # network, missing dataset/config/split, ...: all need the user to act
        raise DataError(
            f"hub dataset {name!r} (config {config or None!r}, split {split!r}): could not be loaded "
            f"({type(e).__name__}: {e}). Check the id, config and split, the network (or HF_HUB_OFFLINE and the "
            f"local cache), or pass a local file instead (no local file named {source!r} exists)."
        ) from e
    label = f"hub dataset {source} (split {split})"
    return _clean_rows(ds, label, "row", question_field, answer_field)


MATH_HUB = "EleutherAI/hendrycks_math"  # MATH (Hendrycks et al. 2021), one hub config per subject
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def math_examples(rows: Iterable[dict], label: str) -> list[dict]:
    """MATH rows {problem, solution, level, type} as examples: the problem is the question, the gold answer is the
    content of the solution's last \\boxed{} (MATH's convention); level and type are kept. A row without a problem or a
    boxed answer raises DataError naming it."""
    from utils.grading import extract_boxed

    out = []
    for i, row in enumerate(rows, start=1):
        where = f"{label} row {i}"
        problem, solution = row.get("problem"), row.get("solution")
        if not isinstance(problem, str) or not problem.strip():
            raise DataError(f"{where}: field 'problem' is missing or empty; a MATH row needs 'problem' and 'solution'.")
        answer = extract_boxed(solution) if isinstance(solution, str) else None
        if not answer or not answer.strip():
            raise DataError(f"{where}: field 'solution' has no complete \\boxed{{...}} answer to take as the gold answer.")
        extra = {k: v for k, v in row.items() if k not in ("problem", "solution")}
        out.append(extra | {"question": problem.strip(), "answer": answer.strip()})
    return out


def _load_math(split: str) -> list[dict]:
    """The MATH split `split` (train: 7500 problems, test: 5000) from the hub: the seven subject configs of
    EleutherAI/hendrycks_math, in subject order."""
    import datasets

    rows = []
    for subject in MATH_SUBJECTS:
        try:
            ds = datasets.load_dataset(MATH_HUB, subject, split=split)
        except Exception as e:  # network, missing split, ...: all need the user to act
            raise DataError(f"hub dataset {MATH_HUB} (config {subject!r}, split {split!r}): could not be loaded "
                            f"({type(e).__name__}: {e}). Check the network (or HF_HUB_OFFLINE and the local cache).") from e
        rows += math_examples(ds, f"hub dataset {MATH_HUB}:{subject} (split {split})")
    return rows


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """True when ``source`` cannot be a hub id: it has a data file extension or a path-like shape."""
    if Path(source).suffix.lower() in _DATA_FILE_EXTENSIONS:
        return True
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1


def load_examples(
    source: str,
    question_field: str = "question",
    answer_field: str = "answer",
    split: str = "train",
    limit: int | None = None,
    seed: int | None = None,
    arithmetic: ArithmeticConfig | None = None,
) -> list[dict]:
    """Rows as dicts with at least "question" (str) and "answer" (str); every other field of the row kept as is
    (e.g. "dataset", "level"). `source` is one of:
      - "hendrycks_math": MATH from the hub (`math_examples`: the problem, the last box of the solution), `split`
        "train" (7500) or "test" (5000).
      - "arithmetic": the built-in procedural task (see `ArithmeticConfig`); `split` "train" or "test"
        selects one of two DISJOINT sets; `seed` fixes which expressions go where (None: the config's
        `seed`); `arithmetic` is the config (default `ArithmeticConfig()`). The field names are ignored.
      - a local file: .jsonl, .json (a list of objects, or {"data": [...]}) or .parquet. `split` is ignored.
      - a Hugging Face hub dataset id, optionally "id:config" (loaded with datasets.load_dataset(id, config, split=split)).
    "arithmetic" wins over a local file of that name; an existing file wins over a hub id.
    Every row of the source is validated (even beyond `limit`); problems raise `DataError`.
    `limit` keeps the first `limit` rows (after loading; deterministic); None keeps all. `seed` only
    matters for "arithmetic"; rows of files and hub datasets keep their order.
    """
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise DataError(f"limit must be a positive integer or None (for all rows), got {limit!r}.")
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}. Accepted forms:\n{_ACCEPTED_FORMS}")

    path = Path(source).expanduser()
    if source == "arithmetic":
        arithmetic = arithmetic or ArithmeticConfig()
        rows = arithmetic_examples(arithmetic, split, arithmetic.seed if seed is None else seed)
        label = f"arithmetic (split {split})"
    elif source == "hendrycks_math":
        rows = _load_math(split)
        label = f"{MATH_HUB} (split {split})"
    elif path.exists():
        rows = _load_file(path, question_field, answer_field)
        label = str(path)
    elif _looks_like_path(source):
        reason = "has a file extension" if Path(source).suffix else "has a path shape"
        raise DataError(
            f"{source}: file not found (resolved to {path.resolve()}). It was taken for a file path because it {reason}; "
            "check the path (relative paths start from the current directory). "
            "Hugging Face hub dataset ids look like 'owner/name' or 'owner/name:config'."
        )
    elif _HUB_ID.match(source):
        rows = _load_hub(source, split, question_field, answer_field)
        label = f"hub dataset {source} (split {split})"
    else:
        raise DataError(
            f"{source!r}: not 'arithmetic', not an existing file (looked for {path.resolve()}), and not a hub "
            f"dataset id. Accepted forms:\n{_ACCEPTED_FORMS}"
        )

    if not rows:
        raise DataError(f"{label}: no rows found (the source is empty or holds only blank lines). Pass a source with data.")
    return rows if limit is None else rows[:limit]
