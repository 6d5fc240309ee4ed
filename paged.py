"""paged.py: the sampler's KV cache as fixed-size pages, and attention over them.

rollout.py's engine owns the schedule (which rows run, when pages are taken and returned);
this file owns the storage and the kernels' glue:

1. `PagePool`: host-side bookkeeping of `num_pages` pages: a free list and a reference count
   per page. A page shared by k rows (the prompt's pages, shared by its n samples) has
   count k and goes back to the free list when the last of them lets go. `check_whole()`
   asserts that the pool is whole again (nothing leaked, nothing double-freed).
2. `PagedCache`: a transformers `Cache` (the public extension point: the model calls
   `cache.update(k, v, layer_idx)` in every attention layer, transformers 5.17-5.24) whose
   storage is one K and one V pool per layer, `(num_pages * page_size, H, D)`, allocated on
   the first write (so tensor-parallel ranks get their local head count and dtype). Slot
   `page * page_size + offset` holds one token. Before each forward the engine sets
       write (Q,)  the slot of every new token, flattened row-major over (rows, new tokens)
       read  (A, S / ps) the pages of each row's context, in position order (None in a
                    prefill: every prefill item is fed whole, so its context IS the new tokens)
   and `update` writes the new K/V to their slots and returns what attention reads:
     - reference path (mode "gather", everywhere): the gathered dense context (A, H, S, D); the
       engine passes a 4D additive mask built from lengths, and the model's own sdpa / eager
       attention runs unchanged (a 4D mask is "already prepared": transformers 5.17-5.24
       return it as-is instead of building one).
     - mirror (mode "mirror", the CPU default): the reference path's dense context kept
       between steps for the live rows, one token appended per row per step (to the mirror
       only: write-back), rows moved or gathered from their pages only when the live rows
       change; the same attention call as "gather".
     - in-place path (mode "inplace"): the pools themselves as (1, H, slots, D) views, read by
       `paged_attention` (FlexAttention) through a `BlockMask` whose block table IS the page
       table (`decode_block_mask`): no dense copy of any row's context.
   The pools hold one page more than the scheduler hands out: the scratch page (id
   `num_pages`), where the padded rows of a static-shape decode step write and read.
3. `paged_attention`: the attention function registered with transformers'
   `AttentionInterface` under the names `FLEX` (compiled FlexAttention: block-sparse, reads
   only each row's pages) and `FLEX_EAGER` (the same call uncompiled: torch evaluates the
   mask over the whole pool densely; slow, a reference for tests). The engine switches the
   model to one of them for the duration of a sample() call. A prefill (a dense 4D mask)
   goes to transformers' sdpa function unchanged.

Shapes: A live rows, Q new tokens per row (1 in decode), S context slots per row, H KV heads,
Hq query heads, D head dim, NP pages, ps page size, W page-table width (pages per row).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


class PagePool:
    """Free list + reference counts of `num_pages` pages (host-side Python ints)."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"PagePool: need at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out the lowest id first
        self.ref = [0] * num_pages

    @property
    def n_free(self) -> int:
        return len(self.free)

    def take(self, k: int) -> list[int]:
        """k fresh pages, each with reference count 1."""
        if k > len(self.free):
            raise RuntimeError(f"PagePool.take: {k} pages asked, {len(self.free)} free (the scheduler must check first)")
        out = [self.free.pop() for _ in range(k)]
        for p in out:
            self.ref[p] = 1
        return out

    def share(self, pages: list[int]) -> None:
        """One more row holds these pages."""
        for p in pages:
            assert self.ref[p] > 0, f"PagePool.share: page {p} is free"
            self.ref[p] += 1

    def release(self, pages: list[int]) -> None:
        """One row lets go of these pages; a page whose count drops to 0 is free again."""
        for p in pages:
            assert self.ref[p] > 0, f"PagePool.release: page {p} freed twice"
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.free.append(p)

    def check_whole(self) -> None:
        """Every page free exactly once and no references left (the end of a run)."""
        assert sorted(self.free) == list(range(self.num_pages)), f"PagePool: {self.num_pages - len(set(self.free))} pages leaked or duplicated"
        assert not any(self.ref), "PagePool: references left"


class PagedCache(Cache):
    """K/V pools per layer, written and read through slot indices the engine sets per forward."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, *, mode: str = "gather", mirror_rows: int = 0, mirror_pages: int = 0):
        super().__init__(layers=[])
        if mode not in ("gather", "mirror", "inplace"):
            raise ValueError(f"PagedCache: mode={mode!r}: expected gather, mirror or inplace")
        self.num_layers, self.num_pages, self.page_size, self.mode = num_layers, num_pages, page_size, mode
        self.scratch = num_pages  # the extra page: padded rows of a static-shape step write and read there
        self.k: list[torch.Tensor | None] = [None] * num_layers  # each ((NP + 1) * ps, H, D)
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.write: torch.Tensor | None = None  # (A * Q,) long
        self.read: torch.Tensor | None = None  # (A, S / ps) long page ids, or None in a prefill
        # mode "mirror": per layer a dense copy of the live rows' contexts, (R, W * ps, H, D);
        # per decode step the engine sets `rebuild` (the live rows changed) with `keep_new`,
        # `keep_old` (k,) (rows moved within the mirror) and `fresh` (f,) (rows gathered from
        # their pages), `mirror_write` (A,) (row a's new token goes to flat slot
        # a * W * ps + pos[a]) and `span` (S: the longest context + 1; attention reads mirror[:A, :S])
        self.mirror_rows, self.mirror_pages = mirror_rows, mirror_pages
        self.mk: list[torch.Tensor | None] = [None] * num_layers
        self.mv: list[torch.Tensor | None] = [None] * num_layers
        self.rebuild, self.mirror_write, self.span = True, None, 0
        self.keep_new = self.keep_old = self.fresh = None

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always passed explicitly
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        A, H, Q, D = key_states.shape  # (A, H, Q, D)
        if self.k[layer_idx] is None:
            slots = (self.num_pages + 1) * self.page_size
            self.k[layer_idx] = key_states.new_zeros(slots, H, D)
            self.v[layer_idx] = value_states.new_zeros(slots, H, value_states.shape[-1])
        kp, vp = self.k[layer_idx], self.v[layer_idx]
        if self.mode == "mirror" and self.read is not None:  # a mirror decode step: the new token goes to the mirror only
            return self._mirror(layer_idx, kp, vp, key_states, value_states)
        kp.index_copy_(0, self.write, key_states.transpose(1, 2).reshape(A * Q, H, D))  # (A*Q, H, D)
        vp.index_copy_(0, self.write, value_states.transpose(1, 2).reshape(A * Q, H, -1))
        if self.read is None:  # prefill: the context is the new tokens themselves
            return key_states, value_states
        if self.mode == "inplace":  # attention reads the pools through the block mask
            return kp.view(1, -1, H, D).transpose(1, 2), vp.view(1, -1, H, vp.shape[-1]).transpose(1, 2)  # (1, H, slots, D)
        # the reference gather, whole pages at a time (a page is one contiguous ps x H x D block)
        # into two buffers shared by all layers (layer i's attention is done before layer i+1
        # writes; a fresh multi-MB tensor per call costs more than the copy on CPU)
        A, n_pg = self.read.shape
        flat = self.read.reshape(-1)  # (A * S/ps,)
        kpg, vpg = kp.view(self.num_pages + 1, -1), vp.view(self.num_pages + 1, -1)  # (NP + 1, ps * H * D)
        kb, vb = self._buffers(flat.numel(), kpg)
        torch.index_select(kpg, 0, flat, out=kb)
        torch.index_select(vpg, 0, flat, out=vb)
        S = n_pg * self.page_size
        return kb.view(A, S, H, D).transpose(1, 2), vb.view(A, S, H, -1).transpose(1, 2)  # (A, H, S, D)

    def _mirror(self, i: int, kp, vp, key_states, value_states):
        """Mode "mirror" (a decode step): the dense copy of the live rows' contexts is the
        truth for live rows (write-back: a decode step writes its new token there only, never
        to the pages). When the live rows changed, the mirror is rebuilt: rows that were in the
        last decode step are moved from their old mirror row (`keep_old` -> `keep_new`), rows
        prefilled since (admitted, or re-admitted after preemption: `fresh`) are gathered from
        their pages, which the prefill wrote. Then every row's new token is appended at
        (a, pos[a]). The pages of a decoded row are stale afterwards, which nothing reads: a
        preempted row is re-prefilled from its tokens, a shared prompt page is never written
        after its prefill. Returns (A, H, S, D) views of the mirror."""
        A, H, _, D = key_states.shape
        n_pg = self.read.shape[1]
        R, W, ps = self.mirror_rows, self.mirror_pages, self.page_size
        if self.mk[i] is None:
            self.mk[i] = kp.new_zeros(R, W * ps, H, D)  # (R, W * ps, H, D)
            self.mv[i] = vp.new_zeros(R, W * ps, H, vp.shape[-1])
        mk, mv = self.mk[i], self.mv[i]
        S = self.span  # the longest context exactly (<= n_pg * ps)
        if self.rebuild:
            if self.keep_new.numel():  # (the right side is a copy: moving rows within the mirror is safe)
                mk[self.keep_new, :S] = mk[self.keep_old, :S]
                mv[self.keep_new, :S] = mv[self.keep_old, :S]
            if self.fresh.numel():
                pages = self.read[self.fresh]  # (f, S / ps)
                mk.view(R, W, -1)[self.fresh, :n_pg] = kp.view(self.num_pages + 1, -1)[pages]  # (f, S / ps, ps * H * D)
                mv.view(R, W, -1)[self.fresh, :n_pg] = vp.view(self.num_pages + 1, -1)[pages]
        mk.view(R * W * ps, H, D).index_copy_(0, self.mirror_write, key_states[:, :, 0])  # (A, H, D) at (a, pos[a])
        mv.view(R * W * ps, H, -1).index_copy_(0, self.mirror_write, value_states[:, :, 0])
        return mk[:A, :S].transpose(1, 2), mv[:A, :S].transpose(1, 2)  # (A, H, S, D)

    def _buffers(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (rows, page bytes) of the reusable gather buffers, grown when too small."""
        if getattr(self, "_kb", None) is None or self._kb.shape[0] < rows:
            self._kb, self._vb = like.new_empty(rows, like.shape[1]), like.new_empty(rows, like.shape[1])
        return self._kb[:rows], self._vb[:rows]

    @torch.no_grad()
    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy whole pages src[i] -> dst[i] in every layer (a shared partial page, copied on write)."""
        if not src:
            return
        ps = self.page_size
        s = torch.tensor(src, device=self.k[0].device)
        d = torch.tensor(dst, device=self.k[0].device)
        for pool in self.k + self.v:
            view = pool.view(-1, ps, *pool.shape[1:])  # (NP + 1, ps, H, D)
            view.index_copy_(0, d, view.index_select(0, s))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (..., Q, S) True = attend -> additive bias of the model dtype (0 / dtype min), with a
    head dim: (A, 1, Q, S). Eager attention adds it to the scores; sdpa takes it as attn_mask."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------------------------
# The in-place path: FlexAttention over the pools, the page table as its block table.
# ---------------------------------------------------------------------------------------


def decode_block_mask(table: torch.Tensor, pos: torch.Tensor, page_size: int, num_pages: int) -> BlockMask:
    """The BlockMask of one decode step over the whole pool ((NP + 1) * ps slots, the scratch
    page last), for FlexAttention with KV blocks of one page.

    table (A, W) long: row a's pages in position order; entries past its last page are
    ignored. pos (A,) long: the position of row a's new token (already written to its slot),
    so row a attends to positions 0..pos[a]: its pages 0..pos // ps, all full except the last.

    Block-sparse part (what compiled kernels visit): the full pages as "full" blocks (no mask
    evaluated) and the last page as the one partial block. The mask_mod alone is also the whole
    truth (eager FlexAttention ignores the block lists and evaluates it on every slot): slot
    kv is page kv // ps; `logical[a, page]` is that page's index in row a's table, or -1 if row
    a does not hold it; the slot is seen iff the page is held and its position
    logical * ps + kv % ps <= pos[a]. Everything is built on the device from tensors (no host
    sync), so a CUDA graph can capture it."""
    A, W = table.shape
    ps = page_size
    n = pos // ps + 1  # (A,) pages each row reads
    j = torch.arange(W, device=table.device)
    held = j[None, :] < n[:, None]  # (A, W)
    # page -> its index in the row's table; the unheld entries are sent to a junk column (NP + 1)
    logical = torch.full((A, num_pages + 2), -1, dtype=torch.int32, device=table.device)  # (A, NP + 2)
    logical.scatter_(1, torch.where(held, table, num_pages + 1), torch.where(held, j[None, :], -1).int().expand(A, W).contiguous())
    pos32 = pos.int()

    def mask_mod(b, h, q_idx, kv_idx):
        lp = logical[b, kv_idx // ps]
        return (lp >= 0) & (lp * ps + kv_idx % ps <= pos32[b])

    # the block lists, as wide as the pool has pages (the CPU kernel requires it; torch's own
    # PagedAttention pads them the same way): row a's full pages first, then its last page
    full_num = (n - 1).int()[:, None, None]  # (A, 1, 1)
    full_idx = torch.zeros(A, 1, 1, num_pages + 1, dtype=torch.int32, device=table.device)  # (A, 1, 1, NP + 1)
    full_idx[:, 0, 0, :W] = table  # the first n - 1 are read
    part_idx = torch.zeros_like(full_idx)
    part_idx[:, 0, 0, :1] = table.gather(1, (n - 1)[:, None])  # (A, 1) the last page
    part_num = torch.ones(A, 1, 1, dtype=torch.int32, device=table.device)
    slots = (num_pages + 1) * ps
    return BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx, BLOCK_SIZE=ps, mask_mod=mask_mod,
                                    seq_lengths=(1, slots), compute_q_blocks=False)  # fmt: skip


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (inductor: Triton on CUDA, C++ on CPU). Shapes:
    automatic dynamic (the first call compiles for its shapes, a second live-row count
    recompiles with that dim symbolic, then no more): the pool and the block lists are as wide
    as the pool, so only the live rows change. (dynamic=True, every dim symbolic from the
    start, fails to build in torch 2.13's C++ FlexAttention template.)"""
    return torch.compile(flex_attention, dynamic=None)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, compiled=True, **kwargs):
    """transformers attention function (module, q (A, Hq, Q, D), k, v, mask, scaling=...) ->
    ((A, Q, Hq, D), None). A decode step (the mask is a BlockMask, k / v the (1, H, slots, D)
    pools) runs FlexAttention over the pages in place: the scale is the module's (head_dim^-0.5
    for Qwen3; q_norm / k_norm and RoPE were applied by the model before the cache), GQA by
    enable_gqa (query head i reads KV head i // (Hq / H), as repeat_kv does). A prefill (dense
    k / v, a 4D additive mask) goes to transformers' sdpa function."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("paged_attention: attention logit soft-capping is not supported")
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kernel = _compiled_flex() if compiled else flex_attention
    out = kernel(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])  # (A, Hq, Q, D)
    return out.transpose(1, 2).contiguous(), None


# Registered names (transformers' public extension point); the mask interface gets sdpa's mask
# builder under the same names so transformers treats them like sdpa everywhere it builds masks
# (our masks are always 4D or a BlockMask, which it returns as-is).
FLEX, FLEX_EAGER = "antisd_paged_flex", "antisd_paged_flex_eager"
AttentionInterface.register(FLEX, functools.partial(paged_attention, compiled=True))
AttentionInterface.register(FLEX_EAGER, functools.partial(paged_attention, compiled=False))
AttentionMaskInterface.register(FLEX, sdpa_mask)
AttentionMaskInterface.register(FLEX_EAGER, sdpa_mask)
