r"""Tests for utils/grading.py: box extraction, the two graders, and the worker-process plumbing.

The official grader (mode="official"): expected scores were checked by hand against math-verify 0.9.0.
Where math-verify's answer is surprising, the test asserts what it really does and says why: that mode
must match the official ReMA reward, not our taste.

The rema grader (the default): it must agree with every hand label of tests/data/grading_cases.jsonl
but the few listed in REMA_KNOWN_MISSES, and each error of the official grader that it fixes is shown
next to the official score in FIXED_ERRORS.
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

from utils.grading import (
    GRADERS,
    MAX_ANSWER_CHARS,
    MAX_RESPONSE_CHARS,
    Grader,
    choice_letter,
    extract_boxed,
    final_answer,
    has_boxed,
    prepare_answer,
    unevaluated,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABELLED_CASES = Path(__file__).resolve().parent / "data" / "grading_cases.jsonl"


@pytest.fixture(scope="module")
def grader():
    """The official grader: the tests that document math-verify's own behaviour use this one."""
    with Grader(timeout=10.0, num_workers=2, mode="official") as g:
        yield g


@pytest.fixture(scope="module")
def rema_grader():
    with Grader(timeout=10.0, num_workers=2, mode="rema") as g:
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


# ---- Grader, official mode: math-verify semantics ----

PI_PAIR = r"(3,\frac{\pi}{2})"

CASES = [
    # (response, gold, expected score)
    (r"\frac{1}{2}", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{25}", "025", 1.0),  # leading zeros do not matter (math-verify, the official grader, agrees)
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


@pytest.mark.parametrize("mode", GRADERS)
def test_grader_counts_math_verify_exceptions_as_errors(mode):
    with Grader(timeout=10.0, mode=mode) as g:
        assert g.grade(["18", "18"], ["18", ""]) == [1.0, 0.0]
        assert (g.num_graded, g.num_errors, g.num_timeouts) == (2, 1, 0)


def test_grader_rejects_mismatched_inputs(grader):
    assert grader.grade([], []) == []
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        grader.grade(["1", "2"], ["1"])
    with pytest.raises(TypeError):
        grader.grade([None], ["1"])


@pytest.mark.parametrize("mode", GRADERS)
def test_long_response_keeps_its_end(mode, grader, rema_grader):
    filler = "x" * 100_000
    answer_at_end = filler + r" The answer is $\boxed{7}$."
    answer_at_start = r"\boxed{7} " + filler  # documented: cut off by the MAX_RESPONSE_CHARS guard
    assert len(answer_at_start) > MAX_RESPONSE_CHARS
    g = grader if mode == "official" else rema_grader
    assert g.grade([answer_at_end, answer_at_start], ["7", "7"]) == [1.0, 0.0]


@pytest.mark.parametrize("mode", GRADERS)
def test_benchmark_golds_grade_themselves(mode):
    """Every gold of the seven test sets, wrapped as \\boxed{gold}, graded against itself.

    Measured with math-verify 0.9.0, in both modes: 3217 / 3221 = 99.88% score 1.0, in about 5 s with
    2 workers on an idle machine, so all rows are graded. The 4 failures are the rows whose gold is
    the empty string (math-verify raises ValueError "No gold targets found"; the rema grader does the
    same), so those problems can never be solved:
      line indices (0-based) 97 (MATH500), 1972, 2056, 2081 (gaokao2023en).
    Every other gold, including minerva's long physics formulas, matches itself.
    """
    path = DATA_DIR / "math_benchmarks.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    golds = [row["answer"] for row in rows]
    # A generous per-answer limit: this test is about math-verify, not about a busy machine.
    with Grader(timeout=30.0, num_workers=2, mode=mode) as g:
        scores = g.grade([r"\boxed{" + gold + "}" for gold in golds], golds)
        failed = [i for i, s in enumerate(scores) if s != 1.0]
        assert len(rows) == 3221
        assert sum(scores) >= 3217
        assert all(golds[i] == "" for i in failed), [(i, golds[i]) for i in failed]
        assert g.num_timeouts == 0


# ---- Grader, rema mode: the final answer, compared in full ----

# Each error of the official grader that the rema grader fixes: (kind, response, gold, official, rema).
FIXED_ERRORS = [
    # False positives (reward hacks): an unboxed answer read as its leading number.
    ("leading number", r"The final answer is 3\sqrt{2}", "3", 1.0, 0.0),
    ("leading number", r"The answer is 3\pi.", "3", 1.0, 0.0),
    ("leading number", r"The answer is 2k", "2", 1.0, 0.0),
    ("leading number", r"The answer is 1+2i", "1", 1.0, 0.0),
    ("leading number", r"The answer is -2x", "-2", 1.0, 0.0),
    ("leading number", r"The answer is 2e27", "2", 1.0, 0.0),
    # False positives: 6-decimal rounding, and math-verify's unit stripping of a trailing letter.
    ("rounded decimal", r"\boxed{0.333333}", r"\frac{1}{3}", 1.0, 0.0),
    ("rounded decimal", r"\boxed{1.414214}", r"\sqrt{2}", 1.0, 0.0),
    ("unit letter", r"\boxed{2+3d}", "5", 1.0, 0.0),
    # False positives: an unevaluated sum where the gold is a number (the RA of a multi-turn run learned to stop at
    # "7 + 1 + 4 = 8 + 4." and was paid for it).
    ("unevaluated", "7 + 1 + 4 = 8 + 4.", "12", 1.0, 0.0),
    ("unevaluated", r"\boxed{3 \cdot 4}", "12", 1.0, 0.0),
    ("unevaluated", r"\boxed{2^3}", "8", 1.0, 0.0),
    # False negatives: several boxes read as a set; \fbox and "\boxed {" not read.
    ("self-correction", r"So \boxed{2}. Wait, that is wrong. Final: \boxed{18}.", "18", 0.0, 1.0),
    ("fbox", r"\fbox{18}", "18", 0.0, 1.0),
    ("boxed space", r"\boxed {18}", "18", 0.0, 1.0),
    # False negatives: unboxed LaTeX, lists and tuples, letter choices.
    ("unboxed latex", r"The answer is \dfrac{1}{2}.", r"\frac{1}{2}", 0.0, 1.0),
    ("unboxed latex", r"The answer is 2\sqrt{5}.", r"2\sqrt{5}", 0.0, 1.0),
    ("unboxed tuple", r"The answer is (1, 2).", "(1,2)", 0.0, 1.0),
    ("unboxed list", r"The answers are 2 and 3.", "2, 3", 0.0, 1.0),
    ("letter choice", "(C)", r"\text{(C)}", 0.0, 1.0),
    ("letter choice", "Answer: C", "C", 0.0, 1.0),
]


@pytest.mark.parametrize("mode", GRADERS)
def test_each_official_error_and_its_fix(mode, grader, rema_grader):
    """The official grader makes each error of FIXED_ERRORS; the rema grader does not."""
    g = grader if mode == "official" else rema_grader
    kinds, responses, golds, official, rema = zip(*FIXED_ERRORS)
    expected = official if mode == "official" else rema
    scores = g.grade(list(responses), list(golds))
    wrong = [(k, r, gold, e, s) for k, r, gold, e, s in zip(kinds, responses, golds, expected, scores) if s != e]
    assert wrong == [], "(kind, response, gold, expected, got)"


# Where the rema grader scores the official CASES above differently: each is an official error it fixes.
REMA_CHANGES = {
    "(3, pi/2)": 1.0,  # plain-text pi is read
    r"\boxed{0.333333}": 0.0,  # a decimal must agree with a fraction to 12 places
    r"So \boxed{2}. Final: \boxed{18}.": 1.0,  # the last box is the answer
    r"\fbox{18}": 1.0,
    r"\boxed {18}": 1.0,
}


def test_rema_keeps_what_math_verify_gets_right(rema_grader):
    """On every official case above, the rema grader scores the same, but for the fixes in REMA_CHANGES."""
    responses, golds, official = zip(*CASES)
    expected = [REMA_CHANGES.get(r, e) for r, e in zip(responses, official)]
    assert set(REMA_CHANGES) <= set(responses)
    scores = rema_grader.grade(list(responses), list(golds))
    wrong = [(r, g, e, s) for r, g, e, s in zip(responses, golds, expected, scores) if s != e]
    assert wrong == [], "(response, gold, expected, got)"


@pytest.mark.parametrize("number", ["3", "-2", "12"])
def test_rema_never_scores_a_partial_read(rema_grader, number):
    """An answer that is a number times something else never equals the number, boxed or not."""
    tails = [r"\sqrt{2}", r"\pi", "k", "x", "i", "e27", "d", "g", "m", "o", r"x^2", r"\cdot y", "^2"]
    responses = [form.format(number + tail) for tail in tails
                 for form in (r"The final answer is {}", r"\boxed{{{}}}", "Answer: ${}$.", "So the total is {}.")]
    scores = rema_grader.grade(responses, [number] * len(responses))
    assert [r for r, s in zip(responses, scores) if s != 0.0] == []
    assert rema_grader.grade([rf"The final answer is {number}"], [number]) == [1.0]  # the number alone does


# Labelled cases where the rema grader and the hand label disagree, by response. Keep it short; a new
# disagreement fails test_rema_agrees_with_the_labels, and so does a miss that gets fixed.
REMA_KNOWN_MISSES = {
    # A box, then an unboxed correction: the box wins (the format the prompts ask for).
    r"So the answer is \boxed{17}. Hmm, wait: 9 + 9 = 18, so the answer is 18.",
    # The letter sits before "is": the value of a closing statement is read after its "is".
    r"I think (C) is correct.",
}


def _labelled_cases() -> list[dict]:
    return [json.loads(line) for line in LABELLED_CASES.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_labelled_cases_cover_the_issue():
    """At least 150 cases, labels 0/1, every kind of error the issue names, and 40+ benchmark golds."""
    cases = _labelled_cases()
    assert len(cases) >= 150
    assert all(set(c) <= {"response", "gold", "label", "kind", "note"} and c["label"] in (0, 1) for c in cases)
    kinds = {c["kind"] for c in cases}
    assert {"fp_leading_number", "fp_rounded_decimal", "fn_self_correction", "fn_fbox_or_space", "fn_unboxed_latex",
            "fn_unboxed_list_tuple", "fn_letter_choice", "equivalent_form", "wrong_close", "gold_self",
            "fp_unevaluated"} <= kinds
    assert sum(c["kind"] == "gold_self" for c in cases) >= 40
    assert len({(c["response"], c["gold"]) for c in cases}) == len(cases)  # no duplicates


def test_rema_agrees_with_the_labels(rema_grader):
    cases = _labelled_cases()
    scores = rema_grader.grade([c["response"] for c in cases], [c["gold"] for c in cases])
    misses = {c["response"]: (c["kind"], c["gold"], c["label"], s) for c, s in zip(cases, scores) if s != c["label"]}
    assert set(misses) - REMA_KNOWN_MISSES == set(), "new disagreements: {response: (kind, gold, label, score)}"
    assert REMA_KNOWN_MISSES - set(misses) == set(), "fixed: remove them from REMA_KNOWN_MISSES"


def test_official_disagrees_with_the_labels_both_ways(grader):
    """What bench/grader_agreement.py measures: the official grader's errors on the labelled set."""
    cases = _labelled_cases()
    scores = grader.grade([c["response"] for c in cases], [c["gold"] for c in cases])
    false_pos = {c["kind"] for c, s in zip(cases, scores) if c["label"] == 0 and s == 1.0}
    false_neg = {c["kind"] for c, s in zip(cases, scores) if c["label"] == 1 and s == 0.0}
    assert {"fp_leading_number", "fp_rounded_decimal", "fp_unit_letter", "fp_unevaluated"} <= false_pos
    assert {"fn_self_correction", "fn_fbox_or_space", "fn_unboxed_latex", "fn_unboxed_list_tuple",
            "fn_letter_choice"} <= false_neg


def test_grader_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        Grader(mode="strict")


# ---- final_answer, prepare_answer, choice_letter: the rema grader's reading of a reply ----


@pytest.mark.parametrize(
    "text, expected",
    [
        # 1. the last box, and the boxes before it that only list
        (r"\boxed{2} then, after checking, \boxed{18}", "18"),
        (r"\boxed{2} and \boxed{3}", "2, 3"),
        (r"$x = \boxed{-1}$ or $x = \boxed{4}$.", "-1, 4"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\boxed{1}}", "1"),
        (r"\boxed{a} \boxed{ \boxed{b}", "b"),  # the unclosed box is not one
        (r"\boxed{1}" * 50, ", ".join(["1"] * 10)),  # at most MAX_LISTED_BOXES
        (r"\boxed{}", ""),
        # 2. the last explicit commitment, the whole rest of its sentence
        (r"The final answer is $3\sqrt{2}$. I hope it is correct.", r"3\sqrt{2}"),
        (r"The final answer is 3\sqrt{2}", r"3\sqrt{2}"),
        (r"The answer is 5. No wait, the answer is 7.", "7"),
        ("**Answer:** 18", "18"),
        ("The answer is 3.5.", "3.5"),  # a decimal point does not end the sentence
        ("The answer is 3!", "3!"),  # nor does a factorial
        (r"The answer is $\frac{1}{2}$, which is 0.5.", r"\frac{1}{2}"),  # the clause is cut
        ("The answer is 18 (since 9 + 9 = 18).", "18"),
        ("The answer is therefore 18", "18"),
        ("**Final Answer**\n\n$$\\frac{3}{4}$$", r"\frac{3}{4}"),
        ("The answer is\n\\[\n x^2\n\\]", "x^2"),
        (r"The answers are $2$ and $3$.", "2 and 3"),
        ("The answer is", None),
        # 3. the closing statement
        ("So the total is 18 dollars.", "18 dollars"),
        ("First 2 + 4 = 6.\nThen 6 * 3 = 18.", "18"),
        ("Therefore $x = 5$.", "x = 5"),
        ("So $x$ is 5.", "5"),
        (r"\frac{1}{2}", r"\frac{1}{2}"),
        ("(C)", "(C)"),
        ("Thus the value is\n\\[\n 2\\sqrt{3}\n\\]", r"2\sqrt{3}"),
        ("x >= 3", "x >= 3"),  # not split at the "=" of ">="
        ("", None),
        ("   \n ", None),
        ("1 " * 5000, None),  # longer than MAX_ANSWER_CHARS
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_final_answer_reads_the_end_of_a_long_reply():
    assert final_answer(r"\boxed{7} " + "x " * MAX_RESPONSE_CHARS) is None  # as the Grader: the box was cut off
    assert final_answer("x " * MAX_RESPONSE_CHARS + "The answer is 7.") == "7"
    assert len("1" * (MAX_ANSWER_CHARS + 1)) > MAX_ANSWER_CHARS and final_answer("1" * (MAX_ANSWER_CHARS + 1)) is None


@pytest.mark.parametrize(
    "answer, expected",
    [
        (r"18\text{ cm}", "18"),
        (r"12 \text{ square units}", "12"),
        ("5 apples", "5"),
        ("20 square feet", "20"),
        (r"2400 \mbox{ cm}^2", "2400"),
        (r"\text{Monday}", r"\text{Monday}"),  # nothing before the text: it is the answer
        (r"1+2\text{i}", r"1+2\text{i}"),  # one letter in \text is no unit
        ("2d", "2d"),  # nor is a bare letter
        ("2 m", "2 m"),
        ("3 pi", r"3 \pi "),
        ("π/2", r"\pi /2"),
        ("pin", "pin"),
    ],
)
def test_prepare_answer(answer, expected):
    assert prepare_answer(answer) == expected


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("8 + 4", "12", True),
        (r"3 \cdot 4", "12", True),
        (r"3\times4", "12", True),
        ("(-8) + 3", "-5", True),
        ("2^{3}", "8", True),
        (r"\frac{1}{2}+\frac{1}{2}", "1", True),
        ("7 + 1 + 4 = 8 + 4", "12", True),  # the value stated is the last right-hand side
        ("8 + 4 = 12", "12", False),
        ("12", "12", False),
        ("-5", "-5", False),
        ("x = -5", "-5", False),
        ("12,000", "12000", False),
        (r"\frac{1}{2}", "0.5", False),  # a fraction is a number
        ("24/2", "12", False),  # and so is a fraction in lowest terms or not: "/" is never a sum left to do
        (r"3 \times 10^{5}", "300000", False),  # scientific notation
        ("10^3", "1000", False),
        (r"1 + \sqrt{2}", r"1+\sqrt{2}", False),  # the gold is no plain number: an expression may answer it
        ("8 + 4", "x + 4", False),
    ],
)
def test_unevaluated(answer, gold, expected):
    assert unevaluated(answer, gold) == expected


@pytest.mark.parametrize(
    "answer, lenient, expected",
    [
        ("C", False, "C"),
        (r"\text{(D)}", False, "D"),
        (r"$\textbf{(E)}$", False, "E"),
        ("**B.**", False, "B"),
        ("e", False, None),  # a gold "e" is Euler's number, not option E
        ("(c)", True, "C"),
        ("(D) 42", True, "D"),
        ("(D) 42", False, None),
        ("F", True, None),
        ("CD", True, None),
        ("A total of 5", True, None),
        ("42", True, None),
    ],
)
def test_choice_letter(answer, lenient, expected):
    assert choice_letter(answer, lenient) == expected


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


@pytest.mark.parametrize("mode", GRADERS)
def test_garbage_never_raises(mode):
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
    with Grader(timeout=2.0, num_workers=2, mode=mode) as g:
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
