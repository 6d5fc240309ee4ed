"""bench_sampler.py: our sampler (rollout.sample, the paged engine) vs the previous sampler and HF
`model.generate`, tokens/s; and the engine's scheduling report (no model needed).

    python bench/bench_sampler.py --preset 10m --rows 64 --n 8 --new-tokens 128 --rounds 5 --threads 1
    python bench/bench_sampler.py --preset 4b --rows 256 --n 8 --new-tokens 1024 --rounds 2   # CUDA only
    python bench/bench_sampler.py --schedule     # scheduling report: 256 rollouts, lognormal lengths, 80 GB plan

Scheduling report (--schedule, CPU, seconds): Qwen3-4B's memory plan on an 80 GB card
(memory.plan, AdamW offloaded while sampling) gives the KV budget; 256 rollouts (32 prompts
x 8, 256-token prompts) get response lengths from a lognormal (median 1.5K, sigma 0.75: mean
~2K) capped at --new-tokens (8,192 and 16,384), and rollout.simulate runs the engine's
scheduler on them. Printed: decode forward calls, mean and peak live rows per call,
preemptions, and the ideal max(longest, total tokens / rows, KV token-steps / KV budget).

The old sampler (bench/old_sampler.py, the pre-engine rollout.py) is timed too ("old").

Both samplers get the same model, the same prompts and the same rows (B = rows / n distinct
prompts, each repeated n times, prompt-major), the same max_new_tokens and the same sampling
distribution: T = --temperature with top-k off and top-p = 1 (or greedy for both at T = 0).
EOS stopping is off for both (generate gets eos_token_id=None, we get no EOS ids), so every
row generates exactly --new-tokens tokens and the counted work is equal; the script asserts
that. Only generated tokens count. generate gets its inputs already repeated n times, which
is exactly what its `num_return_sequences` does internally (and the only option for greedy);
so with n > 1 it prefills every prompt n times while we prefill it once: that is a real
difference of the two samplers in RL (G samples per prompt), and --n 1 removes it.

Rounds alternate (ours, generate, ours, generate, ...) after one untimed warm-up of each,
so drift in machine load hits both. The headline is the ratio of each sampler's best round
(other load only ever slows a run down); medians and per-round ratios show the spread, and
on CPU the process CPU time (robust to other processes on a shared machine, with
--threads 1). With --peak-gbps (guessed for H100 / H200 / A100 on CUDA) it prints the
fraction of the memory-bandwidth floor reached: the floor of one rollout is the sum over
decode steps of (weight bytes + KV bytes read that step) / peak bandwidth; the measured time
includes the prefill, so the fraction is a lower bound.

Presets: tiny (model.load("tiny"), ~1M), 10m and 50m (Qwen3 shapes with the tiny tokenizer's
569-token vocabulary, random weights), 4b (random:Qwen/Qwen3-4B-Instruct-2507, bf16; CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: model, rollout
from model import build_tiny_tokenizer, left_pad, load, tiny_config  # noqa: E402
from rollout import sample  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import old_sampler  # noqa: E402  the pre-engine sampler, the baseline

# Qwen3 shapes at ~10M and ~50M parameters (on top of model.TINY_CONFIG; vocabulary 569).
SHAPES = {
    "10m": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=64),
    "50m": dict(hidden_size=640, intermediate_size=1920, num_hidden_layers=10, num_attention_heads=10, num_key_value_heads=2, head_dim=64),
}
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM peak of SXM parts, GB/s


def build(preset: str, device: torch.device, seed: int):
    if preset == "tiny":
        return load("tiny", device=device, seed=seed)
    if preset == "4b":
        return load("random:Qwen/Qwen3-4B-Instruct-2507", device=device, seed=seed)
    from transformers import Qwen3ForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(tiny_config(tok, **SHAPES[preset])).eval()
    return model, tok


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        return f"{model}, {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rollout_bytes_gb(model, N: int, P: int, T: int) -> float:
    """Bytes one rollout must read from memory, over all T decode steps, in GB (divide by GB/s).

    Per step: every weight once (the input embedding only reads N rows, so it is left out
    unless tied to the output head) plus the KV cache of every row up to that step.
    """
    cfg = model.config.get_text_config(decoder=True)
    params = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights once
    w_bytes = sum(p.numel() * p.element_size() for p in params)
    emb = model.get_input_embeddings().weight
    if emb.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        w_bytes -= emb.numel() * emb.element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * emb.element_size()  # K and V
    kv_bytes = sum(N * (P + t) * kv_per_token for t in range(T))  # our cache reads the padded prompt too
    return (T * w_bytes + kv_bytes) / 1e9


def schedule_report(args) -> dict:
    """The engine's schedule at the paper's shape under the 80 GB plan (module docstring)."""
    import memory
    from transformers import AutoConfig

    import model as model_lib

    kw = model_lib._rope(model_lib.REAL_CONFIGS["Qwen/Qwen3-4B-Instruct-2507"])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    out = {}
    for gpu, gib in (("80GB", 79.6), ("141GB", 139.8)):
        for T in (8192, 16384):
            p = memory.plan(cfg, gpu_bytes=int(gib * memory.GiB), rows=256, prompt_len=256, new_tokens=T, group=8)
            lens = memory.lognormal_lengths(256, median=1500, sigma=0.75, cap=T, seed=args.seed)
            st = memory.concurrent_rows(p, lens, prompt_len=256, page_size=args.page_size)
            out[f"{gpu}_{T}"] = dict(kv_tokens=p.kv_tokens, worst_case_rows=p.sample_rows, **st)
            print(f"{gpu:5s} {T:5d} new: KV {p.kv_tokens} tokens ({p.kv_tokens * p.kv_per_token / memory.GiB:.1f} GiB), worst case {p.sample_rows} rows | "
                  f"lengths mean {st['mean_length']:.0f} longest {st['longest']} | decode calls {st['decode_calls']} = {st['ratio_to_ideal']:.3f}x ideal "
                  f"{st['ideal_decode_calls']} | live rows mean {st['mean_live_rows']:.1f} peak {st['max_live_rows']} | preemptions {st['preemptions']}")  # fmt: skip
    tight = memory.plan(cfg, gpu_bytes=int(79.6 * memory.GiB), rows=256, prompt_len=256, new_tokens=8192, group=8, offload=False)
    lens = memory.lognormal_lengths(256, median=1500, sigma=0.75, cap=8192, seed=args.seed)
    st = memory.concurrent_rows(tight, lens, prompt_len=256, page_size=args.page_size)
    out["80GB_8192_resident"] = dict(kv_tokens=tight.kv_tokens, worst_case_rows=tight.sample_rows, **st)
    print(f"80GB  8192 new, AdamW resident (--keep-optim-on-gpu): KV {tight.kv_tokens} tokens, worst case {tight.sample_rows} rows | decode calls "
          f"{st['decode_calls']} = {st['ratio_to_ideal']:.3f}x ideal {st['ideal_decode_calls']} | live rows mean {st['mean_live_rows']:.1f} peak {st['max_live_rows']} | preemptions {st['preemptions']}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), schedule=out), f, indent=1)
        print(f"wrote {args.out}")
    return out


def main(args):
    if args.schedule:
        return schedule_report(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.preset == "4b" and device.type != "cuda":
        sys.exit("bench_sampler: the 4b preset needs CUDA (a random 4B model on CPU would take hours)")
    assert args.rows % args.n == 0, "--rows must be a multiple of --n"
    model, tok = build(args.preset, device, args.seed)
    n_params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())

    # Ragged prompts of random token ids (no special tokens), the same for both samplers.
    g = torch.Generator().manual_seed(args.seed)
    B = args.rows // args.n
    lens = torch.randint(args.prompt_min, args.prompt_max + 1, (B,), generator=g)  # (B,)
    prompts = [torch.randint(0, 500, (int(L),), generator=g).tolist() for L in lens]
    T, N = args.new_tokens, args.rows
    rep = [p for p in prompts for _ in range(args.n)]  # prompt-major, as generate would repeat them
    ids, mask = left_pad(rep, tok.pad_token_id, device)  # (N, P)
    P = ids.shape[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_ours(new_tokens, fn=sample, **kw):
        gen = torch.Generator(device=device).manual_seed(args.seed)
        r = fn(model, prompts, n=args.n, max_new_tokens=new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
               eos_token_ids=[], pad_token_id=tok.pad_token_id, generator=gen, **kw)  # fmt: skip
        return int(r.lengths.sum())

    def run_generate(new_tokens):
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=tok.pad_token_id, **sampling)  # fmt: skip
        assert out.shape == (N, P + new_tokens), out.shape  # no early stop: every row made new_tokens tokens
        return N * new_tokens

    runs = {"ours": lambda t: run_ours(t, page_size=args.page_size, attention=args.attention), "old": lambda t: run_ours(t, fn=old_sampler.sample),
            "generate": run_generate}  # fmt: skip
    for a in filter(None, args.also.split(",")):  # more attention paths of the engine, in the same rounds
        runs[f"ours_{a}"] = lambda t, a=a: run_ours(t, page_size=args.page_size, attention=a)
    for f in runs.values():  # warm-up (allocator, kernels, lazy imports), untimed
        f(min(8, T))
    results = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, f in runs.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            n_tok = f(T)
            sync()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            assert n_tok == N * T, (name, n_tok)
            results[name].append(dict(wall_s=wall, cpu_s=cpu, tokens=n_tok, tok_per_s=n_tok / wall))
            print(f"round {r} {name:10s} {n_tok} tokens  wall {wall:7.2f}s  {n_tok / wall:9.1f} tok/s  cpu {cpu:7.2f}s", flush=True)

    # Headline: best round of each (the least disturbed by other load: a shared machine only
    # ever slows a run down); medians and per-round ratios show the spread.
    best = {k: max(x["tok_per_s"] for x in v) for k, v in results.items()}
    med = {k: statistics.median(x["tok_per_s"] for x in v) for k, v in results.items()}
    ratio, ratio_med = best["ours"] / best["generate"], med["ours"] / med["generate"]
    per_round = [o["tok_per_s"] / g_["tok_per_s"] for o, g_ in zip(results["ours"], results["generate"])]
    cpu_ratio = min(g_["cpu_s"] for g_ in results["generate"]) / min(o["cpu_s"] for o in results["ours"])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    summary = dict(
        preset=args.preset, params=n_params, device=str(device), device_name=dev_name, torch=torch.__version__,
        threads=torch.get_num_threads(), rows=N, prompts=B, n=args.n, prompt_len_padded=P, new_tokens=T,
        temperature=args.temperature, best_tok_per_s=best, median_tok_per_s=med, ratio=ratio, ratio_of_medians=ratio_med, per_round_ratio=per_round,
        cpu_time_ratio=cpu_ratio if device.type == "cpu" else None,
    )  # fmt: skip
    print(f"{args.preset} ({n_params / 1e6:.1f}M params) on {dev_name}, {torch.get_num_threads()} threads, {N} rows ({B} prompts x n={args.n}) x {T} new tokens")
    print(f"best round: ours {best['ours']:.1f} tok/s  generate {best['generate']:.1f} tok/s  ratio {ratio:.2f}x")
    print(f"medians:    ours {med['ours']:.1f} tok/s  generate {med['generate']:.1f} tok/s  ratio {ratio_med:.2f}x  (per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    if device.type == "cpu":
        print(f"process CPU time, best round: generate / ours = {cpu_ratio:.2f}x")
    old_ratio = best["ours"] / best["old"]
    old_cpu = min(o["cpu_s"] for o in results["old"]) / min(o["cpu_s"] for o in results["ours"])
    summary.update(ratio_vs_old=old_ratio, cpu_time_ratio_vs_old=old_cpu if device.type == "cpu" else None)
    print(f"vs the old sampler: best rounds ours / old = {old_ratio:.2f}x" + (f", process CPU time old / ours = {old_cpu:.2f}x" if device.type == "cpu" else ""))
    for k in results:
        if k.startswith("ours_"):
            c = min(o["cpu_s"] for o in results["ours"]) / min(o["cpu_s"] for o in results[k])
            summary[f"{k}_vs_ours"] = best[k] / best["ours"]
            print(f"{k}: best rounds {best[k]:.1f} tok/s = {best[k] / best['ours']:.2f}x ours" + (f", process CPU time ours / {k} = {c:.2f}x" if device.type == "cpu" else ""))

    peak = args.peak_gbps
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_GBPS.items() if k in dev_name), None)
    if peak:
        floor = rollout_bytes_gb(model, N, P, T) / peak  # seconds at peak bandwidth
        fastest = min(x["wall_s"] for x in results["ours"])
        summary.update(peak_gbps=peak, floor_s=floor, floor_fraction=floor / fastest)
        print(f"memory-bandwidth floor {floor:.3f}s at {peak:.0f} GB/s; ours best {fastest:.3f}s -> {floor / fastest:.1%} of the floor (incl. prefill)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), summary=summary, runs=results), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # workload
    p.add_argument("--preset", default="10m", choices=["tiny", "10m", "50m", "4b"], help="model: tiny (~1M), 10m, 50m (random Qwen3 shapes, 569-token vocab), 4b (random Qwen3-4B-Instruct-2507, CUDA only)")
    p.add_argument("--rows", type=int, default=64, help="rows N sampled in one batch (= prompts x n)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (G); 1 = every row its own prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (EOS is off, so exactly this many)")
    p.add_argument("--prompt-min", type=int, default=16, help="shortest prompt, tokens")
    p.add_argument("--prompt-max", type=int, default=48, help="longest prompt, tokens (prompts are ragged in [min, max])")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for both (0 = greedy for both)")
    # measurement
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, each runs ours then generate")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared 2-core box, 2 threads swing run times 20x)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size of the engine, tokens")
    p.add_argument("--attention", default="auto", choices=["auto", "gather", "mirror", "flex", "flex_eager"], help="the engine's decode attention (rollout.sample's attention=)")
    p.add_argument("--also", default="", help="comma-separated more attention paths of the engine to time in the same rounds, e.g. flex (reported as ours_<path>)")
    p.add_argument("--schedule", action="store_true", help="only the scheduling report (no model, CPU, seconds); see the docstring")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth peak in GB/s for the floor estimate (default: guessed for H100/H200/A100, none on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model weights, prompts and sampling")
    p.add_argument("--out", default="", help="write args, summary and per-round numbers to this JSON file")
    main(p.parse_args())
