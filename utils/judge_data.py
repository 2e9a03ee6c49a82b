"""RewardBench as pair ranking: the training and test data of ReMA's LLM-as-a-Judge task (paper Tables 1b and 2).

RewardBench (``allenai/reward-bench``, split ``filtered``, 2985 rows) holds preference pairs
``{prompt, chosen, rejected, chosen_model, rejected_model, subset, id}``. The judge task asks for the better of two
responses, so every pair becomes two *items*, one per order (the paper's 5000 + 970 = 5970 = 2 x 2985):

    {"question": prompt, "response_A": chosen,   "response_B": rejected, "label": "A>B", "subset", "id", "pair_id": "<id>:A>B"}
    {"question": prompt, "response_A": rejected, "response_B": chosen,   "label": "B>A", "subset", "id", "pair_id": "<id>:B>A"}

``id`` is the RewardBench row's id; ``pair_id`` names the item. This is the shape ``eval.py --task judge`` reads
(``question``, ``response_A``, ``response_B``, ``label``) and the shape of JudgeBench, the out-of-distribution test
set (``../shared/data/judgebench_gpt4o.jsonl``), which needs no conversion.

The paper splits the items into 5000 train / 970 test ("RewardBench970") with every subset evenly represented, in
two ways (``mode``):

* ``"strict"`` (Table 1b): no instruction appears in both splits. All items with the same prompt text (both orders,
  every pair of that prompt, in any subset) form one *unit* that goes to one side as a whole.
* ``"loose"`` (Table 2): no identical item appears in both splits. A unit is the set of items with the same
  (question, response_A, response_B); usually one item, so the two orders of one pair, or two pairs with the same
  prompt, may land on different sides.

Balanced draw (:func:`build_splits`). The test split is drawn first, then the train split from the units left:

1. The units are shuffled once with ``seed``; each subset gets a queue of the units that hold its items, in that order.
2. Until the split holds its size: the subset with the fewest items drawn so far (ties: alphabetical order) that
   still has units queued takes its next unit. The unit is drawn whole if it fits in the room left, else it is
   skipped (it stays available for the other split). A subset whose queue is empty drops out.

This is round-robin over subsets in which the quota of a subset that runs out goes to the others. With one-item
units (loose mode) the result is an equal quota per subset: a subset gets all its items or ``q`` / ``q + 1`` of them,
where ``q`` is the same for all. With bigger units (strict mode: a prompt's items, at least 2) a subset can run
ahead of the others by the size of one unit, or more when its prompts also appear in other subsets. With the paper's
sizes the test split has about 970 / 23 = 42 items per subset and the train split takes all 5000 items left.

A split that cannot be filled (too few items, or in strict mode no combination of whole units that fits) raises
:class:`~utils.data.DataError` with the sizes available. Lower ``train_size`` / ``test_size`` then.

One split definition. A split is fixed by a :class:`SplitSpec` (source, mode, train_size, test_size, split_seed)
and drawn by :func:`rewardbench_split`, whichever path asks for it: the command line below, and a training run that
splits RewardBench itself (:func:`load_judge_examples`). The split seed defaults to :data:`SPLIT_SEED` everywhere and
is not the training seed, so a run and a ``test.jsonl`` written with the same mode and sizes hold the same split. Two
checks refuse the rest (:func:`load_judge_train_eval` runs both for the training scripts):

* :func:`check_same_split`: a split file's manifest names another split than the run uses (:func:`read_split_spec`);
* :func:`check_disjoint`: the training and held-out items share an instruction (strict) or an item (loose), whatever
  the files' origin. This is the check that counts; the first one only explains the cause earlier.

Command line (writes ``train.jsonl`` and ``test.jsonl``, one item per line, and ``manifest.json`` with the
arguments, the split spec under ``"split"`` and the items per subset of each split)::

    python -m utils.judge_data --source allenai/reward-bench --mode strict --out data/judge_strict
    python eval.py --task judge --datasets data/judge_strict/test.jsonl --dataset_field subset   # per-subset accuracy

A built-in pair-ranking task needs no hub: :func:`arithmetic_pairs` (source ``"arithmetic"``) pairs a right and a
wrong solution of every question of the arithmetic task (:mod:`utils.data`), in both orders.
"""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from utils.data import ArithmeticConfig, DataError, arithmetic_examples, arithmetic_steps

__all__ = ["SPLIT_SEED", "SplitSpec", "arithmetic_pairs", "build_splits", "check_disjoint", "check_same_split",
           "load_judge_examples", "load_judge_train_eval", "load_rewardbench", "pair_items", "read_split_spec",
           "rewardbench_split", "write_jsonl"]

SPLIT_SEED = 0
"""The default seed of the split draw, the same everywhere: the command line's ``--split_seed`` and the training
scripts' ``--judge.split_seed``. It is not the training seed: runs with other training seeds share one split."""

REQUIRED_FIELDS = ("prompt", "chosen", "rejected", "subset", "id")
FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------------------------------
# Loading RewardBench rows
# --------------------------------------------------------------------------------------------------


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_row(row, where: str) -> None:
    """Raise DataError naming ``where`` (e.g. "rb.jsonl line 3") and the field if ``row`` is not a usable pair."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields {', '.join(REQUIRED_FIELDS)}, "
                        f"found {type(row).__name__}: {_short(row)}.")
    missing = [field for field in REQUIRED_FIELDS if field not in row]
    if missing:
        raise DataError(f"{where}: missing field {', '.join(map(repr, missing))}; the row has fields "
                        f"{sorted(map(str, row))}. RewardBench rows need {', '.join(REQUIRED_FIELDS)}: fix or remove the row.")
    for field in ("prompt", "chosen", "rejected", "subset"):
        if not isinstance(row[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, found {type(row[field]).__name__}: "
                            f"{_short(row[field])}. Fix or remove the row.")
    for field in ("prompt", "subset"):  # an empty response is a legitimate (bad) answer; an empty question is not
        if not row[field].strip():
            raise DataError(f"{where}: field {field!r} is empty. Fix or remove the row.")
    if not isinstance(row["id"], (int, str)) or isinstance(row["id"], bool):
        raise DataError(f"{where}: field 'id' must be an integer or a string, found {type(row['id']).__name__}: "
                        f"{_short(row['id'])}. Fix or remove the row.")


def _read_file(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row of a local .jsonl / .json / .parquet file; ``where`` is its file and line/row."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                                    "Each line must hold one complete JSON object.") from None
                yield f"{path} line {lineno}", row
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}). Fix the file.") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, found {type(data).__name__}. Convert it (or use .jsonl).")
        for i, row in enumerate(data, start=1):
            yield f"{path} row {i}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path} row {i}", row
    else:
        raise DataError(f"{path}: unsupported file extension {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(FILE_EXTENSIONS)}.")


def _read_hub(source: str, split: str) -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row of a hub dataset, loaded with ``datasets.load_dataset(source, split=split)``."""
    import datasets  # imported only for hub sources: it is slow to import

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, unknown id or split, offline without a cache: all need the user to act
        raise DataError(f"hub dataset {source!r} (split {split!r}) could not be loaded ({type(e).__name__}: {e}). "
                        "Check the id and the network (or the local cache with HF_HUB_OFFLINE=1), or pass a local "
                        f"{'/'.join(FILE_EXTENSIONS)} file (no local file named {source!r} exists).") from e
    for i, row in enumerate(ds, start=1):
        yield f"hub dataset {source} (split {split}) row {i}", row


def load_rewardbench(source: str, split: str = "filtered") -> list[dict]:
    """RewardBench rows (dicts with at least prompt, chosen, rejected, subset, id; other fields kept) from ``source``:
    an existing local .jsonl / .json (a list) / .parquet file, or else a hub dataset id loaded with
    ``datasets.load_dataset(source, split=split)``. Every row is checked, and ids must be unique (they name the
    items); a problem raises DataError naming the file, the line (.jsonl) or row, and the field."""
    path = Path(source).expanduser()
    if path.exists():
        located = _read_file(path)
    elif path.suffix.lower() in FILE_EXTENSIONS:
        raise DataError(f"{source}: file not found (resolved to {path.resolve()}); check the path.")
    else:
        located = _read_hub(source, split)
    rows, first_seen = [], {}
    for where, row in located:
        _check_row(row, where)
        if row["id"] in first_seen:
            raise DataError(f"{where}: field 'id' is {row['id']!r}, already used at {first_seen[row['id']]}; ids must be unique.")
        first_seen[row["id"]] = where
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no rows found. Pass a source with data.")
    return rows


# --------------------------------------------------------------------------------------------------
# Pair-ranking items and the balanced splits
# --------------------------------------------------------------------------------------------------


def pair_items(rows: list[dict]) -> list[dict]:
    """Both orders of every pair, in row order: the chosen response as A (label "A>B"), then as B (label "B>A")."""
    items = []
    for row in rows:
        for label, a, b in (("A>B", row["chosen"], row["rejected"]), ("B>A", row["rejected"], row["chosen"])):
            items.append({"question": row["prompt"], "response_A": a, "response_B": b, "label": label,
                          "subset": row["subset"], "id": row["id"], "pair_id": f"{row['id']}:{label}"})
    return items


def _unit_key(item: dict, mode: str):
    """What must not appear in both splits: the prompt (strict) or the whole item (loose)."""
    return item["question"] if mode == "strict" else (item["question"], item["response_A"], item["response_B"])


def _units(items: list[dict], mode: str) -> list[list[int]]:
    """Indices of the items that share a :func:`_unit_key`, so they must stay on one side together."""
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(_unit_key(item, mode), []).append(i)
    return list(groups.values())


def _draw_balanced(units: list[list[int]], items: list[dict], size: int, rng: random.Random) -> set[int]:
    """Indices of whole units holding ``size`` items (fewer if no fit is found), drawn round-robin over subsets: the
    subset with the fewest items drawn so far (ties: alphabetical) takes its next unit (module docstring)."""
    order = list(range(len(units)))
    rng.shuffle(order)
    queues: dict[str, deque[int]] = {}
    for u in order:
        for subset in dict.fromkeys(items[i]["subset"] for i in units[u]):  # a prompt shared by subsets: several queues
            queues.setdefault(subset, deque()).append(u)
    drawn_per_subset: Counter[str] = Counter()
    drawn, total = set(), 0
    while total < size and queues:
        subset = min(queues, key=lambda s: (drawn_per_subset[s], s))
        u = queues[subset].popleft()
        if not queues[subset]:
            del queues[subset]
        if u in drawn or len(units[u]) > size - total:
            continue
        drawn.add(u)
        total += len(units[u])
        drawn_per_subset.update(items[i]["subset"] for i in units[u])
    return drawn


def build_splits(rows: list[dict], mode: Literal["strict", "loose"], train_size: int = 5000, test_size: int = 970,
                 seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) pair-ranking items of RewardBench ``rows`` (as from :func:`load_rewardbench`), each split in the
    rows' order. ``mode`` "strict": no prompt in both splits; "loose": no identical (question, response_A,
    response_B) in both. Subsets are balanced by the round-robin draw of the module docstring, test split first;
    the same rows and seed give the same splits. Raises DataError naming the sizes available when a split cannot be
    filled."""
    if mode not in ("strict", "loose"):
        raise ValueError(f"mode must be 'strict' or 'loose', got {mode!r}")
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be positive, got {train_size} and {test_size}")
    items = pair_items(rows)
    if train_size + test_size > len(items):
        raise DataError(f"the source has {len(rows)} pairs = {len(items)} items (both orders), fewer than "
                        f"train_size + test_size = {train_size} + {test_size}. Lower --train_size / --test_size.")
    rng = random.Random(seed)
    units = _units(items, mode)
    test_drawn = _draw_balanced(units, items, test_size, rng)
    left = [unit for u, unit in enumerate(units) if u not in test_drawn]
    train_drawn = _draw_balanced(left, items, train_size, rng)
    test = sorted(i for u in test_drawn for i in units[u])
    train = sorted(i for u in train_drawn for i in left[u])
    for name, split, size, pool in (("test", test, test_size, units), ("train", train, train_size, left)):
        if len(split) < size:
            raise DataError(f"the {name} split could be filled with only {len(split)} of {name}_size={size} items: "
                            f"{sum(map(len, pool))} items were left for it, in {len(pool)} units that must stay whole "
                            f"({mode} mode; the largest holds {max(map(len, pool))} items). Lower --{name}_size.")
    assert not {_unit_key(items[i], mode) for i in train} & {_unit_key(items[i], mode) for i in test}
    return [items[i] for i in train], [items[i] for i in test]


@dataclass(frozen=True)
class SplitSpec:
    """Everything that fixes a RewardBench split: the same rows and spec give the same items
    (:func:`rewardbench_split`). The command line writes it into manifest.json (:func:`read_split_spec`)."""

    source: str
    """hub dataset id, or a local file (stored as its absolute path, so that specs made anywhere compare equal)"""
    mode: str
    """"strict" or "loose" (:func:`build_splits`)"""
    train_size: int
    test_size: int
    split_seed: int

    def __post_init__(self):
        path = Path(self.source).expanduser()
        if path.exists():
            object.__setattr__(self, "source", str(path.resolve()))

    def describe(self) -> str:
        return (f"{self.mode} split of {self.source} ({self.train_size} train / {self.test_size} test items, "
                f"split seed {self.split_seed})")


def rewardbench_split(spec: SplitSpec) -> tuple[list[dict], list[dict]]:
    """(train, test) items of the split ``spec`` names: the one definition the command line and the training
    scripts share."""
    return build_splits(load_rewardbench(spec.source), spec.mode, spec.train_size, spec.test_size, spec.split_seed)


def read_split_spec(items_file: str) -> SplitSpec | None:
    """The split a ``train.jsonl`` / ``test.jsonl`` written by the command line belongs to, from the manifest.json
    beside it; None for any other source (JudgeBench, a hub id, "arithmetic"). A manifest of an older version (its
    seed under "seed") is read too; a damaged one raises DataError."""
    path = Path(items_file).expanduser()
    manifest = path.parent / "manifest.json"
    if path.name not in ("train.jsonl", "test.jsonl") or not path.is_file() or not manifest.is_file():
        return None
    fix = f"Rewrite the split with `python -m utils.judge_data --out {path.parent}`."
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{manifest}: not valid JSON ({e}). {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{manifest}: expected a JSON object, found {type(data).__name__}. {fix}")
    split = data.get("split") or {"source": data.get("source"), "mode": data.get("mode"), "train_size": data.get("train_size"),
                                  "test_size": data.get("test_size"), "split_seed": data.get("seed")}
    if not isinstance(split, dict):
        raise DataError(f"{manifest}: \"split\" must be an object, found {type(split).__name__}. {fix}")
    kinds = {"source": str, "mode": str, "train_size": int, "test_size": int, "split_seed": int}
    bad = [name for name, kind in kinds.items() if not isinstance(split.get(name), kind) or isinstance(split.get(name), bool)]
    if bad or split["mode"] not in ("strict", "loose"):
        raise DataError(f"{manifest}: the split is missing or malformed (fields {', '.join(bad) or 'mode'}). {fix}")
    return SplitSpec(**{name: split[name] for name in kinds})


def check_same_split(spec_a: SplitSpec, spec_b: SplitSpec | None, what: str) -> None:
    """Raise DataError naming both specs when ``spec_b`` (the split that ``what``, a split file, belongs to) is not
    ``spec_a`` (the split the run uses). None (a file the command line did not write): nothing to compare."""
    if spec_b is None or spec_b == spec_a:
        return
    differ = [f"{f.name} {getattr(spec_a, f.name)!r} vs {getattr(spec_b, f.name)!r}"
              for f in fields(SplitSpec) if getattr(spec_a, f.name) != getattr(spec_b, f.name)]
    raise DataError(
        f"{what} belongs to the {spec_b.describe()}, but this run uses the {spec_a.describe()} ({'; '.join(differ)}). "
        "Two different draws share most of their items, so the held-out items would be trained on. Use one split: "
        f"train with the file's settings (--judge.split_seed {spec_b.split_seed}, mode {spec_b.mode}, sizes "
        f"{spec_b.train_size} / {spec_b.test_size}) or on the train.jsonl written beside it, or rewrite the files with "
        f"`python -m utils.judge_data --source {spec_a.source} --mode {spec_a.mode} --train_size {spec_a.train_size} "
        f"--test_size {spec_a.test_size} --split_seed {spec_a.split_seed}`.")


def check_disjoint(train_items: list[dict], test_items: list[dict], mode: str, train_name: str, test_name: str) -> None:
    """Raise DataError when the test items share with the training items an instruction ("question"; mode "strict")
    or an identical (question, response_A, response_B) item (mode "loose"). The message gives the count, an example
    and the fix."""
    if mode not in ("strict", "loose"):
        raise ValueError(f"mode must be 'strict' or 'loose', got {mode!r}")
    seen = {_unit_key(item, mode) for item in train_items}
    leaked = [item for item in test_items if _unit_key(item, mode) in seen]
    if not leaked:
        return
    shared = dict.fromkeys(_unit_key(item, mode) for item in leaked)
    what = "instruction" if mode == "strict" else "identical item"
    raise DataError(
        f"{test_name} shares {len(shared)} {what}(s) with {train_name} ({len(leaked)} of its {len(test_items)} items), "
        f"e.g. {_short(next(iter(shared)))}; a {mode} split shares none. The two come from different splits: evaluate on "
        "the test.jsonl written together with the training split (`python -m utils.judge_data` writes both), or give "
        "the run the split of the test file (the same mode, sizes and --judge.split_seed).")


PAIR_FIELDS = ("question", "response_A", "response_B", "label")
LABELS = ("A>B", "B>A")


def _check_item(item, where: str) -> dict:
    """A pair-ranking item, checked, with "answer" set to the right verdict ("A" or "B")."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with fields {', '.join(PAIR_FIELDS)}, found {type(item).__name__}.")
    missing = [f for f in PAIR_FIELDS if f not in item]
    if missing:
        raise DataError(f"{where}: missing field {', '.join(map(repr, missing))}; the row has fields {sorted(map(str, item))}. "
                        f"Judge items need {', '.join(PAIR_FIELDS)} (RewardBench rows: prompt, chosen, rejected, subset, id).")
    for field in ("question", "response_A", "response_B"):
        if not isinstance(item[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, found {type(item[field]).__name__}: "
                            f"{_short(item[field])}. Fix or remove the row.")
    if not item["question"].strip():
        raise DataError(f"{where}: field 'question' is empty. Fix or remove the row.")
    if item["label"] not in LABELS:
        raise DataError(f"{where}: field 'label' must be 'A>B' or 'B>A', found {_short(item['label'])}. Fix the row.")
    return item | {"answer": item["label"][0]}


def is_rewardbench(source: str) -> bool:
    """True for RewardBench itself (a hub id, or a file whose first row has RewardBench's "chosen" column), False for
    a file of pair-ranking items or the built-in "arithmetic" task."""
    if source == "arithmetic":
        return False
    path = Path(source).expanduser()
    if not path.exists():
        return True
    first = next(_read_file(path), None)
    return first is not None and isinstance(first[1], dict) and "chosen" in first[1]


def arithmetic_pairs(cfg: ArithmeticConfig, split: str, *, max_error: int = 10, worked: bool = True) -> list[dict]:
    """Pair-ranking items of the built-in arithmetic task, in the shape :func:`load_judge_examples` returns.

    For every question of ``arithmetic_examples(cfg, split, cfg.seed)``: a right response and a wrong one whose
    result is off by a nonzero amount in [-max_error, max_error] (drawn by a generator seeded with the question, so
    fixed per question), each pair in both orders (:func:`pair_items`; subset "arithmetic", id
    "arithmetic-<split>-<n>"). ``worked=True``: each response is a worked solution, one operation per step
    (:func:`~utils.data.arithmetic_steps`), "12 + 30 = 42. The answer is 42."; the wrong one slips in its last step.
    ``worked=False``: just the number. Difficulty knobs: those of ``cfg`` (the questions), ``max_error`` (how close
    the wrong result is) and ``worked`` (False: the judge must work the answer out; True: it can check the steps).
    The train and test questions are disjoint, so a strict split holds."""
    if not isinstance(max_error, int) or isinstance(max_error, bool) or max_error < 1:
        raise DataError(f"arithmetic pairs: max_error must be an integer >= 1 (the wrong result differs), got {max_error!r}.")
    rows = []
    for n, example in enumerate(arithmetic_examples(cfg, split, cfg.seed)):
        steps = arithmetic_steps(example["question"])
        rng = random.Random(example["question"])
        slip = rng.randint(1, max_error) * rng.choice((-1, 1))
        wrong = steps[:-1] + [str(int(steps[-1]) + slip)]
        chosen, rejected = (f"{' = '.join(chain)}. The answer is {chain[-1]}." if worked else chain[-1]
                            for chain in (steps, wrong))
        rows.append({"prompt": example["question"], "chosen": chosen, "rejected": rejected, "subset": "arithmetic",
                     "id": f"arithmetic-{split}-{n}"})
    return [_check_item(item, f"arithmetic pairs ({split} item {i})") for i, item in enumerate(pair_items(rows), start=1)]


def format_demonstrations(items: list[dict], seed: int = 0, verdicts: Literal["random", "right"] = "random") -> list[dict]:
    """Rows for `sft.py --datasets arithmetic-judge` that teach the judge prompts' output format. The untrained
    SmolLM2-135M never writes a verdict (0 of 64 sampled VRP replies on arithmetic pairs), so RL alone gets no signal.
    Each prompt of every method (VRP, MRP, the MTA's plan, the RA following it) is answered with the question worked
    out (the right response's steps, "4 + 3 = 7") and then a verdict:
    - ``verdicts="random"``: drawn at random, right half the time. This teaches the format and not which response is
      right; choosing the response that agrees with the model's own working is left for RL to learn (measured: RL
      did not learn it in 4-15 steps, docs/results.md).
    - ``verdicts="right"``: the procedure, with the right verdict: each response's result listed with its letter,
      then the working, then the letter of the result it matches ("Answers: 28 from A, 38 from B. Working it out:
      18 + 10 = 28 from A. [[A]]"). Once the working is written the letter is a copy (the model's induction from
      "28 from" to what followed it before); how well the model works out questions it was not shown, and so
      judges them, is what RL can improve.
    (A first version answered with a neutral sentence and no working; RL then stayed at chance: docs/judge.md.)
    LlamaFactory "alpaca with history" rows, the shape sft.py reads."""
    from utils import prompts

    if verdicts not in ("random", "right"):
        raise ValueError(f"format_demonstrations: verdicts must be 'random' or 'right', got {verdicts!r}")
    rng = random.Random(seed)
    plan = "Work out the correct answer to the question yourself, then check which response gives it."

    def row(messages: list[dict], reply: str) -> dict:
        return {"system": messages[0]["content"], "history": [], "instruction": messages[1]["content"], "input": None,
                "output": reply, "question": messages[1]["content"], "answer": reply}

    rows = []
    for it in items:
        q, a, b = it["question"], it["response_A"], it["response_B"]
        work = (a if it["label"] == "A>B" else b).split(". The answer is")[0]  # "4 + 3 = 7"
        if verdicts == "random":  # "Working it out: 4 + 3 = 7. [[B]]"
            vrp, mrp, ra = (f"{work}. [[{rng.choice('AB')}]]" for _ in range(3))
            vrp = f"Working it out: {vrp}"
        else:  # "Answers: 7 from A, 9 from B. Working it out: 4 + 3 = 7 from A. [[A]]"
            right = it["label"][0]
            result_a, result_b = (r.split("The answer is ")[-1].rstrip(".") for r in (a, b))
            vrp = mrp = ra = (f"Answers: {result_a} from A, {result_b} from B. "
                              f"Working it out: {work} from {right}. [[{right}]]")
        rows += [row(prompts.judge_vrp_messages(q, a, b), vrp),
                 row(prompts.judge_mrp_messages(q, a, b), f"Plan: {plan} Following the plan: {mrp}"),
                 row(prompts.judge_meta_messages(q), plan),
                 row(prompts.judge_reas_messages(q, a, b, plan), f"Following the plan: {ra}")]
    return rows


def load_judge_examples(source: str, split: str, *, limit: int | None = None, mode: Literal["strict", "loose"] = "strict",
                        train_size: int = 5000, test_size: int = 970, split_seed: int | None = None,
                        seed: int | None = None, arithmetic: ArithmeticConfig | None = None,
                        max_error: int = 10) -> list[dict]:
    """Pair-ranking rows for training or evaluating a judge, each with "answer" = the right verdict ("A" / "B").

    source: a file of items (a split written by this module's command line, or JudgeBench), read whole (`split` is
    ignored); RewardBench itself (a hub id, or a file with RewardBench's columns), split here by
    :func:`rewardbench_split` with `mode`, the sizes and `split_seed` (None: :data:`SPLIT_SEED`), of which `split`
    ("train" or "test") is returned; or "arithmetic": :func:`arithmetic_pairs` of the config `arithmetic` (default
    ``ArithmeticConfig()``; its own sizes and seed apply) with `max_error`. `seed` is the former name of `split_seed`, kept for old
    callers. Problems raise DataError naming the file, the line and the field."""
    if seed is not None and split_seed is not None and seed != split_seed:
        raise ValueError(f"seed ({seed}) is the former name of split_seed ({split_seed}): pass split_seed only")
    if split_seed is None:
        split_seed = SPLIT_SEED if seed is None else seed
    if source == "arithmetic":
        items = arithmetic_pairs(arithmetic or ArithmeticConfig(), split, max_error=max_error)
    elif is_rewardbench(source):
        if split not in ("train", "test"):
            raise DataError(f"{source}: RewardBench is split here into 'train' and 'test'; got split {split!r}.")
        train, test = rewardbench_split(SplitSpec(source, mode, train_size, test_size, split_seed))
        items = [_check_item(item, f"{source} ({mode} split, {split} item {i})")
                 for i, item in enumerate(train if split == "train" else test, start=1)]
    else:
        items = [_check_item(item, where) for where, item in _read_file(Path(source).expanduser())]
    if not items:
        raise DataError(f"{source}: no rows found. Pass a source with data.")
    return items[:limit] if limit else items


def load_judge_train_eval(train_source: str, eval_source: str | None = None, *, mode: Literal["strict", "loose"] = "strict",
                          train_size: int = 5000, test_size: int = 970, split_seed: int = SPLIT_SEED,
                          eval_limit: int | None = None, arithmetic: ArithmeticConfig | None = None,
                          max_error: int = 10) -> tuple[list[dict], list[dict]]:
    """(train, held-out) items of a judge run, the split checked in one call (for the training scripts).

    The sources are those of :func:`load_judge_examples`; ``eval_source`` None means the test split of
    ``train_source`` (RewardBench or "arithmetic"; a file of items needs an ``eval_source``). The split of each side
    is the run's (mode, sizes, split_seed) when it is RewardBench split here, or read from a split file's manifest;
    the two must agree (:func:`check_same_split`), and the items must be disjoint in the split's mode
    (:func:`check_disjoint`; also for a held-out file of another origin, such as JudgeBench)."""
    if eval_source is None:
        if train_source != "arithmetic" and not is_rewardbench(train_source):
            raise DataError(f"{train_source} is a file of items: pass a held-out source with it (the test.jsonl written "
                            "beside it, or ../shared/data/judgebench_gpt4o.jsonl).")
        eval_source = train_source
    options = dict(mode=mode, train_size=train_size, test_size=test_size, split_seed=split_seed, arithmetic=arithmetic,
                   max_error=max_error)
    train = load_judge_examples(train_source, "train", **options)
    held_out = load_judge_examples(eval_source, "test", limit=eval_limit, **options)

    def spec_of(source: str) -> SplitSpec | None:
        if source == "arithmetic":
            return None
        if is_rewardbench(source):
            return SplitSpec(source, mode, train_size, test_size, split_seed)
        return read_split_spec(source)

    train_spec, eval_spec = spec_of(train_source), spec_of(eval_source)
    if train_spec is not None:
        check_same_split(train_spec, eval_spec, f"the held-out set {eval_source}")
    split_mode = train_spec.mode if train_spec else eval_spec.mode if eval_spec else mode
    check_disjoint(train, held_out, split_mode, f"the training set {train_source}", f"the held-out set {eval_source}")
    return train, held_out


def write_jsonl(path: str | Path, items: list[dict]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is), creating the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@dataclass
class Args:
    source: str = "allenai/reward-bench"
    """hub dataset id (its "filtered" split is read) or a local .jsonl/.json/.parquet file with RewardBench's columns"""
    mode: Literal["strict", "loose"] = "strict"
    """strict: no prompt in both splits (Table 1b); loose: no identical (question, A, B) item in both (Table 2)"""
    out: str | None = None
    """directory for train.jsonl, test.jsonl and manifest.json (None: data/judge_<mode>)"""
    train_size: int = 5000
    """items in the train split (paper: 5000)"""
    test_size: int = 970
    """items in the test split (paper: 970, "RewardBench970")"""
    split_seed: int = SPLIT_SEED
    """seed of the draw (not a training seed): the same source, mode, sizes and split seed give the same files.
    The training scripts' --judge.split_seed has the same default, so a run that splits RewardBench itself holds
    the same split"""


def main(args: Args) -> None:
    spec = SplitSpec(args.source, args.mode, args.train_size, args.test_size, args.split_seed)
    train, test = rewardbench_split(spec)
    out = Path(args.out or f"data/judge_{args.mode}")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    counts = {name: dict(sorted(Counter(item["subset"] for item in split).items()))
              for name, split in (("train", train), ("test", test))}
    manifest = asdict(args) | {"split": asdict(spec), "subset_counts": counts}  # "split": what read_split_spec reads
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for name, split in (("train", train), ("test", test)):
        print(f"{out / name}.jsonl: {len(split)} items, per subset {counts[name]}")


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except ValueError as error:  # DataError or a bad size: say what to fix, without a traceback
        raise SystemExit(f"utils/judge_data.py: {error}")
