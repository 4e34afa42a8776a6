"""The likelihood proxies of the masked processes (LLaDA, Dream): mask draws, ELBO, SPG's EUBO surrogate,
d1's mean-field log-probs, decoding orders and the IW_K drift monitor. The processes' facts and the
formulas are in ``dipod.lm.proxies``' docstring and docs/lm_proxies.md; ``settings`` is a
``dipod.lm.proxies.ProxySettings`` everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dipod.lm.processes.base import Proxies

if TYPE_CHECKING:
    from dipod.lm.model import MaskedDiffusionLM


@dataclass(frozen=True)
class ForwardProcess:
    """The released facts of one forward process (the sampling itself is ``draw_masks``)."""

    name: str
    scores_eos: bool  # the first EOS is a live, scored token
    masks_tail: bool  # positions after the first EOS are masked in every copy
    default_draws: int  # the release's number of draws
    reseeds_per_iteration: bool  # the release draws new masks for every inner iteration
    source: str


PROCESSES = {
    "block_random": ForwardProcess("block_random", scores_eos=True, masks_tail=True, default_draws=2,
                                   reseeds_per_iteration=True,
                                   source="language/SPG/spg/spg_trainer.py forward_process (num_t 2, random_masking)"),
    "random": ForwardProcess("random", scores_eos=False, masks_tail=False, default_draws=4,
                             reseeds_per_iteration=False,
                             source="language/d1/diffu-grpo/diffu_grpo_trainer.py _get_sequence_elbo "
                                    "(elbo_num_samples 4, stored randomness)"),
    # Not released: kept because it halves the per-draw std of `random` and is unbiased for the
    # any-order ELBO (docs/lm_proxies.md, measured).
    "unbiased_random": ForwardProcess("unbiased_random", scores_eos=True, masks_tail=True, default_draws=2,
                                      reseeds_per_iteration=False, source="dipod (no release)"),
}
MASKINGS = tuple(PROCESSES)


@dataclass
class ProxySettings:
    """How the likelihood proxies are estimated (defaults: SPG's released block_random process)."""

    num_draws: int | None = None  # None: the process's released count (block_random 2, random 4)
    masking: str = "block_random"
    min_t: float = 0.0
    max_t: float = 1.0
    block_length: int = 32
    p_mask_prompt: float = 0.0
    eubo_beta: float = 1.5
    max_tokens_per_forward: int | None = None

    def __post_init__(self) -> None:
        if self.masking not in PROCESSES:
            raise ValueError(f"ProxySettings: masking={self.masking!r}; choose one of {MASKINGS}")
        if self.num_draws is None:
            self.num_draws = PROCESSES[self.masking].default_draws
        if self.num_draws < 1:
            raise ValueError(f"ProxySettings: num_draws={self.num_draws} must be >= 1")
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

    @property
    def process(self) -> ForwardProcess:
        return PROCESSES[self.masking]


@dataclass
class MaskDraw:
    """The random part of one proxy call (all on the CPU, from one generator)."""

    masked_nkl: Tensor  # bool [B, K, G]: completion positions replaced by the mask token
    scored_nkl: Tensor  # bool [B, K, G]: positions whose log-probs enter the estimators
    weight_nk: Tensor  # float32 [B, K]: importance weight of each draw
    prompt_masked_ncp: Tensor  # bool [B, K + 1, P]: prompt positions masked; copy K is the mean-field one

    @classmethod
    def from_masks(cls, masked_nkl: Tensor, live_nl: Tensor, prompt_masked_ncp: Tensor) -> "MaskDraw":
        """Both released processes score every masked live token with weight ``L_n / max(|scored|, 1)``
        (for ``random`` ``|scored| = n``); this is the one place that rule lives, so a mask set taken
        from the released code (benchmarks/released_parity.py) is scored exactly as ours."""
        live_nl = live_nl.bool().to(masked_nkl.device)
        scored_nkl = masked_nkl & live_nl[:, None]
        weight_nk = live_nl.sum(1)[:, None].float() / scored_nkl.sum(-1).clamp(min=1).float()
        return cls(masked_nkl, scored_nkl, weight_nk, prompt_masked_ncp)


def completion_mask(completion_ids: Tensor, eos_id: int, include_eos: bool = True) -> Tensor:
    """float32 ``[B, G]``: 1 before each row's first EOS, and on it when ``include_eos`` (all ones
    without EOS)."""
    is_eos = completion_ids == eos_id
    gen_length = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), gen_length)
    positions = torch.arange(gen_length, device=completion_ids.device)[None]
    live = positions <= first_eos[:, None] if include_eos else positions < first_eos[:, None]
    return live.float()


def live_mask(completion_ids: Tensor, eos_id: int, settings: ProxySettings) -> Tensor:
    """The live tokens of ``settings``' process (float32 ``[B, G]``)."""
    return completion_mask(completion_ids, eos_id, include_eos=settings.process.scores_eos)


def _random_ranks(scores: Tensor) -> Tensor:
    """Rank of every entry along the last dim (0 = smallest): a uniform random permutation."""
    return scores.argsort(-1).argsort(-1)


def _uniform_subset(candidates_nkl: Tensor, count_nk: Tensor, scores_nkl: Tensor) -> Tensor:
    """A uniformly random subset of ``count_nk`` of the candidate positions (bool, same shape)."""
    ranks_nkl = _random_ranks(torch.where(candidates_nkl, scores_nkl, 2.0))  # non-candidates rank last
    return candidates_nkl & (ranks_nkl < count_nk[..., None])


def draw_masks(prompt_attn: Tensor, live_nl: Tensor, settings: ProxySettings,
               generator: torch.Generator) -> MaskDraw:
    """Sample the K draws of ``settings.masking`` (and the mean-field copy's prompt mask).

    ``live_nl`` is ``live_mask(...)`` of the same settings. Every call consumes the generator in
    the same order: ``u [B, K]``, ``block keys [B, ceil(K / nb), nb]``, ``position scores [B, K, G]``, ``p_mask_prompt
    uniforms [B, K + 1, P + G]``.
    """
    batch, prompt_len = prompt_attn.shape
    gen_length = live_nl.shape[1]
    draws = settings.num_draws
    u_nk = torch.rand(batch, draws, generator=generator)
    num_blocks = -(-gen_length // settings.block_length)
    perms = -(-draws // num_blocks)  # one block permutation per num_blocks draws (one, as released)
    block_keys_nqb = torch.rand(batch, perms, num_blocks, generator=generator)
    scores_nkl = torch.rand(batch, draws, gen_length, generator=generator)
    prompt_u_ncx = torch.rand(batch, draws + 1, prompt_len + gen_length, generator=generator)

    live_nl = live_nl.bool().cpu()
    length_n = live_nl.sum(1)
    real_prompt_ncp = prompt_attn.bool().cpu()[:, None, :].expand(-1, draws + 1, -1)
    prompt_masked_ncp = (prompt_u_ncx[..., :prompt_len] < settings.p_mask_prompt) & real_prompt_ncp
    if settings.masking in ("random", "unbiased_random"):
        t_nk = settings.min_t + (settings.max_t - settings.min_t) * u_nk
        if settings.masking == "random":
            num_masked_nk = (t_nk * length_n[:, None].float()).long()  # floor, as the release
        else:
            num_masked_nk = torch.minimum(torch.ceil(t_nk * length_n[:, None]).long().clamp(min=1), length_n[:, None])
        masked_nkl = _uniform_subset(live_nl[:, None].expand(-1, draws, -1), num_masked_nk, scores_nkl)
        if settings.process.masks_tail:
            masked_nkl = masked_nkl | ~live_nl[:, None]
        return MaskDraw.from_masks(masked_nkl, live_nl, prompt_masked_ncp)

    block = settings.block_length
    num_live_blocks_n = (length_n - 1).div(block, rounding_mode="floor") + 1
    block_nk = block_keys_nqb.argsort(-1).flatten(1)[:, :draws] % num_live_blocks_n[:, None]
    block_live_nk = torch.minimum(length_n[:, None] - block * block_nk, torch.tensor(block))
    low_nk = (block_live_nk.float() * settings.min_t).long().clamp(min=1)
    high_nk = torch.maximum(torch.minimum((block_live_nk.float() * settings.max_t).long(), block_live_nk), low_nk)
    count_nk = low_nk + (u_nk * (high_nk - low_nk + 1).float()).long().clamp(max=high_nk - low_nk)

    block_of_l = torch.arange(gen_length) // block
    in_block_nkl = (block_of_l == block_nk[..., None]) & live_nl[:, None]
    chosen_nkl = _uniform_subset(in_block_nkl, count_nk, scores_nkl)
    before_nkl = block_of_l < block_nk[..., None]
    extra_nkl = before_nkl & (prompt_u_ncx[:, :draws, prompt_len:] < settings.p_mask_prompt)
    masked_nkl = chosen_nkl | extra_nkl | (block_of_l > block_nk[..., None]) | ~live_nl[:, None]
    return MaskDraw.from_masks(masked_nkl, live_nl, prompt_masked_ncp)


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
        logits_rlv = lm.logits(ids_rt[start:start + chunk], attn_rt[start:start + chunk], first=prompt_len)
        target = targets_rl[start:start + chunk, :, None]
        out.append((logits_rlv.gather(-1, target) - logits_rlv.logsumexp(-1, keepdim=True)).squeeze(-1))
    return torch.cat(out, dim=0)


def masked_proxies(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                   settings: ProxySettings, seed: int, *, meanfield: bool = False) -> Proxies:
    """ELBO (per draw, mean, per token), EUBO surrogate and, with ``meanfield``, d1's per-token
    log-probs, all from one batched forward over ``B x (K [+1])`` masked copies."""
    mask_nl = live_mask(completion_ids, lm.eos_id, settings)
    draw = draw_masks(prompt_attn, mask_nl, settings, torch.Generator().manual_seed(int(seed)))
    return score_draw(lm, prompt_ids, prompt_attn, completion_ids, draw, settings, meanfield=meanfield)


def score_draw(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
               draw: MaskDraw, settings: ProxySettings, *, meanfield: bool = False) -> Proxies:
    """The proxies of one given ``draw`` (its K copies, plus the mean-field copy when asked)."""
    batch, gen_length = completion_ids.shape
    device = completion_ids.device
    mask_nl = live_mask(completion_ids, lm.eos_id, settings)
    copies = draw.masked_nkl.shape[1] + int(meanfield)

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
    logp_nkl = logp_ncl[:, :draw.masked_nkl.shape[1]]
    scored_nkl = draw.scored_nkl.to(device)
    weight_nk = draw.weight_nk.to(device)
    elbo_nk = weight_nk * torch.where(scored_nkl, logp_nkl, 0.0).sum(-1)
    elbo_n = elbo_nk.mean(1)
    return Proxies(
        elbo_nk=elbo_nk, elbo_n=elbo_n, elbo_per_token_n=elbo_n / lengths_n.clamp_min(1.0),
        eubo_n=eubo_surrogate(logp_nkl, scored_nkl, weight_nk, settings.eubo_beta, lengths_n),
        completion_mask_nl=mask_nl, lengths_n=lengths_n,
        meanfield_logp_nl=logp_ncl[:, -1] if meanfield else None)


def eubo_surrogate(logp_nkl: Tensor, scored_nkl: Tensor, weight_nk: Tensor, beta: float,
                   lengths_n: Tensor) -> Tensor:
    """``(L_n / S_n) (1/beta) sum_l log((1/K) sum_k w_nk scored_nkl p_nkl^beta)`` -> ``[B]``, the sum
    over the ``S_n`` tokens scored in at least one draw, rescaled to the ``L_n`` live tokens (SPG).
    Computed in log space (logsumexp over draws), so a tiny ``p^beta`` never underflows to 0."""
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
    inside each block (``block_random``); the other positions come after them (never revealed)."""
    live_nl = completion_mask_nl.bool().cpu()
    batch, gen_length = live_nl.shape
    keys_nkl = torch.rand(batch, num_orders, gen_length, generator=generator)
    if settings.masking == "block_random":
        keys_nkl = keys_nkl + (torch.arange(gen_length) // settings.block_length).float()
    keys_nkl = torch.where(live_nl[:, None], keys_nkl, keys_nkl + gen_length + 1.0)
    return _random_ranks(keys_nkl)


@torch.no_grad()
def order_log_probs(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                    step_nkl: Tensor, max_tokens_per_forward: int | None = None,
                    settings: ProxySettings | None = None) -> Tensor:
    """``log p_sigma_k(x)`` ``[B, K]`` of the live tokens of ``settings``' process (default SPG's):
    decode along each order revealing one token per step; the positions after the live tokens stay
    masked (``block_random``) or visible (``random``), as in that process. One batched forward over
    ``B x K`` rows per step."""
    check_batch(prompt_ids, prompt_attn, completion_ids)
    settings = settings or ProxySettings()
    batch = completion_ids.shape[0]
    num_orders = step_nkl.shape[1]
    mask_nl = live_mask(completion_ids, lm.eos_id, settings)
    step_rl = step_nkl.to(completion_ids.device).flatten(0, 1)
    target_rl = completion_ids[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    prompt_rp = prompt_ids[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    attn_rp = prompt_attn[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    logp_rl = torch.zeros(step_rl.shape, dtype=torch.float32, device=completion_ids.device)
    live_rl = mask_nl.bool()[:, None].expand(-1, num_orders, -1).flatten(0, 1)
    hidden_rl = ~live_rl if settings.process.masks_tail else torch.zeros_like(live_rl)
    for step in range(int(mask_nl.sum(1).max())):
        noisy_rl = target_rl.masked_fill(((step_rl >= step) & live_rl) | hidden_rl, lm.mask_id)  # not yet revealed
        logp_step_rl = token_log_probs(lm, prompt_rp, attn_rp, noisy_rl, target_rl, max_tokens_per_forward)
        logp_rl = torch.where(step_rl == step, logp_step_rl, logp_rl)
    return torch.where(live_rl, logp_rl, 0.0).sum(1).view(batch, num_orders)


def masked_gap_lower_bound(lm: MaskedDiffusionLM, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                           settings: ProxySettings, num_orders: int, seed: int) -> Tensor:
    """The drift monitor ``IW_K - ELBO_K`` ``[B]`` (float32, >= 0) over ``K = num_orders`` random orders.

    ``IW_K = log (1/K) sum_k p_sigma_k(x)`` and ``ELBO_K = (1/K) sum_k log p_sigma_k(x)`` from the same
    orders. ``E[ELBO_K]`` is the any-order ELBO of the live tokens and ``E[IW_K]`` rises with K to
    ``log pi``, so the expectation lies in ``[0, log pi - ELBO]`` and tends to the gap. The prompt is
    never masked here; live tokens and the tail follow ``settings.masking`` (block by block for
    ``block_random``). Costs ``max_n L_n`` forwards of ``B x K`` rows.
    """
    orders = decoding_orders(live_mask(completion_ids, lm.eos_id, settings), num_orders, settings,
                             torch.Generator().manual_seed(int(seed)))
    log_p_nk = order_log_probs(lm, prompt_ids, prompt_attn, completion_ids, orders, settings.max_tokens_per_forward,
                               settings)
    iw_n = torch.logsumexp(log_p_nk, dim=1) - math.log(num_orders)
    return iw_n - log_p_nk.mean(1)


def check_batch(prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor) -> None:
    if prompt_ids.ndim != 2 or completion_ids.ndim != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"expected prompt_ids [B, P] and completion_ids [B, G] with the same B, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}")
    if prompt_attn.shape != prompt_ids.shape:
        raise ValueError(f"prompt_attn {tuple(prompt_attn.shape)} must match prompt_ids {tuple(prompt_ids.shape)}")
    if completion_ids.shape[1] == 0:
        raise ValueError("completion_ids has no tokens (G = 0); nothing to score")
