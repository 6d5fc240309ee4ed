"""grading.py: extraction, math-verify equivalences, no substring credit, think blocks, timeouts."""

import multiprocessing as mp
import signal
import threading
import time

import pytest

import grading
from grading import extract_answer, grade, grade_many

# --- extraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last box counts
        ("\\fbox{7}", "7"),
        ("\\boxed {7}", "7"),  # a space before the brace
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\left\\{1, 2\\right\\}}", "\\left\\{1, 2\\right\\}"),  # escaped braces are not grouping
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("$\\boxed{ -3 }$", "-3"),
        ("no box here: 42", None),
        ("\\boxed{}", None),  # empty box
        ("\\boxed{   }", None),
        ("\\boxed{3} and then \\boxed{4", None),  # the last box never closes (truncated): no answer
        ("<think>maybe \\boxed{5}</think>The answer is \\boxed{6}.", "6"),
        ("<think>it is \\boxed{5}</think>I am not sure.", None),  # only inside the think block
        ("<think>it is \\boxed{5} and still thinking", None),  # unclosed think block
        ("<think>a</think> \\boxed{1} <think>b</think> final \\boxed{2}", "2"),  # after the LAST </think>
        ("<think>a</think> \\boxed{1} <think> \\boxed{2}", "1"),  # a new think block that never closed
        ("reasoning (template put <think> in the prompt)</think>\\boxed{9}", "9"),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- grade: equivalences and non-equivalences ------------------------------------------


def boxed(x):
    return f"Some reasoning.\n\nThe final answer is $\\boxed{{{x}}}$."


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "\\frac{1}{2}"),  # fraction vs decimal
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "\\frac12"),  # \dfrac and brace-less \frac
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),  # sqrt forms
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("\\{1, 2\\}", "\\{2, 1\\}"),  # sets in any order
        ("[0, 1)", "[0,1)"),  # intervals
        ("(-\\infty, 2]", "(-\\infty,2]"),
        ("-3", "-3"),  # negatives
        ("-\\frac{1}{3}", "\\frac{-1}{3}"),
        ("x = 5", "5"),  # an assignment
        ("204", "204"),
        ("011", "11"),  # AIME-style leading zero
        ("1,000", "1000"),
        ("\\frac{\\pi}{2}", "\\pi/2"),
        ("x^2+2x+1", "(x+1)^2"),
    ],
)
def test_grade_equivalent(pred, gold):
    assert grade(boxed(pred), gold) == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("12", "2"),  # no substring credit
        ("2", "12"),
        ("3", "-3"),  # sign matters
        ("(0, 1)", "[0, 1)"),  # interval ends matter
        ("0.333", "\\frac{1}{3}"),  # not close enough
        ("\\{1, 2\\}", "\\{1, 2, 3\\}"),
        ("2\\sqrt{3}", "\\sqrt{8}"),
    ],
)
def test_grade_not_equivalent(pred, gold):
    assert grade(boxed(pred), gold) == 0.0


def test_grade_response_shapes():
    assert grade("The answer is 5.", "5") == 0.0  # no box, no credit (even though 5 is there)
    assert grade("\\boxed{}", "5") == 0.0
    assert grade("\\boxed{5} wait, no: \\boxed{6}", "6") == 1.0  # multiple boxes: the last counts
    assert grade("\\boxed{5} wait, no: \\boxed{6}", "5") == 0.0
    assert grade("<think>\\boxed{5}</think>", "5") == 0.0  # only in the think block
    assert grade("<think>\\boxed{5}", "5") == 0.0  # unclosed think block
    assert grade("<think>hmm \\boxed{4}</think>So \\boxed{5}", "5") == 1.0
    assert grade("\\boxed{\\boxed{5}}", "5") == 1.0  # a box inside the box
    assert grade("\\boxed{I don't know}", "5") == 0.0
    with pytest.raises(ValueError):
        grade("\\boxed{5}", "")  # an empty reference is a data bug, not a 0


# --- never hangs -----------------------------------------------------------------------

ADVERSARIAL = "9^{9^{9^{9}}}"  # sympy would try to evaluate this for a very long time


def test_timeout_in_main_thread_scores_zero_quickly():
    t0 = time.monotonic()
    assert grade(boxed(ADVERSARIAL), "5", timeout=0.5) == 0.0
    assert time.monotonic() - t0 < 5.0


def test_timeout_restores_an_outer_alarm():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        assert grade(boxed("7"), "7") == 1.0
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left <= 3.0  # the caller's timer is still armed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_grade_from_a_thread():
    # math-verify's own signal timeouts raise off the main thread; ours delegates to a process
    out = {}

    def work():
        out["ok"] = grade(boxed("\\frac{1}{2}"), "0.5")
        out["bad"] = grade(boxed(ADVERSARIAL), "5", timeout=0.5)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert out == {"ok": 1.0, "bad": 0.0}


def test_grade_many_matches_grade_and_pool_matches_inline():
    responses = [boxed(p) for p in ["1", "0.5", "12", "x=3", "\\{2,1\\}"]] + ["no box", "<think>\\boxed{1}</think>"]
    answers = ["1", "\\frac12", "2", "3", "\\{1,2\\}", "1", "1"]
    expected = [grade(r, a) for r, a in zip(responses, answers)]
    assert expected == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert grade_many(responses, answers, workers=0) == expected
    assert grade_many(responses, answers, workers=2, inline_below=0) == expected  # forced through the pool
    with pytest.raises(ValueError):
        grade_many(["a"], ["1", "2"])


def test_pool_timeout_in_worker():
    responses = [boxed(ADVERSARIAL), boxed("3"), boxed("4")]
    assert grade_many(responses, ["5", "3", "5"], workers=2, timeout=0.5, inline_below=0) == [0.0, 1.0, 0.0]


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="the patched function reaches workers by fork")
def test_pool_guard_kills_a_worker_stuck_where_no_signal_lands(monkeypatch):
    real = grading._verify_unbounded

    def stuck(pred, answer):
        if pred == "HANG":  # like a long C call: SIGALRM is never delivered
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        return real(pred, answer)

    monkeypatch.setattr(grading, "_verify_unbounded", stuck)
    t0 = time.monotonic()
    out = grading._grade_in_pool([("1", "1"), ("HANG", "1"), ("2", "2"), ("3", "4")], workers=2, timeout=0.2, guard=2.0)
    assert out == [1.0, 0.0, 1.0, 0.0]  # the stuck pair scores 0, the rest are regraded in a fresh pool
    assert time.monotonic() - t0 < 20


def test_speed_30_problems_x_32_samples():
    responses, answers = grading._bench_batch(30, 32)
    t0 = time.monotonic()
    scores = grade_many(responses, answers, workers=2)
    dt = time.monotonic() - t0
    assert len(scores) == 960 and 0.2 < sum(scores) / 960 < 0.5
    assert dt < 30, f"grading 960 responses took {dt:.1f} s"  # ~1.5 s on an idle 2-core CPU; loose for shared CI
