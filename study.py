"""study.py: the lab study, GRPO vs SD vs AntiSD (and two ablations) over seeds, with plots.

    python study.py                                  # 5 methods x 3 seeds, train.py's lab defaults, 1 run at a time
    python study.py --jobs 2                         # 2 runs in parallel (subprocesses, 1 torch thread each)
    python study.py --skip-existing                  # resume a partial study (finished runs skipped, cut ones resumed)
    python study.py --plots-only                     # summary.json, plots and table from the runs on disk
    python study.py --table                          # print the markdown table of results/lab/summary.json
    python study.py --methods grpo,antisd --seeds 0 --steps 20 -- --prompts-per-step 8   # after --: extra train.py flags
    python study.py --levels 0.9:60,0.97:90 --methods grpo,antisd --out results/lab-sparse   # the sparsity sweep (part 2)

What it runs: train.main for each method below and each seed, into OUT/<method>/s<seed>/
(metrics.jsonl, samples.jsonl, checkpoints, train.log for subprocess runs):

    grpo            --method grpo --log-teacher   (teacher pass only for logging: its entropy is plotted too)
    sd              --method sd                   (gate none, train.py's default for sd)
    antisd          --method antisd               (median gate, tau 0.93)
    antisd-nogate   --method antisd --gate none
    revkl           --method revkl
    antisd-official --method antisd --recipe official   (not in the default --methods: the first study predates it)

What it writes: OUT/summary.json

    {"runs": [{"method", "seed", "peak_acc", "peak_step", "final_acc", "final_step", "speedup",
               "reach_step", "grpo_best_step", "wall_s"}, ...],
     "methods": {method: {"n_seeds", "peak_acc_median", "peak_step_median", "final_acc_median",
                          "speedup_median", "n_reached", "n_defined"}},
     "meta": {...machine, wall time, flags...}}

`speedup` is the paper's (eval.speedup): GRPO's best held-out accuracy step (same seed) divided
by the first step at which this run reaches that accuracy; null if it never does (or if GRPO's
best is at step 0, where the ratio is undefined). GRPO's own speedup is 1.0 by construction.
`speedup_median` counts a never-reaching seed as 0 (infinitely slow), so it is the paper's
"median over seeds" without dropping failures; `n_reached` of `n_defined` seeds reached it
(seeds without a GRPO run, or whose GRPO peaked at step 0, have no defined speedup).

Plots (OUT/plots/*.png, need matplotlib: `pip install matplotlib`; without it the summary
is still written and the study says so): held-out accuracy, train reward, teacher entropy
median with the gate state shaded per method, response length, held-out share of search
responses, mean u of the rollouts, and an overview with all of them. Each method is drawn as
the mean over seeds with a min-max band; per-step train metrics are smoothed with a moving
average of --smooth steps first (eval metrics are not smoothed).

The sparsity sweep (issue 15, `--levels L[:steps],...`): the same study at each lab
difficulty L (train.py --lab-level, lab.level_config), each with its own step budget, into
OUT/L<L>/<method>/s<seed>/ (each level directory is a first-study OUT: summary.json, plots).
OUT/summary.json then holds

    {"runs": [... the records above + "level", "frac_zero_var0"],
     "levels": {"<L>": {"level", "steps", "frac_zero_var0", "frac_all_wrong0", "methods": {as above}}},
     "meta": {...}}

`frac_zero_var0` is the step-1 record's frac_zero_var: the share of groups with zero reward
variance among the warm-started policy's rollouts, before any update (a level's value is the
mean over its runs; every method samples the same step-1 rollouts for a seed). Sweep plots
(OUT/plots/): held-out accuracy per method per level (`accuracy_per_level`), speedup vs
frac_zero_var0 with the median over seeds and per-seed points (`speedup_vs_sparsity`), and
the mean |token term| (|A_{i,t} - A_seq|) next to the mean |A_seq| per step (`token_term`),
and every seed's held-out accuracy, one panel per method and level (`accuracy_per_seed`).

Parallel runs share the warm-start cache .cache/lab (in the working directory): the study
builds it once in this process before starting them, so they never race to write it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import eval as eval_lib

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")

# study name -> train.py flags. GRPO logs the teacher pass so every method's teacher entropy is plotted.
METHODS = {
    "grpo": ["--method", "grpo", "--log-teacher"],
    "sd": ["--method", "sd"],
    "antisd": ["--method", "antisd"],
    "antisd-nogate": ["--method", "antisd", "--gate", "none"],
    "revkl": ["--method", "revkl"],
    "antisd-official": ["--method", "antisd", "--recipe", "official"],  # the authors' launcher (README "Which AntiSD?")
}
COLORS = {"grpo": "#444444", "sd": "#d62728", "antisd": "#1f77b4", "antisd-nogate": "#17becf", "revkl": "#ff7f0e", "antisd-official": "#2ca02c"}


# ---------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------


def run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, method, f"s{seed}")


def train_argv(args, method: str, seed: int) -> list[str]:
    """The train.py command line of one run (without the program name)."""
    argv = [*METHODS[method], "--seed", str(seed), "--out", run_dir(args.out, method, seed)]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.eval_every is not None:
        argv += ["--eval-every", str(args.eval_every)]
    return argv + list(args.train_args)


def run_state(args, method: str, seed: int) -> str:
    """'done' (a checkpoint at the final step, or, for a run whose checkpoints were not kept, as
    in results/ in git, a metrics.jsonl with the final step and its eval), 'partial' (a
    resumable checkpoint), 'broken' (files but neither: restarted from scratch, after the old
    directory is moved aside) or 'new'."""
    import train

    targs = train.resolve_args(train.get_parser().parse_args(train_argv(args, method, seed)))
    d = run_dir(args.out, method, seed)
    if os.path.isfile(os.path.join(d, f"checkpoint-{targs.steps}", "trainer_state.pt")) or finished_metrics(d, targs.steps):
        return "done"
    if train.latest_checkpoint(d):
        return "partial"
    return "broken" if os.path.isdir(d) and os.listdir(d) else "new"


def finished_metrics(d: str, steps: int) -> bool:
    """Whether d/metrics.jsonl records the final step and the eval after it (train.py writes the
    final eval last; the lab always evaluates at the end)."""
    try:
        run = read_run(d)
    except (OSError, ValueError):  # no file, or a line cut by a kill
        return False
    return steps in run["steps"] and steps in run["evals"]


def record_wall(d: str, seconds: float, threads: int) -> None:
    """Add this invocation's wall time to OUT/<method>/s<seed>/study.json (resumes add up)."""
    path = os.path.join(d, "study.json")
    prev = json.load(open(path)) if os.path.isfile(path) else {"wall_s": 0.0}
    rec = {"wall_s": prev["wall_s"] + seconds, "threads": threads, "machine": machine(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)


def run_inprocess(argv: list[str], threads: int) -> None:
    """train.main in this process (no import cost per run; what --jobs 1 and the tests use)."""
    import torch

    import train

    torch.set_num_threads(threads)
    old = signal.getsignal(signal.SIGINT)
    try:
        train.main(train.get_parser().parse_args([*argv, "--threads", str(threads)]))  # (train.py's lab default is 1)
    finally:
        signal.signal(signal.SIGINT, old)  # train.main installs its own Ctrl-C handler


def run_subprocess(argv: list[str], threads: int, log_path: str) -> int:
    """python train.py ... with `threads` torch/OpenMP threads, output to log_path. Returns the exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with open(log_path, "a") as log:
        return subprocess.run([sys.executable, TRAIN_PY, *argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def prewarm(argv: list[str], threads: int) -> None:
    """Build the lab's warm-start cache once before parallel runs start (each run would
    otherwise train it and write the same cache directory concurrently). Mirrors train.main's
    setup: the same model preset, task and warm-start flags give the same cache key."""
    import torch

    import lab
    import model as model_lib
    import train

    targs = train.resolve_args(train.get_parser().parse_args(argv))
    if targs.model != "tiny" or targs.init_from:
        return
    torch.set_num_threads(threads)
    model, tok = model_lib.load(targs.model, device=targs.device, seed=targs.seed)
    task = train.Task(targs, tok)
    lab.warm_start(model, tok, task.train, cache_dir=os.path.join(".cache", "lab"), **lab.warm_overrides(targs.lab_level, targs.warm_steps))


def run_all(args) -> int:
    """Every (method, seed) run that is not done, args.jobs at a time; returns how many ran."""
    todo = []
    # seed-major (every method of seed 0, then of seed 1, ...): a study cut short still holds
    # whole seeds, each with its GRPO run, so its speedups are defined
    for seed in args.seeds:
        for method in args.methods:
            state = run_state(args, method, seed)
            d = run_dir(args.out, method, seed)
            if state == "done" and args.skip_existing:
                print(f"{method} s{seed}: done, skipped")
                continue
            if state != "new" and not (args.skip_existing or args.overwrite):
                raise SystemExit(f"study.py: {d} exists; --skip-existing resumes/skips runs, --overwrite deletes them")
            if args.overwrite:
                shutil.rmtree(d, ignore_errors=True)  # asked for
                state = "new"
            elif state == "broken":  # nothing is lost: the unfinished files are kept beside the new run
                aside = f"{d}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
                os.replace(d, aside)
                print(f"{method} s{seed}: unfinished and no checkpoint: moved to {aside}, rerun from scratch")
                state = "new"
            argv = train_argv(args, method, seed) + (["--resume"] if state == "partial" else [])
            todo.append((method, seed, argv))
    if not todo:
        return 0
    if args.jobs > 1 and any("--resume" not in a for _, _, a in todo):
        print("building the warm-start cache before the parallel runs")
        prewarm(todo[0][2], args.threads)

    def one(method, seed, argv):
        d = run_dir(args.out, method, seed)
        os.makedirs(d, exist_ok=True)
        t0 = time.time()
        if args.jobs == 1:
            run_inprocess(argv, args.threads)
            rc = 0
        else:
            rc = run_subprocess(argv, args.threads, os.path.join(d, "train.log"))
        record_wall(d, time.time() - t0, args.threads)
        return rc, time.time() - t0

    print(f"{len(todo)} runs, {args.jobs} at a time, {args.threads} torch thread(s) each")
    failed = []
    if args.jobs == 1:
        for i, (method, seed, argv) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {method} s{seed}: python train.py {' '.join(argv)}", flush=True)
            _, dt = one(method, seed, argv)
            if run_state(args, method, seed) != "done":  # Ctrl-C: train.main saved and returned
                raise SystemExit(f"study.py: {method} s{seed} stopped early; rerun with --skip-existing to resume")
            print(f"[{i}/{len(todo)}] {method} s{seed}: done in {dt:.0f} s", flush=True)
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futs = {pool.submit(one, m, s, a): (m, s) for m, s, a in todo}
            for i, fut in enumerate(as_completed(futs), 1):
                (method, seed), (rc, dt) = futs[fut], fut.result()
                ok = rc == 0 and run_state(args, method, seed) == "done"
                failed += [] if ok else [f"{method} s{seed}"]
                print(f"[{i}/{len(todo)}] {method} s{seed}: {'done' if ok else f'FAILED (exit {rc})'} in {dt:.0f} s (log {run_dir(args.out, method, seed)}/train.log)", flush=True)
    if failed:
        raise SystemExit(f"study.py: failed runs: {', '.join(failed)} (see their train.log; --skip-existing resumes)")
    return len(todo)


def parse_levels(spec: str) -> list[tuple[float, int | None]]:
    """"0.9:60,0.97" -> [(0.9, 60), (0.97, None)]: lab levels with their step budgets (None: --steps)."""
    out = []
    for part in (p for p in spec.split(",") if p.strip()):
        lv, _, steps = part.partition(":")
        try:
            out.append((float(lv), int(steps) if steps else None))
        except ValueError:
            raise SystemExit(f"study.py: --levels: bad entry {part!r} (want L or L:steps, e.g. 0.9:60)") from None
        if not 0.0 <= out[-1][0] < 1.0 or (out[-1][1] is not None and out[-1][1] < 1):
            raise SystemExit(f"study.py: --levels: {part!r}: the level must be in [0, 1) and the steps >= 1")
    return out


def level_dir(out: str, level: float) -> str:
    return os.path.join(out, f"L{level:g}")


def level_args(args, level: float, steps: int | None) -> argparse.Namespace:
    """The first-study arguments of one sweep level: its directory, budget and --lab-level."""
    sub = argparse.Namespace(**vars(args))
    sub.out, sub.steps, sub.levels = level_dir(args.out, level), steps if steps is not None else args.steps, None
    sub.train_args = [*args.train_args, "--lab-level", f"{level:g}"]
    return sub


# ---------------------------------------------------------------------------------------
# Reading runs, the summary.
# ---------------------------------------------------------------------------------------


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, {platform.system()} {platform.release()}"


def read_run(d: str) -> dict:
    """{"steps": {step: record}, "evals": {step: record}} of OUT/<method>/s<seed>/metrics.jsonl;
    a step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its last record."""
    steps, evals = {}, {}
    with open(os.path.join(d, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                (evals if "eval_acc" in rec else steps)[int(rec["step"])] = rec
    return {"steps": dict(sorted(steps.items())), "evals": dict(sorted(evals.items()))}


def find_runs(out: str) -> list[tuple[str, int]]:
    """(method, seed) of every run directory with a metrics.jsonl under OUT, in METHODS order."""
    found = []
    for method in [m for m in METHODS if os.path.isdir(os.path.join(out, m))]:
        for name in sorted(os.listdir(os.path.join(out, method))):
            if name.startswith("s") and name[1:].isdigit() and os.path.isfile(os.path.join(out, method, name, "metrics.jsonl")):
                found.append((method, int(name[1:])))
    return sorted(found, key=lambda ms: (list(METHODS).index(ms[0]), ms[1]))


def _defined(r: dict) -> bool:
    """Whether a run's speedup is defined: a GRPO run of its seed exists and peaked after step 0."""
    return r["grpo_best_step"] is not None and r["grpo_best_step"] > 0


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(out: str, meta: dict | None = None) -> dict:
    """summary.json's content from the runs on disk (see the module docstring)."""
    runs, grpo, machines = [], {}, []
    found = find_runs(out)
    for method, seed in found:  # GRPO first (METHODS order), so its histories exist for the others
        d = run_dir(out, method, seed)
        hist = eval_lib.read_history(os.path.join(d, "metrics.jsonl"))  # {step: eval_acc}
        if method == "grpo":
            grpo[seed] = hist
        peak = max(hist.values())
        peak_step = min(s for s, v in hist.items() if v == peak)
        final_step = max(hist)
        rec = {"method": method, "seed": seed, "peak_acc": peak, "peak_step": peak_step, "final_acc": hist[final_step], "final_step": final_step,
               "speedup": None, "reach_step": None, "grpo_best_step": None}  # fmt: skip
        if seed in grpo:
            s = eval_lib.speedup(grpo[seed], hist)
            rec.update(speedup=s["ratio"], reach_step=s["method_reach_step"], grpo_best_step=s["baseline_best_step"])
        wall = os.path.join(d, "study.json")
        info = json.load(open(wall)) if os.path.isfile(wall) else {}
        rec["wall_s"] = round(info["wall_s"], 1) if "wall_s" in info else None
        machines += [info["machine"]] if info.get("machine") else []
        runs.append(rec)
    methods = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        methods[method] = {
            "n_seeds": len(rs),
            "peak_acc_median": _median([r["peak_acc"] for r in rs]),
            "peak_step_median": _median([r["peak_step"] for r in rs]),
            "final_acc_median": _median([r["final_acc"] for r in rs]),
            # a seed that never reaches GRPO's best counts as speedup 0; seeds without a GRPO run,
            # or whose GRPO best is at step 0 (ratio undefined), are left out
            "speedup_median": _median([r["speedup"] or 0.0 for r in rs if _defined(r)]),
            "n_reached": sum(r["reach_step"] is not None for r in rs if _defined(r)),
            "n_defined": sum(_defined(r) for r in rs),
        }
    walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
    # the machine(s) the runs ran on (their study.json), not the one writing this summary
    meta = {**(meta or {}), "machine": " | ".join(dict.fromkeys(machines)) or machine(), "total_run_wall_s": round(sum(walls), 1) if walls else None}
    return {"runs": runs, "methods": methods, "meta": meta}


def first_step(d: str) -> dict:
    """The step-1 record of a run (its rollouts come from the warm-started policy)."""
    steps = read_run(d)["steps"]
    return steps[min(steps)] if steps else {}


def summarize_sweep(out: str, levels: list[tuple[float, int | None]], meta: dict | None = None) -> dict:
    """OUT/summary.json of a sweep: every level's first-study summary, flattened (see the docstring)."""
    runs, by_level, machines = [], {}, []
    for level, steps in levels:
        ld = level_dir(out, level)
        sub = summarize(ld) if os.path.isdir(ld) else {"runs": [], "methods": {}, "meta": {}}
        machines += sub["meta"].get("machine", "").split(" | ") if sub["runs"] else []
        zv, aw = [], []
        for r in sub["runs"]:
            rec0 = first_step(run_dir(ld, r["method"], r["seed"]))
            r.update(level=level, frac_zero_var0=rec0.get("frac_zero_var"))
            zv += [rec0["frac_zero_var"]] if "frac_zero_var" in rec0 else []
            aw += [rec0["frac_all_wrong"]] if rec0.get("frac_all_wrong") is not None else []
            runs.append(r)
        by_level[f"{level:g}"] = {"level": level, "steps": steps, "frac_zero_var0": sum(zv) / len(zv) if zv else None,
                                  "frac_all_wrong0": sum(aw) / len(aw) if aw else None, "methods": sub["methods"]}  # fmt: skip
    walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
    meta = {**(meta or {}), "machine": " | ".join(dict.fromkeys(machines)) or machine(), "total_run_wall_s": round(sum(walls), 1) if walls else None}
    return {"runs": runs, "levels": by_level, "meta": meta}


def sweep_table(summary: dict) -> str:
    """The README table of a sweep: one row per level and method."""
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "| level | frac_zero_var at step 0 | method | seeds | peak held-out acc | final acc | speedup vs GRPO (median) | per seed | reached GRPO's best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, lv in summary["levels"].items():
        for method, m in lv["methods"].items():
            rs = [r for r in summary["runs"] if r["method"] == method and f"{r['level']:g}" == key]
            per = " / ".join(f"{r['speedup']:.1f}x" if r["speedup"] is not None else "never" if _defined(r) else "n/a" for r in rs)
            sp = "-" if m["speedup_median"] is None else f"{m['speedup_median']:.2f}x"
            lines.append(f"| {key} | {f(lv['frac_zero_var0'], 2)} | {method} | {m['n_seeds']} | {f(m['peak_acc_median'])} | {f(m['final_acc_median'])} | {sp} | {per} | {m['n_reached']}/{m['n_defined']} |")
    lines.append("")
    lines.append("Medians over seeds; speedup as in the first study (never = counted as 0 in the median).")
    return "\n".join(lines)


def markdown_table(summary: dict) -> str:
    """The README table: one row per method, medians over seeds, per-seed speedups."""
    f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "| method | seeds | peak held-out acc | peak step | final acc | speedup vs GRPO (median) | per seed | reached GRPO's best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, m in summary["methods"].items():
        per = " / ".join(f"{r['speedup']:.1f}x" if r["speedup"] is not None else "never" if _defined(r) else "n/a" for r in summary["runs"] if r["method"] == method)
        sp = "-" if m["speedup_median"] is None else f"{m['speedup_median']:.2f}x"
        lines.append(f"| {method} | {m['n_seeds']} | {f(m['peak_acc_median'])} | {f(m['peak_step_median'], 0)} | {f(m['final_acc_median'])} | {sp} | {per} | {m['n_reached']}/{m['n_defined']} |")
    lines.append("")
    lines.append("Medians over seeds. speedup = GRPO's best-accuracy step / the first step the run reaches it (same seed); "
                 "never = did not reach it (counted as 0 in the median); n/a = no GRPO run for that seed or GRPO peaked at step 0.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------

# (file stem, title, y label, source, key, smoothed)
PANELS = [
    ("accuracy", "held-out accuracy (avg@k)", "accuracy", "evals", "eval_acc", False),
    ("reward", "train reward", "mean reward", "steps", "reward_mean", True),
    ("teacher_entropy", "teacher entropy (median over tokens)", "nats", "steps", "teacher_entropy_median", True),
    ("resp_len", "response length", "tokens", "steps", "resp_len_mean", True),
    ("frac_search", "held-out share of search responses", "fraction", "evals", "frac_search", False),
    ("u_mean", "mean u of the rollouts' tokens", "nats", "steps", "u_mean", True),
]


def _smooth(ys: list[float], w: int) -> list[float]:
    """Trailing moving average over the last w values (w <= 1: unchanged)."""
    if w <= 1:
        return ys
    return [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]


def series(runs: dict, method: str, source: str, key: str, smooth: int) -> tuple[list, list, list, list]:
    """steps, mean, min, max over the seeds of one method (steps where at least one seed has a value)."""
    per_seed = []
    for (m, _), r in runs.items():
        if m != method:
            continue
        pts = [(s, rec[key]) for s, rec in r[source].items() if rec.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            per_seed.append(dict(zip(xs, _smooth(list(ys), smooth))))
    steps = sorted({s for d in per_seed for s in d})
    vals = [[d[s] for d in per_seed if s in d] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _draw(ax, runs, methods, panel, smooth):
    _, title, ylabel, source, key, smoothed = panel
    for method in methods:
        xs, mean, lo, hi = series(runs, method, source, key, smooth if smoothed else 1)
        if not xs:
            continue
        n = sum(1 for m, _ in runs if m == method)
        ax.plot(xs, mean, color=COLORS.get(method), label=f"{method} (n={n})", lw=1.6)
        ax.fill_between(xs, lo, hi, color=COLORS.get(method), alpha=0.15, lw=0)
    ys = [line.get_ydata() for line in ax.get_lines()]
    lo_hi = [float(y) for yy in ys for y in yy]
    if lo_hi and min(lo_hi) > 0 and max(lo_hi) / min(lo_hi) > 20:  # e.g. a teacher entropy collapsing to ~0.01 nats
        ax.set_yscale("log")
    ax.set_title(title + (f" (moving avg {smooth})" if smoothed and smooth > 1 else ""), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot(out: str, smooth: int = 5) -> list[str]:
    """Write OUT/plots/*.png from the runs on disk; returns the paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study.py: matplotlib is not installed, no plots (pip install matplotlib, then python study.py --plots-only)")
        return []
    runs = {ms: read_run(run_dir(out, *ms)) for ms in find_runs(out)}
    methods = list(dict.fromkeys(m for m, _ in runs))
    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    paths = []

    def save(fig, name, rect=(0, 0, 1, 1)):
        path = os.path.join(pdir, f"{name}.png")
        fig.tight_layout(rect=rect)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # One figure per metric, all methods: mean over seeds and min-max band.
    for panel in PANELS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        _draw(ax, runs, methods, panel, smooth)
        ax.legend(fontsize=8)
        save(fig, panel[0])

    # Teacher entropy per method with the gate state: gray where the token term is off
    # (lam == 0: warmup or gate closed) in at least half of the seeds.
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        _draw(ax, runs, [method], PANELS[2], smooth)
        ax.set_title(method, fontsize=10)
        if method == "grpo":
            ax.set_title("grpo (no token term; teacher logged)", fontsize=10)
            continue
        xs = series(runs, method, "steps", "lam", 1)[0]
        frac_off = []
        for s in xs:
            lams = [r["steps"][s]["lam"] for (m, _), r in runs.items() if m == method and s in r["steps"]]
            frac_off.append(sum(lam == 0 for lam in lams) / len(lams))
        ax.fill_between(xs, 0, 1, where=[f >= 0.5 for f in frac_off], transform=ax.get_xaxis_transform(), color="gray", alpha=0.2, lw=0, step="mid")
    fig.text(0.5, 0.01, "gray: token term off (gate warmup or closed) in >= half of the seeds; line: mean over seeds, band: min-max", ha="center", fontsize=8)
    save(fig, "teacher_entropy_gate", rect=(0, 0.05, 1, 1))

    # Overview: every panel in one figure (for the README).
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, panel in zip(axes.flat, PANELS):
        _draw(ax, runs, methods, panel, smooth)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"CPU lab: {', '.join(methods)}; mean over seeds, band min-max")
    save(fig, "overview")
    return paths


def plot_sweep(out: str, summary: dict, smooth: int = 5) -> list[str]:
    """OUT/plots/{accuracy_per_level,speedup_vs_sparsity,token_term,accuracy_per_seed}.png of a sweep ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study.py: matplotlib is not installed, no sweep plots (pip install matplotlib, then python study.py --plots-only ...)")
        return []
    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    levels = list(summary["levels"].values())
    per_level = {lv["level"]: {ms: read_run(run_dir(level_dir(out, lv["level"]), *ms)) for ms in find_runs(level_dir(out, lv["level"]))} for lv in levels}
    title = lambda lv: f"level {lv['level']:g} (frac_zero_var0 {lv['frac_zero_var0']:.2f})" if lv["frac_zero_var0"] is not None else f"level {lv['level']:g}"  # noqa: E731
    paths = []

    def save(fig, name):
        path = os.path.join(pdir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # Held-out accuracy per method, one panel per level: mean over seeds, min-max band.
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        runs = per_level[lv["level"]]
        _draw(ax, runs, list(dict.fromkeys(m for m, _ in runs)), PANELS[0], 1)
        ax.set_yscale("linear")  # accuracies: _draw's log scale for wide ranges would hide the plateau
        ax.set_title(title(lv), fontsize=10)
        ax.legend(fontsize=7)
    save(fig, "accuracy_per_level")

    # Speedup vs sparsity: per-seed points (never reached = 0) and the median over seeds per level.
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = [m for m in METHODS if m != "grpo" and any(r["method"] == m for r in summary["runs"])]
    for j, method in enumerate(methods):
        xs, meds = [], []
        for lv in levels:
            rs = [r for r in summary["runs"] if r["method"] == method and r["level"] == lv["level"] and _defined(r)]
            if not rs or lv["frac_zero_var0"] is None:
                continue
            x = lv["frac_zero_var0"]
            jit = 0.006 * (j - (len(methods) - 1) / 2)  # methods side by side at the same x
            ax.scatter([x + jit] * len(rs), [r["speedup"] or 0.0 for r in rs], color=COLORS.get(method), alpha=0.45, s=18)
            xs.append(x + jit)
            meds.append(_median([r["speedup"] or 0.0 for r in rs]))
        if xs:
            ax.plot(xs, meds, "-o", color=COLORS.get(method), label=f"{method} (median)", lw=1.8)
    ax.axhline(1.0, color=COLORS["grpo"], ls="--", lw=1, label="GRPO (1x)")
    ax.axhline(2.0, color="gray", ls=":", lw=1, label="the paper's >= 2x")
    ax.set_xlabel("frac_zero_var at step 0 (share of groups with no reward variance)")
    ax.set_ylabel("speedup to GRPO's best held-out acc")
    ax.set_title("AntiSD's speedup vs reward sparsity (dots: seeds; never reached = 0)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "speedup_vs_sparsity")

    # The token term's size next to A_seq's, per step: solid |token term|, dashed |A_seq|.
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        runs = per_level[lv["level"]]
        for method in dict.fromkeys(m for m, _ in runs):
            for key, ls in (("tok_term_abs_mean", "-"), ("seq_adv_abs_mean", "--")):
                xs, mean, _, _ = series(runs, method, "steps", key, smooth)
                if xs and (method != "grpo" or key == "seq_adv_abs_mean"):  # GRPO's token term is 0
                    ax.plot(xs, mean, ls, color=COLORS.get(method), lw=1.3, label=f"{method} {'|token term|' if ls == '-' else '|A_seq|'}")
        ax.set_title(title(lv) + (f", moving avg {smooth}" if smooth > 1 else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mean over tokens")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    save(fig, "token_term")

    # Every seed's held-out accuracy: one row per method, one column per level; a thin line per
    # seed (a mean and band hide a method that works in some seeds and collapses in others),
    # GRPO's mean over seeds as the grey reference.
    methods = [m for m in METHODS if any(r["method"] == m for r in summary["runs"])]
    fig, axes = plt.subplots(len(methods), len(levels), figsize=(4.0 * len(levels), 2.3 * len(methods)), squeeze=False, sharey=True)
    for i, method in enumerate(methods):
        for ax, lv in zip(axes[i], levels):
            runs = per_level[lv["level"]]
            xs, mean, _, _ = series(runs, "grpo", "evals", "eval_acc", 1)
            if xs and method != "grpo":
                ax.plot(xs, mean, "--", color=COLORS["grpo"], lw=1.2, label="grpo (mean)")
            for (m, seed), run in sorted(runs.items()):
                if m == method and run["evals"]:
                    steps = sorted(run["evals"])
                    ax.plot(steps, [run["evals"][k]["eval_acc"] for k in steps], color=COLORS.get(method), lw=0.9, alpha=0.8)
            ax.set_title(f"{method}, {title(lv)}", fontsize=8)
            ax.grid(alpha=0.3)
            if i == len(methods) - 1:
                ax.set_xlabel("step")
            if ax is axes[i][0]:
                ax.set_ylabel("held-out acc")
            if method != "grpo" and xs:
                ax.legend(fontsize=6, loc="upper left")
    save(fig, "accuracy_per_seed")
    return paths


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--methods", default=",".join(m for m in METHODS if m != "antisd-official"), help=f"comma-separated, from: {', '.join(METHODS)} (default: the first study's five)")
    g.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (train.py --seed); the paper's medians need >= 3")
    g.add_argument("--steps", type=int, default=None, help="RL steps per run (default: train.py's lab default)")
    g.add_argument("--eval-every", type=int, default=None, help="held-out eval interval in steps (default: train.py's lab default)")
    g.add_argument("--levels", default=None, help="sparsity sweep: comma-separated lab levels L (train.py --lab-level), each optionally with its step budget as L:steps; runs go to OUT/L<L>/")
    g.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra train.py flags for every run")
    g = p.add_argument_group("how")
    g.add_argument("--out", default=os.path.join("results", "lab"), help="study directory: OUT/<method>/s<seed>/, OUT/summary.json, OUT/plots/")
    g.add_argument("--jobs", type=int, default=1, help="runs in parallel (subprocesses); 1 = one after the other in this process")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run")
    g.add_argument("--skip-existing", action="store_true", help="skip finished runs, resume cut ones from their last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete existing run directories and rerun them")
    g.add_argument("--smooth", type=int, default=5, help="moving-average window (steps) for per-step train metrics in plots")
    g = p.add_argument_group("no training")
    g.add_argument("--plots-only", action="store_true", help="rewrite summary.json, plots and table from the runs on disk")
    g.add_argument("--table", action="store_true", help="print the markdown table of OUT/summary.json and exit")
    return p


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    """Lists from the comma-separated flags, the train.py flags without the "--", checks. Idempotent."""
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if isinstance(args.methods, str):
        args.methods = [m for m in args.methods.split(",") if m]
    if isinstance(args.seeds, str):
        args.seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"study.py: unknown method(s) {unknown}; choose from {list(METHODS)}")
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("study.py: --jobs and --threads must be >= 1")
    return args


def main_sweep(args: argparse.Namespace) -> dict:
    """--levels: the first study at each level, then OUT/summary.json and the sweep plots."""
    levels = parse_levels(args.levels)
    path = os.path.join(args.out, "summary.json")
    if args.table:
        summary = json.load(open(path))
        print(sweep_table(summary))
        return summary
    t0, ran = time.time(), 0
    for level, steps in levels:
        sub = level_args(args, level, steps)
        if not args.plots_only:
            print(f"=== level {level:g}: {sub.steps or 'default'} steps, out {sub.out}")
        ran += run_study(sub)[1]  # the level's own summary.json, plots and table
    prev = json.load(open(path)).get("meta", {}) if os.path.isfile(path) else {}
    meta = prev if args.plots_only else {**prev, "levels": args.levels, "train_args": args.train_args, "eval_every": args.eval_every, "jobs": args.jobs, "threads": args.threads}
    if ran:  # a call that only skipped finished runs keeps the wall time of the call that ran them
        meta.update(study_wall_s=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M:%S"), runs_timed=ran)
    summary = summarize_sweep(args.out, levels, meta)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    paths = plot_sweep(args.out, summary, args.smooth)
    print(f"\nwrote {path}" + (f" and {len(paths)} sweep plots in {os.path.join(args.out, 'plots')}" if paths else ""))
    print(sweep_table(summary))
    return summary


def main(args: argparse.Namespace) -> dict:
    args = normalize(args)
    if args.levels:
        return main_sweep(args)
    path = os.path.join(args.out, "summary.json")
    if args.table:
        summary = json.load(open(path))
        print(sweep_table(summary) if "levels" in summary else markdown_table(summary))  # a sweep's OUT without --levels
        return summary
    return run_study(args)[0]


def run_study(args: argparse.Namespace) -> tuple[dict, int]:
    """One study directory: the runs not done yet, then summary.json, plots and table.
    Returns (summary, how many runs this call ran)."""
    args = normalize(args)
    path = os.path.join(args.out, "summary.json")
    t0 = time.time()
    ran = 0 if args.plots_only else run_all(args)
    prev = json.load(open(path)).get("meta", {}) if os.path.isfile(path) else {}
    meta = {**prev, "train_args": args.train_args, "steps": args.steps, "eval_every": args.eval_every, "jobs": args.jobs, "threads": args.threads} if not args.plots_only else prev
    if ran:  # a call that only skipped finished runs keeps the wall time of the call that ran them
        meta.update(study_wall_s=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M:%S"), runs_timed=ran)
    summary = summarize(args.out, meta)
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    paths = plot(args.out, args.smooth)
    print(f"\nwrote {path}" + (f" and {len(paths)} plots in {os.path.join(args.out, 'plots')}" if paths else ""))
    print(markdown_table(summary))
    return summary, ran


if __name__ == "__main__":
    main(get_parser().parse_args())
