"""bench_sampler.py: our sampler (rollout.sample) vs HF `model.generate`, tokens/s.

    python bench/bench_sampler.py --preset 10m --rows 64 --n 8 --new-tokens 128 --rounds 5 --threads 1
    python bench/bench_sampler.py --preset 4b --rows 64 --new-tokens 1024 --rounds 2   # CUDA only

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


def main(args):
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

    def run_ours(new_tokens, fast=None):
        gen = torch.Generator(device=device).manual_seed(args.seed)
        r = sample(model, prompts, n=args.n, max_new_tokens=new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
                   eos_token_ids=[], pad_token_id=tok.pad_token_id, generator=gen, fast=fast)  # fmt: skip
        return int(r.lengths.sum())

    def run_generate(new_tokens):
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=tok.pad_token_id, **sampling)  # fmt: skip
        assert out.shape == (N, P + new_tokens), out.shape  # no early stop: every row made new_tokens tokens
        return N * new_tokens

    runs = {"ours": run_ours, "generate": run_generate}
    if args.also_plain:  # ablation: our loop on DynamicCache + the 2D mask (sample(fast=False))
        runs["ours-plain"] = lambda new_tokens: run_ours(new_tokens, fast=False)
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
    if args.also_plain:
        plain = max(x["tok_per_s"] for x in results["ours-plain"])
        print(f"ablation: ours-plain (DynamicCache + 2D mask) best {plain:.1f} tok/s = {plain / best['generate']:.2f}x generate")

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
    p.add_argument("--also-plain", action="store_true", help="also time our loop on the plain path (DynamicCache, 2D mask: sample(fast=False))")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth peak in GB/s for the floor estimate (default: guessed for H100/H200/A100, none on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model weights, prompts and sampling")
    p.add_argument("--out", default="", help="write args, summary and per-round numbers to this JSON file")
    main(p.parse_args())
