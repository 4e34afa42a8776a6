"""The diffusion-process seam: what every kind of diffusion provides, and the results it returns.

A ``DiffusionProcess`` owns everything that depends on how a model's completions are noised and
denoised: decoding, the likelihood proxies (ELBO / EUBO / the DiPOD term's ELBO), the drift
monitor, the rollout-sharpness monitor, the cached forward and which estimators it can feed. A
model family names its process (``ModelFamily.process``); the sampler, the proxies, the monitors
and the trainer look the process up (``dipod.lm.processes.process_of``) and never branch on a family.

This module holds only the contract and the two result records, so that the process modules, the
sampler and the proxies can all import it without importing each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

# forward(x_bt, attn_bt, lo, hi, new_block) -> float32 logits [B, hi - lo, V] predicting positions lo..hi-1
BlockForward = Callable[[Tensor, Tensor, int, int, bool], Tensor]


@dataclass
class Decoded:
    """What one ``decode`` call returns."""

    completion_bg: Tensor  # long [B, G]
    order_bg: Tensor  # long [B, G]: the step, counted from 0 over the whole decode, that revealed each position
    forward_passes: int  # model calls actually run (a guided step's stacked pass counts once)
    row_forwards: int  # rows summed over those calls: the compute the batch paid
    edits: int = 0  # revealed tokens replaced by token editing (``edit_threshold``), summed over the batch


@dataclass
class Proxies:
    """float32 likelihood proxies of a batch (``meanfield_logp_nl`` only when asked). The bounds are None
    only in the proxies of an exact-likelihood estimator run without them (dipod.lm.left_to_right)."""

    elbo_nk: Tensor | None  # [B, K]
    elbo_n: Tensor | None  # [B]
    elbo_per_token_n: Tensor | None  # [B]
    eubo_n: Tensor | None  # [B]
    completion_mask_nl: Tensor  # [B, G], 1.0 on the live tokens of the process
    lengths_n: Tensor  # [B], number of live tokens L_n
    meanfield_logp_nl: Tensor | None = None  # [B, G]
    left_to_right_logp_nl: Tensor | None = None  # [B, G]: exact left-to-right log-probs (JustGRPO)


class DiffusionProcess(ABC):
    """One kind of diffusion. Subclasses implement every method; the arguments are those of the public
    entry points that call them (``dipod.lm.sampler.decode``, ``dipod.lm.proxies.compute_proxies`` /
    ``gap_lower_bound``, ``dipod.lm.monitors.rollout_confidence``), already checked there."""

    name: str = ""

    @abstractmethod
    def decode(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator=None,
               forward: BlockForward | None = None) -> Decoded:
        """Completions of left-padded prompts under ``settings`` (a ``SamplerSettings``)."""

    @abstractmethod
    def proxies(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, seed: int,
                *, meanfield: bool = False) -> Proxies:
        """The likelihood proxies of ``completion_ids`` under ``settings`` (a ``ProxySettings``), seeded."""

    @abstractmethod
    def gap_lower_bound(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings,
                        num_orders: int, seed: int) -> Tensor:
        """The drift monitor ``IW_K - ELBO_K`` ``[B]`` (NaN where the process has no decoding orders)."""

    @abstractmethod
    def rollout_confidence(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_mask_nl: Tensor,
                           chunk: int | None) -> dict[str, float]:
        """Entropy and top-token probability where every rollout starts (NaN where not defined)."""

    def denoising_logits(self, lm, ids: Tensor, attn: Tensor, first: int, clean_completion: Tensor) -> Tensor:
        """float32 logits ``[B, T - first, V]`` of the denoiser on ``ids`` = ``[prompt | noisy completion]`` (the
        completion starts at ``first``): what the SFT loss scores. Here one forward over the whole sequence; a
        process whose denoiser sees other context overrides it (block-causal: the clean earlier blocks, from
        ``clean_completion`` ``[B, T - first]``)."""
        return lm.logits(ids, attn, first)

    @abstractmethod
    def check_estimator(self, cfg) -> None:
        """Raise ``ConfigError`` when ``cfg.estimator`` reads a proxy this process does not provide."""
