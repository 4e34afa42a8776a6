"""The exact prefix KV cache of a block-causal network (SDAR, LLaDA2): finished blocks are computed once.

Under block-causal attention a position's keys and values depend only on its own and earlier blocks,
so once the decoding window has moved past a block, that block's keys and values never change: the
cache is exact, unlike the bidirectional Fast-dLLM caches (``cache.py``). ``BlockCausalCachedForward``
is the sampler's pluggable forward for windows aligned to the model's blocks (the block-causal
process aligns them): on a window's first step it appends the keys and values of the positions
finished since the last window (``store``), then every step runs only the window's queries against
the cache plus the window itself (read only). Logits equal the full forward's to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.lm.networks.transformer import Network, block_causal_mask, row_positions


class PrefixKV:
    """One layer's keys and values of the finished positions ``[B, H_kv, filled, D]``, appended in order."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.store = True  # append what ``update`` receives; False: read the cache, leave it as it is

    @property
    def filled(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if start != self.filled:
            raise RuntimeError(f"prefix cache holds {self.filled} positions but was given keys from {start}")
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if self.store:
            self.k, self.v = k, v
        return k, v


class BlockCausalCachedForward:
    """``forward(x_bt, attn_bt, lo, hi, new_block) -> float32 logits [B, hi - lo, V]`` with an exact prefix cache."""

    def __init__(self, network: Network, uniform_passes: bool = False):
        if network.spec.block_size is None:
            raise ValueError(f"{network.spec.family} attends bidirectionally; the exact prefix cache needs a "
                             "block-causal network (use kv_cache prefix / dual's Fast-dLLM cache instead)")
        self.network = network
        self.cache: list[PrefixKV] = []
        # every call runs the same modules (a storing pass, on one token when there is nothing to store):
        # ranks with sharded weights must (dipod.lm.processes.rank_sync)
        self.uniform_passes = uniform_passes

    def _idle_pass(self, device: torch.device) -> Tensor:
        return self.network.hidden(torch.zeros((1, 1), dtype=torch.long, device=device))

    def idle_step(self, device: torch.device) -> None:
        """The modules of one call, on a single token and without the cache."""
        self._idle_pass(device)
        self.network.head_logits(self._idle_pass(device))

    def _run(self, x_bt: Tensor, attn_bt: Tensor, lo: int, hi: int, store: bool) -> Tensor:
        for layer in self.cache:
            layer.store = store
        mask = block_causal_mask(attn_bt[:, :hi], self.network.spec.block_size, lo, hi)
        return self.network.hidden(x_bt[:, lo:hi], lo, mask, self.cache, row_positions(attn_bt)[:, lo:hi])

    def __call__(self, x_bt: Tensor, attn_bt: Tensor, lo: int, hi: int, new_block: bool) -> Tensor:
        if new_block:
            if not self.cache or self.cache[0].filled > lo:  # a new decode (or a new batch): start over
                self.cache = [PrefixKV() for _ in self.network.layers]
            filled = self.cache[0].filled
            if filled < lo:  # the blocks finished since the last window
                self._run(x_bt, attn_bt, filled, lo, store=True)
            elif self.uniform_passes:
                self._idle_pass(x_bt.device)
        elif not self.cache or self.cache[0].filled != lo:
            raise RuntimeError("the prefix cache does not end where this window starts; call with new_block=True "
                               "on the first step of every window")
        elif self.uniform_passes:
            self._idle_pass(x_bt.device)
        return self.network.head_logits(self._run(x_bt, attn_bt, lo, hi, store=False))
