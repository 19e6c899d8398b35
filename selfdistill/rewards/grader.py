"""Correctness grading (SPEC section 1): math-verify equivalence of the last `\\boxed{}` outside
meta blocks with gold, run in killable worker processes.

Input: each completion as its pieces of text outside meta blocks, in order, cut at the tag
tokens by `selfdistill.rewards.regions.outside_meta_texts` (the one meta grammar, on token ids).
A decoded text cannot be parsed for blocks here: the characters `<|meta|>` spelled out of
ordinary tokens read exactly like the special token, and SPEC section 1 makes only the token a
tag. The answer is the stripped content of the last complete `\\boxed{...}` lying inside one
piece (a box whose braces straddle a block is not an answer); `\\boxed` may be followed by
spaces or tabs before its `{`; `\\{` and `\\}` are content, not delimiters.

Why processes: sympy can hang for minutes (or forever) on hostile input such as
`9^{9^{9^{9}}}`, often inside C code that no signal interrupts, and math-verify's own SIGALRM
timeout only works in the main thread. A worker process can always be killed. Each worker gets
one item at a time with a per-item deadline:
  - soft: a SIGALRM in the worker at 0.8 * timeout_s interrupts pure-Python hangs; the worker
    answers "timeout" and survives;
  - hard: at timeout_s after dispatch the parent SIGKILLs the worker and starts a replacement.
A worker that dies mid-item counts as a crash. Both give -1, which callers count as wrong.

Equivalence: `verify(parse(f"${gold}$"), parse(f"${answer}$"))`, gold first (math-verify's
comparison is not symmetric), the same `$...$` convention the decoys use (SPEC section 3). When
`$answer$` yields no parsed expression we retry `\\boxed{answer}`, which math-verify normalises
differently. `$...$` is the primary form because it also accepts `50\\%`, which the boxed form
leaves unparsed.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import runpy
import signal
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

__all__ = ["Grader", "GraderError", "extract_boxed_answer", "math_equivalent"]

_BOXED = "\\boxed"

CORRECT, WRONG, FAILED = 1, 0, -1


class GraderError(RuntimeError):
    """The grader cannot run at all (workers fail to start, or it was closed)."""


# ----------------------------------------------------------------------------- answer extraction

def _last_boxed(text: str) -> Optional[str]:
    """Content of the last complete `\\boxed{...}` of `text` (braces balanced, `\\{` `\\}`
    escaped as in TeX); an unclosed `\\boxed{` is not an answer."""
    last, pos = None, 0
    while True:
        start = text.find(_BOXED, pos)
        if start < 0:
            return last
        i = start + len(_BOXED)
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text) or text[i] != "{":
            pos = start + len(_BOXED)
            continue
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth != 0 or j >= len(text):  # unclosed: look for later, complete ones
            pos = i + 1
            continue
        last = text[i + 1:j]
        pos = j + 1  # a \boxed nested inside this one is not "later"


def _check_pieces(pieces, where: str) -> None:
    if isinstance(pieces, str) or not isinstance(pieces, (list, tuple)) or not all(isinstance(p, str) for p in pieces):
        raise TypeError(
            f"{where} must be a completion's outside-meta text pieces (a list of str, from "
            f"selfdistill.rewards.regions.outside_meta_texts), got {type(pieces).__name__}: a decoded text cannot tell "
            f"a <|meta|> token from the same characters typed out; wrap a text known to hold no tag token as [text]")


def extract_boxed_answer(pieces: Sequence[str]) -> Optional[str]:
    """Stripped content of the last `\\boxed{...}` lying wholly inside one of a completion's
    outside-meta pieces (`outside_meta_texts`), searched from the last piece back; None if none.
    A box whose braces straddle a meta block is split over two pieces and is no answer."""
    _check_pieces(pieces, "extract_boxed_answer: pieces")
    for piece in reversed(pieces):
        answer = _last_boxed(piece)
        if answer is not None:
            return answer.strip()
    return None


# ----------------------------------------------------------------------------- equivalence

@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${gold}$", parsing_timeout=None))


def math_equivalent(gold: str, answer: str) -> bool:
    """math-verify equivalence of `answer` with `gold`, without any timeout.

    Only for worker processes (or trusted input): the caller must bound its run time.
    """
    from math_verify import parse, verify

    target = parse(f"${answer}$", parsing_timeout=None)
    if not any(not isinstance(x, str) for x in target):
        boxed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        if any(not isinstance(x, str) for x in boxed):
            target = boxed
    return bool(verify(list(_parse_gold(gold)), target, timeout_seconds=None))


# ----------------------------------------------------------------------------- worker process

class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker. BaseException so math-verify's `except Exception` blocks
    cannot swallow it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _worker_main(conn, equivalent: Optional[Callable[[str, str], bool]]) -> None:
    """Worker loop: receive (job, gold, answer, soft_s); reply (job, 1 | 0 | "timeout" |
    "error")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    check = equivalent or math_equivalent
    math_equivalent("1", "1")  # import and warm sympy/math-verify before reporting ready
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job, gold, answer, soft_s = msg
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_s)
                same = check(gold, answer)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            result = CORRECT if same else WRONG
        except _SoftTimeout:
            result = "timeout"
        except Exception:
            result = "error"
        conn.send((job, result))


_WORKER_RUN_NAME = "__selfdistill_grader_worker__"


class _Worker:
    def __init__(self, ctx, equivalent, name: str):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        # The child runs this file by path rather than importing `selfdistill.rewards.grader`:
        # importing it would run the package __init__s (torch and the reward registry) in every
        # worker, seconds of startup for code the worker never uses. So this file must not
        # import from selfdistill. (multiprocessing still re-runs the parent's main module in
        # the child: keep an entry script's work under `if __name__ == "__main__":`.)
        self.proc = ctx.Process(
            target=runpy.run_path, args=(__file__,), name=name, daemon=True,
            kwargs={"run_name": _WORKER_RUN_NAME,
                    "init_globals": {"_worker_conn": child_conn, "_worker_equivalent": equivalent}})
        self.proc.start()
        child_conn.close()
        self.started = time.monotonic()
        self.ready = False
        self.job: Optional[tuple[int, float]] = None  # (job id, hard deadline)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _set_forkserver_preload(ctx, equivalent) -> None:
    """Have the fork server import what every worker needs, so a worker (first or replacement)
    forks ready in ~0.2 s instead of paying interpreter start + imports (seconds).

    The modules: math-verify (sympy); the module of a custom `equivalent`; and the parent's main
    module, which multiprocessing re-runs in each child (`python -m selfdistill.train` would
    otherwise import torch and transformers in every worker). The preload list is process-wide
    and only read when the fork server starts; if it is already running (started by another
    user) workers still work, they just import these themselves.
    """
    import sys

    modules = ["__main__"]  # multiprocessing's default preload
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name and not name.endswith("__main__"):
        modules.append(name)
    modules.append("math_verify")
    module = getattr(equivalent, "__module__", None)
    if module and module not in ("__main__", "__mp_main__"):
        modules.append(module)
    ctx.set_forkserver_preload(modules)


# ----------------------------------------------------------------------------- grader

class Grader:
    """Grades completions against gold answers: 1 correct, 0 wrong (incl. no boxed answer),
    -1 timeout or worker crash (callers count it as wrong; SPEC section 1).

    Reusable across calls; close it (or use it as a context manager) to stop the workers.
    Counters, cumulative over the grader's life and counted per completion: `graded`,
    `timeouts`, `crashes` (a worker that died, or an exception raised by the check);
    `metrics()` gives them under the names the trainer logs.

    `equivalent(gold, answer) -> bool` replaces math-verify (it must be picklable: a module-level
    function), e.g. for other answer formats or tests. Worker startup does not count towards an
    item's deadline: the first workers need the fork server's start (interpreter + sympy, about a
    second; create the Grader early), a replacement for a killed worker forks from it in ~0.2 s
    in the background while the others keep grading. With start_method="spawn" every start pays
    the full interpreter + imports.
    """

    def __init__(self, timeout_s: float = 5.0, workers: int = 2, *,
                 equivalent: Optional[Callable[[str, str], bool]] = None,
                 start_timeout_s: float = 120.0, start_method: str = "forkserver"):
        if not timeout_s > 0:
            raise ValueError(f"Grader timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Grader workers must be an integer >= 1, got {workers!r}")
        if start_method not in ("spawn", "forkserver"):
            # fork would copy the trainer's threads and CUDA state into the workers; forkserver
            # (default) forks from a clean server process, spawn starts fresh interpreters.
            raise ValueError(f"Grader start_method must be 'spawn' or 'forkserver', "
                             f"got {start_method!r}")
        self.timeout_s = float(timeout_s)
        self.num_workers = workers
        self.start_timeout_s = float(start_timeout_s)
        self._equivalent = equivalent
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            _set_forkserver_preload(self._ctx, equivalent)
        self._lock = threading.Lock()
        self._spawned = 0
        self._failed_starts = 0
        self._closed = False
        self._broken: Optional[str] = None  # why workers cannot start, once that is known
        self.graded = 0
        self.timeouts = 0
        self.crashes = 0
        self._workers: list[_Worker] = [self._spawn() for _ in range(workers)]

    # -- public API

    def grade(self, completions: Sequence[Sequence[str]], golds: Sequence[str]) -> list[int]:
        """Grade `completions[i]` against `golds[i]`; returns 1 / 0 / -1 per completion.

        completions[i]: that completion's outside-meta text pieces (`outside_meta_texts`, or
        `rollout_outside_meta_texts` of a rollout batch)."""
        if len(completions) != len(golds):
            raise ValueError(f"grade: {len(completions)} completions but {len(golds)} golds")
        with self._lock:
            if self._closed:
                raise GraderError("grade() called on a closed Grader")
            if self._broken:
                raise GraderError(self._broken)
            results: list[Optional[int]] = [None] * len(completions)
            jobs: dict[tuple[str, str], list[int]] = {}  # identical pairs are graded once
            for i, (pieces, gold) in enumerate(zip(completions, golds)):
                if not isinstance(gold, str):
                    raise TypeError(f"grade: item {i}: gold must be a str, got {type(gold).__name__}")
                _check_pieces(pieces, f"grade: item {i}")
                answer = extract_boxed_answer(pieces)
                gold = gold.strip()
                if answer is None or not answer:
                    results[i] = WRONG
                elif answer == gold:  # fast path: identical strings need no worker
                    results[i] = CORRECT
                else:
                    jobs.setdefault((gold, answer), []).append(i)
            outcomes = self._run(list(jobs))
            for pair, outcome in zip(jobs, outcomes):
                for i in jobs[pair]:
                    if outcome == "timeout":
                        self.timeouts += 1
                        results[i] = FAILED
                    elif outcome in ("crash", "error"):
                        self.crashes += 1
                        results[i] = FAILED
                    else:
                        results[i] = outcome
            self.graded += len(completions)
            return results  # type: ignore[return-value]

    def metrics(self) -> dict[str, float]:
        return {"grader/graded": float(self.graded), "grader/timeouts": float(self.timeouts),
                "grader/crashes": float(self.crashes)}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
            for w in self._workers:
                w.proc.join(timeout=1)
                w.kill()
            self._workers = []

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- worker pool

    def _spawn(self) -> _Worker:
        self._spawned += 1
        return _Worker(self._ctx, self._equivalent, f"selfdistill-grader-{self._spawned}")

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()

    def _run(self, pairs: list[tuple[str, str]]) -> list:
        """Grade unique (gold, answer) pairs across the workers; each outcome is 1, 0,
        "timeout", "crash" or "error"."""
        outcomes: list = [None] * len(pairs)
        pending = deque(range(len(pairs)))
        soft_s = 0.8 * self.timeout_s
        try:
            while pending or any(w.job for w in self._workers):
                for w in list(self._workers):  # dispatch to idle ready workers
                    if pending and w.ready and w.job is None:
                        job = pending.popleft()
                        try:
                            w.conn.send((job, *pairs[job], soft_s))
                        except (OSError, ValueError):  # died while idle: retry elsewhere
                            pending.appendleft(job)
                            self._replace(w)
                            continue
                        w.job = (job, time.monotonic() + self.timeout_s)
                now = time.monotonic()
                wake = [w.job[1] for w in self._workers if w.job]
                wake += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
                waitables = [w.conn for w in self._workers if w.job or not w.ready]
                waitables += [w.proc.sentinel for w in self._workers if w.job or not w.ready]
                mp_connection.wait(waitables, timeout=max(0.0, min(wake) - now) if wake else None)
                for w in list(self._workers):
                    self._poll(w, outcomes)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.job and now >= w.job[1]:  # hard deadline: kill and replace
                        outcomes[w.job[0]] = "timeout"
                        self._replace(w)
                    elif not w.ready and now >= w.started + self.start_timeout_s:
                        self._broken = (f"grader worker {w.proc.name} did not start within "
                                        f"{self.start_timeout_s:.0f}s")
                        raise GraderError(self._broken)
        except BaseException:
            # Interrupted (Ctrl-C, GraderError): workers with a job in flight would answer a later
            # call with this call's result, so replace them.
            for w in list(self._workers):
                if w.job:
                    self._replace(w)
            raise
        return outcomes

    def _poll(self, w: _Worker, outcomes: list) -> None:
        """Take a worker's message if any; replace it if it died."""
        try:
            if w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._failed_starts = 0
                else:
                    job, result = msg
                    if w.job and w.job[0] == job:
                        outcomes[job] = result
                        w.job = None
                return
        except (EOFError, OSError):
            pass
        if w.proc.is_alive():
            return
        # The worker is gone.
        if w.job:
            outcomes[w.job[0]] = "crash"
        elif not w.ready:
            self._failed_starts += 1
            if self._failed_starts >= 3:
                self._broken = (f"grader worker {w.proc.name} exited with code "
                                f"{w.proc.exitcode} before becoming ready, 3 times in a row; "
                                f"its stderr says why")
                raise GraderError(self._broken)
        self._replace(w)


if __name__ == _WORKER_RUN_NAME:  # this file run as a grader worker process (see _Worker)
    _worker_main(_worker_conn, _worker_equivalent)  # noqa: F821 (names from init_globals)
