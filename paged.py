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
     - reference path (everywhere): the gathered dense context (A, H, S, D); the engine
       passes a 4D additive mask built from lengths, and the model's own sdpa / eager
       attention runs unchanged (a 4D mask is "already prepared": transformers 5.17-5.24
       return it as-is instead of building one).
     - in-place path (`dense=False`): the pools themselves, for an attention function that
       reads the pages through the page table (FlexAttention; not written yet).

Shapes: A live rows, Q new tokens per row (1 in decode), S context slots per row, H KV heads,
D head dim, NP pages, ps page size.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


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

    def __init__(self, num_layers: int, num_pages: int, page_size: int, *, dense: bool = True):
        super().__init__(layers=[])
        self.num_layers, self.num_pages, self.page_size, self.dense = num_layers, num_pages, page_size, dense
        self.k: list[torch.Tensor | None] = [None] * num_layers  # each (NP * ps, H, D)
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.write: torch.Tensor | None = None  # (A * Q,) long
        self.read: torch.Tensor | None = None  # (A, S / ps) long page ids, or None in a prefill

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always passed explicitly
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        A, H, Q, D = key_states.shape  # (A, H, Q, D)
        if self.k[layer_idx] is None:
            slots = self.num_pages * self.page_size
            self.k[layer_idx] = key_states.new_zeros(slots, H, D)
            self.v[layer_idx] = value_states.new_zeros(slots, H, value_states.shape[-1])
        kp, vp = self.k[layer_idx], self.v[layer_idx]
        kp.index_copy_(0, self.write, key_states.transpose(1, 2).reshape(A * Q, H, D))  # (A*Q, H, D)
        vp.index_copy_(0, self.write, value_states.transpose(1, 2).reshape(A * Q, H, -1))
        if self.read is None:  # prefill: the context is the new tokens themselves
            return key_states, value_states
        if not self.dense:  # in-place path: attention reads the pools itself
            return kp, vp
        # the reference gather, whole pages at a time (a page is one contiguous ps x H x D block)
        # into two buffers shared by all layers (layer i's attention is done before layer i+1
        # writes; a fresh multi-MB tensor per call costs more than the copy on CPU)
        A, n_pg = self.read.shape
        flat = self.read.reshape(-1)  # (A * S/ps,)
        kb, vb = self._buffers(flat.numel(), kp.view(self.num_pages, -1))
        torch.index_select(kp.view(self.num_pages, -1), 0, flat, out=kb)
        torch.index_select(vp.view(self.num_pages, -1), 0, flat, out=vb)
        S = n_pg * self.page_size
        return kb.view(A, S, H, D).transpose(1, 2), vb.view(A, S, H, -1).transpose(1, 2)  # (A, H, S, D)

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
            view = pool.view(self.num_pages, ps, *pool.shape[1:])  # (NP, ps, H, D)
            view.index_copy_(0, d, view.index_select(0, s))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (..., Q, S) True = attend -> additive bias of the model dtype (0 / dtype min), with a
    head dim: (A, 1, Q, S). Eager attention adds it to the scores; sdpa takes it as attn_mask."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
