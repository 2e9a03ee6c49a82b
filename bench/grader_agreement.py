"""Agreement of each grader with the hand-labelled cases of tests/data/grading_cases.jsonl.

    HF_HUB_OFFLINE=1 python bench/grader_agreement.py [--workers 2] [--out docs/bench/grader_agreement.txt]

For each mode of utils.grading.GRADERS: the cases whose score equals their label (count and %), the false
positives (label 0, scored 1: a reward hack in RL) and false negatives (label 1, scored 0) per kind of case,
then every disagreement with the final answer the rema grader reads from it. Prints the report and writes the
same text to --out. Takes about a minute on two busy CPU cores.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.grading import GRADERS, Grader, final_answer  # noqa: E402

CASES = ROOT / "tests" / "data" / "grading_cases.jsonl"


def load_cases(path: Path = CASES) -> list[dict]:
    """The labelled cases: dicts with response, gold, label (0/1), kind and an optional note."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report(cases: list[dict], scores: dict[str, list[float]]) -> str:
    """The agreement table, the errors per kind, and the list of disagreements, for each mode in ``scores``."""
    n = len(cases)
    lines = [f"{n} labelled cases ({sum(c['label'] for c in cases)} correct, "
             f"{sum(1 - c['label'] for c in cases)} wrong) from {CASES.relative_to(ROOT)}", "",
             f"{'grader':10s} {'agree':>7s} {'%':>7s} {'false pos':>10s} {'false neg':>10s}"]
    errors = {}
    for mode, mode_scores in scores.items():
        fp = [c for c, s in zip(cases, mode_scores) if c["label"] == 0 and s == 1.0]
        fn = [c for c, s in zip(cases, mode_scores) if c["label"] == 1 and s == 0.0]
        errors[mode] = (fp, fn)
        agree = n - len(fp) - len(fn)
        lines.append(f"{mode:10s} {agree:7d} {100 * agree / n:6.1f}% {len(fp):10d} {len(fn):10d}")
    kinds = sorted({c["kind"] for c in cases})
    lines += ["", "errors per kind, false positives / false negatives:",
              f"{'kind':24s} {'cases':>5s} " + " ".join(f"{mode:>10s}" for mode in scores)]
    for kind in kinds:
        row = [f"{sum(c['kind'] == kind for c in fp)} / {sum(c['kind'] == kind for c in fn)}"
               for fp, fn in errors.values()]
        lines.append(f"{kind:24s} {sum(c['kind'] == kind for c in cases):5d} " + " ".join(f"{r:>10s}" for r in row))
    for mode, (fp, fn) in errors.items():
        for name, wrong in (("false positives", fp), ("false negatives", fn)):
            lines += ["", f"{mode}: {len(wrong)} {name} (kind | response | gold | rema's final answer)"]
            for c in wrong:
                answer = final_answer(c["response"])
                lines.append(f"  {c['kind']:22s} | {c['response'][-70:]!r} | {c['gold'][:30]!r} | {answer!r}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="grading worker processes per grader")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "grader_agreement.txt",
                        help="where to write the report")
    args = parser.parse_args()
    cases = load_cases()
    scores = {}
    for mode in GRADERS:
        with Grader(timeout=10.0, num_workers=args.workers, mode=mode) as grader:
            scores[mode] = grader.grade([c["response"] for c in cases], [c["gold"] for c in cases])
    text = report(cases, scores)
    print(text, end="")
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
