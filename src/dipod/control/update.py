"""One on-policy update: FPO++ (+ the DiPOD term) for flow actors, clipped PPO for Gaussian actors.

Both run the same loop (``run_update``), FPO++'s released order: advantages normalised over the
whole batch and clamped to ``+-advantage_clip`` (FPO++: 100, so in practice only a guard), ONE
random permutation cut into ``minibatches`` and reused by every epoch (``reshuffle_each_epoch``
draws a new one per epoch instead), ``policy loss + value_coef * value loss`` per minibatch with
global gradient-norm clipping. The value loss is ``mean (V - R)^2`` (rsl-rl's and FPO++'s scale;
``value_clip > 0`` takes PPO's clipped form). A minibatch whose loss or gradient is not finite is
skipped with a log line; the weights never take a NaN step.

FPO++ policy loss (per Monte-Carlo draw k of sample n, draws fixed for the whole update):
- ``CFM_nk`` from ``FlowActor.cfm_terms``; ``cfm_clamp > 0`` clamps old and new CFM losses at that
  value (FPO++ locomotion: 20); where ``A_n < 0`` the NEW CFM loss is clamped at
  ``cfm_clamp_negative`` (FPO++: 20): pushing the CFM loss of a bad action up has no natural end,
  and the clamp stops its gradient once it is large;
- ``dipod.objectives.fpo_plus_plus_loss`` on ``ELBO = -CFM``: per-draw ratios, straight-through
  log-ratio clamp at ``log_ratio_max`` (FPO++: 10; tracking 3), ASPO trust region ``clip_eps``;
- ``- knn_entropy_coef * H_kNN`` of the predicted clean actions of the K draws (``entropy.py``);
- DiPOD (Algorithm 2): ``+ dipod.objectives.dipod_term(ELBO_nk, beta)`` on the unclamped ELBO of
  the same minibatch (one shared forward pass), which keeps the bound tight on-policy.

Learning-rate schedules (the rate lives in the optimizer's param groups, so in checkpoints):
- ``kl``: FPO++'s rule, before every minibatch step: with ``kl`` the minibatch's KL measure
  (flows: mean squared change of the predicted noise end ``x_t - t v`` of every draw since the
  rollout, FPO++'s ``x1_pred``; Gaussian: the k3 estimate ``E[(r - 1) - log r]``), divide the rate by
  1.5 when ``kl > 2 * desired_kl``, multiply it by 1.5 when ``0 < kl < desired_kl / 2``, within
  ``[lr_min, lr_max]`` (FPO++: 1e-5, 1e-2);
- ``clip_fraction``: after every epoch, the same factors on the fraction of draws outside the trust
  region against ``target_clip_fraction``;
- ``fixed``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dipod.config import require
from dipod.control.entropy import knn_entropy
from dipod.objectives import dipod_term, fpo_plus_plus_loss, ppo_clip_objective

Diagnostics = dict[str, float]
LR_SCHEDULES = ("fixed", "kl", "clip_fraction")
log = logging.getLogger(__name__)


@dataclass
class UpdateSettings:
    """Hyper-parameters of one update (see the module docstring). Defaults: FPO++'s released values."""

    epochs: int = 16
    minibatches: int = 6
    reshuffle_each_epoch: bool = False
    clip_eps: float = 0.05
    log_ratio_max: float = 10.0
    cfm_clamp: float = 0.0
    cfm_clamp_negative: float = 20.0
    knn_entropy_coef: float = 0.0
    knn_entropy_k: int = 5
    dipod_beta: float = 0.0
    value_coef: float = 1.0
    value_clip: float = 0.0
    max_grad_norm: float = 1.0
    normalize_advantages: bool = True
    advantage_clip: float = 100.0
    lr_schedule: str = "fixed"
    desired_kl: float = 1e-4
    target_clip_fraction: float = 0.2
    lr_min: float = 1e-5
    lr_max: float = 1e-2

    def __post_init__(self) -> None:
        require(self.lr_schedule in LR_SCHEDULES, f"lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        for name in ("epochs", "minibatches", "knn_entropy_k"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("log_ratio_max", "cfm_clamp_negative", "max_grad_norm", "value_coef", "desired_kl",
                     "target_clip_fraction", "lr_min"):
            require(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        for name in ("cfm_clamp", "knn_entropy_coef", "dipod_beta", "value_clip", "advantage_clip"):
            require(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        require(0 < self.clip_eps < 1, f"clip_eps={self.clip_eps} must lie in (0, 1) (FPO++: 0.05, tracking 0.01)")
        require(self.lr_min <= self.lr_max, f"lr_min={self.lr_min} must not exceed lr_max={self.lr_max}")
        finite = [name for name in ("clip_eps", "log_ratio_max", "cfm_clamp", "cfm_clamp_negative", "knn_entropy_coef",
                                    "dipod_beta", "value_coef", "value_clip", "max_grad_norm", "advantage_clip",
                                    "desired_kl", "lr_max") if not math.isfinite(getattr(self, name))]
        require(not finite, f"{finite} must be finite numbers")


@dataclass
class RolloutBatch:
    """A flattened rollout (``B = T * num_envs`` samples) with everything the update needs.

    Flow actors fill ``eps``/``t``/``elbo_old``/``noise_pred_old`` (the fixed Monte-Carlo draws, their
    ELBOs and predicted noise ends under the rollout policy); Gaussian actors fill ``logp_old``.
    """

    obs: Tensor  # [B, D]
    actions: Tensor  # [B, A], normalised action space, unclipped
    advantages: Tensor  # [B]
    returns: Tensor  # [B]
    values: Tensor  # [B], critic values at rollout time
    eps: Tensor | None = None  # [B, K, A]
    t: Tensor | None = None  # [B, K]
    elbo_old: Tensor | None = None  # [B, K]
    noise_pred_old: Tensor | None = None  # [B, K, A]
    logp_old: Tensor | None = None  # [B]
    critic_obs: Tensor | None = None  # [B, Dc] when the critic sees other (e.g. privileged) observations

    def __len__(self) -> int:
        return self.obs.shape[0]


def prepare_advantages(adv_b: Tensor, normalize: bool, clip: float) -> Tensor:
    """Batch-normalise (optional) and clamp advantages to ``[-clip, clip]`` (``clip <= 0``: no clamp)."""
    adv = adv_b.float()
    if normalize and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv.clamp(-clip, clip) if clip > 0 else adv


def value_loss(values_b: Tensor, values_old_b: Tensor, returns_b: Tensor, clip: float) -> Tensor:
    """``mean (V - R)^2``; with ``clip > 0`` PPO's ``mean max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2)``."""
    unclipped = (values_b - returns_b).pow(2)
    if clip <= 0:
        return unclipped.mean()
    clipped = (values_old_b + (values_b - values_old_b).clamp(-clip, clip) - returns_b).pow(2)
    return torch.maximum(unclipped, clipped).mean()


def minibatch_order(n: int, settings: UpdateSettings, generator: torch.Generator) -> list[list[Tensor]]:
    """Index sets of every epoch's minibatches: one permutation for all epochs (FPO++), or one per epoch."""
    size = n // settings.minibatches
    if size < 1:
        raise ValueError(f"update: {n} samples cannot fill {settings.minibatches} minibatches; "
                         "lower minibatches or collect more steps per iteration")
    epochs = []
    perm = torch.randperm(n, generator=generator)
    for epoch in range(settings.epochs):
        if epoch and settings.reshuffle_each_epoch:
            perm = torch.randperm(n, generator=generator)
        epochs.append([perm[i * size:(i + 1) * size] for i in range(settings.minibatches)])
    return epochs


def adapt_lr(lr: float, measure: float, target: float, settings: UpdateSettings, zero_counts: bool = False) -> float:
    """FPO++'s step rule: / 1.5 above ``2 * target``, * 1.5 below ``target / 2``, clamped to ``[lr_min, lr_max]``.

    A measure of exactly 0 leaves the rate alone unless ``zero_counts`` (FPO++'s KL rule: the first
    minibatch of an update is scored before any step, so its KL is 0 by construction).
    """
    if measure > 2.0 * target:
        lr = max(settings.lr_min, lr / 1.5)
    elif (zero_counts or measure > 0.0) and measure < 0.5 * target:
        lr = min(settings.lr_max, lr * 1.5)
    return lr


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def mean_cfm_loss(actor: nn.Module, obs: Tensor, actions: Tensor, eps: Tensor, t: Tensor, chunk: int = 4096,
                  normalized: bool = False) -> float:
    """Mean per-draw CFM loss of (obs, action) pairs under ``actor`` (the tightness proxy), chunked."""
    total = 0.0
    for start in range(0, obs.shape[0], chunk):
        sl = slice(start, start + chunk)
        total += float(actor.cfm_loss(obs[sl], actions[sl], eps[sl], t[sl], normalized).sum())
    return total / max(eps.shape[0] * eps.shape[1], 1)


@torch.no_grad()
def rollout_proxies(actor: nn.Module, obs: Tensor, actions: Tensor, eps: Tensor, t: Tensor,
                    chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """``ELBO_old [B, K]`` and predicted noise ends ``[B, K, A]`` of a rollout under ``actor`` (no graph)."""
    parts = [actor.cfm_terms(obs[s:s + chunk], actions[s:s + chunk], eps[s:s + chunk], t[s:s + chunk])
             for s in range(0, obs.shape[0], chunk)]
    return -torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])


MinibatchLoss = Callable[[Tensor, Tensor], tuple[Tensor, Diagnostics]]


def run_update(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, batch: RolloutBatch, critic: nn.Module,
               settings: UpdateSettings, generator: torch.Generator, policy_loss: MinibatchLoss) -> Diagnostics:
    """The shared epochs x minibatches loop; ``policy_loss(idx, adv_mb)`` gives the actor's loss and a ``kl`` entry."""
    adv = prepare_advantages(batch.advantages, settings.normalize_advantages, settings.advantage_clip)
    critic_obs = batch.obs if batch.critic_obs is None else batch.critic_obs
    sums: dict[str, float] = {}
    count = skipped = 0
    for epoch_idx in minibatch_order(len(batch), settings, generator):
        epoch_clip = 0.0
        for idx in epoch_idx:
            loss_pi, info = policy_loss(idx, adv[idx])
            if settings.lr_schedule == "kl":  # FPO++: adapt before this minibatch's step, from its own KL measure
                _set_lr(optimizer, adapt_lr(optimizer.param_groups[0]["lr"], info["kl"], settings.desired_kl, settings))
            loss_v = value_loss(critic(critic_obs[idx]), batch.values[idx], batch.returns[idx], settings.value_clip)
            loss = loss_pi + settings.value_coef * loss_v
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                skipped += 1
                log.warning("update: skipped a minibatch with non-finite loss %s / gradient norm %s (policy %s, value %s)",
                            float(loss), float(grad_norm), float(loss_pi), float(loss_v))
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            info = {**info, "policy_loss": float(loss_pi.detach()), "value_loss": float(loss_v.detach()),
                    "grad_norm": float(grad_norm)}
            for key, value in info.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            epoch_clip += info["clip_ratio"]
        if settings.lr_schedule == "clip_fraction":
            lr = adapt_lr(optimizer.param_groups[0]["lr"], epoch_clip / len(epoch_idx), settings.target_clip_fraction,
                          settings, zero_counts=True)
            _set_lr(optimizer, lr)
    out = {key: value / max(count, 1) for key, value in sums.items()}
    out["lr"] = optimizer.param_groups[0]["lr"]
    out["skipped_minibatches"] = float(skipped)
    return out


def fpo_plus_plus_update(actor: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                         settings: UpdateSettings, generator: torch.Generator) -> Diagnostics:
    """FPO++ (+ DiPOD when ``settings.dipod_beta > 0``) on a flow-actor rollout; returns mean diagnostics.

    ``batch`` must carry ``eps``, ``t``, ``elbo_old`` and ``noise_pred_old`` (``rollout_proxies``).
    Actor and critic parameters must both be in ``optimizer``.
    """
    if batch.eps is None or batch.t is None or batch.elbo_old is None or batch.noise_pred_old is None:
        raise ValueError("fpo_plus_plus_update: the batch needs eps, t, elbo_old and noise_pred_old "
                         "(the rollout's fixed draws, from rollout_proxies)")

    def policy_loss(idx: Tensor, adv_mb: Tensor) -> tuple[Tensor, Diagnostics]:
        cfm_nk, action_pred, noise_pred = actor.cfm_terms(batch.obs[idx], batch.actions[idx], batch.eps[idx], batch.t[idx])
        cfm_old = -batch.elbo_old[idx]
        cfm_new = cfm_nk
        if settings.cfm_clamp > 0:
            cfm_old, cfm_new = cfm_old.clamp(max=settings.cfm_clamp), cfm_new.clamp(max=settings.cfm_clamp)
        cfm_new = torch.where((adv_mb < 0)[:, None], cfm_new.clamp(max=settings.cfm_clamp_negative), cfm_new)
        loss, info = fpo_plus_plus_loss(-cfm_new, -cfm_old, adv_mb, settings.clip_eps, settings.log_ratio_max)
        if settings.knn_entropy_coef > 0:
            entropy = knn_entropy(action_pred, settings.knn_entropy_k)
            loss = loss - settings.knn_entropy_coef * entropy
            info["knn_entropy"] = float(entropy.detach())
        if settings.dipod_beta > 0:
            term = dipod_term(-cfm_nk, settings.dipod_beta)
            loss = loss + term
            info["dipod_loss"] = float(term.detach())
        info["cfm_loss"] = float(cfm_nk.detach().mean())
        info["kl"] = float((noise_pred.detach() - batch.noise_pred_old[idx]).pow(2).mean())
        return loss, info

    params = [p for p in list(actor.parameters()) + list(critic.parameters()) if p.requires_grad]
    return run_update(params, optimizer, batch, critic, settings, generator, policy_loss)


def gaussian_ppo_update(actor: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                        settings: UpdateSettings, generator: torch.Generator) -> Diagnostics:
    """Clipped PPO for a ``GaussianActor`` (exact log-likelihood ratios); ``batch.logp_old`` required."""
    if batch.logp_old is None:
        raise ValueError("gaussian_ppo_update: the batch needs logp_old (log-probs at rollout time)")

    def policy_loss(idx: Tensor, adv_mb: Tensor) -> tuple[Tensor, Diagnostics]:
        log_ratio = actor.log_prob(batch.obs[idx], batch.actions[idx]) - batch.logp_old[idx]
        ratio = torch.exp(log_ratio)
        objective, clipped = ppo_clip_objective(ratio, adv_mb, settings.clip_eps, settings.clip_eps)
        kl = float(((ratio - 1.0) - log_ratio).detach().mean())
        return -objective.mean(), {"clip_ratio": float(clipped.float().mean()), "ratio_mean": float(ratio.detach().mean()),
                                   "action_std": float(actor.log_std.detach().exp().mean()), "kl": kl}

    params = [p for p in list(actor.parameters()) + list(critic.parameters()) if p.requires_grad]
    return run_update(params, optimizer, batch, critic, settings, generator, policy_loss)
