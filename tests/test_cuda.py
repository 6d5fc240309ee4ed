"""The GPU-only checks of issue 10 (skipped without CUDA): what reading and CPU runs could not tell.

    python -m pytest -q -rs tests/test_cuda.py        # on a GPU; bench/gpu_check.sh runs it first

Each test names the issue item it guards. On a small random Qwen3 in bf16 on the GPU:
  - greedy sampling equals `model.generate` (both sampler paths), also from train mode with
    gradient checkpointing on (item 2: transformers <= 5.22 dropped the cache there);
  - a 3-step AntiSD run of the lab in which one rollout per group is correct (forced, as
    bench_gpu.one_correct_per_group does: random weights never solve anything), so the teacher
    prompt holds a real peer and the peer choice runs (item 1: it crashed on CUDA); it resumes
    exactly and writes a checkpoint that plain transformers loads and generates from;
  - bf16 gradients accumulate in fp32 over micro-batches (item 4);
  - the head backward's peak at 4B widths stays within the memory plan (item 10), eval's
    automatic batch fits a 32K-token KV cache next to a 4B model (item 9), expandable
    segments are on (item 10), --device cuda:1 sets the device (item 12; needs 2 GPUs).
Tensor parallel and FSDP are covered by the gloo tests (tests/test_dist.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (issue 10's GPU checks)")

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: the exact-resume test compares runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import antisd  # noqa: E402
import memory  # noqa: E402
import model as model_lib  # noqa: E402
from rollout import sample  # noqa: E402

PROMPTS = [[5, 17, 230, 9, 44], [301], [8, 8, 120, 77, 3, 400, 12, 90, 11], [260, 14, 2]]  # ragged, B = 4


def _sharp_bf16(seed=1):
    """The tiny model with its 2-D weights x 8 (large argmax margins), in bf16 on the GPU."""
    m, tok = model_lib.load("tiny", dtype=torch.bfloat16, device="cuda", seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m, tok


def _assert_greedy_equal(model, tok, ours, n, T):
    """ours (N, T) == HF greedy generate, except after a near-tie of bf16 logits (reported)."""
    rep = [p for p in PROMPTS for _ in range(n)]
    ids, mask = model_lib.left_pad(rep, tok.pad_token_id, "cuda")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=T, eos_token_id=None,
                             pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    ref = out.sequences[:, ids.shape[1] :]  # (N, T)
    scores = torch.stack(out.scores, 1).float()  # (N, T, V)
    same = 0
    for r in range(ref.shape[0]):
        diff = (ours[r] != ref[r]).nonzero()
        if diff.numel() == 0:
            same += 1
            continue
        t = int(diff[0])
        top2 = scores[r, t].topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap <= 0.02 * float(top2[0].abs()) + 1e-3, f"row {r} differs from generate at step {t} where the margin is {gap:.4f} (not a tie)"
    assert same >= 0.75 * ref.shape[0], f"only {same} of {ref.shape[0]} rows equal generate"


@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_bf16_equals_generate_also_from_train_mode_with_grad_ckpt(page_size):
    model, tok = _sharp_bf16()
    r = sample(model, PROMPTS, n=2, max_new_tokens=16, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=page_size)
    _assert_greedy_equal(model, tok, r.tokens, 2, 16)
    model.gradient_checkpointing_enable()
    model.train()  # item 2: what train.py's periodic eval used to sample from
    r2 = sample(model, PROMPTS, n=2, max_new_tokens=16, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=page_size)
    assert model.training and torch.equal(r2.tokens, r.tokens)


def test_peer_choice_needs_a_cpu_generator():
    """Item 1: the draw that crashed, and the guard that names it."""
    cuda_gen = torch.Generator(device="cuda").manual_seed(0)
    with pytest.raises(RuntimeError):
        torch.randint(3, (1,), generator=cuda_gen)  # the crash: a CUDA generator, a CPU output
    _, tok = model_lib.load("tiny", device="cuda")
    responses = torch.tensor([[5, 6, 7], [8, 9, 10]], device="cuda")
    args = (tok, ["Q"], responses, torch.tensor([3, 3], device="cuda"), torch.tensor([1.0, 1.0], device="cuda"), 2)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        antisd.teacher_prompts(*args, references=["R"], generator=cuda_gen)
    assert len(antisd.teacher_prompts(*args, references=["R"], generator=torch.Generator().manual_seed(0))) == 2


FAST = ["--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--warm-steps", "3", "--eval-limit", "4",
        "--eval-k", "1", "--micro-batch", "3", "--warmup-steps", "1", "--device", "cuda", "--dtype", "bfloat16", "--save-every", "100"]  # fmt: skip


def _run(tmp_path, out, *extra):
    import train

    train.main(train.get_parser().parse_args([*FAST, "--out", str(tmp_path / out), *extra]))
    return [r for r in map(json.loads, open(tmp_path / out / "metrics.jsonl")) if "loss" in r]


def test_antisd_steps_with_correct_peers_resume_exactly_and_save_a_loadable_checkpoint(tmp_path, monkeypatch):
    import bench_gpu

    monkeypatch.chdir(tmp_path)  # the lab's warm-start cache
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with bench_gpu.one_correct_per_group():
            full = _run(tmp_path, "full", "--steps", "3", "--eval-every", "0")
            _run(tmp_path, "cut", "--steps", "2", "--eval-every", "0")
            resumed = _run(tmp_path, "cut", "--steps", "3", "--eval-every", "0", "--resume")
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r["step"] for r in full] == [1, 2, 3] and all(r["reward_mean"] == 0.25 for r in full)  # one correct per group of 4
    assert all(r["peak_mem_gb"] is not None and r["grad_norm"] > 0 for r in full)
    assert full[-1]["lam"] == 0.5 and full[-1]["u_mean"] is not None  # the gate opened: the token term trained
    a, b = full[2], resumed[-1]
    assert b["step"] == 3
    for k in ("reward_mean", "resp_len_mean"):
        assert a[k] == b[k], k  # the same tokens after the resume
    for k in ("loss", "u_mean", "grad_norm"):
        assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), k
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "full" / "checkpoint-3"
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Which pair sums to 5? A: 1 4, B: 2 2"}], add_generation_prompt=True, return_tensors="pt", return_dict=True).to("cuda")
    out = m.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    ts = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert ts["rng"]["teacher_pickers"] is not None and ts["rng"]["cuda"] is not None


def _loss(model, prompts, resp, lengths, adv, i, num_tokens):
    T = int(lengths[i])
    logp, _ = model_lib.response_logprobs(model, [prompts[i]], resp[i : i + 1, :T], lengths[i : i + 1])
    return antisd.policy_loss(logp, logp.detach(), adv[i : i + 1, :T], antisd.mask_from_lengths(lengths[i : i + 1], T), num_tokens=num_tokens)


def test_bf16_gradients_accumulate_in_fp32_on_the_gpu():
    """Item 4: the optimizer's fp32 sums equal the fp32 sum of each micro-batch's bf16 gradient."""
    model, _ = model_lib.load("tiny", dtype=torch.bfloat16, device="cuda", seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    n = 32
    prompts = [torch.randint(3, 500, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    lengths = torch.randint(1, 40, (n,), generator=g).cuda()
    resp = torch.randint(3, 500, (n, int(lengths.max())), generator=g).cuda()
    adv = torch.randn(n, int(lengths.max()), generator=g).cuda()
    num_tokens = int(lengths.sum())
    names, params = zip(*model.named_parameters())
    ref = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(n):
        for r, gi in zip(ref, torch.autograd.grad(_loss(model, prompts, resp, lengths, adv, i, num_tokens), params, allow_unused=True)):
            if gi is not None:
                r += gi.float()
    opt = memory.AdamW(model.named_parameters(), lr=1e-3)
    for i in range(n):
        _loss(model, prompts, resp, lengths, adv, i, num_tokens).backward()
    for name, r in zip(names, ref):
        torch.testing.assert_close(opt.grad(name), r, rtol=0, atol=0)  # (the same adds in the same order)


def test_head_backward_peak_is_within_the_plan_at_4b_widths():
    """Item 10: measured extra peak of one training micro-batch (2 layers at Qwen3-4B's widths, vocab
    151936, gradient checkpointing, fp32 gradient sums) <= the plan's head + activations + grads."""
    from transformers import AutoConfig

    kw = model_lib._rope({**model_lib.REAL_CONFIGS["Qwen/Qwen3-4B-Instruct-2507"], "num_hidden_layers": 2})
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_lib.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    opt = memory.AdamW(model.named_parameters(), lr=1e-6)
    n_params = sum(p.numel() for p in model.parameters())
    plan = memory.plan(cfg, gpu_bytes=torch.cuda.get_device_properties(0).total_memory, n_params=n_params)
    for tokens in (1024, 3072):
        rows, T = 2, tokens // 2 - 64
        prompts = [[7] * 64 for _ in range(rows)]
        resp = torch.randint(3, 1000, (rows, T), device="cuda")
        lengths = torch.full((rows,), T, device="cuda")
        opt.zero_grad()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logp, _ = model_lib.response_logprobs(model, prompts, resp, lengths)
        logp.sum().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        est = plan.logits + plan.act_per_token * rows * (64 + T) + plan.grads
        print(f"head backward at 4B widths, {rows * (64 + T)} tokens: measured extra peak {extra / 2**30:.2f} GiB, plan {est / 2**30:.2f} GiB "
              f"(head {plan.logits / 2**30:.2f}, grads {plan.grads / 2**30:.2f})")  # fmt: skip
        assert extra <= 1.05 * est, (extra / 2**30, est / 2**30)
        assert extra >= 0.5 * est  # the estimate is not wildly high either


def test_eval_batch_fits_a_32k_cache_next_to_a_4b_model():
    """Item 9: eval.py sampled 64 rows of 33K tokens (~312 GB of KV cache for 4B); auto_batch_size
    takes what fits, and a wave of that size allocates its full-length cache without running out."""
    import eval as eval_lib

    model, tok = model_lib.load("random:Qwen/Qwen3-4B-Instruct-2507", device="cuda")
    P, T = 200, 32768
    rows = eval_lib.auto_batch_size(model, P, T)
    free = torch.cuda.mem_get_info()[0]
    assert 1 <= rows <= 64 and rows * (P + T) * memory.kv_bytes_per_token(model.config, 2) <= free
    prompts = [[7] * P for _ in range(rows)]
    r = sample(model, prompts, n=1, max_new_tokens=T, eos_token_ids=list(range(model.config.vocab_size)), pad_token_id=tok.pad_token_id,
               generator=torch.Generator(device="cuda").manual_seed(0))  # every token ends its row: the cache is allocated, 16 steps run
    assert r.finished.all()
    del model, r
    torch.cuda.empty_cache()


def test_expandable_segments_are_configured():
    """Item 10: memory.configure_cuda_allocator (train.py / eval.py call it first) turns expandable segments on."""
    code = ("import sys; sys.path.insert(0, %r); import memory, torch; memory.configure_cuda_allocator(); x = torch.empty(2**20, device='cuda'); "
            "segs = torch.cuda.memory_snapshot(); print(sorted(segs[0]) if segs else 'no segments'); "
            "print(bool(segs) and all(s.get('is_expandable', False) for s in segs))") % ROOT  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "True", p.stdout + p.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_device_index_selects_the_current_device():
    """Item 12."""
    import dist as dist_lib

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    before = torch.cuda.current_device()
    try:
        dist_lib.setup(device="cuda:1")
        assert torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(before)


# ---------------------------------------------------------------------------------------
# issue 14: the engine's in-place attention (FlexAttention over the pages) and its CUDA-graph
# decode step, against the reference path (gather + sdpa). Written without a GPU: first run
# on a lent device.
# ---------------------------------------------------------------------------------------

EOS_MIX = list(range(0, 30))  # rows finish at scattered steps: the live batch shrinks through the buckets


def _first_divergence(a, b):
    """(N,) index of the first differing token per row (T where the rows are equal)."""
    diff = a != b
    T = a.shape[1]
    return torch.where(diff.any(1), diff.float().argmax(1), torch.full_like(diff[:, 0], T, dtype=torch.long))


@pytest.mark.parametrize("page_size", [16, 64])
def test_inplace_flex_bf16_matches_gather(page_size):
    """bf16: greedy tokens of the in-place path (no graphs) equal generate (up to bf16 near-ties),
    and sampled tokens / log-probs agree with the reference path up to each row's first divergence."""
    model, tok = _sharp_bf16()
    kw = dict(n=4, max_new_tokens=32, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=page_size)
    r = sample(model, PROMPTS, temperature=0, attention="flex", decode_graphs=False, **kw)
    assert r.stats["attention"] == "flex" and r.stats["graph_buckets"] == []
    _assert_greedy_equal(model, tok, r.tokens, 4, 32)
    ref = sample(model, PROMPTS, temperature=1.0, attention="gather", generator=torch.Generator(device="cuda").manual_seed(3), **kw)
    fast = sample(model, PROMPTS, temperature=1.0, attention="flex", decode_graphs=False, generator=torch.Generator(device="cuda").manual_seed(3), **kw)
    d = _first_divergence(fast.tokens, ref.tokens)
    assert (d == 32).float().mean() >= 0.75, f"rows equal to the reference: {(d == 32).sum()} of {d.numel()}"
    keep = torch.arange(32, device="cuda")[None] < d[:, None]
    assert (fast.logprobs - ref.logprobs).abs()[keep].max() < 0.1


def test_inplace_flex_fp32_equals_gather_with_preemption():
    """fp32 on the GPU (TF32 off): the in-place path gives the reference path's tokens under
    preemption and row caps, and log-probs to 1e-4."""
    model, tok = model_lib.load("tiny", device="cuda", seed=0)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        kw = dict(n=4, max_new_tokens=24, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id, page_size=16, kv_tokens=160, max_rows=12)
        ref = sample(model, PROMPTS, attention="gather", generator=torch.Generator(device="cuda").manual_seed(2), **kw)
        fast = sample(model, PROMPTS, attention="flex", decode_graphs=False, generator=torch.Generator(device="cuda").manual_seed(2), **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert ref.stats["preemptions"] > 0 or ref.stats["prefill_calls"] > 1
    assert torch.equal(fast.tokens, ref.tokens) and torch.equal(fast.lengths, ref.lengths)
    torch.testing.assert_close(fast.logprobs, ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    """The captured decode step (one graph per batch-size bucket, replayed) gives the uncaptured
    step's tokens: exactly in fp32, all but bf16 near-ties in bf16; several buckets are used
    (rows finish at scattered steps), and the model's attention is restored after."""
    model, tok = model_lib.load("tiny", device="cuda", dtype=dtype, seed=0)
    kw = dict(n=8, max_new_tokens=40, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id, page_size=16, attention="flex")
    eager = sample(model, PROMPTS, decode_graphs=False, generator=torch.Generator(device="cuda").manual_seed(7), **kw)
    graph = sample(model, PROMPTS, decode_graphs=True, generator=torch.Generator(device="cuda").manual_seed(7), **kw)
    assert len(graph.stats["graph_buckets"]) >= 3, graph.stats
    assert model.config._attn_implementation == "sdpa"
    if dtype == torch.float32:
        assert torch.equal(graph.tokens, eager.tokens) and torch.equal(graph.lengths, eager.lengths)
        torch.testing.assert_close(graph.logprobs, eager.logprobs, atol=1e-4, rtol=0)
    else:
        d = _first_divergence(graph.tokens, eager.tokens)
        assert (d == 40).float().mean() >= 0.75


def test_cuda_defaults_are_inplace_with_graphs():
    model, tok = model_lib.load("tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    r = sample(model, PROMPTS, n=2, max_new_tokens=8, eos_token_ids=[], pad_token_id=tok.pad_token_id, generator=torch.Generator(device="cuda").manual_seed(0))
    assert r.stats["attention"] == "flex" and r.stats["graph_buckets"] == [8]
    r1 = sample(model, PROMPTS, n=2, max_new_tokens=8, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=4)
    assert r1.stats["attention"] == "gather" and r1.stats["graph_buckets"] == []  # pages below Triton's 16-token tiles
    with pytest.raises(ValueError, match="multiple of 16"):
        sample(model, PROMPTS, n=2, max_new_tokens=8, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=4, attention="flex")
