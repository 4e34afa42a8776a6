"""Reveal rules of the sampler: which proposals a step keeps, and how many.

A step proposes a token for every still-masked position of the current block; a **reveal rule**
scores the proposals (higher = reveal first) and a **count rule** says how many of them each row
reveals. The sampler (``dipod.lm.sampler``) keeps the ``k`` best scores of each row.

Score rules (``REVEAL_RULES``), each ``score(logits_blv, tokens_bl, temperature, generator) -> score_bl``:

- ``low_confidence`` (LLaDA): the model's probability of the proposed token, ``softmax(logits)``
  without temperature;
- ``random`` (LLaDA): a uniform draw, ignoring the model;
- ``maskgit_plus`` (Dream): the probability of the proposed token under the tempered distribution
  ``softmax(logits / T)`` (``T = 0``: untempered, so equal to ``low_confidence`` when greedy);
- ``topk_margin`` (Dream): top-1 minus top-2 tempered probability;
- ``entropy`` (Dream): the negative entropy of the tempered distribution.

Count rules, each giving a long tensor ``[B]`` of reveals for this step:

- ``even_counts``: LLaDA's fixed schedule, a block's masks split evenly over its steps;
- ``global_counts``: Dream's schedule, times ``t = linspace(1, eps, steps + 1)``, step ``i``
  reveals ``floor(n_masked * (1 - t[i+1] / t[i]))`` (float32, as Dream computes it) and the last
  step reveals the rest;
- ``threshold_counts``: threshold parallel decoding, every masked position whose score exceeds
  the threshold, at least one, at most a cap.

Scores are float64; the sampler gives already revealed positions ``-inf`` before counting and ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor, float, "torch.Generator | None"], Tensor]


@dataclass(frozen=True)
class RevealRule:
    """A score function, and whether its score is a probability in [0, 1] (so a threshold applies)."""

    score: ScoreFn
    is_probability: bool


def _tempered_probs(logits_blv: Tensor, temperature: float) -> Tensor:
    logits = logits_blv.double()
    return torch.softmax(logits / temperature if temperature > 0 else logits, dim=-1)


def low_confidence(logits_blv: Tensor, tokens_bl: Tensor, temperature: float, generator) -> Tensor:
    # LLaDA scores with the un-tempered probabilities whatever the sampling temperature.
    probs_blv = torch.softmax(logits_blv.double(), dim=-1)
    return probs_blv.gather(-1, tokens_bl.unsqueeze(-1)).squeeze(-1)


def random_score(logits_blv: Tensor, tokens_bl: Tensor, temperature: float, generator) -> Tensor:
    return torch.rand(tokens_bl.shape, generator=generator, dtype=torch.float64, device=tokens_bl.device)


def maskgit_plus(logits_blv: Tensor, tokens_bl: Tensor, temperature: float, generator) -> Tensor:
    probs_blv = _tempered_probs(logits_blv, temperature)
    return probs_blv.gather(-1, tokens_bl.unsqueeze(-1)).squeeze(-1)


def topk_margin(logits_blv: Tensor, tokens_bl: Tensor, temperature: float, generator) -> Tensor:
    top2_bl2 = _tempered_probs(logits_blv, temperature).topk(2, dim=-1).values
    return top2_bl2[..., 0] - top2_bl2[..., 1]


def neg_entropy(logits_blv: Tensor, tokens_bl: Tensor, temperature: float, generator) -> Tensor:
    probs_blv = _tempered_probs(logits_blv, temperature)
    return torch.special.xlogy(probs_blv, probs_blv).sum(dim=-1)  # 0 log 0 = 0 (the -inf mask logit)


REVEAL_RULES: dict[str, RevealRule] = {
    "low_confidence": RevealRule(low_confidence, is_probability=True),
    "random": RevealRule(random_score, is_probability=False),
    "maskgit_plus": RevealRule(maskgit_plus, is_probability=True),
    "topk_margin": RevealRule(topk_margin, is_probability=True),
    "entropy": RevealRule(neg_entropy, is_probability=False),
}


def reveal_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens revealed at each of ``steps`` steps: ``num_masked`` split evenly, remainder to the first steps."""
    base, extra = divmod(num_masked, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def even_counts(block_length: int, steps: int) -> Callable[[int, Tensor, Tensor], Tensor]:
    """LLaDA: step ``i`` of a block reveals ``reveal_schedule(block_length, steps)[i]`` in every row."""
    schedule = reveal_schedule(block_length, steps)

    def count(step: int, masked_bl: Tensor, score_bl: Tensor) -> Tensor:
        return torch.full((masked_bl.shape[0],), schedule[step], dtype=torch.long, device=masked_bl.device)
    return count


def global_counts(steps: int, eps: float) -> Callable[[int, Tensor, Tensor], Tensor]:
    """Dream: step ``i`` reveals ``floor(n_masked * (1 - s / t))`` of the masks left, all at the last step."""
    # Dream's own float32 arithmetic, so the counts agree with diffusion_generate to the token.
    times = torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)

    def count(step: int, masked_bl: Tensor, score_bl: Tensor) -> Tensor:
        n_masked_b = masked_bl.sum(dim=1)
        if step >= steps - 1:
            return n_masked_b
        fraction = (1.0 - times[step + 1] / times[step]).to(masked_bl.device)
        return (n_masked_b.float() * fraction).long()
    return count


def threshold_counts(threshold: float, cap: int | None) -> Callable[[int, Tensor, Tensor], Tensor]:
    """Every masked position scoring above ``threshold``; at least one per row with masks left, at most ``cap``."""

    def count(step: int, masked_bl: Tensor, score_bl: Tensor) -> Tensor:
        n_masked_b = masked_bl.sum(dim=1)
        k_b = ((score_bl > threshold) & masked_bl).sum(dim=1).clamp_min(1)
        if cap is not None:
            k_b = k_b.clamp_max(cap)
        return torch.minimum(k_b, n_masked_b)
    return count


def top_k_mask(score_bl: Tensor, k: int | Tensor) -> Tensor:
    """Boolean ``[B, L]`` marking each row's ``k`` (an int or a long ``[B]``) highest scores.

    Equal scores go to the leftmost position.
    """
    # A stable descending sort keeps equal scores in position order, so the tie rule is exact.
    order_bl = torch.sort(score_bl, dim=1, descending=True, stable=True).indices
    k_b1 = torch.as_tensor(k, device=score_bl.device).reshape(-1, 1)
    keep_bl = torch.arange(score_bl.shape[1], device=score_bl.device)[None, :] < k_b1
    return torch.zeros_like(score_bl, dtype=torch.bool).scatter_(1, order_bl, keep_bl.expand_as(order_bl))
