"""What fast rollouts change: the same prompts decoded by a fast sampler and by the reference one.

Rollouts may come from a faster sampler (threshold decoding, a block KV cache) because DiPOD's
estimators score completions with the policy's own likelihood proxies, not with the sampler's
probabilities. Fast samplers are reported to destabilise RL through over-confident reveals, so
``rollout_mismatch`` measures, on one batch of prompts, for each sampler:

- ``reward``: mean reward of the completions (``score`` callback);
- ``elbo_per_token``: the mean over completions of ``elbo_per_token_n`` (each one's ELBO per token)
  under the current policy (``dipod.lm.proxies.compute_proxies``, the estimators' own proxy);
- ``confidence``: ``reveal_confidence``, the exact model's probability of each revealed token at
  the step that revealed it (replayed with full forwards, so a cache's stale keys do not hide
  over-confidence), averaged over the completion;
- ``forwards``: model forwards the sampler ran;

and ``same_tokens``, the fraction of completion tokens both samplers chose. Both decodes use the
same random seed. docs/lm_fast_rollouts.md explains how to read the numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from dipod.lm.model import eval_mode
from dipod.lm.proxies import ProxySettings, compute_proxies
from dipod.lm.sampler import SamplerSettings, decode, fill_after_first_eos


@torch.no_grad()
def reveal_confidence(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_bg: Tensor, order_bg: Tensor) -> Tensor:
    """float64 ``[B]``: per row, the mean over completion positions of ``p(token | state before its step)``.

    ``completion_bg`` are the tokens as revealed (before any fill after EOS) and ``order_bg`` the
    step that revealed each (``dipod.lm.sampler.Decoded``). The state before step ``s`` shows the
    tokens revealed at earlier steps and masks the rest, exactly as the sampler saw it; the
    probabilities exclude the mask token, which the sampler never proposes. Positions no step
    revealed (order -1: the EOS a ``stop_at_eos`` row was filled with) stay masked and are not averaged.
    """
    prompt_len = prompt_ids.shape[1]
    attn_bt = torch.cat([prompt_attn.long(), torch.ones_like(completion_bg)], dim=1)
    total_b = torch.zeros(completion_bg.shape[0], dtype=torch.float64, device=completion_bg.device)
    unrevealed_bg = order_bg < 0
    for step in range(int(order_bg.max()) + 1):
        state_bg = completion_bg.masked_fill((order_bg >= step) | unrevealed_bg, lm.mask_id)
        logits_bgv = lm.logits(torch.cat([prompt_ids, state_bg], dim=1), attn_bt, first=prompt_len).double()
        logits_bgv[..., lm.mask_id] = float("-inf")
        prob_bg = torch.softmax(logits_bgv, dim=-1).gather(-1, completion_bg.unsqueeze(-1)).squeeze(-1)
        total_b += (prob_bg * (order_bg == step)).sum(dim=1)
    return total_b / (~unrevealed_bg).sum(dim=1).clamp_min(1)


@torch.no_grad()
def rollout_mismatch(lm, prompt_ids: Tensor, prompt_attn: Tensor, fast: SamplerSettings, reference: SamplerSettings,
                     score: Callable[[Tensor], Tensor], proxy_settings: ProxySettings, seed: int) -> dict[str, float]:
    """Reward, ELBO per token, reveal confidence and forwards of ``fast`` and ``reference`` decoding.

    ``score(completion_ids [B, G]) -> rewards [B]`` grades completions (EOS-filled as the sampler
    returns them). Keys: ``{reward, elbo_per_token, confidence, forwards}_{fast, reference}`` and
    ``same_tokens``.
    """
    out: dict[str, float] = {}
    completions = {}
    with eval_mode(lm.model):
        for name, settings in (("fast", fast), ("reference", reference)):
            generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
            decoded = decode(lm, prompt_ids, prompt_attn, dataclasses.replace(settings, fill_after_eos=False),
                             generator=generator)
            raw_bg = decoded.completion_bg
            completion_bg = fill_after_first_eos(raw_bg, lm.eos_id) if settings.fill_after_eos else raw_bg
            completions[name] = completion_bg
            proxies = compute_proxies(lm, prompt_ids, prompt_attn, completion_bg, proxy_settings, seed)
            out[f"reward_{name}"] = float(score(completion_bg).double().mean())
            out[f"elbo_per_token_{name}"] = float(proxies.elbo_per_token_n.double().mean())
            out[f"confidence_{name}"] = float(reveal_confidence(lm, prompt_ids, prompt_attn, raw_bg,
                                                                decoded.order_bg).mean())
            out[f"forwards_{name}"] = float(decoded.forward_passes)
    out["same_tokens"] = float((completions["fast"] == completions["reference"]).double().mean())
    return out


def reference_settings(settings: SamplerSettings) -> SamplerSettings:
    """``settings`` without the fast-decoding options: fixed schedule, full forwards."""
    return dataclasses.replace(settings, confidence_threshold=None, max_reveal_per_step=None, kv_cache=None,
                               edit_threshold=None)
