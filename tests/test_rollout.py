"""rollout.sample (our KV-cache sampler) against slow, obviously correct references on the tiny model.

References: HF `model.generate` (greedy), a no-cache loop that runs the full forward over each
unpadded sequence every step, `model.response_logprobs`, and brute-force top-k / top-p.
Every test uses ragged prompts (B > 1, unequal lengths); the speed paths of `sample` (the
preallocated cache + 4D mask, `fast=True`, and the plain DynamicCache path, `fast=False`) are
both compared against the references.

Greedy tests use a *sharpened* tiny model (2-D weights x 8): a random tiny model has
near-tied argmaxes, where float noise between two correct implementations flips a token;
`_greedy_reference` asserts the margin so a failure cannot be a near-tie.
"""

import pytest
import torch

import model as model_lib
from model import left_pad, response_logprobs
from rollout import _next_token, filter_logits, sample

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


# ----------------------------------------------------------------------------------------
# greedy == generate == no-cache reference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_greedy_matches_generate(sharp, n, fast):
    model, tok = sharp
    T = 12
    r = sample(model, PROMPTS, n=n, max_new_tokens=T, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, fast=fast)
    assert r.tokens.shape == (len(PROMPTS) * n, T)
    assert torch.equal(r.tokens, _generate(model, tok, PROMPTS, n, T))
    assert (r.lengths == T).all() and not r.finished.any()


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_matches_no_cache_reference(sharp, fast):
    model, tok = sharp
    T = 10
    r = sample(model, PROMPTS, n=2, max_new_tokens=T, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, fast=fast)
    for b, p in enumerate(PROMPTS):
        ref_tok, ref_lp = _greedy_reference(model, p, T)
        for j in range(2):  # prompt-major rows: row b*n + j
            assert torch.equal(r.tokens[b * 2 + j], ref_tok)
            torch.testing.assert_close(r.logprobs[b * 2 + j], ref_lp, atol=1e-5, rtol=1e-5)  # logits x8: |logp| up to ~10


def test_greedy_eager_attention_matches_generate(sharp):
    """The fast path's additive 4D mask under eager attention (added to the scores) too."""
    model, tok = sharp
    model.set_attn_implementation("eager")
    try:
        r = sample(model, PROMPTS, n=2, max_new_tokens=8, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id)
        assert torch.equal(r.tokens, _generate(model, tok, PROMPTS, 2, 8))
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("fast", [True, False])
def test_train_mode_with_gradient_checkpointing_samples_like_eval_mode(fast):
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
    r = sample(model, PROMPTS, n=2, max_new_tokens=10, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id, fast=fast)
    assert model.training  # restored
    assert torch.equal(r.tokens, ref)


# ----------------------------------------------------------------------------------------
# per-row EOS stop, truncation, pruning
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_per_row_eos_stop(sharp, fast):
    """EOS = tokens the greedy path emits at known steps: each row must stop at the first of
    them (EOS included in its length), emit pad after, and rows that never hit one run to
    max_new_tokens with finished=False."""
    model, tok = sharp
    T = 12
    free = _generate(model, tok, PROMPTS, 1, T)  # (B, T) greedy with no EOS
    eos = sorted({int(free[0, 2]), int(free[2, 6])})
    r = sample(model, PROMPTS, max_new_tokens=T, temperature=0, eos_token_ids=eos, pad_token_id=tok.pad_token_id, fast=fast, prune_every=1, prune_frac=0.01)
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
    r1 = sample(model, PROMPTS, max_new_tokens=T, temperature=0, eos_token_ids=eos[0], pad_token_id=tok.pad_token_id, fast=fast)
    hit1 = free == eos[0]
    assert torch.equal(r1.finished, hit1.any(1))


def _batch_sizes(model):
    """Record the batch size of every forward call (to see finished rows leave the batch)."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("fast", [True, False])
def test_pruning_does_not_change_results(tiny, fast):
    """T = 1 sampling with the same seed: dropping finished rows every step (prune_every=1) gives
    the same tokens as never dropping them, and the batch really shrinks."""
    model, tok = tiny
    eos = list(range(0, 40))  # ~7% of the vocabulary: rows finish at scattered steps
    kw = dict(n=4, max_new_tokens=24, temperature=1.0, eos_token_ids=eos, pad_token_id=tok.pad_token_id, fast=fast)
    sizes, h = _batch_sizes(model)
    try:
        a = sample(model, PROMPTS, generator=torch.Generator().manual_seed(3), prune_every=1, prune_frac=0.01, **kw)
    finally:
        h.remove()
    b = sample(model, PROMPTS, generator=torch.Generator().manual_seed(3), prune_every=10**9, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert a.finished.any() and a.lengths.unique().numel() > 2, "test setup: want ragged finishing"
    assert sizes[0] == len(PROMPTS)  # the prefill runs each distinct prompt once
    decode = sizes[1:]  # live rows per decode step: shrinks as rows finish
    assert max(decode) <= 16 and min(decode) < 16 and decode == sorted(decode, reverse=True)


def test_fast_path_equals_plain_path(tiny):
    """The preallocated cache + 4D mask path and the DynamicCache + 2D mask path sample the same tokens."""
    model, tok = tiny
    kw = dict(n=3, max_new_tokens=20, temperature=1.0, eos_token_ids=list(range(0, 20)), pad_token_id=tok.pad_token_id)
    a = sample(model, PROMPTS, generator=torch.Generator().manual_seed(0), fast=True, **kw)
    b = sample(model, PROMPTS, generator=torch.Generator().manual_seed(0), fast=False, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# sampler log-probs == response_logprobs at T != 1
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampler_logprobs_equal_response_logprobs(tiny, temperature, fast):
    model, tok = tiny
    n = 3
    r = sample(model, PROMPTS, n=n, max_new_tokens=16, temperature=temperature, eos_token_ids=list(range(0, 30)),
               pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1), fast=fast, prune_every=4)  # fmt: skip
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
    u = torch.rand(64, 50, generator=g)
    tok, _ = _next_token(logits, 1.0, 1, 1.0, u)
    assert torch.equal(tok, logits.argmax(-1))
    for top_k, top_p in [(5, 1.0), (0, 0.6)]:
        keep = _brute_filter_mask(logits, top_k, top_p)
        for s in range(5):
            tok, lp = _next_token(logits, 0.8, top_k, top_p, torch.rand(64, 50, generator=g))
            assert keep.gather(1, tok[:, None]).all()
            # reported log-probs are of the FULL temperature-scaled distribution
            torch.testing.assert_close(lp, torch.log_softmax(logits / 0.8, -1).gather(1, tok[:, None]).squeeze(1))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_sampling_frequencies(temperature):
    """One step of a 5-way categorical over 40k rows: counts match softmax(logits / T) (Pearson
    chi-square, df = 4; the bound 40 has p < 1e-7, and the seed is fixed), and clearly do
    not match the distribution at another temperature."""
    logits = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0])
    R = 40_000
    g = torch.Generator().manual_seed(0)
    tok, _ = _next_token(logits.expand(R, 5), temperature, 0, 1.0, torch.rand(R, 5, generator=g))
    counts = torch.bincount(tok, minlength=5).double()

    def chi2(T):
        expected = torch.softmax(logits.double() / T, -1) * R
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(temperature) < 40
    assert chi2(temperature * 1.5) > 200


def test_bad_arguments(tiny):
    model, tok = tiny
    for kw in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0), dict(n=0)]:
        args = dict(max_new_tokens=4, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id) | kw
        with pytest.raises(ValueError):
            sample(model, PROMPTS, **args)
    with pytest.raises(ValueError):
        sample(model, [[1, 2], []], max_new_tokens=4, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
