r"""Answer grading: is a model's response correct against a gold answer?

Semantics follow the official ReMA code (`VERL/utils/reward_score/math_verify.py`, spec section 5):

    verify_fn = math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                            pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))
    score, _ = verify_fn(["\\boxed{" + gold + "}"], [response])    # any exception -> 0.0

so \boxed is *not* required in the response ("The answer is 18" vs gold "18" scores 1.0). The official
code pins math-verify 0.7.0; this project uses 0.9.0. Behaviour of 0.9.0 worth knowing (each point is
checked in tests/test_grading.py):

- A response with several boxes is read as the *set* of their contents: "\boxed{2} ... \boxed{18}"
  against gold "18" scores 0.0, even though the last box is right.
- "\fbox{18}" and "\boxed {18}" (with a space) score 0.0: math-verify only looks for "\boxed{".
  `extract_boxed` below accepts both; it is for logging and display, not for grading.
- An empty gold makes math-verify raise ValueError (4 rows of math_benchmarks.jsonl have one), so such a
  row scores 0.0 whatever the response, and counts in `Grader.num_errors`.

Why worker subprocesses. math-verify (sympy underneath) can take seconds, or much longer, on an odd
response ("\boxed{9^{9^{9^{9}}}}"). Its own time limits (5 s per parse and per comparison) use
signal.alarm, which works only in a main thread and cannot interrupt a long C-level computation, so it
is a soft limit at best. The hard limit lives here, as in the official code (pebble process pool, 10 s):
each worker is a plain `python utils/grading.py --worker` process that speaks one JSON object per line
over pipes; the parent waits for each reply with poll() and a deadline (`timeout` seconds from sending
the answer), and past it kills the worker (SIGKILL), starts a new one, and scores the answer 0.0.
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

MAX_RESPONSE_CHARS = 20_000  # longer responses keep only their last MAX_RESPONSE_CHARS characters
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
    last: tuple[int, int] | None = None  # (start, end) of the content of the last complete box so far
    stack: list[tuple[int, bool]] = []  # for each open "{": (index after it, opened by a box command?)
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
                    stack.append((j + 1, True))
                    i = j + 1
                    continue
            i += 2  # skip the escaped character, so "\{" and "\}" are not braces
            continue
        if ch == "{":
            stack.append((i + 1, False))
        elif ch == "}" and stack:
            start, is_box = stack.pop()
            if is_box and (last is None or start > last[0]):
                last = (start, i)
        i += 1
    return None if last is None else text[last[0] : last[1]]


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


class Grader:
    """Grades responses against gold answers with math-verify in worker subprocesses, with a hard time limit.

    Each answer scores 1.0 or 0.0. A timeout, a crash of the worker, or an exception inside math-verify
    scores 0.0 and never raises here; a killed or dead worker is replaced transparently. The counters
    ``num_graded``, ``num_timeouts`` and ``num_errors`` (crashes + math-verify exceptions) are cumulative,
    for the training log. Use as a context manager or call ``close()``::

        with Grader(timeout=10.0, num_workers=2) as grader:
            scores = grader.grade(responses, golds)  # list[float], same order as responses
    """

    def __init__(self, timeout: float = 10.0, num_workers: int = 1):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout = timeout
        self.num_graded = 0
        self.num_timeouts = 0
        self.num_errors = 0
        self._workers = [_Worker() for _ in range(num_workers)]  # start all, then wait: imports overlap
        atexit.register(self.close)
        try:
            for worker in self._workers:
                worker.wait_ready()
        except BaseException:
            self.close()
            raise

    def grade(self, responses: list[str], golds: list[str]) -> list[float]:
        """Score each response against its gold answer: 1.0 if math-verify says equivalent, else 0.0."""
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
    """One ``python grading.py --worker`` subprocess and the parent's end of its pipes."""

    def __init__(self):
        self._start()

    def restart(self) -> None:
        """Kill the process and start a new one, without waiting for it to be ready."""
        self.kill()
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
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
# Worker side: `python utils/grading.py --worker`. Imports only the stdlib and math_verify.
# ---------------------------------------------------------------------------------------------------


def _worker_main() -> None:
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
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, math_metric
        from math_verify.errors import TimeoutException
    except ImportError as e:
        reply({"fatal": f"{type(e).__name__}: {e}"})
        return
    verify_fn = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )
    reply({"ready": True})

    for line in sys.stdin.buffer:  # ends at EOF: the parent closed the pipe or died
        request = json.loads(line)
        if "_sleep" in request:  # test hook, see Grader._run
            time.sleep(request["_sleep"])
        try:
            # math-verify applies its own signal.alarm limits (5 s per parse / comparison) inside.
            score, _ = verify_fn(["\\boxed{" + request["gold"] + "}"], [request["pred"]])
            reply({"score": float(score)})
        except (Exception, TimeoutException) as e:  # TimeoutException is a BaseException
            reply({"score": 0.0, "error": f"{type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("usage: python utils/grading.py --worker   (started by Grader; speaks JSON lines on stdin/stdout)")
    _worker_main()
