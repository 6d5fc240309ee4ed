"""study.py: end to end on tiny budgets (2 methods x 1 seed x 2 steps, in-process and as
parallel subprocesses), resume/skip logic, and the summary's speedup arithmetic on
hand-written eval histories. Runs in a temporary working directory so the warm-start cache
(.cache/lab) never lands in the repo."""

import json
import os

import pytest

import study
from test_train import FAST  # the train tests' tiny budget: 2 prompts x 4 samples, 24 tokens, 3 warm-start steps

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False

RUN_KEYS = {"method", "seed", "peak_acc", "peak_step", "final_acc", "speedup"}


def study_main(*argv):
    return study.main(study.get_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def _lab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("study")


@pytest.fixture(autouse=True)
def _cwd(_lab_dir, monkeypatch):
    monkeypatch.chdir(_lab_dir)  # .cache/lab is created here and shared by this file's tests


def test_study_end_to_end_writes_summary_plots_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "lab")
    base = ["--methods", "grpo,antisd", "--seeds", "0", "--steps", "2", "--eval-every", "1", "--out", out]
    summary = study_main(*base, "--", *FAST)
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary))
    assert [(r["method"], r["seed"]) for r in on_disk["runs"]] == [("grpo", 0), ("antisd", 0)]
    for r in on_disk["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert 0.0 <= r["peak_acc"] <= 1.0 and 0.0 <= r["final_acc"] <= r["peak_acc"] and r["final_step"] == 2
        assert r["peak_step"] in (0, 1, 2) and (r["speedup"] is None or r["speedup"] > 0)
    grpo = on_disk["runs"][0]
    assert grpo["speedup"] == (1.0 if grpo["peak_step"] > 0 else None)  # GRPO against itself
    assert set(on_disk["methods"]) == {"grpo", "antisd"}
    assert {"n_seeds", "peak_acc_median", "final_acc_median", "speedup_median", "n_reached"} <= set(on_disk["methods"]["antisd"])
    # GRPO logs the teacher pass, so its teacher entropy exists for the plots
    grpo_steps = study.read_run(os.path.join(out, "grpo", "s0"))["steps"]
    assert all(rec["teacher_entropy_median"] is not None for rec in grpo_steps.values())
    if HAVE_MPL:
        for name in ("accuracy", "reward", "teacher_entropy", "teacher_entropy_gate", "resp_len", "frac_search", "overview"):
            path = os.path.join(out, "plots", f"{name}.png")
            assert os.path.getsize(path) > 1000, path
    capsys.readouterr()

    # an existing study is never silently overwritten; --skip-existing skips finished runs
    with pytest.raises(SystemExit, match="--skip-existing"):
        study_main(*base, "--", *FAST)
    wall = on_disk["meta"]["study_wall_s"]
    assert on_disk["meta"]["runs_timed"] == 2 and wall > 0
    study_main(*base, "--skip-existing", "--", *FAST)
    assert "grpo s0: done, skipped" in capsys.readouterr().out
    # a call that ran nothing keeps the wall time of the call that ran the runs
    assert json.load(open(os.path.join(out, "summary.json")))["meta"]["study_wall_s"] == wall
    # --plots-only and --table read what is on disk
    os.remove(os.path.join(out, "summary.json"))
    study_main("--out", out, "--plots-only")
    assert json.load(open(os.path.join(out, "summary.json")))["runs"][1]["method"] == "antisd"
    study_main("--out", out, "--table")
    assert "| antisd | 1 |" in capsys.readouterr().out


def test_parallel_subprocess_runs_and_resume_of_a_cut_run(tmp_path, capsys):
    out = str(tmp_path / "lab")
    common = ["--seeds", "0", "--steps", "2", "--eval-every", "0", "--out", out]
    study_main("--methods", "sd,revkl", *common, "--jobs", "2", "--", *FAST, "--save-every", "1")
    for m in ("sd", "revkl"):
        assert os.path.isfile(os.path.join(out, m, "s0", "train.log"))
        assert study.run_state(study.normalize(study.get_parser().parse_args(["--out", out, "--steps", "2", "--", *FAST])), m, 0) == "done"
    # cut sd back to its step-1 checkpoint: --skip-existing resumes it to step 2 (in-process), skips revkl
    import shutil

    shutil.rmtree(os.path.join(out, "sd", "s0", "checkpoint-2"))
    mpath = os.path.join(out, "sd", "s0", "metrics.jsonl")  # killed before the final eval: its record is not there
    lines = [ln for ln in open(mpath).read().splitlines() if not ('"eval_acc"' in ln and json.loads(ln)["step"] == 2)]
    open(mpath, "w").write("\n".join(lines) + "\n")
    capsys.readouterr()
    summary = study_main("--methods", "sd,revkl", *common, "--skip-existing", "--", *FAST, "--save-every", "1")
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "revkl s0: done, skipped" in printed
    assert {r["method"]: r["final_step"] for r in summary["runs"]} == {"sd": 2, "revkl": 2}
    assert all(r["speedup"] is None for r in summary["runs"])  # no GRPO run: undefined


def test_finished_runs_without_checkpoints_are_done_and_unfinished_ones_are_moved_aside(tmp_path, capsys):
    """results/ in git holds finished runs without their checkpoints: --skip-existing must skip
    them, not rerun them; an unfinished run without a checkpoint is rerun, its files kept aside."""
    out = str(tmp_path / "lab")
    common = ["--methods", "grpo", "--seeds", "0,1", "--steps", "1", "--eval-every", "0", "--out", out]
    study_main(*common, "--", *FAST)
    import glob
    import shutil

    for ck in glob.glob(os.path.join(out, "grpo", "s*", "checkpoint-*")):
        shutil.rmtree(ck)  # as committed: no weights
    m1 = os.path.join(out, "grpo", "s1", "metrics.jsonl")
    first = open(m1).read().splitlines()[0]
    open(m1, "w").write(first + "\n")  # s1: only its step-0 eval, killed in step 1
    before = open(os.path.join(out, "grpo", "s0", "metrics.jsonl")).read()
    capsys.readouterr()
    study_main(*common, "--skip-existing", "--", *FAST)
    printed = capsys.readouterr().out
    assert "grpo s0: done, skipped" in printed and open(os.path.join(out, "grpo", "s0", "metrics.jsonl")).read() == before
    (aside,) = glob.glob(os.path.join(out, "grpo", "s1.broken-*"))
    assert "moved to" in printed and open(os.path.join(aside, "metrics.jsonl")).read().count("\n") == 1
    assert study.finished_metrics(os.path.join(out, "grpo", "s1"), 1)  # rerun to the end
    assert [r["seed"] for r in json.load(open(os.path.join(out, "summary.json")))["runs"]] == [0, 1]  # the aside dir is no run


def _fake_run(out, method, seed, evals):
    d = study.run_dir(out, method, seed)
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for step in range(1, max(evals) + 1):
            f.write(json.dumps({"step": step, "loss": 0.0, "reward_mean": 0.5, "lam": 0.5, "teacher_entropy_median": 1.0}) + "\n")
        for step, acc in evals.items():
            f.write(json.dumps({"step": step, "eval_acc": acc, "frac_search": 0.5}) + "\n")


def test_summary_speedup_follows_the_paper(tmp_path):
    out = str(tmp_path)
    _fake_run(out, "grpo", 0, {0: 0.3, 20: 0.5, 40: 0.6, 60: 0.55})  # best 0.6 at step 40
    _fake_run(out, "grpo", 1, {0: 0.3, 20: 0.4, 40: 0.5, 60: 0.5})  # best 0.5 at step 40 (first)
    _fake_run(out, "antisd", 0, {0: 0.3, 20: 0.65, 40: 0.6, 60: 0.7})  # reaches 0.6 at 20: 2x
    _fake_run(out, "antisd", 1, {0: 0.3, 20: 0.4, 40: 0.45, 60: 0.45})  # never reaches 0.5
    _fake_run(out, "sd", 0, {0: 0.3, 20: 0.2, 40: 0.2, 60: 0.2})  # never
    s = study.summarize(out)
    runs = {(r["method"], r["seed"]): r for r in s["runs"]}
    assert runs[("grpo", 0)]["speedup"] == 1.0 and runs[("grpo", 1)]["peak_step"] == 40
    assert runs[("antisd", 0)]["speedup"] == 2.0 and runs[("antisd", 0)]["reach_step"] == 20
    assert runs[("antisd", 0)]["peak_acc"] == 0.7 and runs[("antisd", 0)]["peak_step"] == 60 and runs[("antisd", 0)]["final_acc"] == 0.7
    assert runs[("antisd", 1)]["speedup"] is None and runs[("sd", 0)]["speedup"] is None
    assert s["methods"]["antisd"]["speedup_median"] == 1.0  # median of [2.0, 0 (never)]
    assert s["methods"]["antisd"]["n_reached"] == 1 and s["methods"]["sd"]["n_reached"] == 0
    table = study.markdown_table(s)
    assert "| antisd | 2 |" in table and "2.0x / never" in table


def test_sparsity_sweep_smoke_levels_budgets_summary_and_plots(tmp_path, capsys):
    """--levels (issue 15): each level a first study in OUT/L<L>/ with its own budget and
    --lab-level, the official recipe as a method, OUT/summary.json with the level and the step-0
    sparsity of every run, and the sweep plots."""
    out = str(tmp_path / "sparse")
    argv = ["--levels", "0.5:2,0.9:1", "--methods", "grpo,antisd-official", "--seeds", "0", "--eval-every", "1", "--out", out]
    summary = study_main(*argv, "--", *FAST)
    assert json.load(open(os.path.join(out, "summary.json"))) == json.loads(json.dumps(summary))
    assert list(summary["levels"]) == ["0.5", "0.9"] and [lv["steps"] for lv in summary["levels"].values()] == [2, 1]
    for key, lv in summary["levels"].items():
        assert set(lv["methods"]) == {"grpo", "antisd-official"}
        assert 0.0 <= lv["frac_all_wrong0"] <= lv["frac_zero_var0"] <= 1.0
        # each level is a first-study directory whose runs were told their level
        for m in ("grpo", "antisd-official"):
            targs = json.load(open(os.path.join(out, f"L{key}", m, "s0", "args.json")))
            assert targs["lab_level"] == float(key) and targs["steps"] == lv["steps"]
            assert targs["recipe"] == ("official" if m == "antisd-official" else "paper")
        assert os.path.isfile(os.path.join(out, f"L{key}", "summary.json"))
    assert [(r["level"], r["method"], r["final_step"]) for r in summary["runs"]] == [(0.5, "grpo", 2), (0.5, "antisd-official", 2), (0.9, "grpo", 1), (0.9, "antisd-official", 1)]
    assert all(RUN_KEYS | {"level", "frac_zero_var0"} <= set(r) for r in summary["runs"])
    steps = study.read_run(os.path.join(out, "L0.9", "antisd-official", "s0"))["steps"]
    assert all(rec["tok_term_abs_mean"] >= 0 and rec["seq_adv_abs_mean"] >= 0 for rec in steps.values())
    if HAVE_MPL:
        for name in ("accuracy_per_level", "speedup_vs_sparsity", "token_term", "accuracy_per_seed"):
            assert os.path.getsize(os.path.join(out, "plots", f"{name}.png")) > 1000, name
    capsys.readouterr()
    study_main(*argv, "--table")
    assert "| 0.9 |" in capsys.readouterr().out
    study_main("--table", "--out", out)  # a sweep's summary read without --levels: the sweep table
    assert "| 0.9 | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--levels"):
        study_main("--levels", "1.2:5", "--out", out, "--plots-only")


def test_sweep_summary_reads_each_level_and_its_step0_sparsity(tmp_path):
    out = str(tmp_path)
    for level, zv in ((0.5, 0.25), (0.9, 0.75)):
        ld = study.level_dir(out, level)
        _fake_run(ld, "grpo", 0, {0: 0.1, 20: 0.3, 40: 0.4})
        _fake_run(ld, "antisd", 0, {0: 0.1, 20: 0.45, 40: 0.4})  # reaches GRPO's 0.4 at 20: 2x
        for m in ("grpo", "antisd"):  # the step-1 record carries the sparsity
            p = os.path.join(study.run_dir(ld, m, 0), "metrics.jsonl")
            lines = open(p).read().splitlines()
            lines[0] = json.dumps({**json.loads(lines[0]), "frac_zero_var": zv, "frac_all_wrong": zv - 0.25})
            open(p, "w").write("\n".join(lines) + "\n")
    s = study.summarize_sweep(out, study.parse_levels("0.5:40,0.9"))
    assert s["levels"]["0.5"]["frac_zero_var0"] == 0.25 and s["levels"]["0.9"]["frac_all_wrong0"] == 0.5
    assert s["levels"]["0.9"]["steps"] is None and s["levels"]["0.9"]["methods"]["antisd"]["speedup_median"] == 2.0
    assert {(r["level"], r["method"], r["speedup"]) for r in s["runs"]} == {(0.5, "grpo", 1.0), (0.5, "antisd", 2.0), (0.9, "grpo", 1.0), (0.9, "antisd", 2.0)}
    assert "| 0.9 | 0.75 | antisd | 1 |" in study.sweep_table(s)
    if HAVE_MPL:
        assert [os.path.basename(p) for p in study.plot_sweep(out, s, smooth=1)] == ["accuracy_per_level.png", "speedup_vs_sparsity.png", "token_term.png", "accuracy_per_seed.png"]
    with pytest.raises(SystemExit, match="bad entry"):
        study.parse_levels("0.5:x")
