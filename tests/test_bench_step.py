"""bench/bench_step.py: one real train.py run through run_once (tiny budget), and the
interleaving + summary logic with canned runs (no timings are asserted)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_step  # noqa: E402

TINY = "--prompts-per-step 2 --group-size 4 --max-new-tokens 16 --warm-steps 3 --micro-batch 3 --warmup-steps 1"


def test_run_once_runs_train_and_returns_its_step_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the 3-step warm start is cached here, never in the repo
    recs = bench_step.run_once(ROOT, "antisd", 2, str(tmp_path / "run"), TINY.split())
    assert [r["step"] for r in recs] == [1, 2]
    r = recs[-1]
    assert all(r[f] >= 0 for f in bench_step.FIELDS) and r["t_score"] > 0
    assert 0 < r["teacher_prompt_tokens"] <= r["teacher_prompt_tokens_rows"]


def test_summary_ratios_and_interleaving(tmp_path, monkeypatch):
    """Canned step records: the printed ratios are the medians' ratios, runs alternate order."""
    calls = []
    base = {"grpo": 2.0, "antisd": 2.5}  # this tree's step times; the baseline is 1.5x slower
    b = str(tmp_path / "b")

    def fake_run(tree, method, steps, out, extra):
        calls.append(("baseline" if tree == b else "this", method))
        t = base[method] * (1.5 if tree == b else 1.0)
        return [{"step": s + 1, "step_time": t if s else 99.0, "t_sample": 1.0, "t_score": 0.5 * (method == "antisd"), "t_update": t - 1.0,
                 "step_cpu_time": t / 2 if tree != b else None, "teacher_prompt_tokens": 30 if method == "antisd" else None, "teacher_prompt_tokens_rows": 90 if method == "antisd" else None} for s in range(steps)]  # fmt: skip

    monkeypatch.setattr(bench_step, "run_once", fake_run)
    os.makedirs(b)
    open(os.path.join(b, "train.py"), "w").close()
    out = tmp_path / "s.json"
    args = bench_step.get_parser().parse_args(["--rounds", "2", "--steps", "3", "--baseline", b, "--out", str(out)])
    s = bench_step.main(args)
    assert calls[:4] == [("this", "grpo"), ("this", "antisd"), ("baseline", "grpo"), ("baseline", "antisd")]
    assert calls[4:] == calls[:4][::-1]  # round 2 runs in the reverse order
    assert s["ratio_this"] == pytest.approx(1.25) and s["ratio_baseline"] == pytest.approx(1.25)
    assert s["speedup_grpo"] == pytest.approx(1.5) and s["speedup_antisd"] == pytest.approx(1.5)  # step 1 (99 s) is not timed
    assert s["results"]["this:antisd"]["teacher_prompt_tokens"] == 30 and "teacher_prompt_tokens" not in s["results"]["this:grpo"]
    assert s["ratio_this_cpu"] == pytest.approx(1.25) and "ratio_baseline_cpu" not in s and "speedup_grpo_cpu" not in s  # the baseline logs no CPU time
    assert json.load(open(out))["ratio_this"] == pytest.approx(1.25)
    with pytest.raises(SystemExit, match="has no train.py"):
        bench_step.main(bench_step.get_parser().parse_args(["--baseline", str(tmp_path)]))
