r"""Tests for utils/grading.py: box extraction, math-verify semantics, and the worker-process plumbing.

Expected scores were checked by hand against math-verify 0.9.0. Where math-verify's answer is
surprising, the test asserts what it really does and says why: the grader must match the official ReMA
reward, not our taste.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from utils.grading import MAX_RESPONSE_CHARS, Grader, extract_boxed, has_boxed

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout=10.0, num_workers=2) as g:
        yield g


# ---- extract_boxed / has_boxed ----


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # nested braces kept
        (r"\boxed{1} then \boxed{2} finally \boxed{3}", "3"),  # the last of several
        (r"\boxed {x}", "x"),  # whitespace before the brace
        ("\\boxed\n{y}", "y"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not braces ...
        (r"\boxed{\left\{x\right.}", r"\left\{x\right."),  # ... even unmatched (piecewise functions)
        (r"\boxed{1} and then \boxed{2", "1"),  # unbalanced last box: previous complete one
        (r"\boxed{2", None),  # unbalanced only box
        ("no box here", None),
        ("", None),
        (r"\boxed{}", ""),
        (r"\boxed{\boxed{1}}", "1"),  # the box that starts last
        (r"\boxed{a} \boxed{ \boxed{b}", "b"),  # an unclosed box around a complete one
        (r"\boxedx{1}", None),  # not the \boxed command
        (r"\boxed{1}}}", "1"),  # stray closers after the box
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_many_unclosed_boxes():
    text = r"\boxed{" * 20_000  # a quadratic scan would take minutes
    start = time.monotonic()
    assert extract_boxed(text) is None
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"the answer is \boxed{3}", True),
        (r"\boxed {3}", True),
        (r"\boxed{", True),  # only the format is looked for, not a complete box
        (r"\fbox{3}", False),  # the format the prompts ask for is \boxed
        ("boxed{3}", False),
        ("the answer is 3", False),
        ("", False),
    ],
)
def test_has_boxed(text, expected):
    assert has_boxed(text) is expected


# ---- Grader: math-verify semantics ----

PI_PAIR = r"(3,\frac{\pi}{2})"

CASES = [
    # (response, gold, expected score)
    (r"\frac{1}{2}", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{25}", "025", 1.0),  # the spec's example: leading zeros do not matter
    ("The answer is 18", "18", 1.0),  # \boxed is not required
    ("The answer is 17", "18", 0.0),
    (r"\boxed{17}", "18", 0.0),
    ("", "18", 0.0),
    ("   ", "18", 0.0),
    (r"The final answer is $\boxed{18}$.", "18", 1.0),
    (r"\boxed{18.0}", "18", 1.0),
    (r"\boxed{\text{18}}", "18", 1.0),
    (r"\boxed{(3,\frac{\pi}{2})}", PI_PAIR, 1.0),
    (r"\boxed{(3, \pi/2)}", PI_PAIR, 1.0),
    (r"$(3, \frac{\pi}{2})$", PI_PAIR, 1.0),
    (r"\boxed{(\frac{\pi}{2},3)}", PI_PAIR, 0.0),  # tuples are ordered
    ("(3, pi/2)", PI_PAIR, 0.0),  # surprising: plain-text "pi" outside LaTeX is not extracted at all
    (r"\boxed{[1,3)}", "[1,3)", 1.0),
    (r"\boxed{(1,3)}", "[1,3)", 0.0),  # interval ends matter
    (r"\boxed{[1,3]}", "[1,3)", 0.0),
    (r"\boxed{3,2,1}", "1,2,3", 1.0),  # bare comma lists are compared as sets
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\frac{3}{4}}", r"\dfrac{3}{4}", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),  # thousands separator, not a list of two numbers
    (r"\boxed{1000}", "1,000", 1.0),
    ("The answer is 1,000", "1000", 1.0),
    (r"\boxed{1{,}000}", "1000", 1.0),
    (r"\boxed{x=5}", "5", 1.0),
    (r"\boxed{5}", "x=5", 1.0),
    (r"\boxed{10\%}", "10", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{p-q}", "p-q", 1.0),
    (r"\boxed{q-p}", "p-q", 0.0),
    (r"\boxed{C}", r"\text{(C)}", 1.0),
    (r"\boxed{0.333333}", r"\frac{1}{3}", 1.0),  # numbers are compared rounded to 6 decimals
    (r"\boxed{0.33}", r"\frac{1}{3}", 0.0),
    # Surprising, and a real cost for RL: several boxes are read as the SET of their contents, so
    # boxing an intermediate result and then the right final answer scores 0.
    (r"So \boxed{2}. Final: \boxed{18}.", "18", 0.0),
    (r"\boxed{18} \boxed{2}", "18", 0.0),
    (r"\boxed{18} \boxed{18}", "18", 1.0),  # the set {18}
    # Surprising: math-verify only looks for "\boxed{"; \fbox and "\boxed {" are not extracted.
    (r"\fbox{18}", "18", 0.0),
    (r"\boxed {18}", "18", 0.0),
    # Any exception inside math-verify scores 0: an empty gold raises ValueError("No gold targets").
    ("anything", "", 0.0),
    (r"\boxed{}", "", 0.0),
]


def test_grader_tricky_pairs(grader):
    responses, golds, expected = zip(*CASES)
    scores = grader.grade(list(responses), list(golds))
    wrong = [(r, g, e, s) for r, g, e, s in zip(responses, golds, expected, scores) if s != e]
    assert wrong == [], "(response, gold, expected, got)"


def test_grader_counts_math_verify_exceptions_as_errors():
    with Grader(timeout=10.0) as g:
        assert g.grade(["18", "18"], ["18", ""]) == [1.0, 0.0]
        assert (g.num_graded, g.num_errors, g.num_timeouts) == (2, 1, 0)


def test_grader_rejects_mismatched_inputs(grader):
    assert grader.grade([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        grader.grade(["1", "2"], ["1"])
    with pytest.raises(TypeError):
        grader.grade([None], ["1"])


def test_long_response_keeps_its_end(grader):
    filler = "x" * 100_000
    answer_at_end = filler + r" The answer is $\boxed{7}$."
    answer_at_start = r"\boxed{7} " + filler  # documented: cut off by the MAX_RESPONSE_CHARS guard
    assert len(answer_at_start) > MAX_RESPONSE_CHARS
    assert grader.grade([answer_at_end, answer_at_start], ["7", "7"]) == [1.0, 0.0]


def test_benchmark_golds_grade_themselves():
    """Every gold of the seven test sets, wrapped as \\boxed{gold}, graded against itself.

    Measured with math-verify 0.9.0: 3217 / 3221 = 99.88% score 1.0, in about 5 s with 2 workers, so
    all rows are graded. The 4 failures are the rows whose gold is the empty string (math-verify
    raises ValueError "No gold targets found"), so those problems can never be solved:
      line indices (0-based) 97 (MATH500), 1972, 2056, 2081 (gaokao2023en).
    Every other gold, including minerva's long physics formulas, matches itself.
    """
    path = DATA_DIR / "math_benchmarks.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    golds = [row["answer"] for row in rows]
    # A generous per-answer limit: this test is about math-verify, not about a busy machine.
    with Grader(timeout=30.0, num_workers=2) as g:
        scores = g.grade([r"\boxed{" + gold + "}" for gold in golds], golds)
        failed = [i for i, s in enumerate(scores) if s != 1.0]
        assert len(rows) == 3221
        assert sum(scores) >= 3217
        assert all(golds[i] == "" for i in failed), [(i, golds[i]) for i in failed]
        assert g.num_timeouts == 0


# ---- Grader: hard time limit, crashes, garbage ----


def _worker_pids(g: Grader) -> list[int]:
    return [w.proc.pid for w in g._workers]


def test_hard_timeout_kills_and_restarts_the_worker():
    timeout = 1.0
    with Grader(timeout=timeout, num_workers=1) as g:
        pid_before = _worker_pids(g)
        start = time.monotonic()
        # Test hook: the worker sleeps 30 s before grading, far past the limit.
        assert g._run([{"pred": "1", "gold": "1", "_sleep": 30}]) == [0.0]
        elapsed = time.monotonic() - start
        assert timeout <= elapsed < timeout + 1.5
        assert g.num_timeouts == 1 and g.num_errors == 0
        assert _worker_pids(g) != pid_before  # a new process ...
        assert g.grade([r"\boxed{25}"], ["025"]) == [1.0]  # ... that grades


def test_slow_answer_does_not_block_the_other_worker():
    timeout = 2.0
    with Grader(timeout=timeout, num_workers=2) as g:
        requests = [{"pred": "1", "gold": "1", "_sleep": 30}] + [
            {"pred": rf"\boxed{{{k}}}", "gold": str(k)} for k in range(20)
        ]
        start = time.monotonic()
        scores = g._run(requests)
        elapsed = time.monotonic() - start
        assert scores == [0.0] + [1.0] * 20  # in request order
        assert elapsed < timeout + 1.5  # the 20 fast ones went to the free worker meanwhile
        assert g.num_timeouts == 1


def test_worker_killed_while_idle_is_replaced():
    with Grader(timeout=10.0, num_workers=1) as g:
        proc = g._workers[0].proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert g.grade(["The answer is 18"], ["18"]) == [1.0]  # the answer is not lost
        assert _worker_pids(g) != [proc.pid]
        assert g.num_errors == 0


def test_worker_killed_mid_answer_scores_zero_and_grading_continues():
    with Grader(timeout=20.0, num_workers=1) as g:
        pid = g._workers[0].proc.pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        start = time.monotonic()
        assert g._run([{"pred": "1", "gold": "1", "_sleep": 30}]) == [0.0]
        assert time.monotonic() - start < 5.0  # noticed at once (EOF), not at the 20 s deadline
        assert g.num_errors == 1 and g.num_timeouts == 0
        assert g.grade([r"\boxed{1}", "2"], ["1", "2"]) == [1.0, 1.0]


def test_garbage_never_raises():
    rng = random.Random(0)
    binary = bytes(rng.randrange(256) for _ in range(5000)).decode("utf-8", errors="replace")
    garbage = [
        r"\boxed{" + "9" * 5000 + "}",
        r"\boxed{9^{9^{9^{9}}}}",  # math-verify's soft limit: ~5 s in sympy, then 0
        r"\boxed{99999999!}",
        r"\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",
        "{" * 10_000 + r"\frac{" * 1000,
        r"\boxed{" * 1000,
        binary,
        "\ud800",  # lone surrogate: cannot even be encoded as UTF-8
        r"\boxed{\ud800}",
        "line\nbreaks\r\nand\x00nul\x1b[31m",
        "1 " * 50_000,
        "y" * 100_000,
        r"\boxed{1}" * 2000,
    ]
    garbage_golds = ["\ud800", "\n", binary, r"\boxed{", "}{", "9" * 5000]
    responses = garbage + ["1"] * len(garbage_golds)
    golds = ["1"] * len(garbage) + garbage_golds
    with Grader(timeout=2.0, num_workers=2) as g:
        scores = g.grade(responses, golds)
        assert len(scores) == len(responses)
        assert set(scores) <= {0.0, 1.0}
        assert g.num_graded == len(responses)
        assert g.grade(["The answer is 18"], ["18"]) == [1.0]  # still healthy afterwards
        # Odd characters around a right answer survive the JSON pipe unchanged and do not hurt it.
        odd = ["\ud800\n so the answer is \\boxed{18}\r\n", "é∑ 答案是 \\boxed{18}", "\x00\\boxed{18}"]
        assert g.grade(odd, ["18"] * 3) == [1.0] * 3


def test_works_with_file_descriptors_above_1024():
    """A training process can hold many files open; select() would fail on such descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"cannot open 1200 files (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with Grader(timeout=10.0) as g:
            assert g._workers[0].fileno() > 1024
            assert g.grade([r"\boxed{25}"], ["025"]) == [1.0]
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_close_kills_the_workers_and_is_idempotent():
    g = Grader(timeout=5.0, num_workers=2)
    procs = [w.proc for w in g._workers]
    g.close()
    assert all(p.poll() is not None for p in procs)
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.grade(["1"], ["1"])


def _is_gone(pid: int) -> bool:
    """True if the process has exited (a zombie waiting for init to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.mark.parametrize("how", ["exit without close", "SIGKILL"])
def test_workers_do_not_outlive_the_parent(how):
    """A parent that exits without close() (atexit hook) or is killed hard (worker sees EOF)."""
    repo = Path(__file__).resolve().parents[1]
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "from utils.grading import Grader\n"
        "g = Grader(num_workers=2)\n"
        "print(*[w.proc.pid for w in g._workers], flush=True)\n"
        f"time.sleep({60 if how == 'SIGKILL' else 0})\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(worker_pids) == 2 and not any(_is_gone(pid) for pid in worker_pids)
    if how == "SIGKILL":
        parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10.0
    while not all(_is_gone(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_is_gone(pid) for pid in worker_pids)
