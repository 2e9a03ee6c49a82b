r"""Answer grading: is a model's response correct against a gold answer?

Two graders, chosen with ``Grader(mode=...)`` (training and evaluation scripts: ``--grading.grader``):

``"official"`` reproduces the official ReMA reward exactly (`src/verl/verl/utils/reward_score/math_verify.py`),
errors included, so that results can be compared with the paper's:

    verify_fn = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                            pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
    score, _ = verify_fn(["\\boxed{" + gold + "}"], [response])    # any exception -> 0.0

``"rema"`` (the default) first decides the one final answer the reply commits to, then asks math-verify
whether that answer, and all of it, equals the gold. It exists because the official setup is wrong in
both directions on the kinds of reply an RL policy learns to write (measured on the labelled set
tests/data/grading_cases.jsonl by `python bench/grader_agreement.py`; see docs/grading.md):

- False positives, i.e. reward hacks. Without a box, math-verify's plain-number regexes read an answer as
  its leading number: "The final answer is 3\sqrt{2}" scores 1 against gold "3", and so do "3\pi", "2k",
  "1+2i", "-2x", "2e27". Numbers are compared rounded to 6 decimals, so "\boxed{0.333333}" equals
  "\frac{1}{3}". Its unit stripping drops a trailing "d", "m", "g", "o"...: "\boxed{2+3d}" equals "5".
- False negatives. Several boxes are read as the *set* of their contents, so a reply that corrects
  itself ("\boxed{2} ... no: \boxed{18}") scores 0. "\fbox{18}" and "\boxed {18}" score 0 (only
  "\boxed{" is looked for). Unboxed LaTeX outside $...$ ("\dfrac{1}{2}", "2\sqrt{5}"), unboxed tuples and
  lists, and letter choices ("(C)", "Answer: C") score 0.

The final answer (`final_answer`, applied inside the worker, so within the hard time limit) is, first
match wins:

1. The content of the last complete box (``\boxed{...}``, ``\boxed {...}``, ``\fbox{...}``; see
   `extract_boxed`). Boxes right before it, separated only by commas, "and", "or", spaces or math
   delimiters, belong to the same answer: "\boxed{2} and \boxed{3}" is the list "2, 3" (at most
   MAX_LISTED_BOXES boxes). Any other text between two boxes makes the last box the answer.
2. Else the last explicit commitment: "answer is / are / : / =" ("The final answer is $X$.",
   "**Answer:** X", "the answers are X and Y"), or a "Final Answer" heading followed by a new line.
3. Else the reply's closing statement (its last sentence or line): what follows the last "is", "are",
   "=", "equals", "get", "gives", ": "... in its prose ("So the total is 18 dollars."); without one,
   its last math ("Therefore $x = 5$."), or the whole statement if it is all ("\frac{1}{2}", "(C)").

X in 2 and 3 is the whole rest of the statement: up to the end of the sentence (a period followed by a
space or the end, a "?", a new line outside math), without its math delimiters, and cut before a clause
such as ", which ...", " because ...", " (since ...". Never just its leading number. An X longer than
MAX_ANSWER_CHARS is no answer. Then X and the gold are prepared alike: trailing units are dropped when
written as text ("18\text{ cm}", "5 apples", "12 square units"; a curated list of unit words, never a
bare letter), and plain "pi" becomes "\pi". If the gold is a letter choice ("C", "(C)", "\text{(C)}"),
the answer must name the same letter. If the gold is a plain number ("12", "-0.5"), an answer that leaves
a sum to do scores 0 ("8 + 4", "3 \cdot 4", "2^3", in the right-hand side of its last "="; see `unevaluated`):
math-verify evaluates such an expression, so a reply that restates the question or stops halfway would be
paid. Otherwise both are parsed by math-verify as "\boxed{...}" with the
box as the only extraction target (no fallback to a number or fraction found inside, so a partial read
cannot score) and math-verify's own unit stripping off, and compared with `verify(...,
float_rounding=FLOAT_ROUNDING)`: a decimal equals a fraction only if it agrees to 12 places, so 0.125 =
1/8 but 0.333333 != 1/3. Everything else math-verify gets right stays right: \dfrac vs \frac, 0.5 vs
\frac12, 18.0 vs 18, intervals, tuples, sets, "x = 3" vs 3, degrees, percentages, thousands separators.

Known remaining disagreements of the rema grader with a careful human (tests/data/grading_cases.jsonl
lists the measured ones):

- A reply that boxes an answer and later states another one without a box is graded by the box.
- Commitments in other words are missed when the value comes before the verb ("I think (C) is
  correct" reads "correct"), answers split over several sentences are not joined, and a closing
  statement that is prose plus a number without a linking word ("So 18") is read whole.
- A rounded decimal scores 0 even where the question asked for rounding, unless the gold is rounded the
  same way. Plain-text function names are not read ("sin(x)"), but for "sqrt(2)" and "pi".
- An equation answer is read as its right-hand side, as math-verify does ("2\sqrt{2} = 3" against "3"
  scores 1); math-verify's other quirks stay too.

Behaviour of the official grader (math-verify 0.9.0; the official code pins 0.7.0) worth knowing, each
checked in tests/test_grading.py: the false positives and negatives above; "The answer is 18" scores 1
(no box needed); an empty gold makes math-verify raise ValueError (4 rows of math_benchmarks.jsonl have
one), so such a row scores 0.0 whatever the response, and counts in `Grader.num_errors`. The rema grader
keeps that last rule.

Why worker subprocesses. math-verify (sympy underneath) can take seconds, or much longer, on an odd
response ("\boxed{9^{9^{9^{9}}}}"). Its own time limits (5 s per parse and per comparison) use
signal.alarm, which works only in a main thread and cannot interrupt a long C-level computation, so it
is a soft limit at best. The hard limit lives here, as in the official code (pebble process pool, 10 s):
each worker is a plain `python utils/grading.py --worker MODE` process that speaks one JSON object per
line over pipes; the parent waits for each reply with poll() and a deadline (`timeout` seconds from
sending the answer), and past it kills the worker (SIGKILL), starts a new one, and scores the answer 0.0.
Starting this file with Popen (not multiprocessing) means a worker never re-imports the training script
or inherits a process with torch/CUDA loaded; in --worker mode it imports only the stdlib and
math_verify. Parallelism: `num_workers` workers, one answer in flight each, the next answer going to
whichever worker is free.

Protocol, one line each way, ASCII JSON (json.dumps escapes newlines, non-ASCII characters and lone
surrogates, so any Python str survives the trip):

    worker -> parent, once at start:   {"ready": true}    or  {"fatal": "ImportError: ..."}
    parent -> worker:                  {"pred": "...", "gold": "..."}
    worker -> parent:                  {"score": 1.0}     or  {"score": 0.0, "error": "ValueError: ..."}

Guards and choices:

- Responses longer than MAX_RESPONSE_CHARS are cut to their last MAX_RESPONSE_CHARS characters before
  grading: the final answer is at the end, and parsing 100k characters of reasoning only costs time.
  A long response whose only answer sits at its very beginning is therefore graded wrong.
- Worker stderr goes to DEVNULL (math-verify logs a warning holding the whole response on every soft
  timeout). The counters num_timeouts and num_errors are what a training script should log instead.
- Workers never outlive the parent: close() kills them, an atexit hook calls close(), and if the
  parent dies hard a worker sees EOF on its stdin and exits after its current answer.
- A Grader is not thread-safe: call it from one thread at a time.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time

GRADERS = ("rema", "official")  # Grader(mode=...): the default first, then the paper's reward
MAX_RESPONSE_CHARS = 20_000  # longer responses keep only their last MAX_RESPONSE_CHARS characters
MAX_ANSWER_CHARS = 1000  # rema: an unboxed answer longer than this is not an answer
MAX_LISTED_BOXES = 10  # rema: at most this many adjacent boxes are read as one list answer
FLOAT_ROUNDING = 12  # rema: decimal places to which a decimal must agree with an exact value
WORKER_START_TIMEOUT = 120.0  # seconds for a worker to import math_verify (slow on a busy machine)

_BOX_OPENERS = ("\\boxed", "\\fbox")
_HAS_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, or None.

    Braces are matched, so nested braces are kept (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``), and
    escaped braces ``\\{ \\}`` do not count. Whitespace between the command and ``{`` is allowed. An
    occurrence whose braces never close is ignored, so the previous complete one is returned. "Last"
    means the box that starts last: ``\\boxed{\\boxed{1}}`` gives ``1``. One pass over the text.
    """
    spans = _box_spans(text)
    if not spans:
        return None
    _, start, end = max(spans, key=lambda span: span[1])
    return text[start:end]


def _box_spans(text: str) -> list[tuple[int, int, int]]:
    """Every complete box in ``text``, as (index of the backslash, start of the content, index of the "}")."""
    spans = []
    stack: list[int] = []  # for each open "{": the backslash of its box command, or -1 for a plain brace
    content_starts: list[int] = []  # for each open "{": the index after it
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            opener = next((c for c in _BOX_OPENERS if text.startswith(c, i)), None)
            if opener is not None:
                j = i + len(opener)
                while j < n and text[j].isspace():
                    j += 1
                if j < n and text[j] == "{":
                    stack.append(i)
                    content_starts.append(j + 1)
                    i = j + 1
                    continue
            i += 2  # skip the escaped character, so "\{" and "\}" are not braces
            continue
        if ch == "{":
            stack.append(-1)
            content_starts.append(i + 1)
        elif ch == "}" and stack:
            command, start = stack.pop(), content_starts.pop()
            if command >= 0:
                spans.append((command, start, i))
        i += 1
    return spans


def has_boxed(text: str) -> bool:
    """True if ``text`` contains the answer format ``\\boxed{`` (regex ``\\boxed\\s*\\{``).

    Used for the format part of the reasoning agent's reward and for the penalty on a meta-thinking
    agent that leaks the answer.
    """
    return _HAS_BOXED.search(text) is not None


_VERDICT = re.compile(r"\[\[([AB])\]\]")


def states_verdict(text: str) -> bool:
    """True if `text` contains a verdict "[[A]]" or "[[B]]" at all (a judge's plan must not: the MTA's leak penalty)."""
    return _VERDICT.search(text) is not None


def parse_verdict(text: str) -> str | None:
    """The pair-ranking verdict "A" or "B" of a judge's reply, read strictly: exactly one of "[[A]]" / "[[B]]" must
    occur (any number of times). Both, neither, or another form ("[[a]]", "[A]", "A is better") give None."""
    found = set(_VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------------
# rema grader: the final answer a reply commits to (stdlib only: it also runs inside the worker)
# ---------------------------------------------------------------------------------------------------

# Between two boxes of one list answer: "\boxed{2}, \boxed{3}", "$x = \boxed{2}$ or $x = \boxed{3}$".
_LIST_GAP = re.compile(
    r"(?:[\s$,;]|\\[()\[\]]|\\q?quad\b|\band\b|\bor\b|\\text\s*\{\s*(?:and|or|,)?\s*\}|\b[A-Za-z]\s*=)*"
)
# An explicit commitment; the answer starts where the match ends.
_ANSWER_PHRASE = re.compile(
    r"\banswers?\b[\s*_]*(?:is|are|was|would be|will be|should be|=|:)[\s*_:]*|\bfinal answer\b[\s*_#]*\n",
    re.IGNORECASE,
)
# Words that join a statement to its value, in the prose of a closing statement: "the total is 18", "we get 6".
_LINKING = re.compile(r"\b(?:is|are|was|were|equals|be|gets?|obtain|find|gives|yields)\b|(?<![<>!=])=(?!=)|:(?=\s)",
                      re.IGNORECASE)
# A clause after the answer: "18, which is ...", "18 because ...", "18 (since ...". Checked at a space or comma.
_CLAUSE = re.compile(
    r"[,;]?\s+(?:because|since|which|where|as|so|hence|thus|therefore|given|when|if|using|by|from|for|with|"
    r"after|that|i\.e\.|e\.g\.)\b|\s+\((?=[A-Za-z]{2,})",
    re.IGNORECASE,
)
_LEADING_FILLER = re.compile(
    r"^(?:(?:thus|therefore|then|simply|just|indeed|actually|exactly|clearly|still|now)\b[\s,]*)+", re.IGNORECASE
)
_MATH_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# Units written as text at the end of an answer (or a gold): "18\text{ cm}", "5 apples", "12 square units".
# Text-command content must be a word (or start with a space), so "2\text{i}" keeps its i.
_TEXT_UNIT = re.compile(r"\\(?:text|textrm|textnormal|mbox)\s*\{(?:\s+[^{}]*|[^{}]*[A-Za-z]{2}[^{}]*)\}"
                        r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$")
_UNIT_WORDS = (
    "cm|mm|km|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|kilometres?|inch(?:es)?|feet|foot|ft|"
    "yards?|miles?|mph|kg|kilograms?|grams?|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|seconds?|minutes?|"
    "hours?|hrs?|days?|weeks?|months?|years?|dollars?|cents?|degrees?|units?|people|persons?|students?|apples?|ways?"
)
_UNIT_TAIL_CHARS = 200  # units are looked for in the last characters of an answer only
_WORD_UNIT = re.compile(
    rf"(?<=[\d}}\s])\s*(?:(?:square|sq\.?|cubic)\s+)?(?:{_UNIT_WORDS})(?:\s*\^\s*\{{?\s*[23]\s*\}}?)?\s*$"
)
_PLAIN_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])|π")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CHOICE = re.compile(r"\(?([A-E])\)?")
_CHOICE_LENIENT = re.compile(r"\(?([A-Ea-e])\)?|\(([A-Ea-e])\)\s.*", re.DOTALL)  # also "(c)", "(C) 42"
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")  # "12", "-3", "0.5", "12,000"
# Two numbers joined by an operator, as in "8 + 4", "3 \cdot 4", "(-8) + 3", "2^3" ("/" and \frac write a fraction,
# which is a number), and scientific notation, which is a number too: "3 \times 10^{5}", "10^3".
_OPERATION = re.compile(r"[\d)}]\s*(?:[-+*^\u00d7\u00f7]|\\cdot|\\times|\\div)\s*[-({\\\d]")
_SCIENTIFIC = re.compile(r"(?:\d\s*(?:\*|\u00d7|\\times|\\cdot)\s*|^\s*)10\s*\^")


def final_answer(text: str) -> str | None:
    """The final answer ``text`` commits to, as a LaTeX string, or None (see the module docstring).

    1. the last complete box, with the boxes right before it that only commas, "and" or "or" separate;
    2. else what follows the last "answer is / answer: ..." up to the end of its sentence;
    3. else the closing statement's value: after its last "is / = / :", else its last math, else all of it.

    Reads the last MAX_RESPONSE_CHARS characters only, in linear time; never raises on a str.
    """
    text = text[-MAX_RESPONSE_CHARS:]
    spans = _box_spans(text)
    if spans:
        return _listed_boxes(text, spans)
    phrase = None
    for phrase in _ANSWER_PHRASE.finditer(text):
        pass
    if phrase is not None:
        segments, _ = _read_statement(text, phrase.end(), stop_at_clause=True)
        return _clean(_joined(text, segments))
    return _closing_statement(text)


def _listed_boxes(text: str, spans: list[tuple[int, int, int]]) -> str:
    """The content of the last box, or "a, b, c" when the boxes before it only list (see _LIST_GAP)."""
    group = [max(spans, key=lambda span: span[1])]
    for span in sorted(spans, key=lambda span: span[2], reverse=True):
        if len(group) == MAX_LISTED_BOXES:
            break
        if span[2] >= group[0][0]:  # the last box itself, or a box around or after the first one kept
            continue
        if not _LIST_GAP.fullmatch(text, span[2] + 1, group[0][0]):
            break
        group.insert(0, span)
    return ", ".join(text[start:end] for _, start, end in group)


def _read_statement(text: str, i: int, stop_at_clause: bool) -> tuple[list[tuple[bool, int, int]], int]:
    """Read one statement from index ``i``: its segments (is_math, start, end) and the index where it ends.

    Math segments are the contents of $...$, $$...$$, \\(...\\), \\[...\\] (new lines allowed inside;
    an unclosed one runs to the end of the text). The statement ends, outside math, at a new line, at
    a "." followed by a space or the end (not a decimal point), at "?", at "!" after a letter (not a
    factorial), or with ``stop_at_clause`` before a clause (_CLAUSE). Leading whitespace is skipped.
    """
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    segments: list[tuple[bool, int, int]] = []
    prose_start = i
    while i < n:
        ch = text[i]
        if ch in "$\\":
            delimiters = next((d for d in _MATH_DELIMITERS if text.startswith(d[0], i)), None)
            if delimiters is not None:
                opener, closer = delimiters
                close = text.find(closer, i + len(opener))
                close = n if close < 0 else close
                segments.append((False, prose_start, i))
                segments.append((True, i + len(opener), close))
                i = prose_start = close + len(closer)
                continue
            if ch == "\\":
                i += 2  # an escaped character such as "\$" or "\{" stays in the prose
                continue
        if ch in "\n?" or (ch == "." and (i + 1 == n or text[i + 1].isspace())):
            break
        if ch == "!" and i > 0 and text[i - 1].isalpha():
            break
        # once per run of spaces (i > start here: the first character is not a space), so the scan stays linear
        if stop_at_clause and (ch in ",;" or (ch.isspace() and not text[i - 1].isspace())) and _CLAUSE.match(text, i):
            break
        i += 1
    segments.append((False, prose_start, min(i, n)))
    return [s for s in segments if s[2] > s[1]], i


def _joined(text: str, segments: list[tuple[bool, int, int]]) -> str:
    """The statement's text without its math delimiters: "$2$ and $3$" -> "2 and 3"."""
    return "".join(text[start:end] for _, start, end in segments)


def _clean(answer: str) -> str | None:
    """Strip markup around an unboxed answer; None if nothing is left or it is too long to be an answer."""
    answer = _LEADING_FILLER.sub("", answer.replace("\n", " ").strip(" \t*_:#"))
    answer = answer.rstrip(" \t.,;:*_")
    return answer if 0 < len(answer) <= MAX_ANSWER_CHARS else None


def _closing_statement(text: str) -> str | None:
    """The value stated by the last statement of ``text`` (rule 3 of `final_answer`)."""
    last: list[tuple[bool, int, int]] = []
    i = 0
    while i < len(text):
        segments, end = _read_statement(text, i, stop_at_clause=False)
        if any(not text[start:stop].isspace() for _, start, stop in segments):
            last = segments
        i = end + 1
    if not last:
        return None
    linking = None
    for is_math, start, end in last:
        if not is_math:
            for linking in _LINKING.finditer(text, start, end):
                pass
    if linking is not None:
        segments, _ = _read_statement(text, linking.end(), stop_at_clause=True)
        return _clean(_joined(text, segments))
    math = [k for k, (is_math, _, _) in enumerate(last) if is_math]
    if not math:
        return _clean(_joined(text, last))
    first = math[-1]  # the last math segment, and those before it that only a list gap separates
    while first >= 2 and last[first - 2][0] and _LIST_GAP.fullmatch(text, last[first - 1][1], last[first - 1][2]):
        first -= 2
    return _clean(", ".join(text[start:end] for is_math, start, end in last[first:] if is_math))


def prepare_answer(answer: str) -> str:
    """What the rema grader hands to math-verify, for a final answer and for a gold alike.

    Drops units written as text at the end ("18\\text{ cm}" -> "18", "5 apples" -> "5") and writes a
    plain "pi" as "\\pi". math-verify's own unit stripping stays off: it also drops a trailing bare
    "d", "m", "g", "o"..., which reads "2+3d" as "2+3".
    """
    answer = answer.strip()
    for pattern in (_TEXT_UNIT, _WORD_UNIT, _TEXT_UNIT):
        # A unit is short: searching only the tail keeps this linear (the patterns backtrack on long blanks).
        unit = pattern.search(answer, max(0, len(answer) - _UNIT_TAIL_CHARS))
        if unit is not None and answer[: unit.start()].strip():
            answer = answer[: unit.start()].strip()
    return _PLAIN_PI.sub(r"\\pi ", answer)


def unevaluated(answer: str, gold: str) -> bool:
    """Whether ``answer`` leaves a sum to do where ``gold`` is a plain number: "8 + 4" for 12, "3 \\cdot 4", "2^3".

    Only the value the answer states counts: the right-hand side of its last "=" ("8 + 4 = 12" states 12, as
    math-verify reads it). Such an answer scores 0 in the rema grader even where math-verify finds it equal: a
    reply that restates the question ("7 + 1 + 4") or stops after one operation ("= 8 + 4") has not answered it.
    A fraction ("1/2", "\\frac{1}{2}") and scientific notation ("3 \\times 10^5", "10^3") are numbers, not sums.
    """
    if not _PLAIN_NUMBER.fullmatch(gold.replace("$", "").replace(" ", "")):
        return False
    value = answer.rsplit("=", 1)[-1]
    return _OPERATION.search(value) is not None and _SCIENTIFIC.search(value) is None


def choice_letter(answer: str, lenient: bool = False) -> str | None:
    """The option letter A-E that ``answer`` names ("C", "(C)", "\\text{(C)}", "**C.**"), upper case, or None.

    A gold must be an upper-case letter ("e" is Euler's number, "c" a variable). ``lenient``, for a
    prediction, also accepts lower case and an option quoted with its value: "(c)", "(C) 42".
    """
    answer = _TEXT_WRAPPER.sub(r"\1", _TEXT_WRAPPER.sub(r"\1", answer))
    answer = answer.replace("$", "").replace("*", "").strip().rstrip(".").strip()
    match = (_CHOICE_LENIENT if lenient else _CHOICE).fullmatch(answer)
    return next(letter for letter in match.groups() if letter).upper() if match else None


class Grader:
    """Grades responses against gold answers with math-verify in worker subprocesses, with a hard time limit.

    ``mode`` is one of GRADERS: "rema" (the default: the final answer the reply commits to, compared in
    full) or "official" (the paper's reward, errors included); see the module docstring. Each answer
    scores 1.0 or 0.0. A timeout, a crash of the worker, or an exception inside math-verify
    scores 0.0 and never raises here; a killed or dead worker is replaced transparently. The counters
    ``num_graded``, ``num_timeouts`` and ``num_errors`` (crashes + math-verify exceptions) are cumulative,
    for the training log. Use as a context manager or call ``close()``::

        with Grader(timeout=10.0, num_workers=2, mode="rema") as grader:
            scores = grader.grade(responses, golds)  # list[float], same order as responses
    """

    def __init__(self, timeout: float = 10.0, num_workers: int = 1, mode: str = "rema"):
        if mode not in GRADERS:
            raise ValueError(f"mode must be one of {GRADERS}, got {mode!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout = timeout
        self.mode = mode
        self.num_graded = 0
        self.num_timeouts = 0
        self.num_errors = 0
        self._workers = [_Worker(mode) for _ in range(num_workers)]  # start all, then wait: imports overlap
        atexit.register(self.close)
        try:
            for worker in self._workers:
                worker.wait_ready()
        except BaseException:
            self.close()
            raise

    def grade(self, responses: list[str], golds: list[str]) -> list[float]:
        """Score each response against its gold answer: 1.0 if correct under ``self.mode``, else 0.0."""
        if len(responses) != len(golds):
            raise ValueError(f"got {len(responses)} responses but {len(golds)} gold answers")
        for text in (*responses, *golds):
            if not isinstance(text, str):
                raise TypeError(f"responses and golds must be str, got {type(text).__name__}")
        return self._run([{"pred": r[-MAX_RESPONSE_CHARS:], "gold": g} for r, g in zip(responses, golds)])

    def _run(self, requests: list[dict]) -> list[float]:
        """Send each request to a free worker, collect the replies, enforce the deadlines.

        Requests are the protocol's JSON objects. Test hook: a request may carry ``"_sleep": seconds``,
        which makes the worker sleep that long before grading; only the tests use it, to force a timeout.
        """
        if not self._workers:
            raise RuntimeError("Grader is closed")
        scores = [0.0] * len(requests)
        todo = list(reversed(range(len(requests))))  # pop() gives the requests in order
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (request index, deadline)
        try:
            while todo or busy:
                # ---- dispatch: one request to each free worker ----
                for worker in self._workers:
                    if todo and worker not in busy:
                        if worker.proc.poll() is not None:  # died while idle (killed from outside)
                            worker.restart()
                        worker.wait_ready()
                        k = todo.pop()
                        busy[worker] = (k, time.monotonic() + self.timeout)
                        if not worker.send(requests[k]):  # broken pipe: it died just now
                            self._fail(worker, busy, timed_out=False)
                if not busy:
                    continue
                # ---- collect replies, waiting at most until the earliest deadline ----
                wait = min(deadline for _, deadline in busy.values()) - time.monotonic()
                for worker in _readable(list(busy), wait):
                    try:
                        reply = worker.read_reply()
                    except _WorkerDied:
                        self._fail(worker, busy, timed_out=False)
                        continue
                    if reply is None:  # only part of the line has arrived
                        continue
                    k, _ = busy.pop(worker)
                    scores[k] = 1.0 if reply.get("score") == 1.0 else 0.0
                    if "error" in reply:  # an exception inside math-verify
                        self.num_errors += 1
                    self.num_graded += 1
                # ---- hard time limit: kill and replace the workers past their deadline ----
                now = time.monotonic()
                for worker, (_, deadline) in list(busy.items()):
                    if deadline <= now:
                        self._fail(worker, busy, timed_out=True)
        finally:
            # Only non-empty when leaving on an exception (Ctrl-C, a worker that cannot restart): a late
            # reply from these workers would be read as the answer to the next call's request.
            for worker in busy:
                worker.restart()
        return scores

    def _fail(self, worker: _Worker, busy: dict, timed_out: bool) -> None:
        """The worker's request scores 0.0 (already the default); replace the worker."""
        busy.pop(worker)
        self.num_graded += 1
        if timed_out:
            self.num_timeouts += 1
        else:
            self.num_errors += 1
        worker.restart()

    def close(self) -> None:
        """Kill the workers. Safe to call twice; the Grader cannot grade afterwards."""
        for worker in self._workers:
            worker.kill()
        self._workers = []
        atexit.unregister(self.close)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _readable(workers: list[_Worker], timeout: float) -> list[_Worker]:
    """The workers with something to read (a reply, or EOF if dead), waiting at most ``timeout`` seconds.

    poll() rather than select(): select() fails on file descriptors above 1024, which a training process
    with many open files reaches.
    """
    poller = select.poll()
    by_fd = {worker.fileno(): worker for worker in workers}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(math.ceil(max(0.0, timeout) * 1000))]


class _WorkerDied(Exception):
    """The worker closed its stdout (crashed or was killed) or wrote something that is not a reply."""


class _Worker:
    """One ``python grading.py --worker MODE`` subprocess and the parent's end of its pipes."""

    def __init__(self, mode: str):
        self.mode = mode
        self._start()

    def restart(self) -> None:
        """Kill the process and start a new one, without waiting for it to be ready."""
        self.kill()
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", self.mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # Python >= 3.11: do not put utils/ first on the worker's sys.path, where a file such as
            # utils/logging.py would shadow the stdlib module of the same name.
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
        self._buffer = b""
        self.ready = False

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def wait_ready(self) -> None:
        """Block until the worker has imported math_verify; raise RuntimeError if it cannot."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while not self.ready:
            if not _readable([self], deadline - time.monotonic()):
                raise RuntimeError(f"grading worker not ready after {WORKER_START_TIMEOUT:.0f} s")
            try:
                reply = self.read_reply()
            except _WorkerDied:
                raise RuntimeError("grading worker exited during start-up") from None
            if reply is not None and "fatal" in reply:
                raise RuntimeError(f"grading worker could not start: {reply['fatal']}")
            self.ready = reply is not None and reply.get("ready") is True

    def send(self, request: dict) -> bool:
        """Write one request line; False if the worker is gone (broken pipe)."""
        try:
            self.proc.stdin.write(json.dumps(request).encode("ascii") + b"\n")  # ensure_ascii: safe bytes
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def read_reply(self) -> dict | None:
        """Read what is available (call when select says readable); the reply once its line is complete."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            raise _WorkerDied()
        self._buffer += data
        if b"\n" not in self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            raise _WorkerDied() from None
        if not isinstance(reply, dict):
            raise _WorkerDied()
        return reply

    def kill(self) -> None:
        """SIGKILL the process and reap it, so no zombie is left."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # a request left in the buffer for the dead worker: nothing to deliver
            pass


# ---------------------------------------------------------------------------------------------------
# Worker side: `python utils/grading.py --worker MODE`. Imports only the stdlib and math_verify.
# ---------------------------------------------------------------------------------------------------


def _official_scorer():
    """The paper's reward: math-verify on the whole response, plain-number extraction first."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, math_metric

    verify_fn = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )

    def score(pred: str, gold: str) -> float:
        value, _ = verify_fn(["\\boxed{" + gold + "}"], [pred])
        return float(value)

    return score


def _rema_scorer():
    """The final answer only (`final_answer`), parsed whole from a box on both sides, numbers compared exactly."""
    from math_verify import LatexExtractionConfig, LatexNormalizationConfig, parse, verify

    # The box is the only extraction target: when its content does not parse, no number or fraction
    # inside it is taken instead (the plain-LaTeX patterns need try_extract_without_anchor). Units off:
    # prepare_answer drops the real ones. The rest is math-verify's default normalization.
    config = [
        LatexExtractionConfig(
            try_extract_without_anchor=False,
            boxed_match_priority=0,
            normalization_config=LatexNormalizationConfig(
                basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
            ),
        )
    ]

    def score(pred: str, gold: str) -> float:
        gold_value = prepare_answer(gold)
        gold_parsed = parse("\\boxed{" + gold_value + "}", config)
        if not gold_parsed:  # as math_metric does, so an empty gold counts as an error in both modes
            raise ValueError(f"No gold targets found for gold {gold[:50]!r}")
        answer = final_answer(pred)
        if answer is None:
            return 0.0
        letter = choice_letter(gold)
        if letter is not None:
            return float(choice_letter(answer, lenient=True) == letter)
        value = prepare_answer(answer)
        if unevaluated(value, gold_value):
            return 0.0
        pred_parsed = parse("\\boxed{" + value + "}", config)
        return float(verify(gold_parsed, pred_parsed, float_rounding=FLOAT_ROUNDING))

    return score


def _worker_main(mode: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then closes us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is a scheduler's SIGTERM to the whole process group: the
    # parent finishes its step (grading included) and saves; we exit on EOF when it is gone
    # Replies go to a private copy of stdout; fd 1 is pointed at stderr (DEVNULL), so a library that
    # prints cannot corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        from math_verify.errors import TimeoutException

        score = _rema_scorer() if mode == "rema" else _official_scorer()
    except ImportError as e:
        reply({"fatal": f"{type(e).__name__}: {e}"})
        return
    reply({"ready": True})

    for line in sys.stdin.buffer:  # ends at EOF: the parent closed the pipe or died
        request = json.loads(line)
        if "_sleep" in request:  # test hook, see Grader._run
            time.sleep(request["_sleep"])
        try:
            # math-verify applies its own signal.alarm limits (5 s per parse / comparison) inside.
            reply({"score": score(request["pred"], request["gold"])})
        except (Exception, TimeoutException) as e:  # TimeoutException is a BaseException
            reply({"score": 0.0, "error": f"{type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker" or sys.argv[2] not in GRADERS:
        sys.exit(f"usage: python utils/grading.py --worker {{{','.join(GRADERS)}}}   "
                 "(started by Grader; speaks JSON lines on stdin/stdout)")
    _worker_main(sys.argv[2])
