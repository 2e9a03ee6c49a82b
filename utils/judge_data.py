"""RewardBench as pair ranking: the training and test data of ReMA's LLM-as-a-Judge task (paper Tables 1b and 2).

RewardBench (``allenai/reward-bench``, split ``filtered``, 2985 rows) holds preference pairs
``{prompt, chosen, rejected, chosen_model, rejected_model, subset, id}``. The judge task asks for the better of two
responses, so every pair becomes two *items*, one per order (spec §5: 5000 + 970 = 5970 = 2 x 2985):

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

Command line (writes ``train.jsonl`` and ``test.jsonl``, one item per line, and ``manifest.json`` with the
arguments and the items per subset of each split)::

    python -m utils.judge_data --source allenai/reward-bench --mode strict --out data/judge_strict
    python eval.py --task judge --datasets data/judge_strict/test.jsonl --dataset_field subset   # per-subset accuracy
"""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from utils.data import DataError

__all__ = ["build_splits", "load_rewardbench", "pair_items", "write_jsonl"]

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
    a file of pair-ranking items."""
    path = Path(source).expanduser()
    if not path.exists():
        return True
    first = next(_read_file(path), None)
    return first is not None and isinstance(first[1], dict) and "chosen" in first[1]


def load_judge_examples(source: str, split: str, *, limit: int | None = None, mode: Literal["strict", "loose"] = "strict",
                        train_size: int = 5000, test_size: int = 970, seed: int = 0) -> list[dict]:
    """Pair-ranking rows for training or evaluating a judge, each with "answer" = the right verdict ("A" / "B").

    source: a file of items (a split written by this module's command line, or JudgeBench), read whole (`split` is
    ignored); or RewardBench itself (a hub id, or a file with RewardBench's columns), split here by
    :func:`build_splits` with `mode`, the sizes and `seed`, of which `split` ("train" or "test") is returned.
    Problems raise DataError naming the file, the line and the field."""
    if is_rewardbench(source):
        if split not in ("train", "test"):
            raise DataError(f"{source}: RewardBench is split here into 'train' and 'test'; got split {split!r}.")
        train, test = build_splits(load_rewardbench(source), mode, train_size, test_size, seed)
        items = [_check_item(item, f"{source} ({mode} split, {split} item {i})")
                 for i, item in enumerate(train if split == "train" else test, start=1)]
    else:
        items = [_check_item(item, where) for where, item in _read_file(Path(source).expanduser())]
    if not items:
        raise DataError(f"{source}: no rows found. Pass a source with data.")
    return items[:limit] if limit else items


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
    seed: int = 0
    """seed of the draw: the same source and seed give the same files"""


def main(args: Args) -> None:
    rows = load_rewardbench(args.source)
    train, test = build_splits(rows, args.mode, args.train_size, args.test_size, args.seed)
    out = Path(args.out or f"data/judge_{args.mode}")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    counts = {name: dict(sorted(Counter(item["subset"] for item in split).items()))
              for name, split in (("train", train), ("test", test))}
    (out / "manifest.json").write_text(json.dumps(asdict(args) | {"subset_counts": counts}, indent=2) + "\n")
    for name, split in (("train", train), ("test", test)):
        print(f"{out / name}.jsonl: {len(split)} items, per subset {counts[name]}")


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except ValueError as error:  # DataError or a bad size: say what to fix, without a traceback
        raise SystemExit(f"utils/judge_data.py: {error}")
