"""The uniform-noise process (DiffusionGemma): block diffusion whose canvas starts as random tokens.

The model-specific work lives in ``dipod.lm.diffusion_gemma`` (its own and our ancestral sampler,
the uniform-noise ELBO summed over canvas blocks); this object is its seat at the seam. It has no
unmasking orders and no masked canvas, so the drift monitor and the rollout sharpness are NaN
(not measured), and estimators that read the EUBO or mean-field log-probs are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.lm import diffusion_gemma
from dipod.lm.processes.base import BlockForward, Decoded, DiffusionProcess, Proxies


class UniformProcess(DiffusionProcess):
    name = "uniform"

    def decode(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator=None,
               forward: BlockForward | None = None) -> Decoded:
        if forward is not None:
            raise ValueError("DiffusionGemma decodes with its own encoder/decoder forward; a custom block forward "
                             "(forward=...) does not apply to it")
        return diffusion_gemma.decode(lm, prompt_ids, prompt_attn, settings, generator)

    def proxies(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, seed: int,
                *, meanfield: bool = False) -> Proxies:
        return diffusion_gemma.compute_uniform_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed)

    def gap_lower_bound(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings,
                        num_orders: int, seed: int) -> Tensor:
        return torch.full((completion_ids.shape[0],), float("nan"), device=completion_ids.device)

    def rollout_confidence(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_mask_nl: Tensor,
                           chunk: int | None) -> dict[str, float]:
        return {"rollout_entropy": float("nan"), "rollout_confidence": float("nan")}

    def check_estimator(self, cfg) -> None:
        diffusion_gemma.check_estimator(cfg)
