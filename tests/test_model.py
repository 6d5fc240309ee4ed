"""model.py: the tiny tokenizer, loading and saving, and response_logprobs against a plain
per-sequence forward (no padding at all) + log_softmax, one row at a time.

Every scoring test uses B > 1 rows with unequal prompt AND response lengths, a row with an
empty response and a row with a full-length one, and junk (not pad) token ids beyond each
row's length, which must not change anything.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model as model_lib
from model import build_tiny_tokenizer, left_pad, positions_from_mask, response_logprobs

PROMPTS = [[5, 17, 230, 9, 44], [301], [8, 8, 120, 77, 3, 400, 12, 90, 11], [260, 14, 2], [99, 98]]
LENGTHS = torch.tensor([4, 7, 1, 0, 6])  # (N,) row 1 is full length (T = 7), row 3 empty
T = 7


@pytest.fixture(scope="module")
def tiny():
    return model_lib.load("tiny", seed=0)


def _responses(seed=0):
    """(N, T) response ids with JUNK beyond each length (real token ids, not pad)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 560, (len(PROMPTS), T), generator=g)


def _reference(model, temperature, responses, lengths):
    """Per row, no padding: one forward over prompt + response[:L], log_softmax of logits / T
    at the positions that predict the response tokens. Returns logp (N, T), entropy (N, T)."""
    logp = torch.zeros(len(PROMPTS), T)
    ent = torch.zeros(len(PROMPTS), T)
    for i, (p, L) in enumerate(zip(PROMPTS, lengths.tolist())):
        if L == 0:
            continue
        seq = torch.tensor([p + responses[i, :L].tolist()])  # (1, len(p) + L)
        lp = torch.log_softmax(model(input_ids=seq).logits[0].float() / temperature, -1)  # (len(p)+L, V)
        lp = lp[len(p) - 1 : len(p) - 1 + L]  # (L, V): position len(p)-1+j predicts response token j
        logp[i, :L] = lp.gather(-1, responses[i, :L, None]).squeeze(-1)
        ent[i, :L] = -(lp.exp() * lp).sum(-1)
    return logp, ent


# ----------------------------------------------------------------------------------------
# response_logprobs
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_response_logprobs_match_per_sequence_reference(tiny, temperature):
    model, _ = tiny
    resp = _responses()
    with torch.no_grad():
        ref_lp, ref_ent = _reference(model, temperature, resp, LENGTHS)
        logp, ent = response_logprobs(model, PROMPTS, resp, LENGTHS, temperature=temperature, with_entropy=True)
    assert logp.shape == ent.shape == (len(PROMPTS), T) and logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    mask = torch.arange(T)[None] < LENGTHS[:, None]  # (N, T)
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all()  # exactly 0, not merely small
    assert (logp[mask] < 0).all() and (ent[mask] > 0).all()


def test_response_logprobs_ignore_tokens_beyond_length(tiny):
    """Junk ids past a row's length, or any other junk, give bit-identical scores."""
    model, _ = tiny
    a, b = _responses(0), _responses(1)
    mask = torch.arange(T)[None] < LENGTHS[:, None]
    b = torch.where(mask, a, b)  # same response tokens, different junk
    with torch.no_grad():
        la, ea = response_logprobs(model, PROMPTS, a, LENGTHS, with_entropy=True)
        lb, eb = response_logprobs(model, PROMPTS, b, LENGTHS, with_entropy=True)
    assert torch.equal(la, lb) and torch.equal(ea, eb)


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
def test_chunked_equals_unchunked(tiny, chunk_size):
    model, _ = tiny
    resp = _responses()
    with torch.no_grad():
        l0, e0 = response_logprobs(model, PROMPTS, resp, LENGTHS, temperature=0.8, with_entropy=True, chunk_size=10**6)
        l1, e1 = response_logprobs(model, PROMPTS, resp, LENGTHS, temperature=0.8, with_entropy=True, chunk_size=chunk_size)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=0)
    torch.testing.assert_close(e1, e0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size,grad", [(3, False), (3, True), (64, True)])
def test_head_sees_at_most_chunk_size_positions(tiny, chunk_size, grad):
    """The memory guarantee: every output-head call gets at most chunk_size positions (over all
    rows together), only real response positions reach it, and backward (checkpointed chunks)
    recomputes the same chunk sizes."""
    model, _ = tiny
    calls = []
    h = model.lm_head.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    try:
        with torch.set_grad_enabled(grad):
            logp, _ = response_logprobs(model, PROMPTS, _responses(), LENGTHS, with_entropy=True, chunk_size=chunk_size)
            n_fwd = len(calls)
            if grad:
                logp.sum().backward()
                model.zero_grad(set_to_none=True)
    finally:
        h.remove()
    M = int(LENGTHS.sum())
    assert all(len(c) == 2 and c[0] <= chunk_size for c in calls), calls
    assert sum(c[0] for c in calls[:n_fwd]) == M  # each response position exactly once (entropy reuses the logits)
    assert n_fwd == -(-M // chunk_size)
    if grad:  # checkpointing: backward runs the head again on the same chunks
        assert calls[n_fwd:] and all(c[0] <= chunk_size for c in calls[n_fwd:])


def test_gradient_matches_per_sequence_reference(tiny):
    """d/dtheta of sum_i,t w_it * logp_it: chunked + checkpointed scoring == per-sequence reference."""
    model, _ = tiny
    resp = _responses()
    w = torch.randn(len(PROMPTS), T, generator=torch.Generator().manual_seed(0))  # (N, T)
    params = [p for p in model.parameters()]

    ref_lp, _ = _reference(model, 0.9, resp, LENGTHS)
    ref_grads = torch.autograd.grad((ref_lp * w).sum(), params, allow_unused=True)
    logp, _ = response_logprobs(model, PROMPTS, resp, LENGTHS, temperature=0.9, chunk_size=2)
    grads = torch.autograd.grad((logp * w).sum(), params, allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:  # e.g. embedding rows never touched are still a zero tensor, not None
            assert g is None or (g == 0).all(), name
            continue
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=name)


def test_response_logprobs_all_empty(tiny):
    model, _ = tiny
    with torch.no_grad():
        logp, ent = response_logprobs(model, PROMPTS, _responses(), torch.zeros(len(PROMPTS), dtype=torch.long), with_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()


def test_left_pad_and_positions():
    ids, mask = left_pad([[7, 8, 9], [5]], pad_id=0, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    # right padding after the response keeps counting real tokens only
    m2 = torch.tensor([[False, True, True, True, False, False]])
    assert positions_from_mask(m2).tolist() == [[0, 0, 1, 2, 2, 2]]
    with pytest.raises(ValueError):
        left_pad([[1], []], 0, "cpu")


# ----------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------

TEXTS = [
    "Which pair sums to 13? Let me check each: A: 4 + 9 = 13, yes. So the answer is \\boxed{A}.",
    "  leading spaces, trailing\ttab\n\nand newlines \n",
    "naïve café — 数学 ∑ x² 🙂 \u200b zero-width, e\u0301 combining",
    "",
    "<think> looks special but is plain text here",
]


def test_tokenizer_round_trips_and_specials():
    tok = build_tiny_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for sp in model_lib.SPECIAL_TOKENS:  # each special is one token
        assert len(tok.encode(sp, add_special_tokens=False)) == 1
    assert len(tok.encode(" answer", add_special_tokens=False)) == 1  # a trained whole-word merge
    assert len(tok) < 1000


def test_chat_template():
    tok = build_tiny_tokenizer()
    msgs = [{"role": "user", "content": "Solve 2+2."}]
    plain = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert plain == "<|im_start|>user\nSolve 2+2.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True) == plain
    no_think = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert no_think == plain + "<think>\n\n</think>\n\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in transformers 5
    assert tok.decode(ids) == plain


def test_save_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    model_lib.save(model, tok, str(tmp_path))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    msgs = [{"role": "user", "content": "hi"}]
    for think in (True, False):
        assert tok2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=think) == tok.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=False, enable_thinking=think
        )
    x = torch.tensor([[5, 17, 230, 9, 44, 301]])
    with torch.no_grad():
        ref = model(input_ids=x).logits
        m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path))
        assert torch.equal(m2(input_ids=x).logits, ref)
        m3, tok3 = model_lib.load(str(tmp_path), device="cpu")
        assert torch.equal(m3(input_ids=x).logits, ref)
    assert tok3.pad_token_id == tok.pad_token_id and not m3.training


def test_load_errors():
    with pytest.raises(ValueError, match="unknown random preset.*random:Qwen/Qwen3-4B-Instruct-2507"):
        model_lib.load("random:Nobody/NoSuchModel-1B")
    with pytest.raises(FileNotFoundError):
        model_lib.load("./no/such/dir")


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-30B-A3B"])
def test_random_preset_shrunk(monkeypatch, hub_id):
    """The random:<hub id> code path with the real config shrunk (same model type, tying and
    head layout; a few layers, narrow): it builds, our sampler matches generate greedily, and
    scoring matches the sampler's log-probs. Never instantiates the real sizes."""
    from rollout import sample

    shrunk = dict(model_lib.REAL_CONFIGS[hub_id])
    shrunk.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=640)
    if "moe_intermediate_size" in shrunk:
        shrunk.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    monkeypatch.setitem(model_lib.REAL_CONFIGS, hub_id, shrunk)
    model, tok = model_lib.load("random:" + hub_id, device="cpu")
    assert model.config.model_type == shrunk["model_type"] and model.config.tie_word_embeddings == shrunk["tie_word_embeddings"]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)  # sharpen: no greedy near-ties
    prompts = [[5, 17, 230], [301], [8, 120, 77, 3, 400]]
    r = sample(model, prompts, max_new_tokens=6, temperature=0, eos_token_ids=[], pad_token_id=tok.pad_token_id)
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=tok.pad_token_id)
        logp, _ = response_logprobs(model, prompts, r.tokens, r.lengths)
    assert torch.equal(r.tokens, g[:, ids.shape[1] :])
    torch.testing.assert_close(r.logprobs, logp, atol=1e-4, rtol=1e-5)
    # the shared-prefix scorer on the real architecture (tied head / MoE), repeated prompts
    rows = [0, 2, 0, 1, 2]
    shared, _, work = model_lib.shared_prefix_logprobs(model, [prompts[i] for i in rows], r.tokens[rows], r.lengths[rows])
    assert model_lib.prefix_sharing_ok(model) and work["prompt_tokens"] == 9 < work["prompt_tokens_rows"]
    torch.testing.assert_close(shared, logp[rows], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# shared_prefix_logprobs: each distinct prompt once (issue 12)
# ----------------------------------------------------------------------------------------

# rows -> prompt: repeated prompts (as a group's teacher prompts are), in scattered order, one
# prompt used once; ragged prompts and responses, an empty and a full-length response
SHARED_ROWS = [0, 2, 0, 1, 2, 0, 3, 2]
SHARED_LENGTHS = torch.tensor([7, 3, 1, 0, 7, 5, 2, 6])


_BEGIN = [int(x) for x in torch.randint(0, 560, (20,), generator=torch.Generator().manual_seed(5))]
# longer prompts sharing a 20-token beginning, as a group's teacher prompts do, and one not
LONG = [_BEGIN + [5, 17, 230], _BEGIN + [301], _BEGIN[:18] + [8, 8, 120, 77, 3, 400, 12], [260, 14, 2] * 7, _BEGIN + [99, 98, 1, 2, 3, 4]]


@pytest.mark.parametrize("temperature,chunk_size,long,call_tokens", [(1.0, 1024, False, None), (0.7, 3, False, 0), (0.9, 4, True, 0), (1.0, 1024, True, 10**6)])
def test_shared_prefix_equals_row_by_row(tiny, temperature, chunk_size, long, call_tokens):
    """Against response_logprobs and the per-sequence forward; call_tokens 0 puts every length in
    its own bucket (prompt and response passes), 10**6 everything in one."""
    model, _ = tiny
    base = LONG if long else PROMPTS
    prompts = [base[j] for j in SHARED_ROWS]
    resp = torch.randint(0, 560, (len(prompts), T), generator=torch.Generator().manual_seed(3))  # junk past lengths
    assert model_lib.prefix_sharing_ok(model)  # the shared path runs, not the fallback
    with torch.no_grad():
        ref_lp, ref_ent = response_logprobs(model, prompts, resp, SHARED_LENGTHS, temperature=temperature, with_entropy=True)
    logp, ent, work = model_lib.shared_prefix_logprobs(model, prompts, resp, SHARED_LENGTHS, temperature=temperature, with_entropy=True, chunk_size=chunk_size, call_tokens=call_tokens)
    torch.testing.assert_close(logp, ref_lp, atol=2e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-6, rtol=0)
    mask = torch.arange(T)[None] < SHARED_LENGTHS[:, None]
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all() and (logp[mask] < 0).all()
    assert work == {"prompt_tokens": sum(len(base[j]) for j in set(SHARED_ROWS)), "prompt_tokens_rows": sum(len(p) for p in prompts)}
    assert not logp.requires_grad  # a no-grad scorer, whatever the caller's grad mode
    # the reference itself against the per-sequence forward (no padding at all), row by row
    for i, j in enumerate(SHARED_ROWS):
        L = int(SHARED_LENGTHS[i])
        if L:
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([base[j] + resp[i, :L].tolist()])).logits[0] / temperature, -1)
            want = lp[len(base[j]) - 1 : len(base[j]) - 1 + L].gather(-1, resp[i, :L, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, :L], want, atol=1e-5, rtol=0)


def test_shared_prefix_edges(tiny, monkeypatch):
    """One response token, no response tokens at all, one prompt for every row, and the row-by-row
    fallback for models the shared path does not cover."""
    model, _ = tiny
    prompts = [PROMPTS[2]] * 3
    resp = torch.randint(0, 560, (3, 1), generator=torch.Generator().manual_seed(4))
    one = torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        ref, _ = response_logprobs(model, prompts, resp, one)
    logp, ent, work = model_lib.shared_prefix_logprobs(model, prompts, resp, one)
    torch.testing.assert_close(logp, ref, atol=2e-6, rtol=0)
    assert ent is None and work == {"prompt_tokens": len(PROMPTS[2]), "prompt_tokens_rows": 3 * len(PROMPTS[2])}
    logp, ent, _ = model_lib.shared_prefix_logprobs(model, prompts, resp[:, :0], torch.zeros(3, dtype=torch.long), with_entropy=True)
    assert logp.shape == ent.shape == (3, 0)
    monkeypatch.setattr(model_lib, "prefix_sharing_ok", lambda m: False)
    fall, _, work = model_lib.shared_prefix_logprobs(model, prompts, resp, one)
    assert torch.equal(fall, ref) and work["prompt_tokens"] == work["prompt_tokens_rows"]


def test_length_buckets_trade_padding_for_calls():
    lens = [10, 84, 11, 0, 83, 1, 40, 10]
    # free calls: one bucket per distinct length; expensive calls: one bucket
    assert model_lib._length_buckets(lens, call_tokens=0) == [[1], [4], [6], [2], [0, 7], [5]]
    assert model_lib._length_buckets(lens, call_tokens=10**6) == [[1, 4, 6, 2, 0, 7, 5]]  # (length 0 is below min_len)
    # min_len 2 leaves 84, 83, 40, 11, 10, 10; at 64 per call the cheapest cut is
    # [84 83 40] [11 10 10]: 2*64 + 3*84 + 3*11 = 413 (one bucket 568, [84 83] [40 11 10 10] 456, ...)
    assert model_lib._length_buckets(lens, call_tokens=64, min_len=2) == [[1, 4, 6], [2, 0, 7]]
    assert model_lib._length_buckets(lens, call_tokens=256, min_len=2) == [[1, 4, 6, 2, 0, 7]]  # 760: one call
    assert model_lib._length_buckets([], call_tokens=1) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU path: bf16, sdpa's CUDA kernels, call_tokens 4096)")
def test_shared_prefix_on_cuda_bf16():
    model, _ = model_lib.load("tiny", device="cuda", dtype=torch.bfloat16, seed=0)
    prompts = [LONG[j] for j in SHARED_ROWS]
    resp = torch.randint(0, 560, (len(prompts), T), generator=torch.Generator().manual_seed(3)).cuda()
    lengths = SHARED_LENGTHS.cuda()
    with torch.no_grad():
        ref, ref_ent = response_logprobs(model, prompts, resp, lengths, with_entropy=True)
    logp, ent, _ = model_lib.shared_prefix_logprobs(model, prompts, resp, lengths, with_entropy=True)
    assert logp.dtype == torch.float32 and logp.device.type == "cuda"
    torch.testing.assert_close(logp, ref, atol=5e-2, rtol=0)  # bf16 activations: rounding, not a shift
    torch.testing.assert_close(ent, ref_ent, atol=5e-2, rtol=0)
