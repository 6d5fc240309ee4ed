"""grading.py: the math grader, one function for training rewards and for evaluation.

    grade(response, answer) -> 1.0 or 0.0

1. Only the *final* part of a response counts: the text after the last `</think>`.
   An answer that appears only inside a think block (closed or, for a truncated
   response, never closed) scores 0: the model did not commit to it.
2. From that part take the LAST `\\boxed{...}` (or `\\fbox{...}`), matching braces
   (escaped `\\{` `\\}` do not count as grouping). No box, an empty box, or a last
   box that never closes (truncated output) scores 0. No substring credit: "12" is
   not "2".
3. Rewrite the box content AND the reference answer with `normalize` (below), the
   same way: a thin layer for notations math-verify misreads.
4. Compare the two using math-verify (`parse` both, `verify(gold, pred)`): 0.5 ==
   \\frac{1}{2}, \\dfrac, 2\\sqrt{2} == \\sqrt{8}, sets in any order, intervals with
   their open/closed ends, x=5 == 5, "1,000" == 1000.

Normalisation (issue 11; measured on the real benchmark files, see the README's
"Checking the golds" table). math-verify reads programming e-notation `4.5e33` as
4.5*e*33 (Euler's e), keeps `-1./3` and `np.arcsin(10/13)` as text, and drops a
trailing word it takes for a unit from a list that holds single letters (t h c s l g
d m o), so Minerva's gold `\\frac{1}{m} t` became `\\frac{1}{m}` (the right `\\frac{t}{m}`
scored 0, the wrong `\\frac{1}{m}` 1) and `\\frac{37}{4} m` became 37/4. `normalize`:
  - e-notation -> LaTeX: `4.5e33` -> `4.5 \\times 10^{33}`, `1e-5` -> `1 \\times 10^{-5}`
    (so `2e-1` is 0.2; Euler's 2e minus 1 needs a space: `2e - 1`);
  - Python floats and functions: `-1./3` -> `-1/3`; `np.arcsin(x)`, `math.sqrt(x)`,
    `arcsin(x)` -> `\\arcsin(x)`, `\\sqrt{x}`; `np.pi` -> `\\pi`; `np.log` -> `\\ln`;
  - `336°` -> `336^{\\circ}`;
  - units, replacing math-verify's own unit stripping (turned off: `_NORM`): trailing
    text-set units are dropped (`1.6 \\mathrm{~cm}`, `4.5 \\times 10^{33} \\mathrm{ergs}
    \\mathrm{s}^{-1}`, `5 \\text{ m/s}`) unless text is all there is (`\\text{(C)}`); a bare
    unit word is dropped only after a plain number and only from `_BARE_UNITS` (`1.6 cm`,
    `3 \\times 10^{8} km/s`, `5 students`), never a single letter on its own
    (`\\frac{1}{m} t`, `2.2 \\tau`, `9.25 m` stay products with a variable);
  - one `\\pm` (or `\\mp`) -> the two-element list: `\\frac{-1 \\pm \\sqrt{17}}{2}` ->
    `\\frac{-1 + \\sqrt{17}}{2}, \\frac{-1 - \\sqrt{17}}{2}`, equal to HMMT's two-root gold.
Everything else (fractions, radicals, sets, intervals, equations, percent, degrees,
`\\dfrac`, `\\left`) is math-verify's own normalisation, unchanged. Rewriting only the
gold would move the failure to models that answer in the gold's notation; both
sides always go through the same function. `check_golds` grades every gold of a
benchmark against a few renderings of itself (`python eval.py --check-golds minerva`).

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

from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# math-verify logs a warning the first time it runs with its timeouts off (we always
# do, see the docstring) and on every string it cannot parse; both are noise here.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# math-verify's default LaTeX normalisation with one change: units=False. Its unit
# stripping drops a trailing t/h/c/s/l/g/d/m/o (and "ab", "bc", ...) as a unit, which
# turns Minerva's symbolic golds into wrong ones; `normalize` strips units instead.
_NORM = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False)
_EXTRACTION = [LatexExtractionConfig(normalization_config=_NORM), ExprExtractionConfig()]
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
# normalisation: the same rewrite for gold and prediction, in front of math-verify

# a number written 4.5e33 / 1e-5 / 2.7778E-6 (not part of a word or a longer number)
_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+\.?\d*|\.\d+)[eE]([-+]?\d+)(?![\w.])")
_PY_FLOAT_DOT = re.compile(r"(?<=\d)\.(?![\d.])")  # "-1./3" -> "-1/3"
_PY_FUNCS = {"arcsin": r"\arcsin", "arccos": r"\arccos", "arctan": r"\arctan", "asin": r"\arcsin",
             "acos": r"\arccos", "atan": r"\arctan", "sin": r"\sin", "cos": r"\cos", "tan": r"\tan",
             "sinh": r"\sinh", "cosh": r"\cosh", "tanh": r"\tanh", "exp": r"\exp", "log": r"\ln",
             "log10": r"\log_{10}", "log2": r"\log_{2}", "sqrt": r"\sqrt", "pi": r"\pi"}  # fmt: skip
_PY_MODULE_CALL = re.compile(r"\b(?:np|numpy|math|sp|sympy)\.([A-Za-z]\w*)")
# a function name written without its backslash, right before "(": arcsin(10/13)
_BARE_FUNC = re.compile(r"(?<![\\A-Za-z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|ln|exp|sqrt)(?=\s*\()")
_SQRT_PAREN = re.compile(r"\\sqrt\s*\(([^()]*)\)")  # \sqrt(2) -> \sqrt{2} (math-verify reads \sqrt{...} only)
_PM = re.compile(r"\\(?:pm|mp)(?![A-Za-z])")
_TEXT_CMD = re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox|rm|operatorname)\b")
# a trailing text group (a unit): [spacing] \text{...} [^{..} | ^n]
_TEXT_UNIT_TAIL = re.compile(
    r"(?:\\[,;:! ]|~|\s)*\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{[^{}]*\}"
    r"(?:\s*\^\s*(?:\{[^{}]*\}|[-+]?\d))?\s*$"
)  # fmt: skip
_UNIT_JOINER_TAIL = re.compile(r"(?:\s|\\[,;:! ]|~|/|\\cdot|\\times|\*)+$")
# Bare unit words, dropped only after a plain number. No single letters: m, s, t, c, ...
# are variables as often as units (Minerva's `\frac{37}{4} m`, `\frac{1}{\sqrt{2}} c`).
# Physical units, then the word-problem ones math-verify's own list covered; a plural
# s / es is accepted on each.
_BARE_UNITS = (
    "cm mm km nm um pm Mpc kpc pc AU ly kg mg mol eV keV MeV GeV Hz kHz MHz GHz Pa kPa atm erg "
    "yr hr min sec ms ns deg rad ft mph kmh mL ml cal kcal "
    "year month week day hour minute second degree feet foot inch yard mile acre hectare meter metre "
    "gram pound ounce liter litre gallon dollar cent rupee unit point student people person man men "
    "woman women way coin apple ticket"
).split()
_UNIT_WORD = r"(?:" + "|".join(sorted(_BARE_UNITS, key=len, reverse=True)) + r")(?:e?s)?(?:\s*\^\s*(?:\{[-+]?\d+\}|[-+]?\d))?"
_BARE_UNIT_TAIL = re.compile(  # a plain number, a unit word, more unit words or "/letter" (km/s)
    r"^(?P<num>[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:\s*\\times\s*10\s*\^\s*(?:\{[-+]?\d+\}|\d))?)"
    r"\s*(?:\\[,;:! ]|~)?\s*" + _UNIT_WORD
    + r"(?:\s*(?:(?:\\[,;:! ]|~|/|\\cdot)\s*)?" + _UNIT_WORD + r"|\s*/\s*[A-Za-z](?:\^\{?-?\d\}?)?)*\s*$"
)  # fmt: skip


def _latex_sci(s):
    """4.5e33 -> 4.5 \\times 10^{33}, 1e-5 -> 1 \\times 10^{-5} (every e-notation number in s)."""
    return _E_NOTATION.sub(lambda m: f"{m.group(1).rstrip('.')} \\times 10^{{{m.group(2).lstrip('+')}}}", s)


def _braces_balanced(s):
    depth = 0
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        i += 1
    return depth == 0


def _strip_units(s):
    """Drop trailing units: text-set ones (\\text{ cm}, \\mathrm{ergs} \\mathrm{s}^{-1}) after
    anything, bare unit words (cm, km, ergs) after a plain number. Keeps `s` if nothing
    but text would be left, or if text would remain inside the answer (\\mathrm{H}_2\\mathrm{O})."""
    out = s
    while True:
        m = _TEXT_UNIT_TAIL.search(out)
        if m is None or not _braces_balanced(out[: m.start()]):  # no tail, or it sits inside a group
            break
        rest = _UNIT_JOINER_TAIL.sub("", out[: m.start()])
        if not rest.strip():
            break
        out = rest
    if out != s and _TEXT_CMD.search(out):  # text left over: a chemical formula or words, not a unit
        out = s
    m = _BARE_UNIT_TAIL.match(out.strip())
    if m:
        out = m.group("num")
    return out.strip()


def _expand_pm(s):
    """One \\pm (or \\mp) and no list around it: both roots, as a two-element list."""
    if len(_PM.findall(s)) != 1 or "," in s or ";" in s:
        return s
    plus = _PM.sub(lambda m: "+" if m.group(0) == "\\pm" else "-", s)
    minus = _PM.sub(lambda m: "-" if m.group(0) == "\\pm" else "+", s)
    return f"{plus}, {minus}"


def normalize(s):
    """The rewrite applied to a box's content and to a reference answer alike (docstring)."""
    s = s.strip()
    s = _PY_MODULE_CALL.sub(lambda m: _PY_FUNCS.get(m.group(1), m.group(0)), s)
    s = _BARE_FUNC.sub(lambda m: _PY_FUNCS.get(m.group(1), "\\" + m.group(1)), s)
    s = _SQRT_PAREN.sub(r"\\sqrt{\1}", s)
    s = _latex_sci(s)
    s = _PY_FLOAT_DOT.sub("", s)
    s = s.replace("°", "^{\\circ}")
    s = _strip_units(s)
    return _expand_pm(s)


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
    return tuple(parse("\\boxed{" + normalize(answer) + "}", extraction_config=_EXTRACTION, parsing_timeout=None))


def _verify_unbounded(pred, answer):
    """math-verify on two answer strings, with its own (signal) timeouts off. May be slow."""
    gold = list(_parse_gold(answer))
    if not gold:
        return 0.0
    target = parse("\\boxed{" + normalize(pred) + "}", extraction_config=_EXTRACTION, parsing_timeout=None)
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


def _worker_init():
    """Runs first in each pool worker. A forked worker inherits the parent's Python signal
    handlers: with train.py's Ctrl-C/SIGTERM handler (runs.Stop) it would catch the SIGTERM
    that pool.terminate() sends, keep waiting for tasks, and the parent's join would hang
    forever. Workers die on SIGTERM and leave Ctrl-C to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _new_pool(n):
    return _pool_context().Pool(n, initializer=_worker_init)


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
        pool = _new_pool(min(workers, len(todo)))
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
# gold self-check: does each reference answer accept the ways a model writes it?

_PLAIN_FRACTION = re.compile(r"^\s*([-+]?)\s*(\d+)\.?\s*/\s*(\d+)\.?\s*$")  # 5/2, -1./3
# a number as normalize writes it: 1.6, -1,000, 4.5 \times 10^{33}, -1/3, \frac{3}{4}
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:(?:\d[\d,]*\.?\d*|\.\d+)(?:\s*\\times\s*10\^\{[-+]?\d+\})?|\d+/\d+|\\frac\{\d+\}\{\d+\})$")


def renderings(answer):
    """[(name, response)]: ways of writing `answer` that a careful human grader accepts.

    boxed      the gold verbatim in a box (always)
    latex_sci  e-notation as LaTeX scientific notation: 4.5e33 -> 4.5 \\times 10^{33};
               and `10^{-5}` for a mantissa of 1 (power_of_ten)
    latex_func a Python function call in LaTeX: np.arcsin(10/13) -> \\arcsin(10/13)
    frac       a plain fraction as \\frac: -1./3 -> -\\frac{1}{3}
    unit       a number with a trailing unit: 1.6 \\text{ m} (golds that are a plain number)
    """
    out = [("boxed", f"\\boxed{{{answer}}}")]
    sci = _latex_sci(answer) if _E_NOTATION.search(answer) else None
    if sci is not None:
        out.append(("latex_sci", f"\\boxed{{{sci}}}"))
        m = _E_NOTATION.fullmatch(answer.strip())
        if m and float(m.group(1)) == 1.0:
            out.append(("power_of_ten", f"\\boxed{{10^{{{m.group(2).lstrip('+')}}}}}"))
    if _PY_MODULE_CALL.search(answer):
        out.append(("latex_func", "\\boxed{" + _PY_MODULE_CALL.sub(lambda m: _PY_FUNCS.get(m.group(1), m.group(0)), answer) + "}"))
    m = _PLAIN_FRACTION.match(answer)
    if m:
        sign = "-" if m.group(1) == "-" else ""
        out.append(("frac", f"\\boxed{{{sign}\\frac{{{m.group(2)}}}{{{m.group(3)}}}}}"))
    if _PLAIN_NUMBER.match(normalize(answer)):
        out.append(("unit", f"\\boxed{{{sci or answer} \\text{{ m}}}}"))
    return out


def check_golds(problems, *, workers=None, grader=None):
    """Grade each gold against its own renderings. problems: [{"id", "answer"}].

    Returns [{"id", "answer", "renderings": [names], "failed": [names]}] in order; a gold
    is robust when `failed` is empty. grader: grade_many-like callable (default
    grade_many), so the same check can be run against another grader.
    """
    grader = grader or (lambda r, a: grade_many(r, a, workers=workers))
    rows, responses, answers = [], [], []
    for p in problems:
        rend = renderings(_check_answer(p["answer"]))
        rows.append({"id": str(p["id"]), "answer": p["answer"], "renderings": [n for n, _ in rend], "failed": []})
        responses += [r for _, r in rend]
        answers += [p["answer"]] * len(rend)
    scores = iter(grader(responses, answers))
    for row in rows:
        row["failed"] = [name for name in row["renderings"] if next(scores) != 1.0]
    return rows


def format_check_golds(name, rows):
    """The failing golds, one a line, then the summary line."""
    bad = [r for r in rows if r["failed"]]
    lines = [f"  {name} id {r['id']}: gold {r['answer']!r} rejects {', '.join(r['failed'])}" for r in bad]
    lines.append(f"[check-golds] {name}: {len(rows) - len(bad)} of {len(rows)} golds robust "
                 f"({sum(len(r['renderings']) for r in rows)} renderings graded), {len(bad)} fail")  # fmt: skip
    return "\n".join(lines)


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
