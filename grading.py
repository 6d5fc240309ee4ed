"""grading.py: the math grader, one function for training rewards and for evaluation.

    grade(response, answer) -> 1.0 or 0.0

1. Only the *final* part of a response counts: the text after the last `</think>`.
   An answer that appears only inside a think block (closed or, for a truncated
   response, never closed) scores 0: the model did not commit to it.
2. From that part take the LAST `\\boxed{...}` (or `\\fbox{...}`), matching braces
   (escaped `\\{` `\\}` do not count as grouping). No box, an empty box, or a last
   box that never closes (truncated output) scores 0. No substring credit: "12" is
   not "2".
3. Compare the box content with the reference answer using math-verify
   (`parse` both, `verify(gold, pred)`): 0.5 == \\frac{1}{2}, \\dfrac, 2\\sqrt{2} ==
   \\sqrt{8}, sets in any order, intervals with their open/closed ends, x=5 == 5,
   "1,000" == 1000.

Timeouts. sympy can take forever on adversarial input (a box holding 9^9^9^9).
math-verify's own timeouts use `signal.alarm`, which only works in the main thread
and which its wrappers reset (`alarm(0)`) on every exit, so we turn them off
(`parse(..., parsing_timeout=None)`, `verify(..., timeout_seconds=None)`, the
parameter names in math_verify 0.9.0) and bound the time ourselves:
  - in the main thread: one `signal.setitimer` around the whole parse+verify
    (float seconds), raising a BaseException that math-verify's `except Exception`
    does not swallow; a timeout scores 0.
  - everywhere else, and for batches: `grade_many` farms unique (box, answer) pairs
    out to a process pool; each worker runs tasks in its own main thread, so the
    same itimer works there, and the parent also waits at most 2*timeout + 10 s
    for each result: a worker stuck in C code (where no signal lands) is killed
    with its pool, that pair scores 0 and the rest is regraded in a fresh pool.
  - `grade()` called from a non-main thread delegates to a one-worker pool.

Speed: responses are reduced to their boxed answer in the parent, identical
(box, answer) pairs are graded once, and each reference is parsed once per process;
30 problems x 32 samples is a few hundred unique pairs at ~1-2 ms each: about 1.5-2 s
on 2 CPU cores (`python grading.py --bench`).

Training rewards: SPEC section 1 gives a truncated (unfinished) rollout reward 0
whatever it contains; that rule belongs to the caller (grade only sees text).

Run the tests: python -m pytest -q tests/test_grading.py
Measure speed:  python grading.py --bench
"""

import argparse
import functools
import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# math-verify logs a warning the first time it runs with its timeouts off (we always
# do, see the docstring) and on every string it cannot parse; both are noise here.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


# ----------------------------------------------------------------------------
# extraction: pure string work, never slow


def final_part(text):
    """The part of a response that counts: after the last </think>, cut at an unclosed <think>."""
    k = text.rfind(_THINK_CLOSE)
    tail = text[k + len(_THINK_CLOSE):] if k >= 0 else text
    k = tail.find(_THINK_OPEN)  # a think block opened after the last close never closed
    return tail[:k] if k >= 0 else tail


def _close_brace(s, i):
    """Index of the '}' closing the group whose '{' is at s[i-1]; None if it never closes."""
    depth = 1
    while i < len(s):
        c = s[i]
        if c == "\\":  # \{ \} \\ : an escaped character never opens or closes a group
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_answer(text):
    """Content of the last \\boxed{...} / \\fbox{...} in the final part of `text`, else None.

    Returns None for: no box, an empty box, a last box that never closes, an answer
    only inside a (closed or unclosed) think block.
    """
    if not isinstance(text, str):
        return None
    tail = final_part(text)
    opens = list(_BOX_OPEN.finditer(tail))
    if not opens:
        return None
    start = opens[-1].end()
    end = _close_brace(tail, start)
    if end is None:  # the last box is cut off (truncated generation): no committed answer
        return None
    content = tail[start:end].strip()
    return content or None


# ----------------------------------------------------------------------------
# comparison: math-verify, time-bounded


class GradeTimeout(BaseException):
    """Raised by our itimer. A BaseException so that math-verify's `except Exception` lets it through."""


def _on_alarm(signum, frame):
    raise GradeTimeout()


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer):
    """A reference parsed once per process: an eval grades each answer against ~k boxes.

    Returns a tuple (cached values must not be mutated; verify never does).
    """
    return tuple(parse("\\boxed{" + answer + "}", extraction_config=_EXTRACTION, parsing_timeout=None))


def _verify_unbounded(pred, answer):
    """math-verify on two answer strings, with its own (signal) timeouts off. May be slow."""
    gold = list(_parse_gold(answer))
    if not gold:
        return 0.0
    target = parse("\\boxed{" + pred + "}", extraction_config=_EXTRACTION, parsing_timeout=None)
    if not target:
        return 0.0
    return 1.0 if verify(gold, target, timeout_seconds=None) else 0.0


def _verify_bounded(pred, answer, timeout):
    """_verify_unbounded under a SIGALRM itimer of `timeout` seconds. Main thread only.

    Restores the caller's SIGALRM handler and re-arms a timer the caller had running.
    """
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return _verify_unbounded(pred, answer)
    except GradeTimeout:
        return 0.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = max(old_delay - (time.monotonic() - t0), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def _grade_pair(pred, answer, timeout):
    """Grade one extracted box against one reference. Runs in the main thread of a process."""
    try:
        return _verify_bounded(pred, answer, timeout)
    except Exception:  # a parser bug must not take down a training run: no credit
        return 0.0


def _check_answer(answer):
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"reference answer must be a non-empty string, got {answer!r}")
    return answer.strip()


def grade(response, answer, *, timeout=5.0):
    """1.0 if the last box in the final part of `response` equals `answer` (math-verify), else 0.0.

    Bounded by `timeout` seconds: an itimer in the main thread, a one-worker process
    pool elsewhere.
    """
    answer = _check_answer(answer)
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    if _in_main_thread():
        return _grade_pair(pred, answer, timeout)
    return grade_many([response], [answer], workers=1, timeout=timeout)[0]


# ----------------------------------------------------------------------------
# batches: dedup, then a process pool with a per-result guard


def _pool_context():
    # fork: a worker starts in milliseconds with math-verify already imported. The
    # workers only run sympy, never torch/CUDA, so forking a process that holds a
    # CUDA context or OpenMP threads is safe for them. spawn where fork is missing.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _grade_task(task):
    pred, answer, timeout = task
    return _grade_pair(pred, answer, timeout)


def _grade_in_pool(pairs, workers, timeout, guard=None):
    """Grade (pred, answer) pairs in a process pool; a pair whose result is late scores 0.

    pool.imap yields in order and hands tasks out in order, so once results < i are in,
    task i is running or next in line: waiting `guard` seconds for it is a per-task bound.
    """
    out = []
    if guard is None:  # the in-worker timer, plus worker start-up (spawn re-imports sympy)
        guard = 2 * timeout + 10
    while len(out) < len(pairs):
        todo = pairs[len(out):]
        pool = _pool_context().Pool(min(workers, len(todo)))
        try:
            it = pool.imap(_grade_task, [(p, a, timeout) for p, a in todo])
            for _ in todo:
                out.append(it.next(timeout=guard))
        except mp.TimeoutError:
            # stuck somewhere our signal cannot reach: no credit, kill the pool, go on
            out.append(0.0)
        finally:
            pool.terminate()
            pool.join()
    return out


def default_workers():
    return max(1, min(8, os.cpu_count() or 1))


def grade_many(responses, answers, *, workers=None, timeout=5.0, inline_below=64):
    """grade() over parallel lists; returns a list of floats in {0.0, 1.0}, same order.

    workers: processes in the pool (default min(8, cpu count)); 0 grades in this process
        (time-bounded only in the main thread).
    timeout: seconds per unique (box, answer) pair.
    inline_below: in the main thread, fewer unique pairs than this are graded in-process
        (a pool costs more than it saves). Off the main thread a pool is always used
        unless workers=0.
    """
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    answers = [_check_answer(a) for a in answers]
    preds = [extract_answer(r) for r in responses]
    # identical (box, reference) pairs are graded once: "204" vs "204" 20 times is one call
    unique = sorted({(p, a) for p, a in zip(preds, answers) if p is not None})
    workers = default_workers() if workers is None else workers
    main = _in_main_thread()
    if workers == 0 or (main and len(unique) < inline_below):
        if main:
            scores = [_grade_pair(p, a, timeout) for p, a in unique]
        else:  # no signals off the main thread: unbounded, the caller asked for workers=0
            scores = [_verify_unbounded(p, a) for p, a in unique]
    else:
        scores = _grade_in_pool(unique, workers, timeout)
    table = dict(zip(unique, scores))
    return [0.0 if p is None else table[(p, a)] for p, a in zip(preds, answers)]


# ----------------------------------------------------------------------------
# a speed check: python grading.py --bench


def _bench_batch(n_problems, n_samples, seed=0):
    """A synthetic eval batch: AIME-like integer answers plus fractions, think blocks, misses."""
    import random

    rng = random.Random(seed)
    responses, answers = [], []
    for i in range(n_problems):
        gold = str(rng.randrange(1000)) if i % 3 else f"\\frac{{{i + 1}}}{{{i + 7}}}"
        for _ in range(n_samples):
            r = rng.random()
            if r < 0.3:
                box = gold
            elif r < 0.4:
                box = f"{rng.randrange(1000)}.0"
            elif r < 0.5:
                box = f"\\dfrac{{{rng.randrange(1, 50)}}}{{{rng.randrange(51, 99)}}}"
            elif r < 0.6:
                box = f"{rng.randrange(10)}\\sqrt{{{rng.randrange(2, 50)}}}"
            else:
                box = str(rng.randrange(1000))
            think = "<think>Let me try \\boxed{7}. Wait.</think>" if rng.random() < 0.5 else ""
            responses.append(f"{think}Working... so the answer is $\\boxed{{{box}}}$.")
            answers.append(gold)
    return responses, answers


def main(args):
    responses, answers = _bench_batch(args.problems, args.samples)
    grade_many(responses[:1], answers[:1], workers=0)  # warm up: math-verify builds its parsers lazily
    for workers in [0] + sorted({1, 2, args.workers}):
        t0 = time.perf_counter()
        scores = grade_many(responses, answers, workers=workers, timeout=args.timeout, inline_below=0)
        dt = time.perf_counter() - t0
        n_unique = len({(extract_answer(r), a) for r, a in zip(responses, answers)})
        print(f"workers={workers:2d}  {len(responses)} responses ({n_unique} unique pairs)  "
              f"{dt:6.2f} s  mean score {sum(scores) / len(scores):.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="measure grade_many speed on a synthetic batch")
    p.add_argument("--bench", action="store_true", help="run the speed check (the only mode)")
    p.add_argument("--problems", type=int, default=30, help="problems in the synthetic batch")
    p.add_argument("--samples", type=int, default=32, help="samples per problem")
    p.add_argument("--workers", type=int, default=default_workers(), help="largest pool size to time")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per unique (box, answer) pair")
    main(p.parse_args())
