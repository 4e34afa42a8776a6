"""LLaDA2.1's token editing (token-to-token, "T2T"): revealed tokens of the current block may be replaced.

With ``edit_threshold = e`` every step of a block, besides revealing masks as usual, replaces each
already revealed, generated token of the block (not a prompt token of the block the prompt shares,
not a position still masked when the step began) whose proposal from the same forward differs from
it and scores above ``e`` under the reveal rule. Reveals and edits of a step read the same logits
and are written together.

A row's block ends when a step that began with no mask left in the block edits nothing, or after
``max_post_steps`` such mask-free steps, whichever comes first: with editing, every block costs at
least one forward more than its reveals (the step that finds nothing to edit), unless
``max_post_steps`` is 0. This is the loop of LLaDA2.1's ``generate`` (``max_post_steps`` 16 there).

Edits stay inside the current block, so the block-causal prefix KV cache stays exact: a block's keys
and values are stored only once the window has moved past it, with its final tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.lm.active_rows import ActiveRows


class TokenEditing:
    """Per-row editing state over a decode: which canvas positions may be edited, mask-free steps, block end."""

    def __init__(self, threshold: float, max_post_steps: int, generated_bg: Tensor):
        self.threshold, self.max_post_steps = threshold, max_post_steps
        self.generated_bg = generated_bg  # bool [B, G]: canvas positions the decode fills (never a prompt token)
        batch = generated_bg.shape[0]
        self.post_b = torch.zeros(batch, dtype=torch.long, device=generated_bg.device)  # mask-free steps this block
        self.settled_b = torch.zeros(batch, dtype=torch.bool, device=generated_bg.device)  # such a step edited nothing
        self.edits = 0  # tokens replaced over the decode

    def start_block(self, start: int, end: int) -> None:
        """A new block, canvas columns ``start:end``: a row with nothing generated in it (a window of prompt
        tokens only) is settled at once, so it runs no step there."""
        self.post_b.zero_()
        self.settled_b.copy_(~self.generated_bg[:, start:end].any(dim=1))

    def live(self, rows: ActiveRows, masked_al: Tensor) -> Tensor:
        """Bool ``[A]``: the active rows that run another step of this block."""
        may_edit_a = ~rows.select(self.settled_b) & (rows.select(self.post_b) < self.max_post_steps)
        return masked_al.any(dim=1) | may_edit_a

    def step(self, rows: ActiveRows, live_a: Tensor, masked_al: Tensor, current_al: Tensor, tokens_al: Tensor,
             score_al: Tensor, start: int, end: int) -> Tensor:
        """Bool ``[A, L]``: the positions of the block (canvas columns ``start:end``) this step edits; records
        the step's mask-free count and whether it settled the row."""
        generated_al = rows.select(self.generated_bg)[:, start:end]
        edit_al = (live_a[:, None] & generated_al & ~masked_al & (tokens_al != current_al)
                   & (score_al > self.threshold))
        mask_free_a = live_a & ~masked_al.any(dim=1)
        rows.put_rows(self.post_b, rows.select(self.post_b) + mask_free_a.long())
        rows.put_rows(self.settled_b, rows.select(self.settled_b) | (mask_free_a & ~edit_al.any(dim=1)))
        self.edits += int(edit_al.sum())
        return edit_al
