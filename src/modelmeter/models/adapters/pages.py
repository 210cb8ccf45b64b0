"""Resident adapter weights as stacked pages, the tensors every batch gathers its rows' adapters from.

A *page* is one rank component of an adapter across every served module: row ``p`` of ``a[module]`` (length
``in``) and of ``b[module]`` (length ``out``). An adapter of rank ``r`` owns ``r`` pages, anywhere in the stack,
so adapters of every rank share one pool with no padding in memory (the idea of S-LoRA's unified paging, applied
to rank components). A *label page* is one row of a classification head (``hidden`` weights and a bias); an
adapter with ``n`` labels owns ``n`` of them. Page 0 and label page 0 are zeros: a row without an adapter, and
the padding up to a batch's largest rank, gather them and add nothing.

The factor stacks' capacity is fixed at construction. On the CPU they are allocated with ``torch.empty``, whose
pages the kernel commits only when first written, and free pages are handed out lowest first: resident memory
follows the pages in use (bounded by the adapter pool's budget), not the capacity reserved. The head stacks start
small and double when full, up to ``max_label_pages`` (they are small, and a multi-gigabyte reservation for them
slowed every forward pass of the process by a quarter: 12-14 ms against 15-17 for one sentence, measured across
alternating processes).

One owner thread per pool: the event loop for the CPU's resident pool, the forward thread for a device's.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from modelmeter.models.adapters.artifact import AdapterWeights


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an adapter's rows live in a :class:`PagePool`."""

    pages: tuple[int, ...]
    label_pages: tuple[int, ...]


class PagePool:
    """Stacks ``a[module] [pages, in]``, ``b[module] [pages, out]``, ``head_w [label_pages, hidden]``, ``head_b``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], hidden: int, *, pages: int, label_pages: int,
                 device: torch.device, dtype: torch.dtype, max_label_pages: int | None = None) -> None:
        if pages < 2 or label_pages < 2:
            raise ValueError("a page pool needs room for the zero page and at least one more")
        self.shapes = dict(shapes)
        self.device, self.dtype = device, dtype
        self.a = {name: self._stack(pages, fan_in) for name, (fan_in, _) in shapes.items()}
        self.b = {name: self._stack(pages, fan_out) for name, (_, fan_out) in shapes.items()}
        self.head_w = torch.zeros(label_pages, hidden, device=device, dtype=dtype)
        self.head_b = torch.zeros(label_pages, device=device, dtype=dtype)
        self._free = list(range(1, pages))  # a sorted list is a valid heap
        self._free_labels = list(range(1, label_pages))
        self.capacity, self.label_capacity = pages, label_pages
        self.max_label_capacity = max(max_label_pages or label_pages, label_pages)

    def _stack(self, rows: int, width: int) -> torch.Tensor:
        stack = torch.empty(rows, width, device=self.device, dtype=self.dtype)
        stack[0].zero_()
        return stack

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across every served module."""
        width = sum(fan_in + fan_out for fan_in, fan_out in self.shapes.values())
        return width * self._element_size()

    @property
    def label_page_bytes(self) -> int:
        return (self.head_w.shape[1] + 1) * self._element_size()

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def bytes_for(self, rank: int, n_labels: int) -> int:
        """What an adapter of ``rank`` with ``n_labels`` labels occupies here."""
        return rank * self.page_bytes + n_labels * self.label_page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, rank: int, n_labels: int) -> Placement | None:
        """Reserve pages for an adapter (lowest free first); ``None`` when there is not room for it."""
        while n_labels > len(self._free_labels) and self.label_capacity < self.max_label_capacity:
            self._grow_labels()
        if rank > len(self._free) or n_labels > len(self._free_labels):
            return None
        pages = tuple(heapq.heappop(self._free) for _ in range(rank))
        labels = tuple(heapq.heappop(self._free_labels) for _ in range(n_labels))
        return Placement(pages, labels)

    def _grow_labels(self) -> None:
        """Double the head stacks. A batch already running keeps the tensors it read: the copy has every row."""
        size = min(2 * self.label_capacity, self.max_label_capacity)
        head_w = torch.zeros(size, self.head_w.shape[1], device=self.device, dtype=self.dtype)
        head_b = torch.zeros(size, device=self.device, dtype=self.dtype)
        head_w[: self.label_capacity] = self.head_w
        head_b[: self.label_capacity] = self.head_b
        self.head_w, self.head_b = head_w, head_b
        for page in range(self.label_capacity, size):
            heapq.heappush(self._free_labels, page)
        self.label_capacity = size

    def free(self, placement: Placement) -> None:
        for page in placement.pages:
            heapq.heappush(self._free, page)
        for page in placement.label_pages:
            heapq.heappush(self._free_labels, page)

    def write(self, placement: Placement, weights: AdapterWeights) -> None:
        """Copy an adapter into its pages; a module the adapter does not update gets zeros."""
        index = torch.tensor(placement.pages, dtype=torch.long, device=self.device)
        for name in self.shapes:
            factor = weights.factors.get(name)
            if factor is None:
                self.a[name].index_fill_(0, index, 0)
                self.b[name].index_fill_(0, index, 0)
                continue
            self.a[name].index_copy_(0, index, factor[0].to(self.device, self.dtype, non_blocking=True))
            self.b[name].index_copy_(0, index, factor[1].to(self.device, self.dtype, non_blocking=True))
        labels = torch.tensor(placement.label_pages, dtype=torch.long, device=self.device)
        self.head_w.index_copy_(0, labels, weights.head[0].to(self.device, self.dtype, non_blocking=True))
        self.head_b.index_copy_(0, labels, weights.head[1].to(self.device, self.dtype, non_blocking=True))
