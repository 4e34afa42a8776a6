"""Diagonal-Gaussian actor for the PPO baseline (same normalised action space as ``FlowActor``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dipod.control.flow import ActionScaling, RunningObsNorm, mlp


class GaussianActor(nn.Module):
    """``a ~ N(mu(o), diag(exp(log_std)^2))`` with a state-independent, learned ``log_std``."""

    def __init__(self, obs_dim: int, action_dim: int, action_low: Sequence[float], action_high: Sequence[float],
                 hidden: Sequence[int] = (256, 256), init_log_std: float = 0.0):
        super().__init__()
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.obs_norm = RunningObsNorm(obs_dim)
        self.scaling = ActionScaling(action_low, action_high)
        self.mean_net = mlp(obs_dim, hidden, action_dim)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def mean(self, obs_nd: Tensor) -> Tensor:
        return self.mean_net(self.obs_norm(obs_nd))

    @torch.no_grad()
    def sample(self, obs_nd: Tensor, generator: torch.Generator | None = None, noise_na: Tensor | None = None) -> Tensor:
        """``mu + std * noise`` (noise ``N(0, I)`` from ``generator`` unless given; zeros = the mean)."""
        mu = self.mean(obs_nd)
        noise = noise_na if noise_na is not None else torch.randn(mu.shape, generator=generator, device=mu.device)
        return mu + self.log_std.exp() * noise

    def log_prob(self, obs_nd: Tensor, action_na: Tensor) -> Tensor:
        """Exact ``log pi(a | o)`` summed over action dims -> ``[N]``."""
        z = (action_na.float() - self.mean(obs_nd)) / self.log_std.exp()
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def to_env_action(self, action_na: Tensor) -> Tensor:
        return self.scaling(action_na)
