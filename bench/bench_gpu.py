"""bench_gpu.py: issue 6's GPU benchmark in one command (<= 8 minutes on one H100 / H200).

    python bench/bench_gpu.py                                   # on a GPU; writes bench/results/gpu_<card>.json
    python bench/bench_gpu.py --preset tiny --out /tmp/b.json   # the CPU smoke test (seconds; tests/test_bench_gpu.py)
    bash bench/gpu_check.sh                                     # tests/test_cuda.py, then this (a lent GPU, no network)

Random weights at the real shapes (model.py's `random:` presets, bf16, the tiny tokenizer:
token ids < 151k, nobody reads the text), so nothing is downloaded. Sections, in priority
order; each records its numbers, or why it was skipped: every section has a time guard that
skips it if it would end past --budget-s, estimated from the sections before it (the sampler's
timed runs from their own warm-up):

  sampler  rollout.sample vs model.generate, random:Qwen/Qwen3-4B-Instruct-2507, 64 and 256
           rows (8 samples per prompt, ragged prompts of 64-192 tokens) x 1024 new tokens,
           EOS off for both (every row makes exactly 1024 tokens), T = 1, top-k off, top-p 1.
           Ours runs the engine's CUDA defaults (in-place FlexAttention over the pages, one
           CUDA graph per batch-size bucket; the JSON records which ran). One untimed
           warm-up (compiles and captures), one short run for the time guard's estimate,
           then one timed run of each (GPU time is scarce). Reports
           tokens/s and the fraction of the memory-bandwidth floor ours reaches: the bytes a
           rollout must read (every weight once per decode step + each row's KV cache so far,
           bench_sampler.rollout_bytes_gb) / the card's peak bandwidth, over the measured time
           including the prefill (so a lower bound).
  step     one full train.py step of AntiSD and of GRPO, 32 prompts x 8 rollouts x
           --step-new-tokens, bf16, AdamW with fp32 master weights and moments, fp32 gradient
           sums, gradient checkpointing, the memory plan's budgets (train.py picks them on CUDA):
           time split (sample / score / update) and peak memory, from train.py's own
           metrics.jsonl, the second of two steps (the first warms up). Random weights never
           solve anything nor emit EOS, so one_correct_per_group marks the first rollout of
           every group finished and correct: every teacher prompt holds a full-length peer
           solution, as in a learning run (issue 10: otherwise a 10-token reference, and the
           peer-choice code never ran). Every response runs to the cap: the worst case.
  step:long  the paper's 8K-token responses on an 80 GB card: one AntiSD step of 2 prompts x 8
           rollouts x 8192 new tokens with the allocator capped at 79.6 GiB and the memory plan
           told so (as_if_card_gib): the plan's budgets must hold there, teacher pass included.
  longest  the longest response for which all 32 x 8 rollouts are sampled in ONE wave next to
           the training state (bf16 weights + the fp32 AdamW states; grads are freed while
           sampling, as in train.py): a binary search, each probe one sample() call whose KV
           cache is allocated for the full length at prefill, stopped after 16 decode steps
           (every token id counts as EOS). Next to it the memory plan's estimate.
  8b       random:Qwen/Qwen3-8B: the sampler section, and the step if the plan says the
           training state fits this card (fp32 AdamW states and gradient sums: 18 B/param = 137 GiB).

The JSON holds the card, torch / transformers versions, the git commit and every number; the
table at the end is what bench/README.md records.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # model, rollout, train, memory
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_sampler
import memory  # noqa: E402
import model as model_lib  # noqa: E402
import train  # noqa: E402
from bench_sampler import rollout_bytes_gb  # noqa: E402
from rollout import sample  # noqa: E402

M4B, M8B = "random:Qwen/Qwen3-4B-Instruct-2507", "random:Qwen/Qwen3-8B"
PRESETS = {
    # one H100 / H200
    "gpu": dict(models=[M4B, M8B], rows=[64, 256], n=8, new_tokens=1024, prompt=(64, 192), step_prompts=32, step_group=8,
                step_new_tokens=512, long_prompts=2, long_new_tokens=8192, long_card_gib=79.6, budget_s=420),
    # CPU smoke test: the same code paths on the tiny model
    "tiny": dict(models=["tiny"], rows=[8, 16], n=4, new_tokens=16, prompt=(8, 24), step_prompts=4, step_group=4,
                 step_new_tokens=16, long_prompts=1, long_new_tokens=32, long_card_gib=None, budget_s=300),
}  # fmt: skip


def peak_gbps(name: str) -> float | None:
    """HBM peak bandwidth (GB/s) guessed from the device name; None if unknown (use --peak-gbps)."""
    if "H200" in name:
        return 4800.0
    if "H100" in name:
        return 2000.0 if "PCIe" in name else 3900.0 if "NVL" in name else 3350.0
    if "A100" in name:
        return 2039.0 if "80GB" in name else 1555.0
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ragged_prompts(B: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (B,), generator=g)
    return [torch.randint(0, 500, (int(L),), generator=g).tolist() for L in lens]


# ---------------------------------------------------------------------------------------
# sampler: ours vs generate
# ---------------------------------------------------------------------------------------


def bench_sampler(model, tok, rows: int, n: int, T: int, prompt_range, peak, deadline: float = float("inf"), attention: str = "auto") -> dict:
    """ours vs generate at one shape; a timed run whose estimate (from its warm-up) ends past `deadline`
    (time.time()) is skipped and says so."""
    device = next(model.parameters()).device
    prompts = ragged_prompts(rows // n, *prompt_range)
    rep = [p for p in prompts for _ in range(n)]  # prompt-major, as generate gets them
    ids, mask = model_lib.left_pad(rep, tok.pad_token_id, device)  # (N, P)
    N, P = ids.shape

    stats = {}

    def ours(t):
        r = sample(model, prompts, n=n, max_new_tokens=t, eos_token_ids=[], pad_token_id=tok.pad_token_id,
                   generator=torch.Generator(device=device).manual_seed(0), attention=attention)  # fmt: skip
        stats.update({k: r.stats[k] for k in ("attention", "graph_buckets", "decode_calls", "prefill_calls", "preemptions")})
        return int(r.lengths.sum())

    def generate(t):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=t, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=tok.pad_token_id)  # fmt: skip
        return (out.shape[1] - P) * N

    res = {"rows": N, "prompts": len(prompts), "new_tokens": T, "prompt_len_padded": P}
    for name, f in (("ours", ours), ("generate", generate)):
        f(min(8, T))  # warm-up: kernels, allocator, lazy imports, ours: FlexAttention's compile, the CUDA-graph captures
        sync(device)
        w0 = time.perf_counter()
        f(min(8, T))  # a second short run, timed: the estimate without the first-call costs
        sync(device)
        est = 1.2 * (time.perf_counter() - w0) * T / min(8, T)
        if time.time() + est > deadline:
            res[name] = {"skipped": f"time guard: ~{est:.0f}s estimated, {deadline - time.time():.0f}s left"}
            continue
        t0 = time.perf_counter()
        n_tok = f(T)
        sync(device)
        wall = time.perf_counter() - t0
        assert n_tok == N * T, (name, n_tok, N * T)
        res[name] = {"wall_s": wall, "tok_per_s": n_tok / wall, **(stats if name == "ours" else {})}
        if device.type == "cuda":
            res[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    if "skipped" in res["ours"] or "skipped" in res["generate"]:
        return res
    res["speedup"] = res["ours"]["tok_per_s"] / res["generate"]["tok_per_s"]
    if peak:
        floor = rollout_bytes_gb(model, N, P, T) / peak  # seconds at peak bandwidth
        res["floor_s"], res["floor_fraction"] = floor, floor / res["ours"]["wall_s"]
    return res


# ---------------------------------------------------------------------------------------
# step: train.py, one AntiSD step and one GRPO step
# ---------------------------------------------------------------------------------------


@contextmanager
def one_correct_per_group(train_mod=train):
    """Random weights never solve a problem nor stop, so every reward is 0 and every teacher prompt
    holds the 10-token reference, never a peer's solution (issue 10 item 16: the peer-choice path,
    where a CUDA generator once crashed, never ran). Inside this block train.py's rollouts are
    marked finished and graded correct for the first rollout of every group, incorrect for the
    rest: every group has one correct peer, every row a full-length teacher context. Also used
    by tests/test_train.py and tests/test_cuda.py."""
    real_sample, real_grade = train_mod.sample, train_mod.Task.grade
    G = {}

    def sample(model, prompts, *, n, **kw):
        r = real_sample(model, prompts, n=n, **kw)
        G["n"] = n
        r.finished[::n] = True  # (N,) the first rollout of each group "emitted its EOS" at its length
        return r

    def grade(self, texts, answers):
        return [1.0 if i % G["n"] == 0 else 0.0 for i in range(len(texts))]

    train_mod.sample, train_mod.Task.grade = sample, grade
    try:
        yield
    finally:
        train_mod.sample, train_mod.Task.grade = real_sample, real_grade



def write_problems(path: str, n: int = 32) -> str:
    """Synthetic arithmetic problems (problem / answer jsonl, data.py's generic schema), prompts of
    ~150 tokens with the tiny tokenizer; random weights will not solve them, which is fine."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = 17 * i + 3, 29 * i + 11
            text = f"A farmer has {a} apples and buys {b} more. " * 3 + f"How many apples does the farmer have now, if none were eaten? (problem {i})"
            f.write(json.dumps({"id": f"p{i}", "problem": text, "answer": str(a + b)}) + "\n")
    return path


class _CardOf:
    """torch.cuda.get_device_properties(...) as a smaller card would report it (total_memory), the rest as is."""

    def __init__(self, props, total: int):
        self._props, self.total_memory = props, total

    def __getattr__(self, k):
        return getattr(self._props, k)


@contextmanager
def as_if_card_gib(gib: float | None):
    """Run as if the GPU had `gib` GiB: the allocator is capped there (set_per_process_memory_fraction)
    and train.py's memory plan reads that total. None: the card as it is."""
    if gib is None or not torch.cuda.is_available():
        yield
        return
    real = torch.cuda.get_device_properties
    total = real(0).total_memory
    gib = min(gib, total / 2**30)  # (a card smaller than that: itself)
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    torch.cuda.get_device_properties = lambda *a, **k: _CardOf(real(*a, **k), int(gib * 2**30))
    try:
        yield
    finally:
        torch.cuda.get_device_properties = real
        torch.cuda.set_per_process_memory_fraction(1.0)


def _grading_or_stub():
    """The step sections never grade (one_correct_per_group sets the rewards), but train.py's real-model
    task imports grading.py, whose math-verify a lent GPU may lack: stand in a stub then (said in the JSON)."""
    try:
        import math_verify  # noqa: F401

        return None
    except ImportError:
        import types

        def never(*a, **k):
            raise RuntimeError("bench_gpu: the grading stub was called")

        stub = types.ModuleType("grading")
        stub.grade_many = stub.grade = never
        sys.modules.setdefault("grading", stub)
        return "math-verify not installed: grading.py stubbed (the rewards are set by one_correct_per_group)"


def bench_step(model_name: str, method: str, cfg: dict, work: str, steps: int = 2, *, prompts: int | None = None,
               new_tokens: int | None = None, card_gib: float | None = None, tag: str = "", attention: str = "auto") -> dict:  # fmt: skip
    """`steps` train.py steps (the last is reported; the first warms up), one correct rollout per group
    (so the teacher prompt holds a full-length peer, as in a learning run), checkpoints off."""
    prompts, new_tokens = prompts or cfg["step_prompts"], new_tokens or cfg["step_new_tokens"]
    out = os.path.join(work, f"step-{method}{tag}-{model_name.replace('/', '_').replace(':', '_')}")
    argv = ["--model", model_name, "--data", os.path.join(work, "problems.jsonl"), "--method", method, "--steps", str(steps),
            "--prompts-per-step", str(prompts), "--group-size", str(cfg["step_group"]),
            "--max-new-tokens", str(new_tokens), "--warmup-steps", "1", "--sample-every", "0",
            "--save-every", str(10**9), "--eval-every", "0", "--seed", "0", "--out", out, "--sampler-attention", attention]  # fmt: skip
    note = _grading_or_stub()
    args = train.get_parser().parse_args(argv)
    real_save = train.save_checkpoint
    train.save_checkpoint = lambda *a, **k: None  # a 4B checkpoint + optimizer is ~60 GB of disk writes: not what is timed
    try:
        with one_correct_per_group(), as_if_card_gib(card_gib):
            train.main(args)
    finally:
        train.save_checkpoint = real_save
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    r = [x for x in recs if "loss" in x][-1]  # the last step (the first one warms up)
    used = json.load(open(os.path.join(out, "args.json")))
    keep = ("step", "step_time", "t_sample", "t_score", "t_update", "peak_mem_gb", "tokens_per_s", "resp_len_mean", "reward_mean", "loss", "grad_norm", "lam")
    res = {**{k: r.get(k) for k in keep}, "micro_batch_tokens": used.get("micro_batch_tokens"), "sample_rows": used.get("sample_rows"),
           "rollouts": prompts * cfg["step_group"], "new_tokens": new_tokens, "card_gib": card_gib}  # fmt: skip
    if note:
        res["note"] = note
    return res


# ---------------------------------------------------------------------------------------
# longest: the longest response that fits 32 x 8 rollouts in one wave
# ---------------------------------------------------------------------------------------


def bench_longest(model_name: str, cfg: dict, device) -> dict:
    model, tok = model_lib.load(model_name, device=device)
    opt = memory.AdamW(model.named_parameters(), lr=1e-6, states="fp32")  # the training state sampling must live next to
    G, B = cfg["step_group"], cfg["step_prompts"]
    prompts = ragged_prompts(B, *cfg["prompt"], seed=1)
    V = model.config.vocab_size
    all_eos = list(range(V))  # every row "finishes" at its first token: the loop stops at its first check (16 steps)

    def fits(L: int) -> bool:
        try:
            # the engine's KV pool sized for every row at full length (the worst case), allocated at prefill
            sample(model, prompts, n=G, max_new_tokens=L, eos_token_ids=all_eos, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator(device=device).manual_seed(0), kv_tokens=B * G * (P + L + 16), max_rows=B * G)  # fmt: skip
            sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            free_memory()

    P = max(len(p) for p in prompts)
    mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    est = None
    if mem:
        pl = memory.plan(model.config, gpu_bytes=mem, rows=B * G, prompt_len=P, new_tokens=0, group=G, states="fp32", offload=False)  # AdamW stays resident here
        per_row = (mem - pl.fixed_sample) / (B * G) - 5 * 4 * V  # bytes a row's KV cache may take (memory.plan's rule)
        est = int(per_row // pl.kv_per_token) - P  # the plan's longest response
    res = {"rows": B * G, "prompt_len_padded": P, "plan_estimate": est}
    if device.type != "cuda":  # nothing to run out of: exercise the probe once
        res.update(longest=None, probe_ok=fits(cfg["step_new_tokens"]), note="CPU: no memory limit to search")
        return res
    lo, hi = 0, 64
    while fits(hi) and hi < 1 << 17:  # grow until a probe fails
        lo, hi = hi, hi * 2
    while hi - lo > 64:  # then bisect to 64 tokens
        mid = (lo + hi) // 2 // 64 * 64
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    res["longest"] = lo
    res["free_gib_with_state"] = torch.cuda.mem_get_info(device)[0] / 2**30
    del model, opt
    free_memory()
    return res


# ---------------------------------------------------------------------------------------


def main(a) -> dict:
    memory.configure_cuda_allocator()  # as train.py: expandable segments, before the first CUDA allocation
    cfg = dict(PRESETS[a.preset])
    if a.step_new_tokens:
        cfg["step_new_tokens"] = a.step_new_tokens
    device = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    if a.preset == "gpu" and device.type != "cuda":
        sys.exit("bench_gpu: the gpu preset needs CUDA (use --preset tiny on CPU)")
    T0 = time.time()
    budget = a.budget_s or cfg["budget_s"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    peak = a.peak_gbps or (peak_gbps(card) if device.type == "cuda" else None)
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # no git on the machine: the commit is recorded by whoever copies the JSON
        commit, dirty = None, None
    import transformers

    out = {"preset": a.preset, "sampler_attention": a.sampler_attention, "card": card, "device": str(device), "peak_gbps": peak, "torch": torch.__version__, "transformers": transformers.__version__,
           "commit": commit, "dirty": dirty, "gpu_total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
           "sections": {}}  # fmt: skip
    S = out["sections"]
    want = set(a.only.split(",")) if a.only else {"sampler", "step", "longest", "8b"}
    work = tempfile.mkdtemp(prefix="bench_gpu_")
    write_problems(os.path.join(work, "problems.jsonl"), n=max(32, cfg["step_prompts"]))
    spent = {}
    path = a.out or (os.path.join(ROOT, "bench", "results", f"gpu_{card.replace(' ', '_')}.json") if device.type == "cuda" else None)

    def save():  # after every section, so a run cut short keeps what it measured
        out["total_s"] = time.time() - T0
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(out, f, indent=1)

    def run(name, est_s, fn):
        left = budget - (time.time() - T0)
        if name.split(":")[0] not in want:
            return
        if est_s is not None and est_s > left:
            S[name] = {"skipped": f"time guard: ~{est_s:.0f}s estimated, {left:.0f}s left of --budget-s {budget}"}
            print(f"[{name}] skipped: {S[name]['skipped']}", flush=True)
            return
        t = time.time()
        try:
            S[name] = fn()
        except torch.cuda.OutOfMemoryError as e:
            S[name] = {"oom": str(e).split("\n")[0]}
        except Exception as e:  # noqa: BLE001  a failing section must not cost the others their (scarce) GPU time
            import traceback

            S[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
        spent[name] = time.time() - t
        S[name]["section_s"] = spent[name]
        free_memory()
        save()
        print(f"[{name}] {spent[name]:.0f}s: {json.dumps(S[name])[:400]}", flush=True)

    m_main = cfg["models"][0]

    def sampler_section(model_name, rows):
        model, tok = model_lib.load(model_name, device=device)
        res = {"model": model_name}
        try:
            for r in rows:
                try:
                    res[str(r)] = bench_sampler(model, tok, r, cfg["n"], cfg["new_tokens"], cfg["prompt"], peak, deadline=T0 + budget, attention=a.sampler_attention)
                except Exception as e:  # noqa: BLE001  (not OOM) the engine's CUDA fast path failed: say so, time the reference path
                    if a.sampler_attention != "auto" or isinstance(e, torch.cuda.OutOfMemoryError):
                        raise
                    res["fast_path_error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                    print(f"[sampler] the engine's default (flex + CUDA graphs) failed, falling back to attention=gather: {res['fast_path_error'][:300]}", flush=True)
                    a.sampler_attention = "gather"  # also for the step sections
                    res[str(r)] = bench_sampler(model, tok, r, cfg["n"], cfg["new_tokens"], cfg["prompt"], peak, deadline=T0 + budget, attention="gather")
            return res
        finally:
            del model
            free_memory()

    def decode_s_per_step(rows=None):
        """Seconds per decode step of our sampler at `rows` rows (default: the smallest measured), from the sampler section."""
        got = {int(r): x["ours"]["wall_s"] / x["new_tokens"] for r, x in S.get("sampler", {}).items() if isinstance(x, dict) and "wall_s" in x.get("ours", {})}
        if not got:
            return None
        r = min(got, key=lambda k: abs(k - rows)) if rows else min(got)
        return got[r]

    def step_estimate(rows, new_tokens, steps):  # sampling ~ half of a step at random weights (every row runs to the cap)
        per = decode_s_per_step(rows)
        return None if per is None else steps * 2.0 * per * new_tokens + 40

    # every section has a time guard: its estimate from the sections before it (or a conservative guess)
    run("sampler", 30 if device.type == "cuda" else None, lambda: sampler_section(m_main, cfg["rows"]))
    rows = cfg["step_prompts"] * cfg["step_group"]
    run("step:antisd", step_estimate(rows, cfg["step_new_tokens"], 2) or (240 if device.type == "cuda" else None),
        lambda: bench_step(m_main, "antisd", cfg, work, attention=a.sampler_attention))
    # the paper's length on an 80 GB card (the H200 is capped to 79.6 GiB: allocator and plan): the plan's
    # budgets must hold there, teacher pass included; a few prompts, one step (8K decode steps dominate)
    long_rows = cfg["long_prompts"] * cfg["step_group"]
    run("step:long", step_estimate(long_rows, cfg["long_new_tokens"], 1) if device.type == "cuda" else None,
        lambda: bench_step(m_main, "antisd", cfg, work, steps=1, prompts=cfg["long_prompts"], new_tokens=cfg["long_new_tokens"], card_gib=cfg["long_card_gib"], tag="-long",
                           attention=a.sampler_attention))
    run("step:grpo", spent.get("step:antisd"), lambda: bench_step(m_main, "grpo", cfg, work, attention=a.sampler_attention))
    run("longest", 60 if device.type == "cuda" else None, lambda: bench_longest(m_main, cfg, device))
    if len(cfg["models"]) > 1 and "8b" in want:
        m8 = cfg["models"][1]
        # 8B decoding reads ~2x the bytes of 4B per step: estimated from the 4B runs at the same rows
        r8 = cfg["rows"][:1]
        t4 = sum(S.get("sampler", {}).get(str(r), {}).get(k, {}).get("wall_s", 60) for r in r8 for k in ("ours", "generate"))
        run("8b:sampler", 2.2 * t4 + 30, lambda: sampler_section(m8, r8))
        from transformers import AutoConfig

        kw = model_lib._rope(model_lib.REAL_CONFIGS[m8.split(":", 1)[1]])
        c8 = AutoConfig.for_model(kw.pop("model_type"), **kw)
        mem = torch.cuda.get_device_properties(device).total_memory
        p8 = memory.plan(c8, gpu_bytes=mem, rows=cfg["step_prompts"] * cfg["step_group"], new_tokens=cfg["step_new_tokens"], group=cfg["step_group"])
        if p8.micro_batch_tokens < 256 + cfg["step_new_tokens"] or p8.sample_rows < cfg["step_group"]:
            S["8b:step"] = {"skipped": f"does not fit: training state {p8.fixed_train / 2**30:.1f} GiB of {mem / 2**30:.1f} GiB", "plan": p8.table()}
        else:
            run("8b:step", 2.2 * spent.get("step:antisd", 200), lambda: bench_step(m8, "antisd", cfg, work, attention=a.sampler_attention))
    save()
    shutil.rmtree(work, ignore_errors=True)
    print(table(out) + (f"\nwrote {path}" if path else ""))
    return out


def table(out: dict) -> str:
    S = out["sections"]
    L = [f"{out['card']} | torch {out['torch']} | transformers {out['transformers']} | commit {out['commit']}{' (dirty)' if out['dirty'] else ''} | {out.get('total_s', 0):.0f}s"]
    for key in ("sampler", "8b:sampler"):
        s = S.get(key)
        if not s:
            continue
        if "skipped" in s or "oom" in s or "error" in s:
            L.append(f"{key}: {s.get('skipped') or s.get('error') or 'OOM ' + s['oom']}")
            continue
        if "fast_path_error" in s:
            L.append(f"{key}: the engine's CUDA default failed, timed with attention=gather: {s['fast_path_error'][:300]}")
        L.append(f"sampler, {s['model']}: rows x new tokens | ours tok/s | generate tok/s | ours/generate | floor fraction (ours)")
        for r, x in s.items():
            if isinstance(x, dict) and "ours" in x:
                if "speedup" not in x:
                    L.append(f"  {x['rows']:4d} x {x['new_tokens']} | " + " | ".join(f"{k}: {x[k].get('skipped', 'ok')}" for k in ("ours", "generate")))
                    continue
                ff = f"{x['floor_fraction']:.1%}" if "floor_fraction" in x else "-"
                L.append(f"  {x['rows']:4d} x {x['new_tokens']} | {x['ours']['tok_per_s']:10.0f} | {x['generate']['tok_per_s']:14.0f} | {x['speedup']:13.2f}x | {ff}")
    steps = [(k, S[k]) for k in ("step:antisd", "step:long", "step:grpo", "8b:step") if k in S]
    if steps:
        L.append("step: method | total s | sample s | score s | update s | peak GiB | micro-batch tokens | rows per wave")
        for k, s in steps:
            if "step_time" not in s:
                L.append(f"  {k}: {s.get('skipped') or s.get('error') or 'OOM ' + str(s.get('oom'))}")
                continue
            pk = f"{s['peak_mem_gb']:.1f}" if s.get("peak_mem_gb") is not None else "-"
            card = f", as a {s['card_gib']} GiB card" if s.get("card_gib") else ""
            L.append(f"  {k} ({s['rollouts']} x {s['new_tokens']}{card}) | {s['step_time']:.1f} | {s['t_sample']:.1f} | {s['t_score']:.1f} | {s['t_update']:.1f} | {pk} | {s['micro_batch_tokens']} | {s['sample_rows']}")
    if "longest" in S:
        s = S["longest"]
        if "error" in s:
            L.append(f"longest: {s['error']}")
        else:
            L.append(f"longest response, {s.get('rows')} rollouts in one wave next to the training state: {s.get('longest')} tokens (plan estimate {s.get('plan_estimate')})")
    return "\n".join(L)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu", choices=list(PRESETS), help="gpu: the real shapes (CUDA); tiny: the same code on the tiny model (CPU smoke test)")
    p.add_argument("--only", default="", help="comma-separated sections to run: sampler,step,longest,8b (default all)")
    p.add_argument("--step-new-tokens", type=int, default=None, help="response cap of the train.py step section (default 512; tiny 16)")
    p.add_argument("--budget-s", type=float, default=None, help="time guard in seconds: a section is skipped if it would end after this (default 420; tiny 300)")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth in GB/s for the floor (default: guessed from the card name)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available (tiny preset)")
    p.add_argument("--sampler-attention", default="auto", choices=["auto", "gather", "mirror", "flex"],
                   help="the engine's decode attention in every section (auto: flex + CUDA graphs on CUDA; if that fails in the sampler section, the bench records why and uses gather)")
    p.add_argument("--out", default="", help="JSON path (default on CUDA: bench/results/gpu_<card>.json; on CPU: none)")
    main(p.parse_args())
