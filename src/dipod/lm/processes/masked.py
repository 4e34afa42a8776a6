"""The full-sequence masked process (LLaDA, Dream, any Hugging Face mask predictor).

A completion is noised by replacing tokens with the mask token; the denoiser sees the whole
sequence with bidirectional attention. Decoding is ``masked_sampling.decode_masked`` (blocks,
global schedule or threshold decoding, any reveal rule); the proxies are
``masked_likelihood``'s (released forward processes ``block_random`` / ``random`` and ours).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.config import ConfigError
from dipod.lm.model import eval_mode
from dipod.lm.processes.base import BlockForward, Decoded, DiffusionProcess, Proxies
from dipod.lm.processes.masked_likelihood import masked_gap_lower_bound, masked_proxies
from dipod.lm.processes.masked_sampling import decode_masked


class MaskedProcess(DiffusionProcess):
    name = "masked"

    def decode(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator=None,
               forward: BlockForward | None = None) -> Decoded:
        if settings.edit_threshold is not None:
            raise ConfigError(f"edit_threshold is LLaDA2.1's token editing, a decoding option of block-causal models "
                              f"(SDAR, LLaDA2.x); {getattr(lm.family, 'name', 'this model')} decodes the whole "
                              "sequence: leave edit_threshold unset")
        return decode_masked(lm, prompt_ids, prompt_attn, settings, generator, forward)

    def proxies(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, seed: int,
                *, meanfield: bool = False) -> Proxies:
        return masked_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, meanfield=meanfield)

    def gap_lower_bound(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings,
                        num_orders: int, seed: int) -> Tensor:
        return masked_gap_lower_bound(lm, prompt_ids, prompt_attn, completion_ids, settings, num_orders, seed)

    @torch.no_grad()
    def rollout_confidence(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_mask_nl: Tensor,
                           chunk: int | None) -> dict[str, float]:
        """One forward with the whole completion masked (the sampler's first step), ``chunk`` rows at a time."""
        gen_length = completion_mask_nl.shape[1]
        chunk = chunk or prompt_ids.shape[0]
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(0, prompt_ids.shape[0], chunk):
            rows = slice(start, start + chunk)
            masked = torch.full((prompt_ids[rows].shape[0], gen_length), lm.mask_id, dtype=torch.long,
                                device=prompt_ids.device)
            ids = torch.cat([prompt_ids[rows], masked], dim=1)
            attn = torch.cat([prompt_attn[rows].long(), torch.ones_like(masked)], dim=1)
            with eval_mode(lm.model):
                logits = lm.logits(ids, attn, first=prompt_ids.shape[1])
            logits[..., lm.mask_id] = float("-inf")  # the sampler never proposes the mask token
            logp = torch.log_softmax(logits.double(), dim=-1)
            probs = logp.exp()
            entropy_nl = -(probs * logp.masked_fill(probs == 0, 0.0)).sum(-1)
            weight = completion_mask_nl[rows].double()
            sums += torch.stack([(entropy_nl * weight).sum(), (probs.max(-1).values * weight).sum()]).cpu()
        total = completion_mask_nl.double().sum().clamp_min(1.0).cpu()
        return {"rollout_entropy": float(sums[0] / total), "rollout_confidence": float(sums[1] / total)}

    def check_estimator(self, cfg) -> None:
        """Every estimator applies: the masked process provides the ELBO, the EUBO and mean-field log-probs."""
