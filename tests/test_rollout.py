"""rollout.sample (the paged, continuously batched engine) against slow, obviously correct references.

References: `reference_sample` below (the previous sampler, kept as the slow twin: one
left-padded batch, DynamicCache, every row every step, with the engine's counter-based
draws), HF `model.generate` (greedy), a no-cache loop that runs the full forward over each
unpadded sequence every step, `model.response_logprobs`, and brute-force top-k / top-p.
Every test uses ragged prompts (B > 1, unequal lengths). The engine must give the twin's
tokens exactly for every page size, KV budget (down to one that forces preemption), row cap,
n, EOS mix and filter, and leave the page pool whole.

Greedy tests use a *sharpened* tiny model (2-D weights x 8): a random tiny model has
near-tied argmaxes, where float noise between two correct implementations flips a token;
`_greedy_reference` asserts the margin so a failure cannot be a near-tie.
"""

import os

import pytest
import torch

from transformers import DynamicCache

import model as model_lib
from model import left_pad, positions_from_mask, response_logprobs
from rollout import Scheduler, _cache_kw, _next_token, filter_logits, sample, seed_from, simulate, uniforms

PROMPTS = [[5, 17, 230, 9, 44], [301], [8, 8, 120, 77, 3, 400, 12, 90, 11], [260, 14, 2]]  # ragged, B = 4


@pytest.fixture(scope="module")
def tiny():
    model, tok = model_lib.load("tiny", seed=0)
    return model, tok


@pytest.fixture(scope="module")
def sharp():
    model, tok = model_lib.load("tiny", seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)  # peaked attention and logits: large argmax margins
    return model, tok


@torch.no_grad()
def _greedy_reference(model, prompt, T, min_margin=1e-3):
    """No cache, no padding: the full forward over prompt + generated so far, argmax of the last position.
    Returns tokens (T,) and their log-probs at temperature 1 (T,)."""
    seq, toks, lps = list(prompt), [], []
    for _ in range(T):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()  # (V,)
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > min_margin, "near-tie in the reference: sharpen more or change seed"
        t = int(logits.argmax())
        toks.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        seq.append(t)
    return torch.tensor(toks), torch.tensor(lps)


def _generate(model, tok, prompts, n, T):
    """HF greedy generate with the inputs repeated n times (prompt-major) and no EOS stop."""
    rep = [p for p in prompts for _ in range(n)]
    ids, mask = left_pad(rep, tok.pad_token_id, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=T, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[:, ids.shape[1] :]  # (N, T)


@torch.no_grad()
def reference_sample(model, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, eos_token_ids, pad_token_id, generator=None):
    """The slow twin: the previous sampler (prefill the left-padded prompts once, repeat the
    DynamicCache n times, decode all N rows every step with a 2D mask), drawing row r's token
    at position t with uniforms(seed, r, t) exactly as the engine does."""
    seed = seed_from(generator) if temperature > 0 else 0
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids), dtype=torch.long)
    ids, pmask = left_pad(prompts, pad_token_id, "cpu")  # (B, P)
    B, P, T = ids.shape[0], ids.shape[1], max_new_tokens
    N = B * n
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=pmask.long(), position_ids=positions_from_mask(pmask), use_cache=True, logits_to_keep=1, **{_cache_kw(model): cache})
    cache.batch_repeat_interleave(n)
    logits = out.logits[:, -1].repeat_interleave(n, 0)  # (N, V)
    pmask = pmask.repeat_interleave(n, 0)
    pos = pmask.sum(-1, keepdim=True)  # (N, 1)
    attn = torch.cat([pmask.long(), torch.ones(N, T, dtype=torch.long)], 1)  # (N, P+T)
    tokens, lps = torch.full((N, T), pad_token_id), torch.zeros(N, T)
    lengths, done = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.bool)
    rows = torch.arange(N)
    for t in range(T):
        u = uniforms(seed, rows, torch.full((N,), t)) if temperature > 0 else None
        tok, lp = _next_token(logits, temperature, top_k, top_p, u)
        tok = tok.masked_fill(done, pad_token_id)
        tokens[:, t], lps[:, t] = tok, lp.masked_fill(done, 0.0)
        lengths += (~done).long()
        done |= torch.isin(tok, eos)
        if t == T - 1 or done.all():
            break
        out = model(input_ids=tok[:, None], attention_mask=attn[:, : P + t + 1], position_ids=pos + t, use_cache=True, **{_cache_kw(model): cache})
        logits = out.logits[:, -1]
    return tokens, lengths, done, lps


def _same(r, ref, atol=1e-5):
    tokens, lengths, finished, lps = ref
    assert torch.equal(r.tokens, tokens)
    assert torch.equal(r.lengths, lengths) and torch.equal(r.finished, finished)
    torch.testing.assert_close(r.logprobs, lps, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------
# the engine == the slow twin, for any schedule
# ----------------------------------------------------------------------------------------

EOS_MIX = list(range(0, 30))  # ~5% of the vocabulary: rows finish at scattered steps


@pytest.mark.parametrize("attention", ["gather", "mirror"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("n", [1, 8])
def test_engine_equals_twin_over_page_sizes(tiny, page_size, n, attention):
    model, tok = tiny
    kw = dict(n=n, max_new_tokens=20, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(5), page_size=page_size, attention=attention, **kw)
    assert r.stats["attention"] == attention
    _same(r, ref)
    assert r.finished.any() and not r.finished.all(), "test setup: want an EOS mix"
    assert n == 1 or r.lengths.unique().numel() > 3, "test setup: want ragged finishing"
    assert r.stats["preemptions"] == 0 and r.stats["prefill_calls"] == 1  # everything fits: one packed prefill


@pytest.mark.parametrize("attention", ["gather", "mirror"])
@pytest.mark.parametrize("page_size,kv_tokens,max_rows", [(16, 10**6, None), (4, 64, None), (1, 40, None), (16, 48, 3), (4, 40, 8)])
def test_engine_equals_twin_over_budgets(tiny, page_size, kv_tokens, max_rows, attention):
    """From "everything fits" down to budgets that force preemption (re-prefill from prompt +
    tokens so far) and row caps that force continuous batching."""
    model, tok = tiny
    n = 3 if max_rows == 3 else 8
    kw = dict(n=n, max_new_tokens=24, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(2), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(2), page_size=page_size, kv_tokens=kv_tokens, max_rows=max_rows, attention=attention, **kw)
    _same(r, ref)
    if kv_tokens < 100:
        assert r.stats["preemptions"] > 0, "test setup: this budget should preempt"
    if max_rows is not None:
        assert r.stats["max_live_rows"] <= max_rows and r.stats["prefill_calls"] > 1


@pytest.mark.parametrize("n", [1, 8])
def test_prefill_in_packs_equals_twin(tiny, n):
    """A step's admitted prompts split into packed forwards of <= prefill_pack tokens (lengths
    5, 1, 9, 3 at 6: packs [5, 1], [9] alone, [3]) give the twin's tokens."""
    model, tok = tiny
    kw = dict(n=n, max_new_tokens=12, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(8), page_size=4, prefill_pack=6, **kw)
    _same(r, ref)
    assert r.stats["prefill_calls"] == 1 and r.stats["prefill_forwards"] == 3  # one admission step, three forwards


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.8, 0.7), (8, 0.9, 1.3)])
def test_engine_equals_twin_with_filters(tiny, top_k, top_p, temperature):
    model, tok = tiny
    kw = dict(n=4, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(9), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(9), page_size=4, kv_tokens=80, **kw)
    _same(r, ref)


def test_engine_equals_twin_greedy_with_preemption(sharp):
    model, tok = sharp
    kw = dict(n=2, max_new_tokens=12, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id)
    r = sample(model, PROMPTS, page_size=2, kv_tokens=30, **kw)
    assert r.stats["preemptions"] > 0
    _same(r, reference_sample(model, PROMPTS, **kw))


# ----------------------------------------------------------------------------------------
# the in-place path (FlexAttention reading the pages through the page table) == the reference
# ----------------------------------------------------------------------------------------


def _paged_fixture(A, W, ps, NP, H=2, Hq=4, D=8, seed=0):
    """Random pools and ragged rows: row a holds W distinct random pages (a shuffled pool, the
    scratch page never among them) and its new token sits at a random position < W * ps."""
    g = torch.Generator().manual_seed(seed)
    slots = (NP + 1) * ps
    k, v = torch.randn(slots, H, D, generator=g), torch.randn(slots, H, D, generator=g)  # (slots, H, D)
    table = torch.stack([torch.randperm(NP, generator=g)[:W] for _ in range(A)])  # (A, W)
    pos = torch.randint(0, W * ps, (A,), generator=g)  # (A,)
    q = torch.randn(A, Hq, 1, D, generator=g)  # (A, Hq, 1, D)
    return q, k, v, table, pos


def _dense_reference(q, k, v, table, pos, ps, scale):
    """Each row's context gathered slot by slot in position order, GQA by repeating KV heads,
    softmax over positions 0..pos: the obviously correct attention. -> (A, Hq, 1, D)"""
    A, Hq = q.shape[:2]
    H = k.shape[1]
    out = []
    for a in range(A):
        slots = torch.tensor([int(table[a, p // ps]) * ps + p % ps for p in range(int(pos[a]) + 1)])
        ka = k[slots].transpose(0, 1).repeat_interleave(Hq // H, 0)  # (Hq, L, D)
        va = v[slots].transpose(0, 1).repeat_interleave(Hq // H, 0)
        att = ((q[a] @ ka.transpose(1, 2)) * scale).softmax(-1)  # (Hq, 1, L)
        out.append(att @ va)
    return torch.stack(out)


@pytest.mark.parametrize("ps,NP,W", [(1, 40, 12), (4, 20, 5), (16, 6, 3)])
def test_decode_block_mask_and_flex_eager_vs_dense(ps, NP, W):
    """paged.decode_block_mask: its mask_mod over the whole pool marks exactly each row's
    positions 0..pos; its block lists name exactly the row's pages (full ones before the last);
    and FlexAttention through it (eager) equals the gathered dense attention, with GQA."""
    from torch.nn.attention.flex_attention import flex_attention

    from paged import decode_block_mask

    q, k, v, table, pos = _paged_fixture(A=5, W=W, ps=ps, NP=NP)
    bm = decode_block_mask(table, pos, ps, NP)
    slots = (NP + 1) * ps
    kv = torch.arange(slots)
    for a in range(5):
        want = torch.zeros(slots, dtype=torch.bool)
        for p in range(int(pos[a]) + 1):
            want[int(table[a, p // ps]) * ps + p % ps] = True
        got = bm.mask_mod(torch.tensor(a), torch.tensor(0), torch.tensor(0), kv)
        assert torch.equal(got, want), a
        n = int(pos[a]) // ps + 1
        assert bm.full_kv_num_blocks[a, 0, 0] == n - 1 and torch.equal(bm.full_kv_indices[a, 0, 0, : n - 1].long(), table[a, : n - 1])
        assert bm.kv_num_blocks[a, 0, 0] == 1 and bm.kv_indices[a, 0, 0, 0] == table[a, n - 1]
    scale = 0.37
    out = flex_attention(q, k.view(1, slots, 2, -1).transpose(1, 2), v.view(1, slots, 2, -1).transpose(1, 2), block_mask=bm, scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, _dense_reference(q, k, v, table, pos, ps, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("n", [1, 8])
def test_inplace_equals_twin_over_page_sizes(tiny, page_size, n):
    """attention="flex_eager" (the in-place path, FlexAttention uncompiled) samples the twin's
    tokens and log-probs (fp32); with n = 8 also through the static-shape buckets."""
    model, tok = tiny
    kw = dict(n=n, max_new_tokens=20, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(5), page_size=page_size, attention="flex_eager", decode_graphs=n == 8, **kw)
    _same(r, ref)
    assert r.stats["attention"] == "flex_eager" and r.finished.any() and not r.finished.all()
    assert model.config._attn_implementation == "sdpa", "the model's attention must be restored"


@pytest.mark.parametrize("page_size,kv_tokens,max_rows,graphs", [(1, 40, None, True), (4, 40, 8, False)])
def test_inplace_equals_twin_over_budgets(tiny, page_size, kv_tokens, max_rows, graphs):
    """The in-place path under preemption and row caps (continuous batching), with and
    without the padded static-shape step: the twin's tokens exactly."""
    model, tok = tiny
    kw = dict(n=8, max_new_tokens=24, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(2), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(2), page_size=page_size, kv_tokens=kv_tokens, max_rows=max_rows,
               attention="flex_eager", decode_graphs=graphs, **kw)  # fmt: skip
    _same(r, ref)
    assert r.stats["preemptions"] > 0


def test_inplace_greedy_matches_generate(sharp):
    model, tok = sharp
    r = sample(model, PROMPTS, n=3, max_new_tokens=10, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=4,
               attention="flex_eager", decode_graphs=True)  # fmt: skip
    assert torch.equal(r.tokens, _generate(model, tok, PROMPTS, 3, 10))


def test_inplace_bad_flags(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=4, eos_token_ids=[], pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="attention="):
        sample(model, PROMPTS, attention="paged", **kw)
    for a in ("gather", "mirror"):
        with pytest.raises(ValueError, match="decode_graphs"):
            sample(model, PROMPTS, attention=a, decode_graphs=True, **kw)


# ----------------------------------------------------------------------------------------
# greedy == generate == no-cache reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_matches_generate(sharp, n):
    model, tok = sharp
    T = 12
    r = sample(model, PROMPTS, n=n, max_new_tokens=T, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=4)
    assert r.tokens.shape == (len(PROMPTS) * n, T)
    assert torch.equal(r.tokens, _generate(model, tok, PROMPTS, n, T))
    assert (r.lengths == T).all() and not r.finished.any()


def test_greedy_matches_no_cache_reference(sharp):
    model, tok = sharp
    T = 10
    r = sample(model, PROMPTS, n=2, max_new_tokens=T, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id)
    for b, p in enumerate(PROMPTS):
        ref_tok, ref_lp = _greedy_reference(model, p, T)
        for j in range(2):  # prompt-major rows: row b*n + j
            assert torch.equal(r.tokens[b * 2 + j], ref_tok)
            torch.testing.assert_close(r.logprobs[b * 2 + j], ref_lp, atol=1e-5, rtol=1e-5)  # logits x8: |logp| up to ~10


def test_greedy_eager_attention_matches_generate(sharp):
    """The 4D additive masks under eager attention (added to the scores) too."""
    model, tok = sharp
    model.set_attn_implementation("eager")
    try:
        r = sample(model, PROMPTS, n=2, max_new_tokens=8, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=2, kv_tokens=24)
        assert torch.equal(r.tokens, _generate(model, tok, PROMPTS, 2, 8))
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("page_size", [1, 16])
def test_train_mode_with_gradient_checkpointing_samples_like_eval_mode(page_size):
    """Issue 10 item 2: transformers <= 5.22's GradientCheckpointingLayer drops the KV cache when
    the model is in train mode with gradient checkpointing on (train.py evaluates right after an
    update); sample() must decode exactly as in eval mode and give the model back in its mode.
    Fails under transformers 5.17 (.ci/run's second environment) without rollout._in_eval_mode."""
    model, tok = model_lib.load("tiny", seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)  # the sharpened model: no near-tied argmaxes
    ref = _generate(model, tok, PROMPTS, 2, 10)
    model.gradient_checkpointing_enable()
    model.train()
    r = sample(model, PROMPTS, n=2, max_new_tokens=10, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=page_size)
    assert model.training  # restored
    assert torch.equal(r.tokens, ref)


# ----------------------------------------------------------------------------------------
# per-row EOS stop, truncation
# ----------------------------------------------------------------------------------------


def test_per_row_eos_stop(sharp):
    """EOS = tokens the greedy path emits at known steps: each row must stop at the first of
    them (EOS included in its length), emit pad after, and rows that never hit one run to
    max_new_tokens with finished=False."""
    model, tok = sharp
    T = 12
    free = _generate(model, tok, PROMPTS, 1, T)  # (B, T) greedy with no EOS
    eos = sorted({int(free[0, 2]), int(free[2, 6])})
    r = sample(model, PROMPTS, max_new_tokens=T, temperature=0, eos_token_ids=eos, pad_token_id=tok.pad_token_id, page_size=4)
    hit = torch.isin(free, torch.tensor(eos))  # (B, T)
    exp_len = torch.where(hit.any(1), hit.int().argmax(1) + 1, T)  # first EOS, counted
    assert torch.equal(r.lengths, exp_len)
    assert torch.equal(r.finished, hit.any(1))
    assert r.finished.any() and not r.finished.all(), "test setup: want both finished and truncated rows"
    assert exp_len[0] <= 3 and exp_len[2] <= 7
    for i, L in enumerate(r.lengths.tolist()):
        assert torch.equal(r.tokens[i, :L], free[i, :L])
        assert (r.tokens[i, L:] == tok.pad_token_id).all()
        assert (r.logprobs[i, L:] == 0).all() and (r.logprobs[i, :L] < 0).all()
    assert torch.equal(r.mask(), torch.arange(T)[None] < r.lengths[:, None])
    assert r.to_lists() == [free[i, :L].tolist() for i, L in enumerate(r.lengths.tolist())]
    # a single int EOS works too
    r1 = sample(model, PROMPTS, max_new_tokens=T, temperature=0, eos_token_ids=eos[0], pad_token_id=tok.pad_token_id)
    hit1 = free == eos[0]
    assert torch.equal(r1.finished, hit1.any(1))


def _batch_sizes(model):
    """Record the batch size of every forward call (to see finished rows leave the batch)."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    return sizes, handle


def test_finished_rows_leave_and_waiting_rows_join(tiny):
    """Continuous batching: with a row cap, finished rows leave the batch at once and waiting
    prompts join; the prefill is packed (one row, no padding) and runs each prompt once."""
    model, tok = tiny
    sizes, h = _batch_sizes(model)
    try:
        r = sample(model, PROMPTS, n=2, max_new_tokens=24, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(3), max_rows=4)  # fmt: skip
    finally:
        h.remove()
    prefill = [s for s in sizes if s[1] > 1]
    decode = [s[0] for s in sizes if s[1] == 1]
    assert all(s[0] == 1 for s in prefill)  # packed: one row
    assert sum(s[1] for s in prefill) >= sum(map(len, PROMPTS)) and r.stats["prefill_tokens"] >= sum(map(len, PROMPTS))
    assert max(decode) <= 4 and len(set(decode)) > 1
    assert r.stats["decode_calls"] == len(decode) and r.stats["decode_rows"] == sum(decode)


# ----------------------------------------------------------------------------------------
# page accounting
# ----------------------------------------------------------------------------------------


def _check_scheduler_invariants(s: Scheduler):
    """Every page's count equals the number of live rows holding it; free pages are held by none."""
    held = {}
    for r in s.running:
        assert len(s.pages[r]) == s.pages_for(s.ctx[r] + 1) or len(s.pages[r]) == s.pages_for(s.ctx[r]), (r, s.ctx[r], s.pages[r])
        for p in s.pages[r]:
            held[p] = held.get(p, 0) + 1
    for p in range(s.pool.num_pages):
        assert s.pool.ref[p] == held.get(p, 0), (p, s.pool.ref[p], held.get(p, 0))
    assert set(s.pool.free) == {p for p in range(s.pool.num_pages) if p not in held} and len(s.pool.free) == len(set(s.pool.free))


@pytest.mark.parametrize("page_size,num_pages", [(4, 400), (4, 24), (1, 70), (16, 12)])
def test_page_accounting(page_size, num_pages):
    """Driven without a model: shared prompt pages are counted once per holder, nothing leaks
    or is freed twice, and the pool is whole at the end (also under preemption)."""
    g = torch.Generator().manual_seed(0)
    P = [9, 1, 16, 33, 5]
    n = 4
    lengths = torch.randint(1, 30, (len(P) * n,), generator=g).tolist()
    s = Scheduler(P, n, 30, num_pages=num_pages, page_size=page_size, max_rows=12)
    first = True
    while s.busy:
        items = s.admit()
        if first:  # a new prompt's full pages are stored once, shared by its n samples
            rows, feed, copies = items[0]
            assert len(rows) == n and feed == P[0]
            shared = s.pages[rows[0]][: P[0] // page_size]
            assert all(s.pool.ref[p] == n for p in shared)
            assert len(copies) == (n - 1) * (P[0] % page_size != 0)
            first = False
        _check_scheduler_invariants(s)
        s.sampled([s.length[r] + 1 >= lengths[r] for r in s.running])
        _check_scheduler_invariants(s)
        s.grow()
        _check_scheduler_invariants(s)
        if s.running:
            s.decoded()
    s.pool.check_whole()
    assert s.length == [min(L, 30) for L in lengths]
    if num_pages * page_size < 200:
        assert s.stats["preemptions"] > 0, "test setup: this budget should preempt"


def test_prompt_stored_once():
    """8 samples of a 64-token prompt hold 4 shared pages of 16, not 32."""
    s = Scheduler([64], 8, 4, num_pages=100, page_size=16, max_rows=8)
    s.admit()
    assert s.pool.num_pages - s.pool.n_free == 4
    assert simulate([64], 8, [4] * 8, 4, num_pages=100, page_size=16, max_rows=8)["peak_pages"] == 4 + 8  # + one page each to grow


def test_budget_too_small_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="KV budget"):
        sample(model, PROMPTS, n=2, max_new_tokens=30, eos_token_ids=[], pad_token_id=tok.pad_token_id, page_size=4, kv_tokens=16)


# ----------------------------------------------------------------------------------------
# sampler log-probs == response_logprobs at T != 1
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampler_logprobs_equal_response_logprobs(tiny, temperature):
    model, tok = tiny
    n = 3
    r = sample(model, PROMPTS, n=n, max_new_tokens=16, temperature=temperature, eos_token_ids=list(range(0, 30)),
               pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1), page_size=4, kv_tokens=90)  # fmt: skip
    assert r.lengths.unique().numel() > 2, "test setup: want unequal response lengths"
    rows = [p for p in PROMPTS for _ in range(n)]
    logp, _ = response_logprobs(model, rows, r.tokens, r.lengths, temperature=temperature)
    torch.testing.assert_close(r.logprobs, logp, atol=1e-5, rtol=0)
    assert (r.logprobs[~r.mask()] == 0).all()


# ----------------------------------------------------------------------------------------
# seeds, filters, sampling frequencies
# ----------------------------------------------------------------------------------------


def test_seeded_reproducibility(tiny):
    model, tok = tiny
    kw = dict(n=2, max_new_tokens=16, temperature=1.0, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    a = sample(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    b = sample(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    c = sample(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    # the n samples of one prompt differ from each other (they are not copies)
    assert not torch.equal(a.tokens[0], a.tokens[1])


def _brute_filter_mask(logits, top_k, top_p):
    """Keep-mask by the definitions, one row at a time: top-k = the k largest; then top-p = the
    smallest prefix (by descending probability, renormalised over the top-k survivors) whose
    mass reaches top_p."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for i, row in enumerate(logits):
        order = row.argsort(descending=True).tolist()
        if top_k > 0:
            order = order[:top_k]
        probs = row[order].softmax(-1).tolist()
        mass = 0.0
        for j, p in zip(order, probs):
            keep[i, j] = True
            mass += p
            if mass >= top_p:
                break
    return keep


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (8, 0.7), (0, 1e-6)])
def test_filter_logits_vs_brute_force(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 2  # (A, V), no ties
    out = filter_logits(logits, top_k, top_p)
    keep = _brute_filter_mask(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(out), keep)
    assert torch.equal(out[keep], logits[keep])  # survivors untouched
    assert (keep.sum(-1) >= 1).all()


def test_top_k_1_is_greedy_and_topk_samples_stay_in_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3  # (A, V)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    tok, _ = _next_token(logits, 1.0, 1, 1.0, u)
    assert torch.equal(tok, logits.argmax(-1))
    for top_k, top_p in [(5, 1.0), (0, 0.6)]:
        keep = _brute_filter_mask(logits, top_k, top_p)
        for s in range(5):
            tok, lp = _next_token(logits, 0.8, top_k, top_p, torch.rand(64, generator=g, dtype=torch.float64))
            assert keep.gather(1, tok[:, None]).all()
            # reported log-probs are of the FULL temperature-scaled distribution
            torch.testing.assert_close(lp, torch.log_softmax(logits / 0.8, -1).gather(1, tok[:, None]).squeeze(1))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_sampling_frequencies(temperature):
    """One step of a 5-way categorical over 40k rows with the engine's draws uniforms(seed, row, t):
    counts match softmax(logits / T) (Pearson chi-square, df = 4; the bound 40 has p < 1e-7,
    and the seed is fixed), and clearly do not match the distribution at another temperature."""
    logits = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0])
    R = 40_000
    u = uniforms(12345, torch.arange(R), torch.full((R,), 3))
    tok, _ = _next_token(logits.expand(R, 5), temperature, 0, 1.0, u)
    counts = torch.bincount(tok, minlength=5).double()

    def chi2(T):
        expected = torch.softmax(logits.double() / T, -1) * R
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(temperature) < 40
    assert chi2(temperature * 1.5) > 200


def test_uniforms_are_uniform_and_independent():
    """The counter-based draws: uniform over 64 bins (chi-square, df = 63: p < 1e-6 above 130),
    in [0, 1), no correlation between neighbouring rows, steps or seeds, and a pure function."""
    rows, t = torch.arange(200).repeat_interleave(200), torch.arange(200).repeat(200)  # a 200 x 200 grid
    u = uniforms(7, rows, t)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=64, min=0, max=1)
    exp = u.numel() / 64
    assert float(((counts - exp) ** 2 / exp).sum()) < 130
    grid = u.view(200, 200)  # [row, t]
    for a, b in [(grid[1:], grid[:-1]), (grid[:, 1:], grid[:, :-1]), (grid, uniforms(8, rows, t).view(200, 200))]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.03  # 4 sigma at ~40k pairs
    assert torch.equal(u, uniforms(7, rows, t))
    assert seed_from(torch.Generator().manual_seed(1)) == seed_from(torch.Generator().manual_seed(1))


def test_bad_arguments(tiny):
    model, tok = tiny
    for kw in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0), dict(n=0)]:
        args = dict(max_new_tokens=4, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id) | kw
        with pytest.raises(ValueError):
            sample(model, PROMPTS, **args)
    with pytest.raises(ValueError):
        sample(model, [[1, 2], []], max_new_tokens=4, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)


@pytest.mark.skipif(not os.environ.get("ANTISD_SLOW_TESTS"), reason="torch.compile of the decode step takes 1-4 min of CPU here; ANTISD_SLOW_TESTS=1 runs it")
def test_compiled_decode_step_equals_eager(tiny):
    """The decode step under torch.compile (dynamo + AOT autograd, the "aot_eager" backend: the
    graph capture and functionalisation of the cache writes, without inductor's C++ build, to
    keep the test's compile time small) samples the same tokens as eager, with preemption."""
    model, tok = tiny
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id, page_size=4, kv_tokens=48)
    eager = sample(model, PROMPTS, generator=torch.Generator().manual_seed(4), **kw)
    torch._dynamo.reset()
    comp = sample(model, PROMPTS, generator=torch.Generator().manual_seed(4), compile="aot_eager", **kw)
    assert torch.equal(comp.tokens, eager.tokens) and torch.equal(comp.lengths, eager.lengths)
    torch.testing.assert_close(comp.logprobs, eager.logprobs, atol=1e-5, rtol=0)


@pytest.mark.skipif(not os.environ.get("ANTISD_SLOW_TESTS"), reason="compiling FlexAttention's C++ kernel takes ~35 s of CPU here; ANTISD_SLOW_TESTS=1 runs it")
@pytest.mark.parametrize("graphs", [True, False])
def test_compiled_inplace_equals_twin(tiny, graphs):
    """attention="flex": the compiled, block-sparse FlexAttention kernel (what CUDA runs; on CPU
    inductor's C++ template) reads only the listed pages and gives the twin's tokens, with
    preemption, scattered EOS (the live rows change: a recompile with that dim dynamic) and,
    with graphs, the padded static-shape buckets."""
    model, tok = tiny
    kw = dict(n=4, max_new_tokens=24, temperature=1.0, eos_token_ids=EOS_MIX, pad_token_id=tok.pad_token_id)
    ref = reference_sample(model, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    r = sample(model, PROMPTS, generator=torch.Generator().manual_seed(3), page_size=4, kv_tokens=56, attention="flex", decode_graphs=graphs, **kw)
    _same(r, ref)
    assert r.stats["preemptions"] > 0 and r.stats["attention"] == "flex"
