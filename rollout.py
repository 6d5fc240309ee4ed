"""rollout.py: our sampler (the dominant cost of RL): a paged KV cache with continuous batching.

    rollout = sample(model, prompts, n=8, max_new_tokens=512, temperature=1.0,
                     eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, generator=gen)
    rollout.tokens (N, T), rollout.lengths (N,), rollout.finished (N,), rollout.logprobs (N, T)

Why not `model.generate`: we need per-token log-probs of exactly the distribution we sampled
from, ragged prompts, per-row stop, seeded sampling, and the KV memory of a row only while it
lives. The engine, in the spirit of vLLM / nano-vllm, in plain PyTorch over the HF model:

  1. Paged KV cache (paged.py): one pool per layer of fixed-size pages, sized by `kv_tokens`
     (train.py passes the memory plan's KV budget). A row holds a page table; it takes a page
     when it grows past one and returns its pages the moment it finishes. The n samples of a
     prompt share the prompt's pages (reference counts); the partly filled last page is
     copied for samples 2..n at admission (they would all write into it on their first step).
  2. Continuous batching (`Scheduler`, host-side, no tensors): every step, admit waiting
     prompts (all n samples of a prompt together) while pages and `max_rows` allow and
     prefill them (packed: the admitted prompts are concatenated into one row with a
     block-diagonal causal mask, so ragged prompts cost no padding); then sample one token
     for every live row, free the rows that finished, make sure every other row has a slot
     for its next token (if the pool is empty, PREEMPT the newest rows: drop their pages and
     re-prefill them later from prompt + tokens so far), and run one decode forward.
  3. Sampling that does not depend on the schedule: row r's draw at response position t is
     u = uniforms(seed, r, t), a counter-based hash (no generator state), and the token is
     the inverse CDF of u over the temperature-scaled, top-k / top-p filtered distribution.
     So which rows share a step, the page size, the budget and preemption change nothing:
     the same seed gives the same tokens (tests/test_rollout.py checks it against the old
     sampler kept there as the slow twin). `generator` only supplies the seed: one 63-bit
     draw per call, so consecutive calls differ and a saved generator state resumes exactly.
     Up to float noise: a row's logits are computed in batches of different sizes under
     different schedules (and a preempted row's context is recomputed by a prefill), which
     can move the last bits; a token flips only if u lands within that noise of a CDF
     boundary (~1e-6 per token), and log-probs agree to ~1e-6.
  4. Attention (paged.py, `attention=`). The reference path ("gather") copies each row's
     pages into a dense (A, H, S, D) context and runs the model's own sdpa / eager attention
     with a length mask. "mirror" (the CPU default) keeps that dense context between steps
     and appends one token per row to it alone (write-back), moving rows or gathering them
     from their pages only when the live rows change. The in-place
     path ("flex", the CUDA default) reads the pages where they are: FlexAttention with the
     page table as its block table (each row's full pages as full blocks, its last page as
     the one masked block), no dense copy.
  5. CUDA-graph decode (`decode_graphs=`, on by default with "flex" on CUDA): the in-place
     step at static shapes, live rows padded to a bucket (1, 2, 4, ..., max_rows), each
     bucket captured once and replayed (`StaticDecode`).
     Hooked in through transformers' public extension points only: a `Cache` subclass, a
     prepared 4D mask or a BlockMask (returned as-is by transformers' mask builders,
     5.17-5.24), an attention function registered with `AttentionInterface`, explicit
     `position_ids`.

Log-probs: `logprobs[i, t]` is log softmax(logits / temperature)[token] of the FULL
temperature-scaled distribution (before top-k / top-p), which is what the training loss
assumes (SPEC section 5 pitfall). With top-p < 1 the tokens come from the truncated
distribution, so these are not the sampling probabilities; the paper trains with top-p = 1.
Greedy (temperature = 0) reports log-probs at temperature 1.

Host syncs: one per decode step (the sampled tokens, to see EOS and free pages at once).

Shapes: B prompts, n samples each, N = B * n rows (prompt-major: the n samples of prompt 0
first), A live rows (A <= max_rows), T = max_new_tokens, V vocabulary, ps page size.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from paged import FLEX, FLEX_EAGER, PagedCache, PagePool, additive_mask, decode_block_mask


@dataclass
class Rollout:
    tokens: torch.Tensor  # (N, T) long, right-padded with pad_token_id
    lengths: torch.Tensor  # (N,) long, response lengths (an emitted EOS counts)
    finished: torch.Tensor  # (N,) bool, True if the row emitted an EOS (False = truncated)
    logprobs: torch.Tensor  # (N, T) fp32, sampler's log-prob of each token (0 past length)
    stats: dict = field(default_factory=dict)  # the engine's schedule: decode calls, live rows, preemptions, ...

    def mask(self) -> torch.Tensor:
        """(N, T) bool, True on response tokens: built from lengths, never from token ids."""
        T = self.tokens.shape[1]
        return torch.arange(T, device=self.tokens.device)[None, :] < self.lengths[:, None]

    def to_lists(self) -> list[list[int]]:
        return [row[:L].tolist() for row, L in zip(self.tokens.cpu(), self.lengths.cpu().tolist())]


# ---------------------------------------------------------------------------------------
# Sampling: counter-based uniforms and the inverse CDF.
# ---------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding
    uint32 values. The multipliers are odd and < 2^31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def uniforms(seed: int, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per (seed, row, t), float64 with 53 random bits. rows, t (A,) long.

    A pure function of its arguments: the draw of row r at response position t is the same
    whatever else runs, which is what makes the engine's tokens schedule-independent."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    h = _mix32((rows & _M32) ^ lo)
    h = _mix32(h ^ hi)
    h = _mix32((h + (t & _M32)) & _M32)
    h1 = _mix32(h ^ 0x68E31DA4)
    h2 = _mix32(h1 ^ 0x1B56C4E9)
    return ((h1 << 21) + (h2 >> 11)).double() * 2.0**-53  # (A,)


def seed_from(generator: torch.Generator | None) -> int:
    """The call's seed: one draw from `generator` (torch's default generator when None)."""
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=dev))


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
    """Pick one token per row. logits (A, V), u (A,) uniforms in [0, 1) (None when greedy)
    -> tokens (A,), logprobs (A,) under the full temperature-scaled distribution.

    Inverse-CDF sampling: with p the filtered, unnormalised probabilities in vocabulary order
    and c their running sum (float64), the token is the first index with c > u * c[-1]: an
    exact sample of p / sum(p). Tokens with p = 0 (filtered out) are never picked: they do
    not raise c. The min with the last index of positive p guards u * c[-1] rounding up to c[-1].
    """
    logits = logits.float()
    logp_full = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)  # (A, V)
    if temperature == 0:
        tok = logits.argmax(-1)  # (A,)
    else:
        p = filter_logits(logp_full, top_k, top_p).exp()  # (A, V) fp32, 0 outside top-k / top-p
        c = p.double().cumsum(-1)  # (A, V)
        total = c[:, -1:]  # (A, 1)
        tok = torch.minimum((c <= u[:, None] * total).sum(-1), (c < total).sum(-1))  # (A,) no host sync
    return tok, logp_full.gather(-1, tok[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------
# The scheduler: host-side bookkeeping of rows and pages (no tensors, no model).
# ---------------------------------------------------------------------------------------


class Scheduler:
    """Which rows run, their pages, admission and preemption (module docstring, 1-2).

    Row r = b * n + j is sample j of prompt b. Per row: `pages[r]` (its page table),
    `ctx[r]` (tokens whose K/V are in its pages), `length[r]` (response tokens sampled).
    `waiting` holds ("group", b) for prompts not started and ("row", r) for preempted rows
    (at the front: they resume first). `running` lists the live rows in admission order.
    The engine calls, per step: admit() -> prefill those items; sampled(...) after sampling a
    token for every running row; grow() to give every running row a slot for its next token;
    then one decode forward over `running`. bench/bench_sampler.py drives it without a model.
    """

    def __init__(self, prompt_lens: list[int], n: int, max_new_tokens: int, *, num_pages: int, page_size: int,
                 max_rows: int, prefill_tokens: int = 4096, reserve: float = 0.01):  # fmt: skip
        if page_size < 1 or max_rows < n or prefill_tokens < 1:
            raise ValueError(f"Scheduler: bad budget page_size={page_size} max_rows={max_rows} (must be >= n={n}) prefill_tokens={prefill_tokens}")
        self.P, self.n, self.T, self.ps = list(prompt_lens), n, max_new_tokens, page_size
        self.max_rows, self.prefill_tokens = max_rows, prefill_tokens
        # One row at full length (prompt + T - 1 fed tokens: the last token is never fed) and
        # one group's admission must each fit in an empty pool, or the run could never finish.
        need = max(max(self.pages_for(P + max_new_tokens - 1), self._group_pages(P)) for P in self.P)
        if num_pages < need:
            raise ValueError(f"rollout: the KV budget of {num_pages} pages x {page_size} tokens cannot hold one row "
                             f"(longest prompt {max(self.P)} + {max_new_tokens} new tokens, {n} samples sharing it needs {need} pages): "
                             f"raise kv_tokens or lower max_new_tokens")  # fmt: skip
        self.pool = PagePool(num_pages)
        self.reserve = int(reserve * num_pages)  # free pages kept back when admitting (fewer preemptions right after)
        N = len(self.P) * n
        self.pages: list[list[int]] = [[] for _ in range(N)]
        self.ctx, self.length, self.done = [0] * N, [0] * N, [False] * N
        self.waiting: deque[tuple[str, int]] = deque(("group", b) for b in range(len(self.P)))
        self.running: list[int] = []
        self.stats = dict(decode_calls=0, decode_rows=0, prefill_calls=0, prefill_tokens=0, preemptions=0, max_live_rows=0,
                          peak_pages=0, num_pages=num_pages, page_size=page_size)  # fmt: skip

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.ps)

    def _group_pages(self, P: int) -> int:  # the prompt's pages once + a copy of a partial last page per extra sample
        return self.pages_for(P) + (self.n - 1) * (P % self.ps != 0)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[tuple[list[int], int, list[tuple[int, int]]]]:
        """Admit waiting items while rows, pages and the prefill token budget allow.

        Returns [(rows, feed, copies)]: the rows that start (n of a new prompt, or one
        preempted row), the tokens to prefill for them (the prompt, or prompt + its tokens so
        far; the first row's page table maps them), and the (src, dst) pages to copy after
        the prefill (the shared partial last page). The rows join `running` in this order."""
        items, tokens = [], 0
        while self.waiting:
            kind, i = self.waiting[0]
            rows = [i * self.n + j for j in range(self.n)] if kind == "group" else [i]
            P = self.P[rows[0] // self.n]
            feed = P + (0 if kind == "group" else self.length[i])
            need = self._group_pages(P) if kind == "group" else self.pages_for(feed)
            reserve = self.reserve if self.running else 0
            if len(self.running) + len(rows) > self.max_rows or need + reserve > self.pool.n_free:
                break
            if items and tokens + feed > self.prefill_tokens:
                break
            self.waiting.popleft()
            first = self.pool.take(self.pages_for(feed))
            self.pages[rows[0]], copies = first, []
            for r in rows[1:]:  # other samples of a new prompt: share the full pages, copy a partial one
                full = first[: P // self.ps]
                self.pool.share(full)
                self.pages[r] = full + (self.pool.take(1) if P % self.ps else [])
                if P % self.ps:
                    copies.append((first[-1], self.pages[r][-1]))
            for r in rows:
                self.ctx[r] = feed
            self.running.extend(rows)
            items.append((rows, feed, copies))
            tokens += feed
        if items:
            self.stats["prefill_calls"] += 1
            self.stats["prefill_tokens"] += tokens
            self._note()
        return items

    def sampled(self, stops: list[bool]) -> list[int]:
        """Every running row sampled one token; stops[i]: running[i] emitted an EOS. Rows that
        stopped or reached max_new_tokens finish and return their pages. Returns the finished rows."""
        assert len(stops) == len(self.running)
        out, keep = [], []
        for r, stop in zip(self.running, stops):
            self.length[r] += 1
            if stop or self.length[r] == self.T:
                self.done[r] = True
                self.pool.release(self.pages[r])
                self.pages[r] = []
                out.append(r)
            else:
                keep.append(r)
        self.running = keep
        return out

    def grow(self) -> list[int]:
        """Give every running row a slot for position ctx (its next token), oldest rows first;
        when no page is free, preempt the newest row (possibly the one asking). Returns the
        preempted rows (they wait at the front of the queue with their tokens so far)."""
        preempted, i = [], 0
        self.new_pages: list[tuple[int, int, int]] = []  # (row, index in its table, page) taken here
        while i < len(self.running):
            r = self.running[i]
            if self.ctx[r] == len(self.pages[r]) * self.ps:  # its pages are full: it needs one more
                if self.pool.n_free == 0:
                    victim = self.running.pop()
                    self.pool.release(self.pages[victim])
                    self.pages[victim] = []
                    preempted.append(victim)
                    self.waiting.appendleft(("row", victim))
                    self.stats["preemptions"] += 1
                    continue  # retry row i (unless it was the victim: then the loop ends)
                self.pages[r].append(self.pool.take(1)[0])
                self.new_pages.append((r, len(self.pages[r]) - 1, self.pages[r][-1]))
            i += 1
        self._note()
        return preempted

    def decoded(self) -> None:
        """One decode forward fed the running rows' last tokens."""
        for r in self.running:
            self.ctx[r] += 1
        self.stats["decode_calls"] += 1
        self.stats["decode_rows"] += len(self.running)

    def _note(self) -> None:
        self.stats["max_live_rows"] = max(self.stats["max_live_rows"], len(self.running))
        self.stats["peak_pages"] = max(self.stats["peak_pages"], self.pool.num_pages - self.pool.n_free)

    def slot(self, r: int, pos: int) -> int:
        return self.pages[r][pos // self.ps] * self.ps + pos % self.ps


def simulate(prompt_lens: list[int], n: int, lengths: list[int], max_new_tokens: int, **budget) -> dict:
    """Run the Scheduler alone on known response lengths (row r stops after lengths[r] tokens,
    an EOS, or at max_new_tokens): the schedule a real run with those lengths gets. Returns its stats."""
    s = Scheduler(prompt_lens, n, max_new_tokens, **budget)
    while s.busy:
        s.admit()
        s.sampled([s.length[r] + 1 >= lengths[r] for r in s.running])
        s.grow()
        if s.running:
            s.decoded()
    s.pool.check_whole()
    return s.stats


# ---------------------------------------------------------------------------------------
# The engine: the scheduler's decisions as forwards of the HF model.
# ---------------------------------------------------------------------------------------


def _cache_kw(model) -> str:
    """The forward's cache argument: `cache` from transformers 5.24, `past_key_values` before (5.17-5.23
    ignore `cache=`; 5.24 accepts both but warns on the old name)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _check_model(model) -> None:
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    if any(t != "full_attention" for t in types):
        raise NotImplementedError(f"rollout: the paged engine handles full-attention decoders only; this model has layer types {sorted(set(types))}")
    if cfg._attn_implementation not in ("sdpa", "eager"):
        raise NotImplementedError(f"rollout: the paged engine's reference path needs sdpa or eager attention, the model uses {cfg._attn_implementation!r}")


def default_kv_tokens(model, rows: int, row_tokens: int, page_size: int, device: torch.device) -> int:
    """KV budget when the caller gives none: enough for every row at full length (whole pages),
    capped on CUDA by 90% of the memory free now (minus the sampler's (rows, V) buffers)."""
    want = rows * -(-row_tokens // page_size) * page_size
    if device.type != "cuda":
        return want
    cfg = model.config.get_text_config(decoder=True)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(want, int(0.9 * free - rows * 24 * cfg.vocab_size) // per_token))


def _decode_step(model, cache: PagedCache, cache_kw: str, last, pos, read, write, mask) -> torch.Tensor:
    """One decode forward, the part `compile=` hands to torch.compile: last (A,) tokens at
    positions pos (A,), context pages read (A, S/ps), new slots write (A,), the mask (additive
    (A, 1, 1, S) on the reference path, a BlockMask over the pool on the in-place path) ->
    next-token logits (A, V)."""
    cache.read, cache.write = read, write
    out = model(input_ids=last[:, None], position_ids=pos[:, None], attention_mask=mask, use_cache=True, **{cache_kw: cache})
    return out.logits[:, -1]


def _flex_step(forward, model, cache: PagedCache, cache_kw: str, last, pos, table) -> torch.Tensor:
    """The in-place decode step from its three inputs alone (what a CUDA graph captures): last
    (A,) tokens, pos (A,) their positions, table (A, W) page tables -> logits (A, V). The new
    token's slot and the BlockMask are computed on the device from them."""
    ps = cache.page_size
    write = table.gather(1, (pos // ps)[:, None]).squeeze(1) * ps + pos % ps  # (A,) slot of the new token
    return forward(model, cache, cache_kw, last, pos, table, write, decode_block_mask(table, pos, ps, cache.num_pages))


class StaticDecode:
    """The in-place decode step at static shapes: one CUDA graph per batch-size bucket (issue 14
    item 5; in the spirit of nano-vllm's per-batch-size graphs).

    The live rows (A of them) are copied into static buffers padded to the smallest bucket
    b >= A of (1, 2, 4, ..., max_rows); a padded row feeds token 0 at position 0 with the
    scratch page as its table, so it writes and reads only the scratch page, and its logits
    are dropped. The first time a bucket is used its step is run twice (warm-up: compiles the
    kernel for the shape) and captured into a CUDA graph in one memory pool shared by all
    buckets (replays never overlap), writing its logits into one (max_rows, V) buffer; later
    steps copy their inputs in and replay it. With
    capture=False (CPU, or decode_graphs off) the same padded step runs without a graph,
    which is how the padding is tested on CPU. If a capture fails, it warns and runs the
    rest of the call uncaptured (stats["graph_buckets"] says which buckets replayed)."""

    def __init__(self, step, max_rows: int, width: int, scratch: int, device: torch.device, capture: bool):
        self.step, self.scratch, self.capture = step, scratch, capture
        self.buckets = [1 << k for k in range(max(1, max_rows).bit_length()) if 1 << k < max_rows] + [max_rows]
        self.last = torch.zeros(max_rows, dtype=torch.long, device=device)  # (B,)
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=device)  # (B,)
        self.table = torch.full((max_rows, width), scratch, dtype=torch.long, device=device)  # (B, W)
        self.graphs: dict[int, tuple] = {}  # bucket -> (CUDAGraph, its logits (b, V))
        self.pool = None

    def __call__(self, last: torch.Tensor, pos: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        A, w = table.shape
        b = next(x for x in self.buckets if x >= A)
        self.last[:A].copy_(last)
        self.last[A:b].zero_()
        self.pos[:A].copy_(pos)
        self.pos[A:b].zero_()
        self.table[:A, :w].copy_(table)  # columns past a row's last page are never read
        self.table[A:b, 0].fill_(self.scratch)
        args = (self.last[:b], self.pos[:b], self.table[:b])
        if not self.capture:
            return self.step(*args)[:A]
        if b not in self.graphs:
            try:
                self.graphs[b] = self._capture(args)
            except Exception as e:  # noqa: BLE001  a model whose forward cannot be captured still samples
                warnings.warn(f"rollout: CUDA-graph capture of the decode step failed ({type(e).__name__}: {e}); running it uncaptured (decode_graphs=False silences this)")
                self.capture = False
                return self.step(*args)[:A]
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:A]

    def _capture(self, args):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compiles, lazy allocations; it writes the same K/V the replay will
            for _ in range(2):
                warm = self.step(*args)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.out = warm.new_empty(self.last.shape[0], warm.shape[-1])  # (B, V) every graph's logits land here
        del warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            # the graph's own logits die after the copy, so the shared pool reuses them: the
            # buckets' outputs cost one (B, V) buffer, as an uncaptured step's logits do
            self.out[: args[0].shape[0]].copy_(self.step(*args))
        return graph, self.out


@contextlib.contextmanager
def _attention(model, name: str | None):
    """Run with the model's attention implementation switched to `name` (a function registered
    with transformers' AttentionInterface, paged.py), then restore it. None: leave it."""
    old = model.config._attn_implementation
    if name is None or name == old:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


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
    kv_tokens: int | None = None,
    page_size: int = 16,
    max_rows: int | None = None,
    prefill_tokens: int = 4096,
    prefill_pack: int | None = None,
    compile: str | None = None,
    attention: str = "auto",
    decode_graphs: bool | None = None,
) -> Rollout:
    """Sample n responses for each prompt (rows prompt-major). See the module docstring.

    prompts: B token-id lists (any lengths, no padding). eos_token_ids: int or list of ints.
    generator: supplies the seed (one draw per call); the same generator state, the same tokens.
    kv_tokens: size of the paged KV pool in tokens (rounded down to whole pages); default:
        every row at full length, capped on CUDA by the free memory (train.py passes the
        memory plan's budget). page_size: tokens per page.
    max_rows: rows decoding at once (default: all N). prefill_tokens: prompt tokens admitted
        per step (one item may exceed it alone). prefill_pack: tokens per packed prefill
        forward; a step's admitted prompts run as several such packs. The packed mask is
        dense, so a pack's attention costs its length squared: default 256 on CPU (10m, 64
        prompts of 16-48 tokens: 0.60 s of CPU in 256-token packs, 0.63 s in 512, 1.0 s in one
        2K-token pack, 0.78 s for the old sampler's padded batch), prefill_tokens on CUDA.
    compile: a torch.compile backend for the decode step ("inductor"; the test uses
        "aot_eager" to keep compile time small), None = eager. Shapes are dynamic (A and S
        change every step), so it compiles once per sample() call, not per batch size.
    attention: how decode attention reads the pages (paged.py). "gather": the reference path
        (each row's pages copied into a dense context, the model's own sdpa / eager
        attention, a length mask). "mirror": the same attention over a dense copy of the live
        rows' contexts kept between steps (one token appended per step, to the copy only;
        rows moved or gathered from their pages only when the live rows change; memory: the
        live rows' KV once more). "flex": in place,
        compiled FlexAttention with the page table as its block table (no dense copy).
        "flex_eager": the same uncompiled (torch evaluates the mask over the whole pool:
        slow, a test reference). "auto": "flex" on CUDA (with a page size that is a multiple
        of 16; "gather" for smaller pages), "mirror" elsewhere (the fastest on CPU; bench/README.md).
    decode_graphs: run the in-place decode step at static shapes per batch-size bucket, one
        CUDA graph each (StaticDecode). None: on for "flex" on CUDA without `compile` in a
        single-process run (off under torch.distributed: collectives in the forward). On CPU
        True runs the same padded static-shape step without a graph (a test of the padding).
    """
    if temperature < 0 or not (0 < top_p <= 1) or top_k < 0 or max_new_tokens < 1 or n < 1:
        raise ValueError(f"sample: bad arguments temperature={temperature} top_p={top_p} top_k={top_k} max_new_tokens={max_new_tokens} n={n}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample: empty prompt list or an empty prompt (every prompt needs at least one token)")
    _check_model(model)
    device = next(model.parameters()).device
    if attention == "auto":  # (Triton's FlexAttention tiles a KV block by >= 16 tokens: smaller pages take the reference path)
        attention = "flex" if device.type == "cuda" and page_size % 16 == 0 else "gather" if device.type == "cuda" else "mirror"
    if attention not in ("gather", "mirror", "flex", "flex_eager"):
        raise ValueError(f"sample: attention={attention!r}: expected auto, gather, mirror, flex or flex_eager")
    if attention == "flex" and device.type == "cuda" and page_size % 16:
        raise ValueError(f"sample: attention='flex' on CUDA needs a page size that is a multiple of 16 (Triton's KV tiles), got {page_size}")
    if decode_graphs is None:  # (not under torch.distributed: TP's all-reduces and FSDP's all-gathers in the forward)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        decode_graphs = attention == "flex" and device.type == "cuda" and compile is None and not distributed
    if decode_graphs and attention in ("gather", "mirror"):
        raise ValueError(f"sample: decode_graphs needs the in-place attention (attention='flex' or 'flex_eager'), {attention!r} has no static shapes")
    dtype = next(model.parameters()).dtype
    eos = torch.tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids), dtype=torch.long, device=device)
    B, T = len(prompts), max_new_tokens
    N = B * n
    seed = seed_from(generator) if temperature > 0 else 0
    max_rows = N if max_rows is None else max_rows
    prefill_pack = prefill_pack or (256 if device.type == "cpu" else prefill_tokens)
    if kv_tokens is None:
        kv_tokens = default_kv_tokens(model, N, max(map(len, prompts)) + T, page_size, device)
    sched = Scheduler([len(p) for p in prompts], n, T, num_pages=max(1, kv_tokens // page_size), page_size=page_size,
                      max_rows=max_rows, prefill_tokens=prefill_tokens)  # fmt: skip
    ps = page_size
    cache_kw = _cache_kw(model)
    step = _decode_step if compile is None else torch.compile(_decode_step, backend=compile, dynamic=True)
    # page tables of all rows on the host, (N, pages of a full row); a decode step copies the live rows' part over
    W = sched.pages_for(max(map(len, prompts)) + T)
    mode = {"gather": "gather", "mirror": "mirror"}.get(attention, "inplace")
    cache = PagedCache(model.config.get_text_config(decoder=True).num_hidden_layers, sched.pool.num_pages, ps, mode=mode,
                       mirror_rows=min(max_rows, N), mirror_pages=W)  # fmt: skip
    mirrored: list[int] = []  # mode "mirror": the rows in the mirror, in the last decode step's order
    fresh: set[int] = set()  # rows prefilled since the last decode step (their pages hold their context)
    page_table = torch.zeros(N, W, dtype=torch.long)
    flex = functools.partial(_flex_step, step, model, cache, cache_kw)  # (last, pos, table) -> logits
    static = StaticDecode(flex, min(max_rows, N), W, cache.scratch, device, capture=device.type == "cuda") if decode_graphs else None

    def set_pages(r):
        page_table[r, : len(sched.pages[r])] = torch.tensor(sched.pages[r], dtype=torch.long)

    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)  # (N, T) results
    logprobs = torch.zeros(N, T, dtype=torch.float32, device=device)  # (N, T)
    logits = None  # (A, V) next-token logits of the running rows, in `sched.running` order
    last = None  # (A,) the token each running row feeds next

    def prefill(items):
        """The admitted items' feeds as packed forwards of <= prefill_pack tokens each (an item
        longer than that alone): logits (rows admitted, V) in the items' order."""
        packs, size = [[]], 0
        for it in items:
            if packs[-1] and size + it[1] > prefill_pack:
                packs.append([])
                size = 0
            packs[-1].append(it)
            size += it[1]
        sched.stats["prefill_forwards"] = sched.stats.get("prefill_forwards", 0) + len(packs)
        return torch.cat([prefill_pack_forward(p) for p in packs])

    def prefill_pack_forward(items):
        """One packed forward over the items' feeds: (1, sum feed) tokens, block-diagonal causal mask."""
        ids, pos, seg, write = [], [], [], []
        for k, (rows, feed, _) in enumerate(items):
            r = rows[0]
            b = r // n
            ids += prompts[b] + (tokens[r, : sched.length[r]].tolist() if feed > len(prompts[b]) else [])
            pos += range(feed)
            seg += [k] * feed
            write += [sched.slot(r, p) for p in range(feed)]
            for r2 in rows:
                set_pages(r2)
        S = len(ids)
        seg_t, pos_t = torch.tensor(seg, device=device), torch.tensor(pos, device=device)  # (S,)
        allowed = (seg_t[:, None] == seg_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])  # (S, S) same item, causal
        cache.write, cache.read = torch.tensor(write, device=device), None
        ends = torch.tensor([0] + [f for _, f, _ in items], device=device).cumsum(0)[1:] - 1  # last position of each item
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=pos_t[None], attention_mask=additive_mask(allowed[None], dtype),
                    use_cache=True, logits_to_keep=ends, **{cache_kw: cache})  # fmt: skip
        cache.copy_pages([s for it in items for s, _ in it[2]], [d for it in items for _, d in it[2]])
        reps = torch.tensor([len(rows) for rows, _, _ in items], device=device)
        return out.logits[0].repeat_interleave(reps, dim=0)  # (rows admitted, V): a prompt's n samples share its logits

    def decode(live, last):
        """One token for each running row: write its K/V at position ctx, attend to 0..ctx."""
        ctx = [sched.ctx[r] for r in live]
        pos = torch.tensor(ctx, device=device)  # (A,)
        S = sched.pages_for(max(ctx) + 1) * ps  # whole pages
        read = page_table[live, : S // ps].to(device)  # (A, S / ps) pages past a row's end hold 0: masked below
        if mode == "inplace":  # the pages are read through the page table
            return (static or flex)(last, pos, read)
        if mode == "mirror":  # attention reads exactly S = max(ctx) + 1 slots of the mirror, not whole pages
            where = {r: i for i, r in enumerate(mirrored)}  # row -> its mirror row (the last decode step's order)
            keep = [(i, where[r]) for i, r in enumerate(live) if r in where and r not in fresh]
            new = [i for i, r in enumerate(live) if r not in where or r in fresh]  # prefilled since: from their pages
            cache.rebuild, cache.span = bool(new) or any(i != j for i, j in keep), max(ctx) + 1
            cache.keep_new = torch.tensor([i for i, _ in keep], dtype=torch.long, device=device)
            cache.keep_old = torch.tensor([j for _, j in keep], dtype=torch.long, device=device)
            cache.fresh = torch.tensor(new, dtype=torch.long, device=device)
            cache.mirror_write = torch.arange(len(live), device=device) * (W * ps) + pos  # (A,)
            mirrored[:], S = live, cache.span
            fresh.clear()
        write = read.gather(1, (pos // ps)[:, None]).squeeze(1) * ps + pos % ps  # (A,) slot of the new token
        allowed = torch.arange(S, device=device)[None, :] <= pos[:, None]  # (A, S) from lengths
        return step(model, cache, cache_kw, last, pos, read, write, additive_mask(allowed[:, None], dtype))  # (A, V)

    # the model's attention switched to ours for the call (the in-place path), restored after
    with _attention(model, {"flex": FLEX, "flex_eager": FLEX_EAGER}.get(attention)):
        while sched.busy:
            # --- admit waiting prompts (and preempted rows) and prefill them ---
            items = sched.admit()
            if items:
                new = prefill(items)
                logits = new if logits is None else torch.cat([logits, new])
                fresh.update(r for rows, _, _ in items for r in rows)
            # --- sample one token for every running row ---
            rows = sched.running[:]
            rows_t = torch.tensor(rows, device=device)  # (A,)
            t_t = torch.tensor([sched.length[r] for r in rows], device=device)  # (A,) response position
            u = uniforms(seed, rows_t, t_t) if temperature > 0 else None
            tok, lp = _next_token(logits, temperature, top_k, top_p, u)  # (A,), (A,)
            tokens[rows_t, t_t] = tok
            logprobs[rows_t, t_t] = lp
            stops = torch.isin(tok, eos).tolist()  # the step's one host sync
            # --- finished rows return their pages; the others get a slot (or are preempted) ---
            sched.sampled(stops)
            sched.grow()
            if not sched.running:
                logits = None
                continue
            for r, j, p in sched.new_pages:
                page_table[r, j] = p
            idx = {r: i for i, r in enumerate(rows)}
            keep = torch.tensor([idx[r] for r in sched.running], device=device)  # survivors, in order
            logits = decode(sched.running, tok[keep])
            sched.decoded()
    sched.pool.check_whole()
    lengths = torch.tensor(sched.length, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    ended = lengths > 0
    finished[ended] = torch.isin(tokens[ended].gather(1, (lengths[ended] - 1)[:, None]).squeeze(1), eos)
    logprobs.masked_fill_(torch.arange(T, device=device)[None] >= lengths[:, None], 0.0)
    stats = dict(sched.stats, mean_live_rows=sched.stats["decode_rows"] / max(1, sched.stats["decode_calls"]), attention=attention,
                 graph_buckets=sorted(static.graphs) if static else [])  # fmt: skip
    return Rollout(tokens=tokens, lengths=lengths, finished=finished, logprobs=logprobs, stats=stats)
