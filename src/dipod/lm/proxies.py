r"""Likelihood proxies of a masked-diffusion LM: ELBO, SPG's EUBO surrogate, d1's mean-field
log-probs, and the IW_K drift monitor. Conventions (see docs/lm_proxies.md):

* Layout: ``prompt_ids [B, P]`` left-padded (``prompt_attn`` 0 on padding), ``completion_ids
  [B, G]``; the model sees ``cat([prompt, completion])``. ``K`` Monte-Carlo draws per sequence.
* Live tokens: ``completion_mask_nl`` is 1 up to and including the first EOS (as d1 and SPG),
  ``lengths_n = L_n`` its row sum. As in SPG's forward processes, positions after the first EOS
  are ALWAYS masked (in every draw, the mean-field copy and the drift monitor) and never scored, so
  the EOS tail never influences a proxy; the processes below act on the ``L_n`` live tokens.
* Forward processes, per draw ``t = min_t + (max_t - min_t) u`` with ``u ~ U[0, 1)``:
  ``random``: exactly ``m = clamp(ceil(t L_n), 1, L_n)`` live tokens are masked, a uniformly
  random subset; all of them are scored, weight ``w = L_n / m``.
  ``block_random`` (SPG): the completion is cut into blocks of ``block_length`` positions; a block
  ``b`` is picked uniformly among the ``J_n = ceil(L_n / block_length)`` blocks holding live
  tokens; earlier blocks stay clean, later positions are masked, and ``m = clamp(ceil(t L_b), 1,
  L_b)`` of block b's ``L_b`` live tokens are masked. Only block b's masked tokens are scored,
  weight ``w = J_n L_b / m``.
  Given ``m`` every scored token is masked with probability ``m / L``, so ``w`` makes each draw an
  unbiased estimate; with ``min_t = 0, max_t = 1``, ``m`` is uniform on ``{1..L}`` and the estimate
  is unbiased for the any-order ELBO ``E_sigma[log p_sigma(x)]`` of the live tokens (for
  ``block_random``: orders that decode block by block, LLaDA's semi-autoregressive factorisation).
* Prompt tokens (not padding) are masked independently with probability ``p_mask_prompt`` in every
  copy; they are never scored.
* ``ELBO_nk = w_nk sum_l scored_nkl log p(x_l | z_nk)``; ``elbo_n`` its mean over draws;
  ``elbo_per_token_n = elbo_n / lengths_n``.
* ``EUBO_n = (1/beta) sum_l log( (1/K) sum_k w_nk scored_nkl p(x_l | z_nk)^beta )`` over live
  tokens, from the same K draws. A live token scored in none of the K draws has no estimate; as in
  SPG, the sum over the scored tokens is rescaled by ``L_n / #scored`` (their mean stands in).
* Mean-field (d1): one extra copy with every completion position masked, ``meanfield_logp_nl =
  log p(x_l | prompt with p_mask_prompt masking, all completion masked)``.

All K draws (and the mean-field copy) go through ONE batched forward (chunked to
``max_tokens_per_forward`` tokens); arithmetic is float32 whatever the model dtype. Randomness is
drawn on the CPU from ``torch.Generator().manual_seed(seed)`` before any forward, so the same seed
gives the same masks on every device, with or without chunking or the mean-field copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dipod.lm.model import MaskedDiffusionLM

MASKINGS = ("random", "block_random")


@dataclass
class ProxySettings:
    """How the likelihood proxies are estimated (defaults: SPG's block masking, t ~ U(0, 1))."""

    num_draws: int = 2
    masking: str = "block_random"
    min_t: float = 0.0
    max_t: float = 1.0
    block_length: int = 32
    p_mask_prompt: float = 0.0
    eubo_beta: float = 1.5
    max_tokens_per_forward: int | None = None

    def __post_init__(self) -> None:
        if self.num_draws < 1:
            raise ValueError(f"ProxySettings: num_draws={self.num_draws} must be >= 1")
        if self.masking not in MASKINGS:
            raise ValueError(f"ProxySettings: masking={self.masking!r}; choose one of {MASKINGS}")
        if not 0.0 <= self.min_t <= self.max_t <= 1.0:
            raise ValueError(f"ProxySettings: need 0 <= min_t <= max_t <= 1, got min_t={self.min_t}, max_t={self.max_t}")
        if self.block_length < 1:
            raise ValueError(f"ProxySettings: block_length={self.block_length} must be >= 1")
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError(f"ProxySettings: p_mask_prompt={self.p_mask_prompt} must lie in [0, 1]")
        if self.eubo_beta <= 0:
            raise ValueError(f"ProxySettings: eubo_beta={self.eubo_beta} must be > 0")
        if self.max_tokens_per_forward is not None and self.max_tokens_per_forward < 1:
            raise ValueError(f"ProxySettings: max_tokens_per_forward={self.max_tokens_per_forward} must be >= 1 "
                             "(or None for a single forward)")


@dataclass
class Proxies:
    """float32 likelihood proxies of a batch (``meanfield_logp_nl`` only when asked)."""

    elbo_nk: Tensor  # [B, K]
    elbo_n: Tensor  # [B]
    elbo_per_token_n: Tensor  # [B]
    eubo_n: Tensor  # [B]
    completion_mask_nl: Tensor  # [B, G], 1.0 up to and including the first EOS
    lengths_n: Tensor  # [B], number of scored completion tokens
    meanfield_logp_nl: Tensor | None = None  # [B, G]


@dataclass
class MaskDraw:
    """The random part of one proxy call (all on the CPU, from one generator)."""

    masked_nkl: Tensor  # bool [B, K, G]: completion positions replaced by the mask token
    scored_nkl: Tensor  # bool [B, K, G]: positions whose log-probs enter the estimators
    weight_nk: Tensor  # float32 [B, K]: importance weight of each draw
    prompt_masked_ncp: Tensor  # bool [B, K + 1, P]: prompt positions masked; copy K is the mean-field one


def completion_mask(completion_ids: Tensor, eos_id: int) -> Tensor:
    """float32 ``[B, G]``: 1 up to and including each row's first EOS (all ones without EOS)."""
    is_eos = completion_ids == eos_id
    gen_length = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), gen_length)
    return (torch.arange(gen_length, device=completion_ids.device)[None] <= first_eos[:, None]).float()


def _random_ranks(scores: Tensor) -> Tensor:
    """Rank of every entry along the last dim (0 = smallest): a uniform random permutation."""
    return scores.argsort(-1).argsort(-1)


def draw_masks(prompt_attn: Tensor, completion_mask_nl: Tensor, settings: ProxySettings,
               generator: torch.Generator) -> MaskDraw:
    """Sample the K forward-process draws (and the mean-field copy's prompt mask) described above."""
    batch, prompt_len = prompt_attn.shape
    gen_length = completion_mask_nl.shape[1]
    draws = settings.num_draws
    u_nk = torch.rand(batch, draws, generator=generator)
    u_block_nk = torch.rand(batch, draws, generator=generator)
    scores_nkl = torch.rand(batch, draws, gen_length, generator=generator)
    prompt_u_ncp = torch.rand(batch, draws + 1, prompt_len, generator=generator)

    live_nl = completion_mask_nl.bool().cpu()
    length_n = live_nl.sum(1)
    block = gen_length if settings.masking == "random" else settings.block_length
    num_blocks_n = (length_n + block - 1) // block  # blocks holding live tokens
    block_nk = torch.minimum((u_block_nk * num_blocks_n[:, None]).long(), num_blocks_n[:, None] - 1)
    block_len_nk = (length_n[:, None] - block_nk * block).clamp(max=block)  # live tokens of the block
    t_nk = settings.min_t + (settings.max_t - settings.min_t) * u_nk
    num_masked_nk = torch.minimum(torch.ceil(t_nk * block_len_nk).long().clamp(min=1), block_len_nk)

    block_of_l = torch.arange(gen_length) // block
    in_block_nkl = (block_of_l == block_nk[..., None]) & live_nl[:, None]
    # Scores above 1 outside the block's live tokens: those take the smallest ranks 0..L_b-1 in a
    # uniformly random order.
    ranks_nkl = _random_ranks(torch.where(in_block_nkl, scores_nkl, 2.0))
    scored_nkl = in_block_nkl & (ranks_nkl < num_masked_nk[..., None])
    masked_nkl = scored_nkl | (block_of_l > block_nk[..., None]) | ~live_nl[:, None]
    weight_nk = (num_blocks_n[:, None] * block_len_nk / num_masked_nk).float()
    prompt_masked_ncp = (prompt_u_ncp < settings.p_mask_prompt) & prompt_attn.bool().cpu()[:, None, :]
    return MaskDraw(masked_nkl, scored_nkl, weight_nk, prompt_masked_ncp)


def token_log_probs(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, noisy_completion_rl: Tensor,
                    targets_rl: Tensor, max_tokens_per_forward: int | None) -> Tensor:
    """float32 ``log p(targets | prompt, noisy completion)`` ``[R, G]`` for R rows, chunked by token budget.

    ``prompt_ids``/``prompt_attn`` are ``[R, P]`` (each row may carry its own masked prompt).
    """
    rows, prompt_len = prompt_ids.shape
    ids_rt = torch.cat([prompt_ids, noisy_completion_rl], dim=1)
    attn_rt = torch.cat([prompt_attn, torch.ones_like(noisy_completion_rl, dtype=prompt_attn.dtype)], dim=1)
    seq_len = ids_rt.shape[1]
    chunk = rows if max_tokens_per_forward is None else max(1, max_tokens_per_forward // seq_len)
    out = []
    for start in range(0, rows, chunk):
        logits_rlv = lm.logits(ids_rt[start:start + chunk], attn_rt[start:start + chunk])[:, prompt_len:]
        target = targets_rl[start:start + chunk, :, None]
        out.append((logits_rlv.gather(-1, target) - logits_rlv.logsumexp(-1, keepdim=True)).squeeze(-1))
    return torch.cat(out, dim=0)


def compute_proxies(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                    settings: ProxySettings, seed: int, *, meanfield: bool = False) -> Proxies:
    """ELBO (per draw, mean, per token), EUBO surrogate and, with ``meanfield``, d1's per-token
    log-probs, all from one batched forward over ``B x (K [+1])`` masked copies."""
    _check_batch(prompt_ids, prompt_attn, completion_ids)
    batch, gen_length = completion_ids.shape
    device = completion_ids.device
    mask_nl = completion_mask(completion_ids, lm.eos_id)
    draw = draw_masks(prompt_attn, mask_nl, settings, torch.Generator().manual_seed(int(seed)))
    copies = settings.num_draws + int(meanfield)

    masked_ncl = draw.masked_nkl.to(device)
    if meanfield:
        masked_ncl = torch.cat([masked_ncl, torch.ones(batch, 1, gen_length, dtype=torch.bool, device=device)], 1)
    noisy_ncl = completion_ids[:, None].expand(-1, copies, -1).masked_fill(masked_ncl, lm.mask_id)
    prompt_ncp = prompt_ids[:, None].expand(-1, copies, -1).masked_fill(
        draw.prompt_masked_ncp[:, :copies].to(device), lm.mask_id)
    logp_ncl = token_log_probs(
        lm, prompt_ncp.flatten(0, 1), prompt_attn[:, None].expand(-1, copies, -1).flatten(0, 1),
        noisy_ncl.flatten(0, 1), completion_ids[:, None].expand(-1, copies, -1).flatten(0, 1),
        settings.max_tokens_per_forward).view(batch, copies, gen_length)

    lengths_n = mask_nl.sum(1)
    logp_nkl = logp_ncl[:, :settings.num_draws]
    scored_nkl = draw.scored_nkl.to(device)
    weight_nk = draw.weight_nk.to(device)
    elbo_nk = weight_nk * torch.where(scored_nkl, logp_nkl, 0.0).sum(-1)
    elbo_n = elbo_nk.mean(1)
    return Proxies(
        elbo_nk=elbo_nk, elbo_n=elbo_n, elbo_per_token_n=elbo_n / lengths_n,
        eubo_n=eubo_surrogate(logp_nkl, scored_nkl, weight_nk, settings.eubo_beta, lengths_n),
        completion_mask_nl=mask_nl, lengths_n=lengths_n,
        meanfield_logp_nl=logp_ncl[:, -1] if meanfield else None)


def eubo_surrogate(logp_nkl: Tensor, scored_nkl: Tensor, weight_nk: Tensor, beta: float,
                   lengths_n: Tensor) -> Tensor:
    """``(L_n / S_n) (1/beta) sum_l log((1/K) sum_k w_nk scored_nkl p_nkl^beta)`` -> ``[B]``, the sum
    over the ``S_n`` tokens scored in at least one draw, rescaled to the ``L_n`` live tokens (SPG).
    Computed in log space (logsumexp over draws)."""
    draws = logp_nkl.shape[1]
    log_terms_nkl = torch.where(scored_nkl, weight_nk.log()[..., None] + beta * logp_nkl, -math.inf)
    seen_nl = scored_nkl.any(1)
    # Rows of all -inf would give NaN gradients through logsumexp; give them a finite dummy instead.
    log_terms_nkl = torch.where(seen_nl[:, None], log_terms_nkl, 0.0)
    per_token_nl = (torch.logsumexp(log_terms_nkl, dim=1) - math.log(draws)) / beta
    seen_sum_n = torch.where(seen_nl, per_token_nl, 0.0).sum(1)
    return seen_sum_n * lengths_n.to(seen_sum_n.dtype) / seen_nl.sum(1).clamp_min(1)


def decoding_orders(completion_mask_nl: Tensor, num_orders: int, settings: ProxySettings,
                    generator: torch.Generator) -> Tensor:
    """``step_nkl [B, K, G]``: the step at which each position is revealed; live tokens take steps
    ``0..L_n-1`` in a uniformly random order (``random``) or block by block with a random order
    inside each block (``block_random``); the EOS tail comes after them (never revealed in practice)."""
    live_nl = completion_mask_nl.bool().cpu()
    batch, gen_length = live_nl.shape
    keys_nkl = torch.rand(batch, num_orders, gen_length, generator=generator)
    if settings.masking == "block_random":
        keys_nkl = keys_nkl + (torch.arange(gen_length) // settings.block_length).float()
    keys_nkl = torch.where(live_nl[:, None], keys_nkl, keys_nkl + gen_length + 1.0)
    return _random_ranks(keys_nkl)


@torch.no_grad()
def order_log_probs(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                    step_nkl: Tensor, max_tokens_per_forward: int | None = None) -> Tensor:
    """``log p_sigma_k(x)`` ``[B, K]`` of the live tokens: decode along each order revealing one token
    per step (the EOS tail stays masked). One batched forward over ``B x K`` rows per step."""
    _check_batch(prompt_ids, prompt_attn, completion_ids)
    batch = completion_ids.shape[0]
    num_orders = step_nkl.shape[1]
    mask_nl = completion_mask(completion_ids, lm.eos_id)
    step_rl = step_nkl.to(completion_ids.device).flatten(0, 1)
    target_rl = completion_ids[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    prompt_rp = prompt_ids[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    attn_rp = prompt_attn[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    logp_rl = torch.zeros(step_rl.shape, dtype=torch.float32, device=completion_ids.device)
    live_rl = mask_nl.bool()[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    for step in range(int(mask_nl.sum(1).max())):
        noisy_rl = target_rl.masked_fill((step_rl >= step) | ~live_rl, lm.mask_id)  # not yet revealed
        logp_step_rl = token_log_probs(lm, prompt_rp, attn_rp, noisy_rl, target_rl, max_tokens_per_forward)
        logp_rl = torch.where(step_rl == step, logp_step_rl, logp_rl)
    return torch.where(live_rl, logp_rl, 0.0).sum(1).view(batch, num_orders)


def gap_lower_bound(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                    settings: ProxySettings, num_orders: int, seed: int) -> Tensor:
    """The drift monitor ``IW_K - ELBO_K`` ``[B]`` (float32, >= 0) over ``K = num_orders`` random orders.

    ``IW_K = log (1/K) sum_k p_sigma_k(x)`` and ``ELBO_K = (1/K) sum_k log p_sigma_k(x)`` from the same
    orders. ``E[ELBO_K] = ELBO`` exactly and ``ELBO <= E[IW_K] <= log pi`` with ``E[IW_K]`` rising
    to ``log pi`` as K grows, so the expectation lies in ``[0, log pi - ELBO]`` and tends to the gap.
    The prompt is never masked here and the EOS tail always is; orders follow ``settings.masking``
    (block by block for ``block_random``). Costs ``max_n L_n`` forwards of ``B x K`` rows.
    """
    if num_orders < 1:
        raise ValueError(f"gap_lower_bound: num_orders={num_orders} must be >= 1")
    _check_batch(prompt_ids, prompt_attn, completion_ids)
    orders = decoding_orders(completion_mask(completion_ids, lm.eos_id), num_orders, settings,
                             torch.Generator().manual_seed(int(seed)))
    log_p_nk = order_log_probs(lm, prompt_ids, prompt_attn, completion_ids, orders, settings.max_tokens_per_forward)
    iw_n = torch.logsumexp(log_p_nk, dim=1) - math.log(num_orders)
    return iw_n - log_p_nk.mean(1)


def _check_batch(prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor) -> None:
    if prompt_ids.ndim != 2 or completion_ids.ndim != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"expected prompt_ids [B, P] and completion_ids [B, G] with the same B, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}")
    if prompt_attn.shape != prompt_ids.shape:
        raise ValueError(f"prompt_attn {tuple(prompt_attn.shape)} must match prompt_ids {tuple(prompt_ids.shape)}")
    if completion_ids.shape[1] == 0:
        raise ValueError("completion_ids has no tokens (G = 0); nothing to score")
