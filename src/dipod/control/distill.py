"""Policy-preserving self-distillation of a flow actor: DiPOD Algorithm 3 (initial) and Algorithm 1 (interleaved).

``SelfDistillation`` is the one stage object behind ``dipod control train`` and the rsl-rl class;
each front end only says how to step its environments (``run(obs, step)``). Algorithm 3 as the
paper's released code runs it (defaults of ``DistillSettings``):

- freeze a teacher copy of the actor's network; teacher and student read observations through the
  live actor's normaliser, which keeps updating on every observation seen (as in RL rollouts);
- ``iterations`` (100) times: roll the teacher out for ``rollout_steps`` (8) vector steps, storing
  (normalised observation, action) pairs, then ``updates_per_iteration`` (1) AdamW step(s) of the
  student on the CFM loss of ``min(minibatch_size, buffer)`` (16384) pairs drawn without
  replacement, ``num_draws`` (eps, t) draws each;
- once the buffer holds more than ``max(4 * minibatch_size, num_envs * rollout_steps * 8)`` pairs,
  drop its older half (whole rollout chunks);
- only the actor trains; the critic is untouched. The caller re-creates its RL optimizer (and the
  actor EMA) afterwards and does not count the stage's environment steps in its RL budget.

Metrics (``finish``): ``cfm_loss_before`` / ``cfm_loss_after`` (teacher vs student on the final
buffer, one fixed set of draws), ``action_mse`` (student vs teacher actions from shared noise; 0
means the policy was kept), ``distill_loss_first`` / ``distill_loss_last``, ``env_steps``,
``buffer``, ``time_s``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dipod.config import ConfigError
from dipod.control.flow import FlowActor
from dipod.control.update import mean_cfm_loss


@dataclass
class DistillSettings:
    """One stage; defaults are Algorithm 3 as released. Field names are the front ends' minus ``distill_``."""

    iterations: int = 100
    rollout_steps: int = 8
    updates_per_iteration: int = 1
    minibatch_size: int = 16384
    num_draws: int = 16
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("iterations", "rollout_steps", "updates_per_iteration", "minibatch_size", "num_draws"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill_{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"distill_{name}={getattr(self, name)} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"distill_weight_decay={self.weight_decay} must be >= 0")

    def buffer_cap(self, num_envs: int) -> int:
        return max(4 * self.minibatch_size, num_envs * self.rollout_steps * 8)

    @classmethod
    def from_front_end(cls, cfg, iterations: int) -> "DistillSettings":
        """A stage of ``iterations`` from the ``distill_*`` and ``num_draws`` fields that both front-end
        configs (``dipod control train`` and the rsl_rl class) declare under the same names."""
        return cls(
            iterations=iterations, rollout_steps=cfg.distill_rollout_steps, updates_per_iteration=cfg.distill_updates,
            minibatch_size=cfg.distill_minibatch_size, num_draws=cfg.num_draws, lr=cfg.distill_lr,
            weight_decay=cfg.distill_weight_decay, max_grad_norm=cfg.distill_max_grad_norm)


@torch.no_grad()
def action_mse(student: FlowActor, teacher: FlowActor, obs_nd: Tensor, generator: torch.Generator,
               normalized: bool = False) -> float:
    """Mean squared difference of student and teacher actions from the same initial noise."""
    noise = torch.randn(obs_nd.shape[0], student.action_dim, generator=generator, device=obs_nd.device)
    return float((student.sample(obs_nd, noise_na=noise, normalized=normalized)
                  - teacher.sample(obs_nd, noise_na=noise, normalized=normalized)).pow(2).mean())


def _frozen_copy(actor: FlowActor) -> FlowActor:
    with torch.inference_mode(False):  # rsl-rl rolls out under inference mode; the copy must be a normal module
        frozen = copy.deepcopy(actor).requires_grad_(False)
    frozen.obs_norm = actor.obs_norm  # one normaliser: both networks see the same inputs
    return frozen


class SelfDistillation:
    """One distillation stage on ``actor`` (in place) towards ``teacher`` (default: a frozen copy of ``actor``).

    The teacher reads observations through the student's normaliser (``update_norm=False`` leaves
    the statistics alone, for users who switched normalisation off).
    """

    def __init__(self, actor: FlowActor, settings: DistillSettings, num_envs: int, generator: torch.Generator,
                 teacher: FlowActor | None = None, update_norm: bool = True):
        self.actor, self.settings, self.num_envs, self.generator = actor, settings, num_envs, generator
        self.update_norm = update_norm
        self.initial = _frozen_copy(actor)
        self.teacher = self.initial if teacher is None else _frozen_copy(teacher)
        with torch.inference_mode(False):
            self.optimizer = torch.optim.AdamW(actor.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.obs_chunks: list[Tensor] = []
        self.action_chunks: list[Tensor] = []
        self.losses: list[float] = []
        self.env_steps = 0
        self.skipped = 0
        self.start = time.perf_counter()

    @torch.no_grad()
    def act(self, obs_nd: Tensor) -> Tensor:
        """Update the normaliser on ``obs_nd``, sample the teacher and store the pair; returns the normalised action."""
        if self.update_norm:
            self.actor.obs_norm.update(obs_nd)
        norm = self.actor.obs_norm(obs_nd)
        action = self.teacher.sample(norm, self.generator, normalized=True)
        self.obs_chunks.append(norm)
        self.action_chunks.append(action)
        self.env_steps += obs_nd.shape[0]
        return action

    def train_step(self) -> None:
        """The iteration's student step(s) on the buffer, then the released buffer trimming."""
        s = self.settings
        buffer_obs, buffer_actions = torch.cat(self.obs_chunks), torch.cat(self.action_chunks)
        n = buffer_obs.shape[0]
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(s.updates_per_iteration):
                idx = torch.randperm(n, generator=self.generator, device=buffer_obs.device)[:min(s.minibatch_size, n)]
                eps, t = self.actor.draw_noise(idx.shape[0], s.num_draws, self.generator, device=buffer_obs.device)
                loss = self.actor.cfm_loss(buffer_obs[idx], buffer_actions[idx], eps, t, normalized=True).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.actor.parameters(), s.max_grad_norm)
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    self.skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.step()
                self.losses.append(float(loss.detach()))
        if n > s.buffer_cap(self.num_envs):
            half = len(self.obs_chunks) // 2
            self.obs_chunks, self.action_chunks = self.obs_chunks[half:], self.action_chunks[half:]

    def run(self, obs_nd: Tensor, step: Callable[[Tensor], Tensor]) -> Tensor:
        """The whole stage: ``step(normalised action) -> next observation`` moves the environments."""
        for _ in range(self.settings.iterations):
            for _ in range(self.settings.rollout_steps):
                obs_nd = step(self.act(obs_nd))
            self.train_step()
        return obs_nd

    def finish(self) -> dict[str, float]:
        """Tightness before / after on the final buffer, student-teacher action MSE, cost."""
        obs, actions = torch.cat(self.obs_chunks), torch.cat(self.action_chunks)
        eps, t = self.actor.draw_noise(obs.shape[0], self.settings.num_draws, self.generator, device=obs.device)
        probe = obs[: min(obs.shape[0], 4096)]
        return {
            "cfm_loss_before": mean_cfm_loss(self.initial, obs, actions, eps, t, normalized=True),
            "cfm_loss_after": mean_cfm_loss(self.actor, obs, actions, eps, t, normalized=True),
            "action_mse_before": action_mse(self.initial, self.teacher, probe, self.generator, normalized=True),
            "action_mse": action_mse(self.actor, self.teacher, probe, self.generator, normalized=True),
            "distill_loss_first": self.losses[0] if self.losses else float("nan"),
            "distill_loss_last": self.losses[-1] if self.losses else float("nan"),
            "skipped_steps": float(self.skipped),
            "env_steps": float(self.env_steps),
            "buffer": float(obs.shape[0]),
            "time_s": time.perf_counter() - self.start,
        }
