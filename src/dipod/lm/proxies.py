r"""Likelihood proxies of a masked-diffusion LM: ELBO, SPG's EUBO surrogate, d1's mean-field
log-probs, and the IW_K drift monitor. The two forward processes are the paper's released ones,
by their released names (see docs/lm_proxies.md for the derivations and the parity checks):

* Layout: ``prompt_ids [B, P]`` left-padded (``prompt_attn`` 0 on padding), ``completion_ids
  [B, G]``; the model sees ``cat([prompt, completion])``. ``K`` Monte-Carlo draws per sequence.
* ``block_random`` (SPG's ``forward_type=block_random``). Live tokens: up to AND including the
  first EOS (``L_n`` of them); every position after it is masked in every copy and never scored.
  The completion is cut into ``nb = G / block_length`` blocks; the draws' blocks are the first K
  entries of a random permutation of all block indices taken modulo ``J_n = ceil(L_n / block_length)``
  (so blocks are not equally likely, and the K draws of a row are dependent). Beyond the release,
  which asserts ``G % block_length == 0`` and ``K <= nb``: a last partial block is a block, and
  draws ``nb..2nb-1`` use a second permutation, and so on. In block ``b`` a count
  ``n ~ randint(max(floor(min_t M), 1), min(floor(max_t M), M))`` of its ``M`` live tokens is
  masked (a uniform subset); every later position is masked; each position NOT masked by this
  (prompt and earlier blocks) is masked with probability ``p_mask_prompt``. Every masked live
  token is scored (later blocks and prompt-masked earlier tokens too), weight ``L_n / |scored|``.
* ``random`` (the d1 fork's FPO ELBO). Live tokens: strictly before the first EOS; the EOS and the
  tail stay visible and unscored. ``n = floor(t L_n)`` live tokens are masked, a uniform subset,
  with ``t = min_t + (max_t - min_t) u``, ``u ~ U[0, 1)``; all of them are scored, weight
  ``L_n / max(n, 1)`` (a draw with ``n = 0`` contributes 0). Prompt tokens (not padding) are masked
  with probability ``p_mask_prompt`` (the release never masks them there: its configs set 0).
* ``unbiased_random`` (ours, not released). Live tokens and tail as ``block_random``;
  ``m = clamp(ceil(t L_n), 1, L_n)`` live tokens masked, weight ``L_n / m``: every draw is an unbiased
  estimate of the any-order ELBO ``E_sigma[log p_sigma(x)]`` when ``t ~ U[0, 1)``.
* ``ELBO_nk = w_nk sum_l scored_nkl log p(x_l | z_nk)``; ``elbo_n`` its mean over draws;
  ``elbo_per_token_n = elbo_n / max(L_n, 1)`` (SPG's per-sequence value).
* ``EUBO_n = (L_n / S_n) (1/beta) sum_l log( (1/K) sum_k w_nk scored_nkl p(x_l | z_nk)^beta )``
  over the ``S_n`` live tokens scored in at least one draw (SPG's ``empirical_t`` weighting).
* Mean-field (d1): one extra copy with every completion position masked and the prompt masked with
  ``p_mask_prompt``; ``meanfield_logp_nl = log p(x_l | that copy)``.

All K draws (and the mean-field copy) go through ONE batched forward (chunked to
``max_tokens_per_forward`` tokens); arithmetic is float32 whatever the model dtype. Randomness is
drawn on the CPU from ``torch.Generator().manual_seed(seed)`` before any forward, so the same seed
gives the same masks on every device, with or without chunking or the mean-field copy.
"""

from __future__ import annotations

from torch import Tensor

from dipod.lm.processes.registry import process_of
from dipod.lm.processes.base import Proxies
from dipod.lm.processes.masked_likelihood import (MASKINGS, PROCESSES, ForwardProcess, MaskDraw, ProxySettings,
                                                  check_batch, completion_mask, decoding_orders, draw_masks,
                                                  eubo_surrogate, live_mask, order_log_probs, score_draw,
                                                  token_log_probs)

__all__ = ["MASKINGS", "PROCESSES", "ForwardProcess", "MaskDraw", "Proxies", "ProxySettings", "completion_mask",
           "compute_proxies", "decoding_orders", "draw_masks", "eubo_surrogate", "gap_lower_bound", "live_mask",
           "order_log_probs", "score_draw", "token_log_probs"]


def compute_proxies(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                    settings: ProxySettings, seed: int, *, meanfield: bool = False) -> Proxies:
    """ELBO (per draw, mean, per token), EUBO surrogate and, with ``meanfield``, d1's per-token
    log-probs, by the model's diffusion process (for the masked ones: one batched forward over
    ``B x (K [+1])`` masked copies)."""
    check_batch(prompt_ids, prompt_attn, completion_ids)
    return process_of(lm).proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, meanfield=meanfield)


def gap_lower_bound(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                    settings: ProxySettings, num_orders: int, seed: int) -> Tensor:
    """The drift monitor ``IW_K - ELBO_K`` ``[B]`` (float32, >= 0) over ``K = num_orders`` random orders of
    the model's diffusion process (``masked_likelihood.masked_gap_lower_bound``; NaN, not measured, for a
    uniform-noise family: it has no unmasking orders)."""
    if num_orders < 1:
        raise ValueError(f"gap_lower_bound: num_orders={num_orders} must be >= 1")
    check_batch(prompt_ids, prompt_attn, completion_ids)
    return process_of(lm).gap_lower_bound(lm, prompt_ids, prompt_attn, completion_ids, settings, num_orders, seed)


