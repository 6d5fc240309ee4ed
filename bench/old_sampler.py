"""bench/old_sampler.py: the sampler before the paged engine (commit 6376dc3 rollout.py), unchanged,
kept only as the baseline bench_sampler.py times the engine against (preallocated per-row KV slab,
Gumbel-max draws from a torch.Generator). Not used by training or tests."""

from __future__ import annotations

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


@torch.no_grad()
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
