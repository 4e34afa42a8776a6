"""The block KV cache (Fast-dLLM): reuse keys/values across the steps that decode one block.

``BlockCachedForward`` is the sampler's pluggable forward: ``forward(x_bt, attn_bt, lo, hi,
new_block) -> float32 logits [B, hi - lo, V]`` predicting positions ``lo .. hi - 1`` (already
re-aligned for shifted families such as Dream).

- ``new_block=True`` (a block's first step) runs the whole sequence and keeps every layer's keys
  and values: its logits are exactly the full forward's.
- ``prefix`` then recomputes the block and everything after it at each step, attending to the
  prompt's and finished blocks' keys/values as cached at the block's first step.
- ``dual`` recomputes only the block's tokens; the suffix (the still-masked blocks after it) is
  also read from the cache.
- ``keep_rows(keep_b)`` drops the entries of rows that finished the block, so the sampler's later
  steps run on the remaining rows only (``dipod.lm.active_rows``).

What is approximate (both modes): cached keys/values are those of the block's first step, so they
do not see the tokens revealed since. Fast-dLLM measures this to cost little accuracy, since a
finished prefix changes little and masked suffix tokens carry little information; the benchmark
(benchmarks/lm_rollout_speed.py) measures it here.
"""

from __future__ import annotations

import torch

from dipod.lm.networks.transformer import LayerKV, Network, key_padding_mask

MODES = ("prefix", "dual")


class BlockCachedForward:
    def __init__(self, network: Network, mode: str):
        if mode not in MODES:
            raise ValueError(f"kv_cache={mode!r}; choose one of {MODES} (or none for no cache)")
        self.network, self.mode = network, mode
        self._cache: list[LayerKV] | None = None
        self._block: tuple | None = None  # (shape, lo, hi) of the block the cache was filled for

    def __call__(self, x_bt: torch.Tensor, attn_bt: torch.Tensor, lo: int, hi: int, new_block: bool) -> torch.Tensor:
        shift = 1 if self.network.spec.shifted else 0
        if not shift <= lo < hi <= x_bt.shape[1]:
            raise ValueError(f"block [{lo}, {hi}) must lie in [{shift}, {x_bt.shape[1]}] with lo < hi"
                             + (" (a shifted family predicts position lo from lo - 1)" if shift else ""))
        key_mask = key_padding_mask(attn_bt)
        block = (tuple(x_bt.shape), lo, hi)
        if new_block:
            self._cache, self._block = self.network.new_cache(), block
            hidden = self.network.hidden(x_bt, 0, key_mask, self._cache)[:, lo - shift:hi - shift]
        else:
            if self._block != block:
                raise RuntimeError(f"cached forward called for block {block} but the cache holds {self._block}; "
                                   "call with new_block=True on the first step of every block")
            # Shifted families read position lo's prediction at lo - 1, so that query runs too.
            q_lo, q_hi = lo - shift, (x_bt.shape[1] if self.mode == "prefix" else hi)
            hidden = self.network.hidden(x_bt[:, q_lo:q_hi], q_lo, key_mask, self._cache)[:, :hi - lo]
        return self.network.head_logits(hidden)

    def keep_rows(self, keep_b: torch.Tensor) -> None:
        """Drop the cache entries of the rows not marked in ``keep_b``: the sampler's next calls pass only the
        kept rows (``dipod.lm.active_rows``)."""
        if self._cache is None:
            raise RuntimeError("keep_rows before any block was cached; call with new_block=True first")
        for layer_kv in self._cache:
            layer_kv.keep_rows(keep_b)
        shape, lo, hi = self._block
        self._block = ((int(keep_b.sum()), *shape[1:]), lo, hi)
