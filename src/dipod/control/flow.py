"""Flow-matching policy for continuous control: velocity-field actor, critic, CFM proxies.

Conventions (FPO / FPO++):
- The actor works in a *normalised action space*: an action ``a`` in [-1, 1]^A maps to the
  environment's Box as ``center + half_range * clip(a, -1, 1)`` (``FlowActor.to_env_action``).
  Sampled actions are stored unclipped, because the CFM proxy must score what was sampled.
- Interpolation ``x_t = t * a + (1 - t) * eps`` with ``eps ~ N(0, I)``: t = 0 is noise, t = 1 is
  the action; the target velocity is ``a - eps``. Sampling integrates ``dx/dt = v(o, x, t)`` from
  t = 0 to 1 with Euler steps.
- CFM proxy per Monte-Carlo draw k: ``ELBO_nk = -CFM_nk = -mean_A ||v(o_n, x_tk, t_k) - (a_n - eps_k)||^2``
  (``cfm_reduction='mean'``: the scale of the per-draw log-ratio does not grow with A; FPO++'s
  locomotion configs use ``'sqrt'``, the squared error summed over A and divided by sqrt(A)).
- From one velocity evaluation the flow also predicts both ends of its straight path:
  the clean action ``x_t + (1 - t) v`` and the noise ``x_t - t v`` (``FlowActor.cfm_terms``); FPO++
  scores its k-NN entropy on the first and its KL proxy on the second.
- Time features: ``[cos(2^j t), sin(2^j t)]`` for j < dim / 2 (FPO++: dim 8).
- Flow times of the proxy draws: ``t = 0.005 + 0.99 * (1 - (1 - u)^(1 / b))``, ``u ~ U(0, 1)``
  (FPO++). ``b = 1`` is uniform on [0.005, 0.995]; ``b > 1`` puts more draws near the noise end.

Shapes: ``N`` observations / actions, ``K`` Monte-Carlo draws, ``A`` action dims, ``D`` obs dims.
Everything is float32. All randomness comes from explicit ``torch.Generator``s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

T_MIN, T_SPAN = 0.005, 0.99


class RunningObsNorm(nn.Module):
    """Running mean / variance of observations (parallel Welford); normalises and clips to +-clip.

    Statistics are buffers, so they travel with ``state_dict`` (checkpoints, frozen teacher copies).
    They change only when ``update`` is called, never in ``forward``.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, obs_nd: Tensor) -> None:
        obs_nd = obs_nd.reshape(-1, self.mean.shape[0]).float()
        batch_count = obs_nd.shape[0]
        batch_mean = obs_nd.mean(0)
        batch_var = obs_nd.var(0, unbiased=False)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        # Chan et al.'s parallel combination of two (mean, M2) summaries.
        m2 = self.var * self.count + batch_var * batch_count + delta.pow(2) * self.count * batch_count / total
        self.mean += delta * batch_count / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, obs: Tensor) -> Tensor:
        return ((obs.float() - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


ACTIVATIONS = {"silu": nn.SiLU, "elu": nn.ELU, "tanh": nn.Tanh}
CFM_REDUCTIONS = ("mean", "sqrt")


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "silu") -> nn.Sequential:
    """``Linear -> activation`` blocks of widths ``hidden`` then a linear head."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), ACTIVATIONS[activation]()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def flow_times(u: Tensor, b: float) -> Tensor:
    """FPO++'s flow-time draw ``t = 0.005 + 0.99 * (1 - (1 - u)^(1/b))`` for ``u`` in [0, 1)."""
    return T_MIN + T_SPAN * (1.0 - (1.0 - u).pow(1.0 / b))


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """FPO++'s time features ``[cos(2^j t), sin(2^j t)]_{j < dim/2}`` of ``t`` (any shape ``S``) -> ``[*S, dim]``."""
    freqs = 2.0 ** torch.arange(dim // 2, dtype=torch.float32, device=t.device)
    angles = t.float()[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ActionScaling(nn.Module):
    """Maps the normalised action space [-1, 1]^A onto a Box ``[low, high]`` (clipping first)."""

    def __init__(self, low: Sequence[float], high: Sequence[float]):
        super().__init__()
        low_a, high_a = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("center", (high_a + low_a) / 2)
        self.register_buffer("half_range", (high_a - low_a) / 2)

    def forward(self, action_na: Tensor) -> Tensor:
        return self.center + self.half_range * action_na.clamp(-1.0, 1.0)


class FlowActor(nn.Module):
    """Velocity field ``v(o, x_t, t)`` as an MLP on ``[normalised obs, x_t, time embedding]``.

    The first layer is split into an observation part and an ``(x_t, t)`` part: mathematically the
    same MLP on the concatenation, but the observation features are computed once per observation
    and reused across Euler steps and Monte-Carlo draws.
    """

    def __init__(self, obs_dim: int, action_dim: int, action_low: Sequence[float], action_high: Sequence[float],
                 hidden: Sequence[int] = (256, 256), time_embed_dim: int = 8, sampling_steps: int = 10,
                 time_skew_b: float = 1.0, activation: str = "silu", cfm_reduction: str = "mean"):
        super().__init__()
        if not hidden:
            raise ValueError("FlowActor: hidden must name at least one layer width")
        if sampling_steps < 1 or time_skew_b <= 0 or time_embed_dim < 2 or time_embed_dim % 2:
            raise ValueError(f"FlowActor: need sampling_steps >= 1, time_skew_b > 0, an even time_embed_dim >= 2 "
                             f"(got {sampling_steps}, {time_skew_b}, {time_embed_dim})")
        if cfm_reduction not in CFM_REDUCTIONS or activation not in ACTIVATIONS:
            raise ValueError(f"FlowActor: cfm_reduction={cfm_reduction!r} (choose {CFM_REDUCTIONS}), "
                             f"activation={activation!r} (choose {sorted(ACTIVATIONS)})")
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.sampling_steps, self.time_skew_b, self.time_embed_dim = sampling_steps, time_skew_b, time_embed_dim
        self.cfm_reduction = cfm_reduction
        self.act = ACTIVATIONS[activation]()
        self.obs_norm = RunningObsNorm(obs_dim)
        self.scaling = ActionScaling(action_low, action_high)
        self.obs_in = nn.Linear(obs_dim, hidden[0])
        self.xt_in = nn.Linear(action_dim + time_embed_dim, hidden[0], bias=False)
        self.trunk = mlp(hidden[0], hidden[1:], action_dim, activation)

    def obs_features(self, obs_nd: Tensor, normalized: bool = False) -> Tensor:
        """First-layer contribution of the observation: ``[N, H]`` (``normalized``: ``obs_nd`` is already
        ``obs_norm(obs)``, e.g. a distillation buffer filled while the statistics kept moving)."""
        return self.obs_in(obs_nd.float() if normalized else self.obs_norm(obs_nd))

    def velocity(self, obs_feat: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``v`` for observation features ``[..., H]``, points ``x [..., A]`` and times ``t [...]``."""
        hidden = obs_feat + self.xt_in(torch.cat([x, time_embedding(t, self.time_embed_dim)], dim=-1))
        return self.trunk(self.act(hidden))

    @torch.no_grad()
    def sample(self, obs_nd: Tensor, generator: torch.Generator | None = None, noise_na: Tensor | None = None,
               steps: int | None = None, normalized: bool = False) -> Tensor:
        """Euler-integrate the flow from ``noise_na`` (default ``N(0, I)`` from ``generator``) to t = 1.

        Returns actions ``[N, A]`` in the normalised action space (unclipped). Pass
        ``noise_na = zeros`` for FPO++'s deterministic "zero-sampling" evaluation.
        """
        n = obs_nd.shape[0]
        x = noise_na.float() if noise_na is not None else torch.randn(
            n, self.action_dim, generator=generator, device=obs_nd.device)
        steps = steps or self.sampling_steps
        obs_feat = self.obs_features(obs_nd, normalized)
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((n,), i * dt, device=obs_nd.device)
            x = x + dt * self.velocity(obs_feat, x, t)
        return x

    def draw_noise(self, n: int, k: int, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Monte-Carlo draws for the CFM proxy: ``eps_nka ~ N(0, I)`` and FPO++ flow times ``t_nk``."""
        eps_nka = torch.randn(n, k, self.action_dim, generator=generator, device=device)
        u_nk = torch.rand(n, k, generator=generator, device=device)
        return eps_nka, flow_times(u_nk, self.time_skew_b)

    def cfm_terms(self, obs_nd: Tensor, action_na: Tensor, eps_nka: Tensor, t_nk: Tensor,
                  normalized: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Per-draw CFM loss ``[N, K]`` and the predicted clean action and noise ``[N, K, A]`` of each draw."""
        action = action_na.float()[:, None, :]
        t = t_nk.float()[..., None]
        x_t = t * action + (1.0 - t) * eps_nka
        v = self.velocity(self.obs_features(obs_nd, normalized)[:, None, :], x_t, t[..., 0])
        sq = (v - (action - eps_nka)).pow(2)
        loss = sq.mean(-1) if self.cfm_reduction == "mean" else sq.sum(-1) / math.sqrt(sq.shape[-1])
        return loss, x_t + (1.0 - t) * v, x_t - t * v

    def cfm_loss(self, obs_nd: Tensor, action_na: Tensor, eps_nka: Tensor, t_nk: Tensor, normalized: bool = False) -> Tensor:
        """Per-draw CFM loss ``reduce_A (v(o, t a + (1-t) eps, t) - (a - eps))^2`` -> ``[N, K]``."""
        return self.cfm_terms(obs_nd, action_na, eps_nka, t_nk, normalized)[0]

    def cfm_elbo(self, obs_nd: Tensor, action_na: Tensor, eps_nka: Tensor, t_nk: Tensor) -> Tensor:
        """The FPO/FPO++ likelihood proxy per draw: ``ELBO_nk = -CFM loss_nk`` (``[N, K]``)."""
        return -self.cfm_loss(obs_nd, action_na, eps_nka, t_nk)

    def to_env_action(self, action_na: Tensor) -> Tensor:
        return self.scaling(action_na)


class Critic(nn.Module):
    """State-value MLP with its own running observation normalisation: ``obs [N, D] -> V [N]``."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256), activation: str = "silu"):
        super().__init__()
        self.obs_norm = RunningObsNorm(obs_dim)
        self.net = mlp(obs_dim, hidden, 1, activation)

    def forward(self, obs_nd: Tensor) -> Tensor:
        return self.net(self.obs_norm(obs_nd)).squeeze(-1)
