"""rollout.py: our own batched sampler with a KV cache (the dominant cost of RL).

    rollout = sample(model, prompts, n=8, max_new_tokens=512, temperature=1.0,
                     eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    rollout.tokens (N, T), rollout.lengths (N,), rollout.finished (N,), rollout.logprobs (N, T)

Why not `model.generate`: we need per-token log-probs of exactly the distribution we sampled
from, ragged prompts, per-row stop, a seeded generator, and no per-token host sync; and we
want finished rows to stop costing compute. The loop is short enough to read:

  1. prefill: left-pad the B distinct prompts (position ids count real tokens only, so a
     padded row starts at position 0 exactly like an unpadded one), run them once, and
     repeat the KV cache n times (prompt-major rows: the n samples of prompt 0 first).
     Prefilling each prompt once instead of n times saves (n-1)/n of the prefill.
  2. decode: one token per step for every live row, sampled on-device from
     softmax(logits / temperature) (optionally top-k / top-p filtered) by the Gumbel-max
     trick on uniforms drawn from `generator` for all N rows every step (so a row's tokens
     do not depend on when finished rows were dropped: the same seed, the same tokens);
     a row that emits an EOS is finished: its EOS is part of the response and counted in
     its length, and it emits `pad_token_id` afterwards.
  3. every `prune_every` steps (the only host syncs) we look at which rows finished: stop if
     all did, and drop finished rows from the batch and the KV cache when enough of them
     did, so long-tail rows do not drag the whole batch along.

Speed (bench/README.md has the numbers): for decoders whose layers are all full attention
(Qwen3, Qwen3-MoE, Llama) under sdpa or eager attention, the KV cache is preallocated to
its final length (`_SlabLayer`: one column written per step, where DynamicCache's torch.cat
copies the whole cache every step, O(T^2) bytes per rollout), and the attention mask is
one preallocated 4D additive bias sliced per step (HF returns a 4D mask as-is instead of
rebuilding it from the 2D mask every step). Per-step bookkeeping writes a column of a
buffer that holds only the live rows; results go back to their original rows only when
rows are dropped and at the end. Other models (sliding-window layers, flash attention)
take the plain path: DynamicCache and the 2D mask.

Log-probs: `logprobs[i, t]` is log softmax(logits / temperature)[token] of the FULL
temperature-scaled distribution (before top-k / top-p), which is what the training loss
assumes (SPEC section 5 pitfall). With top-p < 1 the tokens come from the truncated
distribution, so these are not the sampling probabilities; the paper trains with top-p = 1.
Greedy (temperature = 0) reports log-probs at temperature 1.

Shapes: B prompts, n samples each, N = B * n rows, A live rows (A <= N), P prompt length
(padded), T = max_new_tokens, V vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

try:  # the layer-type helper DynamicCache itself uses; without it, take the plain path
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # pragma: no cover
    get_layer_types_and_kwargs = None

from model import left_pad, positions_from_mask


@dataclass
class Rollout:
    tokens: torch.Tensor  # (N, T) long, right-padded with pad_token_id
    lengths: torch.Tensor  # (N,) long, response lengths (an emitted EOS counts)
    finished: torch.Tensor  # (N,) bool, True if the row emitted an EOS (False = truncated)
    logprobs: torch.Tensor  # (N, T) fp32, sampler's log-prob of each token (0 past length)

    def mask(self) -> torch.Tensor:
        """(N, T) bool, True on response tokens: built from lengths, never from token ids."""
        T = self.tokens.shape[1]
        return torch.arange(T, device=self.tokens.device)[None, :] < self.lengths[:, None]

    def to_lists(self) -> list[list[int]]:
        return [row[:L].tolist() for row, L in zip(self.tokens.cpu(), self.lengths.cpu().tolist())]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits (A, V) -> (A, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (A, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)  # (A, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # (A, V)
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. logits (A, V), u (A, V) uniforms in [0, 1) (None when greedy)
    -> tokens (A,), logprobs (A,) under the full temperature-scaled distribution.

    Sampling is the Gumbel-max trick, argmax(log p + G) with G = -log(-log U): an exact sample
    from p, also after top-k / top-p (dropped tokens have log p = -inf, and renormalising is a
    per-row shift that does not move the argmax). A different random stream from
    torch.multinomial (which draws exponentials, 6x slower than uniforms on CPU); the same
    generator seed still gives the same tokens.
    """
    logits = logits.float()
    logp_full = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)  # (A, V)
    if temperature == 0:
        tok = logits.argmax(-1)  # (A,)
    else:
        logp = filter_logits(logp_full, top_k, top_p)  # (A, V) log-probs rank like logits
        gumbel = u.log().neg_().log_().neg_()  # (A, V) -log(-log U); U = 0 gives -inf: never picked
        tok = (logp + gumbel).argmax(-1)  # (A,) no host sync
    return tok, logp_full.gather(-1, tok[:, None]).squeeze(-1)


class _SlabLayer(DynamicLayer):
    """One layer's KV cache, preallocated to its final length (prompt + max_new_tokens).

    DynamicLayer appends with torch.cat, which copies the whole cache every step; here a step
    writes one column and attention reads a view of the filled prefix.
    Buffers (A, H, S_max, D); `keys` / `values` are views (A, H, S, D) of the first S columns.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.filled = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        A, H, _, D = key_states.shape
        self.kbuf = key_states.new_empty(A, H, self.capacity, D)
        self.vbuf = value_states.new_empty(A, H, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s, e = self.filled, self.filled + key_states.shape[-2]
        assert e <= self.capacity, f"_SlabLayer: {e} tokens exceed capacity {self.capacity}"
        self.kbuf[:, :, s:e] = key_states
        self.vbuf[:, :, s:e] = value_states
        self.filled = e
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.filled], self.vbuf[:, :, : self.filled]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf.repeat_interleave(repeats, 0), self.vbuf.repeat_interleave(repeats, 0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf.index_select(0, indices), self.vbuf.index_select(0, indices)
            self._views()


def _fast_path_ok(model) -> bool:
    """Preallocated cache + our own 4D mask are exact only if every layer is full (causal) attention
    and the attention function takes an additive 4D mask (sdpa, eager)."""
    if get_layer_types_and_kwargs is None:
        return False
    cfg = model.config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(cfg)
    return all(lt == "full_attention" for lt in layer_types) and cfg._attn_implementation in ("sdpa", "eager")


def _in_eval_mode(fn):
    """Run fn(model, ...) with the model in eval mode, then restore its mode. NOTE: transformers
    <= 5.22's GradientCheckpointingLayer drops the KV cache whenever the model is in train mode
    with gradient checkpointing on (decoding then runs without a cache: wrong tokens), and
    train.py's periodic evaluation follows an update; sampling is never a training forward."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return wrapped


@torch.no_grad()
@_in_eval_mode
def sample(
    model,
    prompts: list[list[int]],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    prune_every: int = 16,
    prune_frac: float = 0.25,
    fast: bool | None = None,
) -> Rollout:
    """Sample n responses for each prompt (rows prompt-major). See the module docstring.

    prompts: B token-id lists (any lengths, no padding). eos_token_ids: int or list of ints.
    generator: a torch.Generator on the model's device; the same seed gives the same tokens.
    prune_every: steps between host syncs (stop check, dropping finished rows).
    prune_frac: drop finished rows once they are at least this fraction of the live batch.
    fast: preallocated KV cache + prebuilt mask (None = whenever the model allows it; False
        forces the plain DynamicCache path, which the tests compare against).
    """
    if temperature < 0 or not (0 < top_p <= 1) or top_k < 0 or max_new_tokens < 1 or n < 1:
        raise ValueError(f"sample: bad arguments temperature={temperature} top_p={top_p} top_k={top_k} max_new_tokens={max_new_tokens} n={n}")
    device = next(model.parameters()).device
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids), dtype=torch.long, device=device)
    B, T = len(prompts), max_new_tokens
    N = B * n
    if fast is None:
        fast = _fast_path_ok(model)

    # --- 1) prefill the B distinct prompts once, then repeat the cache n times ---
    ids, pmask = left_pad(prompts, pad_token_id, device)  # (B, P)
    P = ids.shape[1]
    if fast:
        cache = Cache(layers=[_SlabLayer(P + T) for _ in range(model.config.get_text_config(decoder=True).num_hidden_layers)])
    else:
        cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=pmask.long(), position_ids=positions_from_mask(pmask), past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]  # (B, V)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)  # (N, V)
        pmask = pmask.repeat_interleave(n, dim=0)  # (N, P)
    pos = pmask.sum(-1, keepdim=True)  # (N, 1) position of the first response token = real prompt length
    # Attention mask over [prompt | generated]: generated columns are always attended (a
    # finished row's later tokens are never read by anyone but itself).
    if fast:
        # additive bias (N, 1, 1, P+T): 0 = attend, dtype-min = masked (left padding); step t
        # uses the first P+t+1 columns. Eager adds it to the scores; sdpa takes it as attn_mask.
        dtype = next(model.parameters()).dtype
        attn = torch.zeros(N, 1, 1, P + T, dtype=dtype, device=device)
        attn[:, 0, 0, :P].masked_fill_(~pmask, torch.finfo(dtype).min)
    else:
        attn = torch.cat([pmask.long(), torch.ones(N, T, dtype=torch.long, device=device)], dim=1)  # (N, P+T)

    # --- 2) decode ---
    # Results for all N rows, filled from the live-row buffers below when rows are dropped
    # and at the end.
    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)  # (N, T)
    logprobs = torch.zeros(N, T, dtype=torch.float32, device=device)  # (N, T)
    lengths = torch.zeros(N, dtype=torch.long, device=device)  # (N,)
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
    # Live rows only (A of them): a step writes column t directly, no index_put per step.
    rows = torch.arange(N, device=device)  # (A,) live row -> original row
    a_tok, a_lp = tokens.clone(), logprobs.clone()  # (A, T)
    a_len, a_done = lengths.clone(), finished.clone()  # (A,)

    def flush():  # copy the live rows' results to their original rows
        tokens[rows], logprobs[rows], lengths[rows], finished[rows] = a_tok, a_lp, a_len, a_done

    for t in range(T):
        u = None
        if temperature > 0:
            # Uniforms for all N rows, live or not, then the live ones: a row's random stream
            # does not depend on when other rows were dropped, so prune_every is only a speed knob.
            u = torch.rand((N, logits.shape[-1]), generator=generator, device=device)  # (N, V)
            u = u if rows.numel() == N else u[rows]  # (A, V)
        tok, lp = _next_token(logits, temperature, top_k, top_p, u)  # (A,), (A,)
        tok = tok.masked_fill(a_done, pad_token_id)  # rows finished before this step emit pad
        a_tok[:, t] = tok
        a_lp[:, t] = lp.masked_fill(a_done, 0.0)
        a_len += (~a_done).long()
        a_done |= torch.isin(tok, eos)
        if t == T - 1:
            break
        # --- 3) the only host sync: stop, or drop finished rows from batch and cache ---
        if (t + 1) % prune_every == 0:
            n_live = int((~a_done).sum())
            if n_live == 0:
                break
            if rows.numel() - n_live >= prune_frac * rows.numel():
                flush()
                keep = (~a_done).nonzero().squeeze(-1)  # (A',)
                cache.batch_select_indices(keep)
                rows, tok, pos, attn = rows[keep], tok[keep], pos[keep], attn[keep]
                a_tok, a_lp, a_len, a_done = a_tok[keep], a_lp[keep], a_len[keep], a_done[keep]
        out = model(
            input_ids=tok[:, None],
            attention_mask=attn[..., : P + t + 1],  # (A, 1, 1, P+t+1) fast, else (A, P+t+1)
            position_ids=pos + t,  # (A, 1)
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]  # (A, V)
    flush()
    return Rollout(tokens=tokens, lengths=lengths, finished=finished, logprobs=logprobs)
