r"""Hostile model outputs: the answer grader and the verdict parser must neither raise nor hang, whatever they read.

A policy in RL training writes anything: numbers with 100k digits, power towers such as 9^{9^{9^{9}}} that sympy
cannot evaluate, 50k unclosed braces, binary garbage, lone surrogates. Every such text must score 0.0 or 1.0
(a verdict "A", "B" or None) within the Grader's hard time limit, and never stop a training run.

Two kinds of test: a fixed list of adversarial cases (ADVERSARIAL_CASES, also timed one by one at training's
10 s limit by `python bench/hostile_grading.py`), and property-based tests (hypothesis) that compose arbitrary
and adversarial text. Every grader test runs once per grading mode (utils.grading.GRADERS); one Grader per mode,
with a short time limit, serves the whole file, so it runs in about two minutes.
`pytest tests/test_hostile.py -s` prints the measured worst case of a single grade call.
"""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.grading import (
    GRADERS,
    Grader,
    choice_letter,
    extract_boxed,
    final_answer,
    has_boxed,
    parse_verdict,
    prepare_answer,
)

TIMEOUT = 2.0  # the Grader's hard limit per answer in this file (training uses 10 s)
MARGIN = 3.0  # on top of TIMEOUT for one call: poll wake-up, SIGKILL and reaping a worker on a busy machine
STARTUP = 10.0  # a grade call after a kill first waits for the new worker to import math_verify (~1 s idle)

# Shared by the property tests: no example database on disk, no per-example deadline (a grade call may
# legitimately take TIMEOUT seconds), and large generated inputs are the point, not a health problem.
PROPERTY_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def _nested(opener: str, inner: str, closer: str, depth: int) -> str:
    return opener * depth + inner + closer * depth


_MATRIX = r"\det\begin{pmatrix}" + r"\\".join("&".join(f"x_{{{i}{j}}}" for j in range(12)) for i in range(12)) + r"\end{pmatrix}"
_RANDOM_BYTES = random.Random(0).randbytes(30_000)

# (name, response, gold). Slow ones are slow for sympy: with math-verify's own 5 s soft limits, or the hard kill.
ADVERSARIAL_CASES: list[tuple[str, str, str]] = [
    ("huge number in box", r"\boxed{" + "9" * 100_000 + "}", "9"),
    ("huge number as gold", "9", "9" * 100_000),
    ("power tower 9^9^9^9", r"\boxed{9^{9^{9^{9}}}}", "9"),
    ("power tower as gold", r"\boxed{9}", "9^{9^{9^{9}}}"),
    ("10^{10^{10}}", r"\boxed{10^{10^{10}}}", "1"),
    ("plain-text 9**9**9**9", "The answer is 9**9**9**9", "1"),
    ("factorial 12345678!", r"\boxed{12345678!}", "1"),
    ("12x12 symbolic det", r"\boxed{" + _MATRIX + "}", "0"),
    ("integral", r"\boxed{\int_0^\infty e^{-x^2}\sin(x^{10})\,dx}", r"\int_0^\infty e^{-x^2}\cos(x^{10})\,dx"),
    ("huge sum", r"\boxed{\sum_{k=1}^{10^{10}} k^{k}}", "1"),
    ("50k open braces", "{" * 50_000, "1"),
    ("50k nested braces in box", r"\boxed{" + _nested("{", "1", "}", 50_000) + "}", "1"),
    ("5k parens, both sides", r"\boxed{" + _nested("(", "1", ")", 5000) + "}", _nested("(", "1", ")", 5000)),
    ("2k nested sqrt", r"\boxed{" + _nested(r"\sqrt{", "2", "}", 2000) + "}", "2"),
    ("5k unbalanced boxes", r"\boxed{" * 5000, "1"),
    ("random bytes as latin-1", _RANDOM_BYTES.decode("latin-1"), "1"),
    ("random bytes surrogateescape", _RANDOM_BYTES.decode("utf-8", "surrogateescape"), "1"),
    ("NUL bytes", "\x00" * 10_000 + r"\boxed{1}", "1"),
    ("lone surrogates", "\ud800" + r"\boxed{1}" + "\udfff", "1"),
    ("surrogate and NUL in gold", r"\boxed{1}", "\ud800\x001"),
    ("5 MB response", "x" * 5_000_000 + r"\boxed{42}", "42"),
]


@pytest.fixture(scope="module", params=GRADERS)
def grader(request):
    with Grader(timeout=TIMEOUT, num_workers=2, mode=request.param) as g:
        yield g


def _ready(grader: Grader) -> None:
    """A sane pair grades right: the grader recovered, and a worker killed before this call is ready again."""
    assert grader.grade([r"The answer is \boxed{18}"], ["18"]) == [1.0]


def test_adversarial_cases_score_in_bounded_time(grader):
    times = {}
    for name, response, gold in ADVERSARIAL_CASES:
        _ready(grader)  # so the timed call below does not include restarting a worker killed by the last case
        start = time.monotonic()
        scores = grader.grade([response], [gold])
        times[name] = time.monotonic() - start
        assert len(scores) == 1 and scores[0] in (0.0, 1.0), name
    _ready(grader)
    worst = max(times, key=times.get)
    print(f"\nworst single grade call: {times[worst]:.2f} s ({worst}); hard limit {TIMEOUT} s + margin {MARGIN} s")
    assert times[worst] <= TIMEOUT + MARGIN, times


# ---- property-based: arbitrary and adversarial text ----

# Pieces of LaTeX that are hard on a parser or on sympy, plus bytes a decoder chokes on.
FRAGMENTS = [
    r"\boxed{", r"\fbox{", "{", "}", r"\{", r"\}", "\\", r"\frac{", r"\sqrt{", "9^{", "^", "!", "(", ")", "[[A]]", "[[B]]",
    r"\int", r"\sum_{k=1}^{10^{10}}", r"\begin{pmatrix}", "&", r"\\", r"\end{pmatrix}", r"\left(", r"\right)",
    "9" * 50, "x", "1", "18", " ", "\n", "\x00", "\ud800", "\udfff", "\udc80", "\x1b[31m", "é∑答", "1e999999",
]
ANY_CHAR = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]))  # surrogates too
hostile_text = st.one_of(
    st.text(ANY_CHAR, max_size=200),
    st.binary(max_size=2000).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(max_size=2000).map(lambda b: b.decode("latin-1")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join),
    st.builds(lambda piece, n: piece * n, st.sampled_from(FRAGMENTS), st.integers(1, 30_000)),  # long repeats
)


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(pairs=st.lists(st.tuples(hostile_text, st.one_of(st.sampled_from(["18", r"\frac{1}{2}", "x+1"]), hostile_text)),
                      min_size=1, max_size=4))
def test_grader_scores_hostile_text_in_bounded_time(grader, pairs):
    responses, golds = (list(x) for x in zip(*pairs))
    graded = grader.num_graded
    start = time.monotonic()
    scores = grader.grade(responses, golds)
    elapsed = time.monotonic() - start
    assert len(scores) == len(pairs) and set(scores) <= {0.0, 1.0}
    assert grader.num_graded == graded + len(pairs)
    # at most one answer in flight per worker, each within the hard limit; a killed worker is restarted on the way
    assert elapsed <= math.ceil(len(pairs) / 2) * (TIMEOUT + MARGIN) + len(pairs) * STARTUP
    _ready(grader)


@settings(PROPERTY_SETTINGS, max_examples=1000)
@given(text=hostile_text)
def test_text_functions_never_raise(text):
    boxed = extract_boxed(text)
    assert boxed is None or boxed in text
    assert has_boxed(text) in (True, False)
    assert parse_verdict(text) in ("A", "B", None)
    answer = final_answer(text)  # what the rema grader reads: it runs in the worker, but must not raise there either
    assert answer is None or isinstance(answer, str)
    assert isinstance(prepare_answer(text), str)
    assert choice_letter(text, lenient=True) in (*"ABCDE", None)


# Text without backslashes or braces, so that it cannot open, close or escape a box.
plain = st.text(st.characters(exclude_categories=(), exclude_characters="\\{}"), max_size=50)


# Matched braces around plain text: "a{b{}c}{d}".
balanced = st.recursive(plain, lambda inner: st.lists(st.one_of(inner, inner.map("{{{}}}".format)), max_size=4).map("".join),
                        max_leaves=20)


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(before=plain, content=balanced, after=plain)
def test_extract_boxed_returns_the_box_content(before, content, after):
    text = before + r"\boxed{" + content + "}" + after
    assert extract_boxed(text) == content
    assert has_boxed(text)


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(text=hostile_text, verdict=st.sampled_from("AB"))
def test_parse_verdict_reads_a_single_verdict(text, verdict):
    other = "B" if verdict == "A" else "A"
    if f"[[{other}]]" not in text:
        assert parse_verdict(text + f"[[{verdict}]]") == verdict
    assert parse_verdict(f"[[{other}]]" + text + f"[[{verdict}]]") is None  # both verdicts: none


# ---- linear time on 1 MB ----

MB = 1 << 20
ONE_MB_INPUTS = {
    "open braces": "{" * MB,
    "close braces": "}" * MB,
    "unclosed boxes": (r"\boxed{" * (MB // 7)),
    "boxes with long whitespace": (r"\boxed" + " " * 1000) * (MB // 1006),
    "backslashes": "\\" * MB,
    "closed boxes": r"\boxed{1}" * (MB // 9),
    "verdict brackets": "[[A]" * (MB // 4),
    "both verdicts": "[[A]][[B]]" * (MB // 10),
    "random bytes": random.Random(1).randbytes(MB).decode("utf-8", "surrogateescape"),
    "NUL bytes": "\x00" * MB,
}


@pytest.mark.parametrize("name", list(ONE_MB_INPUTS))
def test_text_functions_are_fast_on_1_mb(name):
    text = ONE_MB_INPUTS[name]
    for fn in (extract_boxed, has_boxed, parse_verdict, final_answer, prepare_answer, choice_letter):
        start = time.monotonic()
        fn(text)
        assert time.monotonic() - start < 2.0, f"{fn.__name__} on 1 MB of {name}"
