"""bench_step.py: the lab's training step, GRPO vs AntiSD, interleaved, as a ratio and a split.

    python bench/bench_step.py                                   # this tree: 3 rounds x 6 steps of each method
    git archive main | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/bench_step.py --baseline /tmp/base              # and an older tree, interleaved with this one

Each run is `python <tree>/train.py` on the lab defaults (--model tiny, B 16 x G 8, 96 new
tokens, micro-batch 64), same seed, `--steps` steps, in a subprocess with OMP_NUM_THREADS=1,
run from the current directory so every run loads the same cached warm start (.cache/lab;
the first run of a fresh checkout trains it, ~3 min). Held-out evaluation is cut to 4
problems x 1 sample (it is outside the step time anyway). Runs are interleaved: each round
runs every (tree, method) once, in an order reversed every other round, so a change in the
machine's load hits all of them alike. Per (tree, method), the step time and its split
(train.py's own metrics.jsonl: t_sample = rollouts, t_score = teacher prompts + teacher pass,
t_update = the forward/backward passes and the optimizer step) are the medians over steps
2..steps of all rounds (step 1 pays one-time costs), and so is the step's process CPU time
(train.py's step_cpu_time: with one thread it counts only the time the step ran, not the time
it waited for a core, so it is the robust number on a loaded machine). Printed: the AntiSD /
GRPO ratio per tree, wall (also per round, to show the spread) and CPU, the split, the
baseline / this-tree ratio per method, and the teacher prompt tokens computed vs scoring
every row's own (train.py logs both). A tree whose train.py predates step_cpu_time gets "-".

On a shared machine absolute times mean little; ratios within one run are what to read
(bench/README.md records them with the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("grpo", "antisd")
FIELDS = ("step_time", "t_sample", "t_score", "t_update")


def load_avg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_once(tree: str, method: str, steps: int, out: str, extra: list[str]) -> list[dict]:
    """One train.py run; returns its per-step metric records."""
    cmd = [sys.executable, os.path.join(tree, "train.py"), "--method", method, "--steps", str(steps), "--out", out, "--seed", "0",
           "--eval-limit", "4", "--eval-k", "1", "--sample-every", "0", "--save-every", str(10 * steps), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench_step: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(args: argparse.Namespace) -> dict:
    trees = {"this": ROOT}
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "train.py")):
            raise SystemExit(f"bench_step: --baseline {args.baseline!r} has no train.py")
        trees["baseline"] = os.path.abspath(args.baseline)
    extra = args.train_args.split() if args.train_args else []
    combos = [(t, m) for t in trees for m in METHODS]
    recs: dict[tuple, list[list[dict]]] = {c: [] for c in combos}
    print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), load average {load_avg()} at start; torch threads 1 per run")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = combos if r % 2 == 0 else combos[::-1]
            for tree, method in order:
                out = os.path.join(tmp, f"{tree}-{method}-r{r}")
                recs[(tree, method)].append(run_once(trees[tree], method, args.steps, out, extra))
                last = recs[(tree, method)][-1]
                print(f"round {r + 1}/{args.rounds} {tree:8s} {method:6s}: step {med([x['step_time'] for x in last[1:]]):.2f} s (median of steps 2-{args.steps}) | load {load_avg()}", flush=True)
    wall = time.time() - t0

    def steps_of(c):  # steps 2.. of every round
        return [x for run in recs[c] for x in run[1:]]

    summary = {"machine": f"{os.cpu_count()} CPUs ({cpu_name()})", "load_end": load_avg(), "rounds": args.rounds, "steps": args.steps, "wall_s": wall, "trees": trees, "results": {}}
    print(f"\nmedians over steps 2-{args.steps} of {args.rounds} rounds (seconds); load average at end {load_avg()}, {wall / 60:.1f} min")
    print(f"{'tree':8s} {'method':6s} | {'step':>6s} | {'sample':>6s} | {'teacher':>7s} | {'update':>6s} | {'CPU s':>6s} | teacher prompt tokens computed / per-row total")
    for c in combos:
        xs = steps_of(c)
        res = {f: med([x[f] for x in xs]) for f in FIELDS}
        cpu = [x.get("step_cpu_time") for x in xs]  # the process's CPU time (train.py logs it; older trees do not)
        res["step_cpu_time"] = med(cpu) if cpu and None not in cpu else None
        pt = [x.get("teacher_prompt_tokens") for x in xs]
        rows = [x.get("teacher_prompt_tokens_rows") for x in xs]
        if all(v is not None for v in pt + rows) and pt:
            res["teacher_prompt_tokens"], res["teacher_prompt_tokens_rows"] = sum(pt) / len(pt), sum(rows) / len(rows)
            tok = f"{res['teacher_prompt_tokens']:.0f} / {res['teacher_prompt_tokens_rows']:.0f} ({res['teacher_prompt_tokens'] / res['teacher_prompt_tokens_rows']:.2f})"
        else:
            tok = "-"
        res["per_round_step"] = [med([x["step_time"] for x in run[1:]]) for run in recs[c]]
        summary["results"][f"{c[0]}:{c[1]}"] = res
        cpu_s = f"{res['step_cpu_time']:6.2f}" if res["step_cpu_time"] is not None else "     -"
        print(f"{c[0]:8s} {c[1]:6s} | {res['step_time']:6.2f} | {res['t_sample']:6.2f} | {res['t_score']:7.2f} | {res['t_update']:6.2f} | {cpu_s} | {tok}")
    print()
    for tree in trees:
        a, g = summary["results"][f"{tree}:antisd"], summary["results"][f"{tree}:grpo"]
        per_round = [x / y for x, y in zip(a["per_round_step"], g["per_round_step"])]
        summary[f"ratio_{tree}"] = a["step_time"] / g["step_time"]
        summary[f"ratio_{tree}_per_round"] = per_round
        cpu = ""
        if a["step_cpu_time"] is not None and g["step_cpu_time"] is not None:
            summary[f"ratio_{tree}_cpu"] = a["step_cpu_time"] / g["step_cpu_time"]
            cpu = f"; by CPU time {summary[f'ratio_{tree}_cpu']:.2f}x"
        print(f"AntiSD / GRPO step ({tree}): {summary[f'ratio_{tree}']:.2f}x wall (per round: {', '.join(f'{x:.2f}' for x in per_round)}){cpu}")
    if "baseline" in trees:
        for m in METHODS:
            b, t = summary["results"][f"baseline:{m}"], summary["results"][f"this:{m}"]
            summary[f"speedup_{m}"] = b["step_time"] / t["step_time"]
            cpu = ""
            if b["step_cpu_time"] is not None and t["step_cpu_time"] is not None:
                summary[f"speedup_{m}_cpu"] = b["step_cpu_time"] / t["step_cpu_time"]
                cpu = f"; by CPU time {summary[f'speedup_{m}_cpu']:.2f}x"
            print(f"{m} step, baseline / this tree: {summary[f'speedup_{m}']:.2f}x wall{cpu}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.out}")
    return summary


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every (tree, method) once")
    p.add_argument("--steps", type=int, default=6, help="train.py steps per run; steps 2..N are timed")
    p.add_argument("--baseline", default=None, help="a second source tree (a directory with train.py) to interleave with this one")
    p.add_argument("--train-args", default="", help='extra train.py flags for every run, one string (e.g. "--prompts-per-step 4 --max-new-tokens 24")')
    p.add_argument("--out", default=None, help="write the summary JSON here (e.g. bench/results/cpu_lab_step.json)")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
