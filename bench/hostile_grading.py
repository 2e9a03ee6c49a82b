"""Time each adversarial case of tests/test_hostile.py through a Grader with training's 10 s limit, one call at a time.

    HF_HUB_OFFLINE=1 python bench/hostile_grading.py [--timeout 10] [--workers 1]

Columns: seconds for the grade call; the score; how it ended ("graded": math-verify answered, and a case near
5 s hit math-verify's own soft limit and scored 0; "error": math-verify raised, score 0; "hard timeout": the worker
was killed at the limit, score 0); "next call": seconds of the sane call made right after, which includes starting
a new worker when the case killed one.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_hostile import ADVERSARIAL_CASES  # noqa: E402
from utils.grading import Grader  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--timeout", type=float, default=10.0, help="hard limit per answer, seconds (training: 10)")
parser.add_argument("--workers", type=int, default=1, help="grading worker processes")
args = parser.parse_args()

with Grader(timeout=args.timeout, num_workers=args.workers) as grader:
    assert grader.grade([r"\boxed{18}"], ["18"]) == [1.0]
    print(f"{'case':32s} {'seconds':>8s} {'score':>6s}  {'outcome':13s} {'next call':>9s}")
    worst = ("", 0.0)
    for name, response, gold in ADVERSARIAL_CASES:
        timeouts, errors = grader.num_timeouts, grader.num_errors
        start = time.monotonic()
        [score] = grader.grade([response], [gold])
        seconds = time.monotonic() - start
        outcome = "hard timeout" if grader.num_timeouts > timeouts else "error" if grader.num_errors > errors else "graded"
        start = time.monotonic()
        assert grader.grade([r"\boxed{18}"], ["18"]) == [1.0], "the grader did not recover"
        recovery = time.monotonic() - start
        print(f"{name:32s} {seconds:8.2f} {score:6.1f}  {outcome:13s} {recovery:9.2f}", flush=True)
        worst = max(worst, (name, seconds), key=lambda x: x[1])
print(f"worst case: {worst[1]:.2f} s ({worst[0]}); hard limit {args.timeout} s")
