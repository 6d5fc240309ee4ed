"""eval.py: the paper's evaluation (avg@k, pass@k, the Avg column) and its speedup metric.

    python eval.py --model Qwen/Qwen3-4B-Instruct-2507 --bench aime24,aime25,aime26,hmmt25,minerva
    python eval.py --model tiny --bench tests/fixtures/tiny_eval.jsonl --k 2 --max-new-tokens 16
    python eval.py --speedup runs/grpo/metrics.jsonl runs/antisd/metrics.jsonl
    python eval.py --model runs/antisd-tiny-s0/checkpoint-60 --bench lab      # the lab, as train.py evaluates it

Protocol (SPEC section 4) [P]: k samples per problem with T = 0.7, top-p = 0.95 from our own
sampler (rollout.sample), graded by grading.grade (the same function training uses for
rewards); avg@32 on AIME 2024/2025/2026 and HMMT Feb 2025, avg@4 on MinervaMath; the Avg
column is the mean of the benchmarks' avg@k. `--k` overrides the per-benchmark k for all.
[D] --max-new-tokens defaults to 32768 (the paper trains "up to 32K tokens" and does not
print its eval length; long reasoning needs it, short runs should lower it).
[D] A response cut at the length limit is graded on the text it has (the extractor
already gives 0 to an unclosed think block or an unclosed box); the truncation rate is
reported next to the accuracy.

Metrics, per benchmark with n problems, k samples each, c_i correct for problem i:
    avg@k  = mean_i (c_i / k)                         (the paper's number, in %)
    pass@m = mean_i [1 - C(k - c_i, m) / C(k, m)]     for m = 1, 2, 4, ..., k
pass@m is the unbiased estimator of Chen et al. (2021), computed as the stable product
1 - prod_{j = k-c+1}^{k} (1 - m / j) (no huge binomials); pass@1 == avg@k.

Speedup (the paper's "reaches GRPO's best Avg in 2-10x fewer steps"): from two eval
histories step -> Avg, the baseline's best Avg and its (first) step, the first step
at which the method reaches that Avg, ratio = baseline step / method step; plus peak and
final values of both runs (the paper reports peaks; a forker needs both).

The lab (`--bench lab`): train.py's CPU lab task (lab.py) evaluated as train.py does it: its 200
held-out problems with the lab's own prompt (no math instruction) and grader, k = 4, T = 0.7,
top-p 1.0, 96 new tokens (each unless given), so the number matches train.py's eval_acc.

Output: a table on stdout; with --out DIR, DIR/samples.jsonl (one line per sample: bench,
problem id, sample index, response, extracted answer, correct, finished, length) and
DIR/summary.json (args + metrics).

Shapes: B problems per sampler call, k samples each, N = B * k rows, T = max_new_tokens.
"""

import argparse
import json
import math
import os
import sys
import time

import data

PAPER_BENCHES = "aime24,aime25,aime26,hmmt25,minerva"
MAX_NEW_TOKENS = 32768  # [D] see above; the lab's responses need 96


# The parser needs no torch: `--help` and a mistyped flag answer before the heavy imports below
# (torch, transformers and math-verify take seconds).
def get_parser():
    p = argparse.ArgumentParser(description="evaluate a model on the paper's math benchmarks, or compare two runs (--speedup)")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", default=None, help="'tiny', 'random:<hub id>', a hub id or a local checkpoint dir")
    g.add_argument("--bench", default=PAPER_BENCHES,
                   help=f"comma-separated: registered names ({', '.join(data.SOURCES)}), lab (train.py's CPU lab), NAME=PATH for a local copy in "
                        f"that dataset's layout, or .jsonl/.json/.parquet paths with problem/answer (default: the paper's five)")  # fmt: skip
    g.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark (quick runs; default: all)")
    g = p.add_argument_group("sampling (paper: k=32 AIME/HMMT, k=4 Minerva, T=0.7, top-p 0.95)")
    g.add_argument("--k", type=int, default=None, help="samples per problem for every benchmark (default: each benchmark's own k)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1.0 = off); default 0.95 (lab 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="skip (and list) problems whose prompt is longer; prompts that leave no room for --max-new-tokens in the model's context are always skipped so")
    g.add_argument("--max-new-tokens", type=int, default=None, help=f"response length limit in tokens; default {MAX_NEW_TOKENS} (the paper trains up to 32K; lab 96)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per sampler call (problems x samples); default: as many as fit in free GPU memory at full length, at most 64 (64 on CPU)")
    g.add_argument("--enable-thinking", default="off", choices=["default", "on", "off"],
                   help="chat-template thinking switch (Qwen3): off = the paper's non-thinking setting (train.py's default too); default = the template's own")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads; default $OMP_NUM_THREADS if set, else 1 for --bench lab (as train.py), torch's own otherwise")
    g.add_argument("--grade-workers", type=int, default=None, help="grading processes (default: min(8, cpus); 0 = in-process)")
    g.add_argument("--out", default=None, help="directory for samples.jsonl and summary.json (default: print only)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or data reports")
    g = p.add_argument_group("speedup mode")
    g.add_argument("--speedup", nargs=2, metavar=("BASE.jsonl", "METHOD.jsonl"), default=None,
                   help="compare two runs' metrics.jsonl eval records instead of evaluating")
    g.add_argument("--metric", default="eval_acc", help="the metrics.jsonl field holding the eval Avg (with --speedup)")
    g = p.add_argument_group("gold self-check")
    g.add_argument("--check-golds", default=None, metavar="BENCH_OR_FILE",
                   help="instead of evaluating: grade each gold of these benchmarks (same spec as --bench) against "
                        "renderings of itself (boxed, LaTeX scientific notation, \\frac, a trailing unit) and list the failures")  # fmt: skip
    return p


if __name__ == "__main__":
    ARGS = get_parser().parse_args()
    if not ARGS.speedup and not ARGS.check_golds and not ARGS.model:
        get_parser().error("--model is required (or use --speedup BASE.jsonl METHOD.jsonl, or --check-golds BENCH)")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import grading  # noqa: E402


# ----------------------------------------------------------------------------
# metrics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{j=n-c+1}^{n} (1 - k/j): a product of c terms in (0, 1]
    return 1.0 - math.prod(1.0 - k / j for j in range(n - c + 1, n + 1))


def pass_ks(k):
    """The m of pass@m to report: 1, 2, 4, ... up to k, and k itself."""
    ms, m = [], 1
    while m < k:
        ms.append(m)
        m *= 2
    return ms + [k]


def summarize(correct_by_problem, k):
    """correct_by_problem: list of per-problem lists of k floats in {0, 1} -> metrics dict (in %)."""
    n_prob = len(correct_by_problem)
    assert n_prob > 0 and all(len(c) == k for c in correct_by_problem), "every problem needs exactly k grades"
    counts = [int(round(sum(c))) for c in correct_by_problem]  # c_i
    avg = 100.0 * sum(counts) / (n_prob * k)
    passes = {m: 100.0 * sum(pass_at_k(k, c, m) for c in counts) / n_prob for m in pass_ks(k)}
    return {"avg": avg, "pass": passes, "counts": counts}


# ----------------------------------------------------------------------------
# generation + grading


def _work_items(n_problems, k, batch_size):
    """Split (problem, sample) pairs into sampler calls of at most batch_size rows.

    Returns [(problem indices, n samples each)]: whole groups of k when k <= batch_size,
    otherwise each problem's k samples in chunks of batch_size.
    """
    items = []
    if k <= batch_size:
        per = batch_size // k
        for s in range(0, n_problems, per):
            items.append((list(range(s, min(s + per, n_problems))), k))
    else:
        for i in range(n_problems):
            left = k
            while left > 0:
                items.append(([i], min(batch_size, left)))
                left -= batch_size
    return items


def auto_batch_size(model, prompt_len, max_new_tokens, cap=64):
    """Rows per sampler call whose full-length KV cache fits (issue 10: 64 rows x 33K tokens of
    Qwen3-4B is ~312 GB). On CUDA: the memory free now (the driver's free + the allocator's cached
    blocks) less a 10% margin, through memory.sample_rows_that_fit; at most `cap`. CPU: `cap`.
    Until the paged rollout engine replaces the per-call cache, this is what keeps eval in memory."""
    import memory

    device = next(model.parameters()).device
    if device.type != "cuda":
        return cap
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    rows = memory.sample_rows_that_fit(model.config, int(0.9 * free), prompt_len + max_new_tokens, dtype_bytes=model.dtype.itemsize)
    if rows < 1:
        raise RuntimeError(f"eval: one row of {prompt_len} + {max_new_tokens} tokens does not fit in the {free / 2**30:.1f} GiB free on {device}; lower --max-new-tokens")
    return min(cap, rows)


@torch.no_grad()
def evaluate(model, tokenizer, problems, *, k, temperature=0.7, top_p=0.95, top_k=0, max_new_tokens,
             batch_size=None, generator=None, enable_thinking=None, grader=grading.grade, grade_workers=None,
             progress=True, desc="eval", prompt_fn=None, max_prompt_tokens=None):  # fmt: skip
    """Sample k responses per problem and grade them.

    problems: [{"id", "problem", "answer"}] (data.load_problems).
    batch_size: rows per sampler call; None = auto_batch_size (what fits in free GPU memory).
    prompt_fn: prompt_fn(tokenizer, problem dict) -> prompt ids; default the paper's prompt
        (data.format_prompt); the lab bench passes its own.
    grader: grader(response, answer) -> float; the default grading.grade is run in batch
        through grading.grade_many (a process pool).
    max_prompt_tokens: problems whose prompt is longer are not sampled; they are printed and
        listed in "skipped", and n and avg@k are over the others. Whatever it is, a prompt
        that leaves no room for max_new_tokens in the model's context
        (config.max_position_embeddings) is skipped so: its positions would be past the
        trained range. No problem left: ValueError.
    Returns {"k", "n", "avg", "pass" {m: %}, "truncated" (%), "mean_length" (tokens),
             "per_problem" [{"id", "correct"}], "samples" [records], "skipped" [ids], "seconds"}.
    """
    import model as model_lib  # the project's model code and sampler; imported here so grading-only users need neither
    import rollout

    if not problems or k < 1:
        raise ValueError(f"evaluate needs problems and k >= 1, got {len(problems)} problems, k={k}")
    t0 = time.time()
    model_was_training = model.training
    model.eval()
    if prompt_fn is None:
        prompt_fn = lambda tok, p: data.format_prompt(tok, p["problem"], enable_thinking=enable_thinking)  # noqa: E731
    prompts = [prompt_fn(tokenizer, p) for p in problems]
    problems, prompts, skipped = _fitting(model, problems, prompts, max_prompt_tokens, max_new_tokens, desc)
    # a template that opens <think> in the prompt: the grader must see it (see data.think_prefix)
    prefixes = [data.think_prefix(tokenizer, ids) for ids in prompts]
    eos = model_lib.stop_token_ids(model, tokenizer)  # the same stop ids and ...
    texts = [[None] * k for _ in problems]  # [problem][sample] -> response text
    fin = [[False] * k for _ in problems]
    lens = [[0] * k for _ in problems]
    filled = [0] * len(problems)  # samples so far per problem
    if batch_size is None:  # what fits (auto_batch_size): a wave's KV cache is allocated for its full length
        batch_size = auto_batch_size(model, max(len(p) for p in prompts), max_new_tokens)
    items = _work_items(len(problems), k, batch_size)
    for idx, n in tqdm(items, desc=f"{desc}: sampling", disable=not progress, leave=False):
        out = rollout.sample(model, [prompts[i] for i in idx], n=n, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, top_k=top_k, eos_token_ids=eos,
                             pad_token_id=tokenizer.pad_token_id, generator=generator)  # fmt: skip
        L, F = out.lengths.cpu().tolist(), out.finished.cpu().tolist()
        # ... the same graded text as training (data.graded_texts: no stop token, special tokens kept);
        # the think prefix goes in front below, for the grader only
        decoded = data.graded_texts(tokenizer, out.tokens, out.lengths, out.finished, [""] * len(L))
        for r in range(len(idx) * n):  # rows are prompt-major: n samples of idx[0] first
            i = idx[r // n]
            s = filled[i] + r % n
            texts[i][s] = decoded[r]
            fin[i][s], lens[i][s] = bool(F[r]), L[r]
        for i in idx:
            filled[i] += n
    assert all(f == k for f in filled)

    flat_resp = [prefixes[i] + t for i, row in enumerate(texts) for t in row]  # what the grader sees
    flat_ans = [p["answer"] for p in problems for _ in range(k)]
    if grader is grading.grade:
        flat_ok = grading.grade_many(flat_resp, flat_ans, workers=grade_workers)
    else:
        flat_ok = [float(grader(r, a)) for r, a in tqdm(zip(flat_resp, flat_ans), total=len(flat_resp),
                                                        desc=f"{desc}: grading", disable=not progress, leave=False)]
    ok = [flat_ok[i * k:(i + 1) * k] for i in range(len(problems))]
    metrics = summarize(ok, k)
    samples = [
        {"id": p["id"], "sample": s, "response": texts[i][s], "extracted": grading.extract_answer(flat_resp[i * k + s]),
         "answer": p["answer"], "correct": ok[i][s], "finished": fin[i][s], "length": lens[i][s]}
        for i, p in enumerate(problems) for s in range(k)
    ]  # fmt: skip
    n_all = len(samples)
    if model_was_training:
        model.train()
    return {
        "k": k, "n": len(problems), "avg": metrics["avg"], "pass": metrics["pass"],
        "truncated": 100.0 * sum(not r["finished"] for r in samples) / n_all,
        "mean_length": sum(r["length"] for r in samples) / n_all,
        "per_problem": [{"id": p["id"], "correct": c} for p, c in zip(problems, metrics["counts"])],
        "samples": samples, "skipped": skipped, "seconds": time.time() - t0,
    }  # fmt: skip


class PromptsTooLong(ValueError):
    """No problem of a benchmark has a prompt that fits (evaluate's max_prompt_tokens)."""


def _fitting(model, problems, prompts, max_prompt_tokens, max_new_tokens, desc):
    """(problems, prompts, skipped ids): drop the problems whose prompt is over the limit (see
    evaluate's docstring), saying how many and why; every one over it: ValueError."""
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limits = [x for x in (max_prompt_tokens, ctx - max_new_tokens if ctx else None) if x is not None]
    if not limits:
        return problems, prompts, []
    limit = min(limits)
    keep = [i for i, ids in enumerate(prompts) if len(ids) <= limit]
    skipped = [problems[i]["id"] for i in range(len(problems)) if len(prompts[i]) > limit]
    why = f"--max-prompt-tokens {max_prompt_tokens}" if limit == max_prompt_tokens else f"the model's {ctx}-token context minus --max-new-tokens {max_new_tokens}"
    if not keep:
        raise PromptsTooLong(f"{desc}: every prompt is longer than {limit} tokens ({why}; the shortest has {min(map(len, prompts))})")
    if skipped:
        print(f"[eval] {desc}: skipped {len(skipped)} of {len(problems)} problems whose prompt exceeds {limit} tokens ({why}), "
              f"e.g. id {skipped[0]}; n and avg@k are over the other {len(keep)}")  # fmt: skip
    return [problems[i] for i in keep], [prompts[i] for i in keep], skipped


def load_benchmarks(specs, *, k=None, limit=None, verbose=True):
    """{name: {"problems": [...], "k": int}} for data.load_problems specs; load once, evaluate often.

    k: samples per problem for every benchmark; None = each benchmark's registered k.
    Each entry also holds "sampling": evaluate() arguments that apply unless given (the lab's
    prompt, grader and lengths; the paper's length otherwise).
    """
    benches = {}
    for spec in specs:
        if spec == "lab":  # train.py's CPU lab: its held-out set, prompt and grader (see the docstring)
            import lab

            _, held_out = lab.datasets(n_train=1, n_eval=limit or 200)
            benches["lab"] = {"problems": held_out, "k": k or 4, "sampling": {
                "top_p": 1.0, "max_new_tokens": 96, "grader": lab.grade, "prompt_fn": lambda tok, p: lab.chat_ids(tok, lab.user_text(p))}}  # fmt: skip
            continue
        problems, report = data.load_problems(spec, limit=limit, verbose=verbose)
        if report["name"] in benches:
            raise ValueError(f"benchmark {report['name']!r} given twice")
        if not problems:
            raise data.DataError(f"{spec}: no problems in {', '.join(map(str, report['files']))}")
        benches[report["name"]] = {"problems": problems, "k": k if k is not None else report["k"], "sampling": {"max_new_tokens": MAX_NEW_TOKENS}}
    return benches


def run_benchmarks(model, tokenizer, benches, *, k=None, limit=None, progress=True, **eval_kw):
    """Evaluate several benchmarks and their Avg. Used by main and by train.py's periodic eval.

    benches: load_benchmarks(...)'s dict, or a list of specs (loaded here with k and limit).
    eval_kw: evaluate()'s sampling arguments (max_new_tokens, temperature, generator, ...); a
        None value means "the benchmark's own" (its "sampling" entry, else evaluate's default).
    Returns {"benches": {name: evaluate(...) result}, "Avg": mean of the avg@k (%)}.
    """
    if not isinstance(benches, dict):
        benches = load_benchmarks(benches, k=k, limit=limit, verbose=progress)
    if not benches:
        raise ValueError("run_benchmarks: no benchmarks")
    given = {key: v for key, v in eval_kw.items() if v is not None}
    results = {name: evaluate(model, tokenizer, b["problems"], k=b["k"], progress=progress, desc=name, **{**b.get("sampling", {}), **given})
               for name, b in benches.items()}  # fmt: skip
    avg = sum(r["avg"] for r in results.values()) / len(results)
    return {"benches": results, "Avg": avg}


def format_table(result, model_name=""):
    """The printed table: one row per benchmark, then the paper-style line with the Avg column."""
    benches = result["benches"]
    ms = sorted({m for r in benches.values() for m in r["pass"]})
    head = f"{'bench':<12}{'n':>5}{'k':>4}{'avg@k':>8}" + "".join(f"{'p@' + str(m):>8}" for m in ms) + f"{'trunc%':>8}{'len':>8}"
    lines = [head, "-" * len(head)]
    for name, r in benches.items():
        cells = "".join(f"{r['pass'][m]:8.1f}" if m in r["pass"] else f"{'':>8}" for m in ms)
        lines.append(f"{name:<12}{r['n']:>5}{r['k']:>4}{r['avg']:8.1f}{cells}{r['truncated']:8.1f}{r['mean_length']:8.0f}")
    for name, r in benches.items():
        if r.get("skipped"):
            lines.append(f"  {name}: {len(r['skipped'])} problems skipped, prompt too long (not in n): {', '.join(map(str, r['skipped'][:5]))}{' ...' if len(r['skipped']) > 5 else ''}")
    lines.append("")
    names = list(benches)
    lines.append(" | ".join(["model"] + names + ["Avg"]))
    lines.append(" | ".join([model_name or "-"] + [f"{benches[n]['avg']:.1f}" for n in names] + [f"{result['Avg']:.1f}"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# speedup


def speedup(baseline_history, method_history, *, tol=1e-9):
    """The paper's speedup from two eval histories {step: Avg} (or [(step, Avg)]).

    baseline_best / baseline_best_step: the baseline's best Avg and the first step it hits it.
    method_reach_step: the first step at which the method's Avg >= baseline_best (-tol), or None.
    ratio: baseline_best_step / method_reach_step; None when never reached or reached at step 0,
    and None when the baseline's best is its step 0 (baseline_never_improved: there is no
    "steps to reach it" to compare; issue 10: this once reported a speedup of 0.0).
    Also the peak (value, first step) and the final (value, last step) of both runs.
    """
    b = sorted(dict(baseline_history).items())
    m = sorted(dict(method_history).items())
    if not b or not m:
        raise ValueError("speedup needs two non-empty histories")

    def peak(h):
        best = max(v for _, v in h)
        return best, next(s for s, v in h if v == best)

    b_best, b_step = peak(b)
    m_peak, m_peak_step = peak(m)
    reach = next((s for s, v in m if v >= b_best - tol), None)
    never = b_step == 0  # the best is the eval before training: the baseline never improved on it
    ratio = b_step / reach if reach and not never else None
    return {
        "baseline_best": b_best, "baseline_best_step": b_step, "method_reach_step": reach, "ratio": ratio,
        "baseline_never_improved": never,
        "baseline_peak": b_best, "baseline_peak_step": b_step, "baseline_final": b[-1][1], "baseline_final_step": b[-1][0],
        "method_peak": m_peak, "method_peak_step": m_peak_step, "method_final": m[-1][1], "method_final_step": m[-1][0],
    }  # fmt: skip


def read_history(path, key="eval_acc"):
    """{step: Avg} from a run's metrics.jsonl: the lines that have `step` and `key`.

    key's value is a number (the Avg), or a dict holding "Avg" / "avg", or else a dict of
    per-benchmark numbers (averaged). A step logged twice keeps its last value.
    """
    hist = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {lineno} is not valid JSON") from None
            if "step" not in rec or key not in rec:
                continue
            v = rec[key]
            if isinstance(v, dict):
                v = v.get("Avg", v.get("avg", None)) if ("Avg" in v or "avg" in v) else sum(v.values()) / len(v)
            hist[int(rec["step"])] = float(v)
    if not hist:
        raise ValueError(f"{path}: no records with 'step' and {key!r}")
    return hist


def format_speedup(s, base_name="baseline", method_name="method"):
    # histories hold either percentages (eval.py's Avg) or fractions (train.py's eval_acc):
    # fractions need more digits to be told apart
    vals = [s[k] for k in ("baseline_peak", "baseline_final", "method_peak", "method_final") if s[k] is not None]
    digits = 3 if vals and max(abs(v) for v in vals) <= 1.0 else 1

    def fmt(v, step):
        return "-" if v is None else f"{v:.{digits}f}@{step}"

    reach = "never" if s["method_reach_step"] is None else f"step {s['method_reach_step']}"
    ratio = "-" if s["ratio"] is None else f"{s['ratio']:.1f}x"
    if s.get("baseline_never_improved"):
        ratio = f"none ({base_name} never improved on its first eval)"
    return "\n".join([
        f"{'':<10}{'peak':>12}{'final':>12}",
        f"{base_name:<10}{fmt(s['baseline_peak'], s['baseline_peak_step']):>12}{fmt(s['baseline_final'], s['baseline_final_step']):>12}",
        f"{method_name:<10}{fmt(s['method_peak'], s['method_peak_step']):>12}{fmt(s['method_final'], s['method_final_step']):>12}",
        f"{method_name} reaches {base_name}'s best Avg {s['baseline_best']:.{digits}f} (step {s['baseline_best_step']}) at {reach}: speedup {ratio}",
    ])  # fmt: skip


# ----------------------------------------------------------------------------
# CLI


def check_args(args):
    """Bad flags and unusable outputs end here, naming the flag, before any model or data is loaded."""
    checks = [
        (args.k is None or args.k >= 1, "--k must be >= 1"),
        (args.limit is None or args.limit >= 1, "--limit must be >= 1"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.max_new_tokens is None or args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.max_prompt_tokens is None or args.max_prompt_tokens >= 1, "--max-prompt-tokens must be >= 1"),
        (args.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
        (args.top_p is None or 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k >= 0, "--top-k must be >= 0 (0 = off)"),
        (args.grade_workers is None or args.grade_workers >= 0, "--grade-workers must be >= 0"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"eval.py: {msg}")
    if args.out:
        check_out(args.out)


def check_out(out):
    """--out must be a directory we can write samples.jsonl and summary.json into: tried now
    (made if missing, a probe file written), not found out after the whole evaluation."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"eval.py: --out {out} is a file, not a directory")
    for name in ("samples.jsonl", "summary.json"):
        if os.path.isdir(os.path.join(out, name)):
            raise SystemExit(f"eval.py: --out {out}: {name} there is a directory")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".probe-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"eval.py: --out {out}: cannot write there ({e.strerror or e})") from None


def main(args):
    if args.check_golds:  # grade each benchmark's golds against renderings of themselves (grading.check_golds)
        out = {}
        for spec in [s.strip() for s in args.check_golds.split(",") if s.strip()]:
            try:  # a bad file or an unreachable hub: the message, not a traceback
                problems, report = data.load_problems(spec, verbose=not args.quiet)
            except (data.DataError, OSError, ValueError, RuntimeError) as e:
                raise SystemExit(f"eval.py: --check-golds {spec}: {e}") from None
            out[report["name"]] = grading.check_golds(problems, workers=args.grade_workers)
            print(grading.format_check_golds(report["name"], out[report["name"]]))
        return out
    if args.speedup:
        base, meth = args.speedup
        s = speedup(read_history(base, args.metric), read_history(meth, args.metric))
        print(format_speedup(s, "baseline", "method"))
        return s

    check_args(args)
    import memory
    import model as model_lib

    specs = [s.strip() for s in args.bench.split(",") if s.strip()]
    threads = args.threads or (1 if specs == ["lab"] and "OMP_NUM_THREADS" not in os.environ else None)
    if threads:  # the lab on CPU: 1 thread, as train.py (a second thread collapses when the machine is shared: LOG.md)
        torch.set_num_threads(threads)

    memory.configure_cuda_allocator()  # expandable segments, before the first CUDA allocation

    try:  # a missing local model directory is said before any data is read
        model_lib.check_local(args.model or "")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: --model: {e}") from None
    try:  # the data before the model: a bad file is named in seconds, not after a model load
        benches = load_benchmarks(specs, k=args.k, limit=args.limit, verbose=not args.quiet)
    except (data.DataError, OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"eval.py: --bench: {e}") from None
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model, tok = model_lib.load(args.model, dtype=dtype, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: --model: {e}") from None
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed)
    thinking = {"default": None, "on": True, "off": False}[args.enable_thinking]
    if not args.quiet:
        print(f"eval: {args.model} on {device}, thinking {args.enable_thinking}")
    try:
        result = run_benchmarks(
            model, tok, benches, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, generator=gen,
            enable_thinking=thinking, grade_workers=args.grade_workers, progress=not args.quiet,
            max_prompt_tokens=args.max_prompt_tokens,
        )  # fmt: skip
    except PromptsTooLong as e:  # every prompt of a benchmark over the limit: say which, no traceback
        raise SystemExit(f"eval.py: --bench {e}") from None
    if not args.quiet and not sys.stderr.isatty():  # a log file keeps the cleared bar's line: end it
        print(file=sys.stderr, flush=True)
    print(format_table(result, args.model), flush=True)
    if args.out:
        write_outputs(args, result)
    return result


def write_outputs(args, result):
    """DIR/samples.jsonl and DIR/summary.json, each written aside and renamed: a write that fails
    (disk full) says so, naming the file, and leaves no half file (the table is printed already)."""
    summary = {
        "args": vars(args), "Avg": result["Avg"],
        "benches": {n: {k: v for k, v in r.items() if k != "samples"} for n, r in result["benches"].items()},
    }  # fmt: skip
    for name in ("samples.jsonl", "summary.json"):
        path = os.path.join(args.out, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(args.out, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                if name == "summary.json":
                    json.dump(summary, f, indent=1)
                else:
                    for bench, r in result["benches"].items():
                        for rec in r["samples"]:
                            f.write(json.dumps({"bench": bench, **rec}, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            if os.path.isfile(tmp):
                os.remove(tmp)
            raise SystemExit(f"eval.py: could not write {path}: {e.strerror or e}") from None  # ENOSPC: "No space left on device"
    print(f"wrote {args.out}/samples.jsonl and {args.out}/summary.json")




if __name__ == "__main__":
    main(ARGS)
