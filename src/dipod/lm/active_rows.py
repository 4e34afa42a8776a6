"""Per-row cost for the sampler: rows whose block is decoded leave the forwards.

With threshold decoding each row of a batch finishes a block after its own number of steps; run
on the whole batch, every step would pay for rows that have nothing left to reveal, so a batch
would cost its slowest row's forwards times the batch. ``ActiveRows`` holds the batch indices of
the rows still decoding the current block: the sampler runs each forward on those rows only, and
a forward that keeps per-row state across a block's steps (the block KV cache) drops the finished
rows' entries through its ``keep_rows(keep_a)`` method. A row with no masks in a block (a whole
completion revealed, or filled with EOS by ``stop_at_eos``) does not enter that block at all.

Outputs do not change: a row's logits do not depend on the other rows of the batch (every family's
``logits`` keeps rows apart), the reveal rules that can run with a threshold draw no randomness,
and the proposal noise is drawn for the whole batch before the active rows are selected
(``uniform_rows``), so each row sees the random stream it would see without compaction.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActiveRows:
    """The batch rows still decoding the current block (all of them with ``compact=False``)."""

    def __init__(self, batch: int, device: torch.device, compact: bool):
        self.batch, self.compact = batch, compact
        self.index_a = torch.arange(batch, device=device)

    def start_block(self, masked_bl: Tensor) -> None:
        """A block's first forward takes every row with masks in the block (``masked_bl``, all rows ``[B, L]``;
        every row without compaction); a cached forward refills its cache there for exactly those rows."""
        self.index_a = masked_bl.any(dim=1).nonzero().squeeze(1) if self.compact else \
            torch.arange(self.batch, device=masked_bl.device)

    def drop_finished(self, masked_al: Tensor, forward, live_a: Tensor | None = None) -> Tensor:
        """Keep the rows with masks left in the block (``masked_al``: the active rows' block masks), or those
        ``live_a`` marks (token editing keeps a row past its last mask), tell a stateful ``forward`` (one
        with ``keep_rows``), and return the kept rows' masks."""
        if not self.compact:
            return masked_al
        left_a = masked_al.any(dim=1) if live_a is None else live_a
        if bool(left_a.all()):
            return masked_al
        self.index_a = self.index_a[left_a]
        keep_rows = getattr(forward, "keep_rows", None)
        if keep_rows is not None:
            keep_rows(left_a)
        return masked_al[left_a]

    @property
    def all_rows(self) -> bool:
        return self.index_a.numel() == self.batch

    def select(self, full_bt: Tensor) -> Tensor:
        """The active rows of a batch-shaped tensor (the tensor itself while every row is active)."""
        return full_bt if self.all_rows else full_bt[self.index_a]

    def put(self, full_bt: Tensor, lo: int, hi: int, value_al: Tensor) -> None:
        """Write ``value_al`` into columns ``lo:hi`` of the active rows of ``full_bt``."""
        if self.all_rows:
            full_bt[:, lo:hi] = value_al
        else:
            full_bt[self.index_a, lo:hi] = value_al

    def put_rows(self, full_b: Tensor, value_a: Tensor) -> None:
        """Write ``value_a`` into the active rows of the per-row tensor ``full_b``."""
        if self.all_rows:
            full_b.copy_(value_a)
        else:
            full_b[self.index_a] = value_a

    def uniform_rows(self, shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
        """Float64 uniforms ``[A, *shape[1:]]``: drawn for the whole batch, then the active rows selected."""
        uniform = torch.rand((self.batch, *shape[1:]), generator=generator, dtype=torch.float64, device=device)
        return self.select(uniform)
