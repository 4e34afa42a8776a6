"""Variational policy-gradient estimator losses and the DiPOD term.

Everything here is model-agnostic: tensors of likelihood proxies and advantages in, a scalar loss
(to minimise) plus a dict of float diagnostics out. Language models and flow policies compute the
proxies; this module never sees a model.

Shape names: ``N`` sequences/actions, ``K`` Monte-Carlo draws per sample, ``L`` completion tokens.
All arithmetic is float32 (or the input's wider float type).
"""

from __future__ import annotations

import torch
from torch import Tensor

Diagnostics = dict[str, float]

SPG_NEGATIVE_PROXIES = ("eubo", "elbo", "mix")


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _ratio_diagnostics(ratio: Tensor, clipped: Tensor, weights: Tensor | None = None) -> Diagnostics:
    ratio = ratio.detach()
    clipped = clipped.detach().to(ratio.dtype)
    if weights is None:
        clip_fraction = clipped.mean()
        ratio_mean = ratio.mean()
    else:
        weights = weights.detach().to(ratio.dtype)
        total = weights.sum().clamp_min(1.0)
        clip_fraction = (clipped * weights).sum() / total
        ratio_mean = (ratio * weights).sum() / total
        ratio = ratio[weights > 0] if bool((weights > 0).any()) else ratio
    return {
        "clip_ratio": float(clip_fraction),
        "ratio_mean": float(ratio_mean),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
    }


def ppo_clip_objective(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """Elementwise PPO surrogate ``min(r A, clip(r, 1-eps_low, 1+eps_high) A)`` (to maximise).

    Returns the objective and a boolean tensor marking where the clipped branch is active
    (where it is, the gradient with respect to the ratio is zero).
    """
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped = ratio * adv
    clipped = clipped_ratio * adv
    objective = torch.minimum(unclipped, clipped)
    return objective, clipped < unclipped


def d1_loss(
    logp_nl: Tensor,
    logp_old_nl: Tensor,
    adv_n: Tensor,
    mask_nl: Tensor,
    eps: float = 0.2,
    kl_beta: float = 0.0,
    logp_ref_nl: Tensor | None = None,
) -> tuple[Tensor, Diagnostics]:
    """diffu-GRPO (d1): token-level PPO clipping on one-step mean-field log-probs.

    ``loss = -1/N sum_n 1/|o_n| sum_l m_nl [ min(r_nl A_n, clip(r_nl) A_n) - kl_beta * KL_nl ]``
    with ``r_nl = exp(logp_nl - logp_old_nl)`` and the k3 estimator
    ``KL_nl = exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased for KL(pi || ref)).
    Shapes: logp [N, L], adv [N], mask [N, L] (1 on completion tokens).
    """
    # Padding may hold anything (even -inf); zero it before exp so that 0 * inf never makes a NaN.
    valid = mask_nl.bool()
    logp_nl = torch.where(valid, _as_float(logp_nl), 0.0)
    logp_old_nl = torch.where(valid, _as_float(logp_old_nl).detach(), 0.0)
    mask = mask_nl.to(logp_nl.dtype)
    adv = _as_float(adv_n).detach()[:, None]
    ratio = torch.exp(logp_nl - logp_old_nl)
    per_token, clipped = ppo_clip_objective(ratio, adv, eps, eps)
    info: Diagnostics = {}
    if kl_beta > 0.0:
        if logp_ref_nl is None:
            raise ValueError("d1_loss: kl_beta > 0 needs logp_ref_nl (reference log-probs); pass them or set kl_beta=0")
        delta = torch.where(valid, _as_float(logp_ref_nl).detach(), 0.0) - logp_nl
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token - kl_beta * kl
        info["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp_min(1.0))
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    loss = -per_seq.mean()
    info.update(_ratio_diagnostics(ratio, clipped, mask))
    return loss, info


def fpo_loss(elbo: Tensor, elbo_old: Tensor, adv_n: Tensor, eps: float = 0.2, kl_beta: float = 0.0,
             elbo_ref: Tensor | None = None) -> tuple[Tensor, Diagnostics]:
    """FPO in GRPO form: one PPO-clipped ratio per sample, ``r_n = exp(ELBO_n - ELBO_old_n)``.

    ``elbo`` may be [N] or [N, K]; draws are averaged into one ELBO estimate per sample first
    (the language experiments of FPO use a single sequence-level ratio).
    ``loss = -1/N sum_n min(r_n A_n, clip(r_n, 1-eps, 1+eps) A_n) + kl_beta/N sum_n (ELBO_n - ELBO_ref_n)``.
    The KL term is the released d1 fork's: a difference of ELBOs under the current and the
    reference weights. Minimising it LOWERS the ELBO, so it pushes against the DiPOD term
    (``-beta mean ELBO``): with the released 0.04 and 0.05 the net push on the ELBO is 0.01.
    """
    elbo_n = _as_float(elbo).reshape(elbo.shape[0], -1).mean(-1)
    elbo_old_n = _as_float(elbo_old).detach().reshape(elbo_old.shape[0], -1).mean(-1)
    ratio = torch.exp(elbo_n - elbo_old_n)
    objective, clipped = ppo_clip_objective(ratio, _as_float(adv_n).detach(), eps, eps)
    loss = -objective.mean()
    info = _ratio_diagnostics(ratio, clipped)
    if kl_beta < 0:
        raise ValueError(f"fpo_loss: kl_beta={kl_beta} must be >= 0")
    if kl_beta > 0:
        if elbo_ref is None:
            raise ValueError("fpo_loss: kl_beta > 0 needs elbo_ref (reference-model ELBOs); pass them or set kl_beta=0")
        kl = (elbo_n - _as_float(elbo_ref).detach().reshape(elbo_ref.shape[0], -1).mean(-1)).mean()
        loss = loss + kl_beta * kl
        info["kl"] = float(kl.detach())
    return loss, info


def clamp_above_straight_through(x: Tensor, max_value: float) -> Tensor:
    """Value ``min(x, max_value)``, gradient of the identity (so clamped draws still learn)."""
    return x - (x - x.clamp(max=max_value)).detach()


def fpo_plus_plus_loss(
    elbo_nk: Tensor,
    elbo_old_nk: Tensor,
    adv_n: Tensor,
    eps: float = 0.05,
    log_ratio_max: float = 3.0,
) -> tuple[Tensor, Diagnostics]:
    """FPO++: one ratio per Monte-Carlo draw with an asymmetric trust region.

    ``rho_nk = exp(min(ELBO_nk - ELBO_old_nk, log_ratio_max))`` (clamp from above, straight-through
    gradient). Where ``A_n >= 0`` the PPO-clipped surrogate ``min(rho A, clip(rho, 1-eps, 1+eps) A)``;
    where ``A_n < 0`` the SPO penalty ``psi = rho A - |A| / (2 eps) (rho - 1)^2``, whose gradient
    pulls rho back towards 1 instead of vanishing outside the trust region.
    ``loss = -1/(N K) sum_{n,k} objective_nk``.
    """
    elbo_nk, elbo_old_nk = _as_float(elbo_nk), _as_float(elbo_old_nk).detach()
    adv = _as_float(adv_n).detach()[:, None].expand_as(elbo_nk)
    log_ratio = clamp_above_straight_through(elbo_nk - elbo_old_nk, log_ratio_max)
    ratio = torch.exp(log_ratio)
    ppo, clipped = ppo_clip_objective(ratio, adv, eps, eps)
    spo = ratio * adv - adv.abs() / (2.0 * eps) * (ratio - 1.0) ** 2
    positive = adv >= 0
    objective = torch.where(positive, ppo, spo)
    outside = torch.where(positive, clipped, (ratio - 1.0).abs() > eps)
    info = _ratio_diagnostics(ratio, outside)
    info["log_ratio_clamped"] = float(((elbo_nk - elbo_old_nk).detach() > log_ratio_max).float().mean())
    return -objective.mean(), info


def spg_loss(
    adv_n: Tensor,
    elbo_n: Tensor,
    eubo_n: Tensor | None = None,
    negative_proxy: str = "mix",
    mix_weight: float = 0.5,
    lengths_n: Tensor | None = None,
) -> tuple[Tensor, Diagnostics]:
    """SPG (sandwiched policy gradient): ``loss = -sum_n A_n L_n / sum_n |o_n|``.

    ``L_n = ELBO_n`` where ``A_n > 0`` (maximising a lower bound raises log pi); where ``A_n < 0``
    ``L_n`` is the EUBO (``'eubo'``: minimising an upper bound lowers log pi), the ELBO (``'elbo'``),
    or ``w EUBO + (1 - w) ELBO`` (``'mix'``, default ``w = 0.5``). ``elbo_n``/``eubo_n`` are
    sequence-level sums over completion tokens, so dividing the batch sum by the total completion
    length weights each sequence's per-token bound by its length, as the official implementation
    does. Without ``lengths_n`` the loss is the plain mean ``-1/N sum_n A_n L_n``.
    """
    if negative_proxy not in SPG_NEGATIVE_PROXIES:
        raise ValueError(f"spg_loss: negative_proxy={negative_proxy!r}; choose one of {SPG_NEGATIVE_PROXIES}")
    if not 0.0 <= mix_weight <= 1.0:
        raise ValueError(f"spg_loss: mix_weight={mix_weight} must lie in [0, 1]")
    elbo_n = _as_float(elbo_n)
    adv = _as_float(adv_n).detach()
    if negative_proxy == "elbo":
        negative = elbo_n
    else:
        if eubo_n is None:
            raise ValueError(f"spg_loss: negative_proxy={negative_proxy!r} needs eubo_n; pass it or use 'elbo'")
        eubo_n = _as_float(eubo_n)
        negative = eubo_n if negative_proxy == "eubo" else mix_weight * eubo_n + (1.0 - mix_weight) * elbo_n
    proxy = torch.where(adv > 0, elbo_n, negative)
    total = adv.new_tensor(float(adv.numel())) if lengths_n is None else _as_float(lengths_n).sum().clamp_min(1.0)
    loss = -(adv * proxy).sum() / total
    info = {"frac_negative_adv": float((adv < 0).float().mean())}
    return loss, info


def justgrpo_loss(logp_nl: Tensor, logp_old_nl: Tensor, adv_n: Tensor, eps: float = 0.2) -> tuple[Tensor, Diagnostics]:
    """JustGRPO: token-level PPO clipping on the EXACT left-to-right log-probs of every completion token.

    ``loss = -1/(L n_valid) sum_{n,l} min(r_nl A_n, clip(r_nl, 1-eps, 1+eps) A_n)`` with
    ``r_nl = exp(logp_nl - logp_old_nl)``, ``L`` the completion length (every position is scored,
    the EOS padding after an answer too, as the release does) and ``n_valid`` the number of rows
    with a non-zero advantage (at least 1): the mean over rows divided by the share of rows that
    carry a signal (LeapLabTHU/JustGRPO grpo.py ``logprob_loss``, ``scale = 1 / gen_length /
    valid_samples``). On-policy (``logp_old = logp.detach()``, the release's one update) the ratio
    is 1 and the gradient is ``-A_n grad logp_nl / (L n_valid)``. Shapes: logp [N, L], adv [N].
    """
    logp_nl = _as_float(logp_nl)
    ratio = torch.exp(logp_nl - _as_float(logp_old_nl).detach())
    adv = _as_float(adv_n).detach()
    per_token, clipped = ppo_clip_objective(ratio, adv[:, None], eps, eps)
    valid = (adv != 0).sum().clamp_min(1).to(logp_nl.dtype)
    loss = -per_token.sum() / (logp_nl.shape[1] * valid)
    info = _ratio_diagnostics(ratio, clipped)
    info["frac_valid_samples"] = float((adv != 0).float().mean())
    return loss, info


def dipod_term(elbo: Tensor, beta: float, lengths_n: Tensor | None = None) -> Tensor:
    """The DiPOD tightening term (Eq. 7): ``-beta * mean ELBO`` over the same rollout batch.

    Adding its gradient, ``beta * grad ELBO``, to every update keeps the ELBO tight on-policy.
    ``elbo`` may be [N] or [N, K] (draws are averaged). With ``lengths_n`` the mean is the
    length-weighted one, ``-beta * sum_n ELBO_n / sum_n |o_n|``, matching ``spg_loss``.
    Returns a zero that still carries the graph when ``beta == 0``.
    """
    if beta < 0:
        raise ValueError(f"dipod_term: beta={beta} must be >= 0 (0 turns DiPOD off)")
    elbo_n = _as_float(elbo).reshape(elbo.shape[0], -1).mean(-1)
    if lengths_n is None:
        return -beta * elbo_n.mean()
    return -beta * elbo_n.sum() / _as_float(lengths_n).sum().clamp_min(1.0)
