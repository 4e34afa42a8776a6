"""One on-policy update: FPO++ (+ the DiPOD term) for flow actors, clipped PPO for Gaussian actors.

Both run the same loop: advantages normalised over the whole batch and clamped, then
``epochs x minibatches`` AdamW steps on ``policy loss + value_coef * clipped value loss`` with
global gradient-norm clipping, and an optional KL-free adaptive learning rate.

FPO++ policy loss (per Monte-Carlo draw k of sample n, draws fixed for the whole update):
- ``ELBO_nk = -CFM_nk`` from ``FlowActor.cfm_elbo``; where ``A_n < 0`` the CFM loss is clamped at
  ``cfm_clamp_negative`` (old and new alike, so the ratio starts at 1): pushing the CFM loss of a
  bad action up has no natural end, and the clamp stops the gradient once it is large;
- ``dipod.objectives.fpo_plus_plus_loss``: per-draw ratios, log-ratio clamp, ASPO trust region;
- DiPOD (Algorithm 2): ``+ dipod.objectives.dipod_term(ELBO_nk, beta)`` on the unclamped ELBO of
  the same minibatch (one shared forward pass), which keeps the bound tight on-policy.

Adaptive learning rate (``lr_schedule='adaptive'``): flow policies have no tractable KL, so after
every epoch the rate is divided by 1.5 when the fraction of draws outside the trust region
exceeds ``2 * target_clip_fraction`` and multiplied by 1.5 when it is below half the target,
within ``[lr_min, lr_max]``. It stays in the optimizer's param groups (and so in checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dipod.objectives import dipod_term, fpo_plus_plus_loss, ppo_clip_objective

Diagnostics = dict[str, float]


@dataclass
class UpdateSettings:
    """Hyper-parameters of one update (see the module docstring)."""

    epochs: int = 10
    minibatches: int = 32
    clip_eps: float = 0.05
    log_ratio_max: float = 3.0
    cfm_clamp_negative: float = 5.0
    dipod_beta: float = 0.0
    value_coef: float = 0.5
    value_clip: float = 0.2
    max_grad_norm: float = 1.0
    normalize_advantages: bool = True
    advantage_clip: float = 5.0
    lr_schedule: str = "fixed"
    target_clip_fraction: float = 0.2
    lr_min: float = 1e-5
    lr_max: float = 1e-3


@dataclass
class RolloutBatch:
    """A flattened rollout (``B = T * num_envs`` samples) with everything the update needs.

    Flow actors fill ``eps``/``t``/``elbo_old`` (the fixed Monte-Carlo draws and their ELBOs under
    the rollout policy); Gaussian actors fill ``logp_old``.
    """

    obs: Tensor  # [B, D]
    actions: Tensor  # [B, A], normalised action space, unclipped
    advantages: Tensor  # [B]
    returns: Tensor  # [B]
    values: Tensor  # [B], critic values at rollout time
    eps: Tensor | None = None  # [B, K, A]
    t: Tensor | None = None  # [B, K]
    elbo_old: Tensor | None = None  # [B, K]
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


def clipped_value_loss(values_b: Tensor, values_old_b: Tensor, returns_b: Tensor, clip: float) -> Tensor:
    """PPO's value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-clip) - R)^2)`` (``clip <= 0``: plain MSE)."""
    unclipped = (values_b - returns_b).pow(2)
    if clip <= 0:
        return 0.5 * unclipped.mean()
    clipped = (values_old_b + (values_b - values_old_b).clamp(-clip, clip) - returns_b).pow(2)
    return 0.5 * torch.maximum(unclipped, clipped).mean()


@torch.no_grad()
def mean_cfm_loss(actor: nn.Module, obs: Tensor, actions: Tensor, eps: Tensor, t: Tensor, chunk: int = 4096) -> float:
    """Mean per-draw CFM loss of (obs, action) pairs under ``actor`` (the tightness proxy), chunked."""
    total = 0.0
    for start in range(0, obs.shape[0], chunk):
        sl = slice(start, start + chunk)
        total += float(actor.cfm_loss(obs[sl], actions[sl], eps[sl], t[sl]).sum())
    return total / max(eps.shape[0] * eps.shape[1], 1)


@torch.no_grad()
def rollout_elbo(actor: nn.Module, obs: Tensor, actions: Tensor, eps: Tensor, t: Tensor, chunk: int = 4096) -> Tensor:
    """Per-draw ``ELBO_old [B, K]`` of a rollout under ``actor`` (no graph), chunked over samples."""
    return torch.cat([actor.cfm_elbo(obs[s:s + chunk], actions[s:s + chunk], eps[s:s + chunk], t[s:s + chunk])
                      for s in range(0, obs.shape[0], chunk)])


def _adapt_lr(optimizer: torch.optim.Optimizer, clip_fraction: float, settings: UpdateSettings) -> None:
    for group in optimizer.param_groups:
        lr = group["lr"]
        if clip_fraction > 2.0 * settings.target_clip_fraction:
            lr /= 1.5
        elif clip_fraction < 0.5 * settings.target_clip_fraction:
            lr *= 1.5
        group["lr"] = min(max(lr, settings.lr_min), settings.lr_max)


MinibatchLoss = Callable[[Tensor, Tensor], tuple[Tensor, Diagnostics]]


def run_update(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, batch: RolloutBatch, critic: nn.Module,
               settings: UpdateSettings, generator: torch.Generator, policy_loss: MinibatchLoss) -> Diagnostics:
    """The shared epochs x minibatches loop; ``policy_loss(idx, adv_mb)`` gives the actor's loss."""
    n = len(batch)
    mb_size = n // settings.minibatches
    if mb_size < 1:
        raise ValueError(f"update: {n} samples cannot fill {settings.minibatches} minibatches; "
                         "lower minibatches or collect more steps per iteration")
    adv = prepare_advantages(batch.advantages, settings.normalize_advantages, settings.advantage_clip)
    critic_obs = batch.obs if batch.critic_obs is None else batch.critic_obs
    sums: dict[str, float] = {}
    count = 0
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=generator)
        epoch_clip, epoch_steps = 0.0, 0
        for start in range(0, mb_size * settings.minibatches, mb_size):
            idx = perm[start:start + mb_size]
            loss_pi, info = policy_loss(idx, adv[idx])
            loss_v = clipped_value_loss(critic(critic_obs[idx]), batch.values[idx], batch.returns[idx], settings.value_clip)
            loss = loss_pi + settings.value_coef * loss_v
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            info = {**info, "policy_loss": float(loss_pi.detach()), "value_loss": float(loss_v.detach()), "grad_norm": float(grad_norm)}
            for key, value in info.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            epoch_clip += info["clip_ratio"]
            epoch_steps += 1
        if settings.lr_schedule == "adaptive":
            _adapt_lr(optimizer, epoch_clip / epoch_steps, settings)
    out = {key: value / count for key, value in sums.items()}
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


def fpo_plus_plus_update(actor: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                         settings: UpdateSettings, generator: torch.Generator) -> Diagnostics:
    """FPO++ (+ DiPOD when ``settings.dipod_beta > 0``) on a flow-actor rollout; returns mean diagnostics.

    ``batch`` must carry ``eps``, ``t`` and ``elbo_old`` (draws fixed since the rollout). Actor and
    critic parameters must both be in ``optimizer``.
    """
    if batch.eps is None or batch.t is None or batch.elbo_old is None:
        raise ValueError("fpo_plus_plus_update: the batch needs eps, t and elbo_old (the rollout's fixed draws)")

    def policy_loss(idx: Tensor, adv_mb: Tensor) -> tuple[Tensor, Diagnostics]:
        elbo_nk = actor.cfm_elbo(batch.obs[idx], batch.actions[idx], batch.eps[idx], batch.t[idx])
        negative = (adv_mb < 0)[:, None]
        floor = -settings.cfm_clamp_negative
        elbo_clamped = torch.where(negative, elbo_nk.clamp(min=floor), elbo_nk)
        elbo_old = torch.where(negative, batch.elbo_old[idx].clamp(min=floor), batch.elbo_old[idx])
        loss, info = fpo_plus_plus_loss(elbo_clamped, elbo_old, adv_mb, settings.clip_eps, settings.log_ratio_max)
        if settings.dipod_beta > 0:
            term = dipod_term(elbo_nk, settings.dipod_beta)
            loss = loss + term
            info["dipod_loss"] = float(term.detach())
        info["cfm_loss"] = float(-elbo_nk.detach().mean())
        return loss, info

    params = [p for p in list(actor.parameters()) + list(critic.parameters()) if p.requires_grad]
    return run_update(params, optimizer, batch, critic, settings, generator, policy_loss)


def gaussian_ppo_update(actor: nn.Module, critic: nn.Module, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                        settings: UpdateSettings, generator: torch.Generator) -> Diagnostics:
    """Clipped PPO for a ``GaussianActor`` (exact log-likelihood ratios); ``batch.logp_old`` required."""
    if batch.logp_old is None:
        raise ValueError("gaussian_ppo_update: the batch needs logp_old (log-probs at rollout time)")

    def policy_loss(idx: Tensor, adv_mb: Tensor) -> tuple[Tensor, Diagnostics]:
        logp = actor.log_prob(batch.obs[idx], batch.actions[idx])
        ratio = torch.exp(logp - batch.logp_old[idx])
        objective, clipped = ppo_clip_objective(ratio, adv_mb, settings.clip_eps, settings.clip_eps)
        return -objective.mean(), {"clip_ratio": float(clipped.float().mean()), "ratio_mean": float(ratio.detach().mean()),
                                   "action_std": float(actor.log_std.detach().exp().mean())}

    params = [p for p in list(actor.parameters()) + list(critic.parameters()) if p.requires_grad]
    return run_update(params, optimizer, batch, critic, settings, generator, policy_loss)
