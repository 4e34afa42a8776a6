"""Policy-preserving self-distillation of a flow actor (DiPOD Algorithms 3 and 1).

Freeze a teacher copy of the current actor, roll the teacher out in the live environments,
append its (observation, action) pairs to a growing buffer, and train only the student (the live
actor) on the CFM loss of the buffer. The teacher's samples are the target, so the student keeps
the same policy while its ELBO becomes tight again; the critic is not touched and the observation
normaliser is frozen (teacher and student see identical inputs). The caller resets its RL
optimizer afterwards (stale Adam moments belong to the pre-distillation parameters).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dipod.control.envs import VecEnv
from dipod.control.flow import FlowActor
from dipod.control.update import mean_cfm_loss


@dataclass
class DistillSettings:
    """One distillation stage: ``iterations`` x (teacher rollout + ``updates_per_iteration`` AdamW steps)."""

    iterations: int = 10
    rollout_steps: int = 32  # vector steps of teacher rollout per iteration (x num_envs pairs)
    updates_per_iteration: int = 32
    minibatch_size: int = 256
    num_draws: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0


@torch.no_grad()
def action_mse(student: FlowActor, teacher: FlowActor, obs_nd: Tensor, generator: torch.Generator) -> float:
    """Mean squared difference of student and teacher actions from the same initial noise."""
    noise = torch.randn(obs_nd.shape[0], student.action_dim, generator=generator, device=obs_nd.device)
    return float((student.sample(obs_nd, noise_na=noise) - teacher.sample(obs_nd, noise_na=noise)).pow(2).mean())


def distill_updates(actor: FlowActor, optimizer: torch.optim.Optimizer, obs_nd: Tensor, actions_na: Tensor,
                    settings: DistillSettings, generator: torch.Generator) -> float:
    """``settings.updates_per_iteration`` student steps on the CFM loss of random buffer minibatches.

    Random numbers are drawn on the buffer's device (``generator`` must live there); returns the
    mean minibatch loss.
    """
    total = 0.0
    for _ in range(settings.updates_per_iteration):
        idx = torch.randint(obs_nd.shape[0], (settings.minibatch_size,), generator=generator, device=obs_nd.device)
        eps, t = actor.draw_noise(idx.shape[0], settings.num_draws, generator, device=obs_nd.device)
        loss = actor.cfm_loss(obs_nd[idx], actions_na[idx], eps, t).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(actor.parameters(), settings.max_grad_norm)
        optimizer.step()
        total += float(loss.detach())
    return total / settings.updates_per_iteration


def self_distill(actor: FlowActor, env: VecEnv, obs: Tensor, settings: DistillSettings, generator: torch.Generator,
                 teacher: FlowActor | None = None) -> tuple[Tensor, dict[str, float], list[float]]:
    """Run one stage in place on ``actor``; returns (next env obs, metrics, finished-episode returns).

    ``teacher`` defaults to a frozen copy of ``actor`` (self-distillation); passing another flow
    actor distils that policy into ``actor`` instead. Metrics: ``cfm_loss_before`` /
    ``cfm_loss_after`` (the student before and after, on the whole buffer with one fixed set of
    draws), ``action_mse_before`` / ``action_mse`` (student vs teacher actions from shared noise),
    ``env_steps``, ``time_s``.
    """
    start = time.perf_counter()
    initial = copy.deepcopy(actor).requires_grad_(False)
    teacher = initial if teacher is None else teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    obs_chunks: list[Tensor] = []
    action_chunks: list[Tensor] = []
    returns: list[float] = []
    steps = 0
    for _ in range(settings.iterations):
        for _ in range(settings.rollout_steps):
            action = teacher.sample(obs, generator)
            obs_chunks.append(obs)
            action_chunks.append(action)
            obs, _, _, extras = env.step(teacher.to_env_action(action))
            returns += extras["episode_returns"].tolist()
            steps += env.num_envs
        buffer_obs, buffer_actions = torch.cat(obs_chunks), torch.cat(action_chunks)
        distill_updates(actor, optimizer, buffer_obs, buffer_actions, settings, generator)
    eps, t = actor.draw_noise(buffer_obs.shape[0], settings.num_draws, generator)
    probe_obs = buffer_obs[: min(buffer_obs.shape[0], 4096)]
    metrics = {
        "cfm_loss_before": mean_cfm_loss(initial, buffer_obs, buffer_actions, eps, t),
        "cfm_loss_after": mean_cfm_loss(actor, buffer_obs, buffer_actions, eps, t),
        "action_mse_before": action_mse(initial, teacher, probe_obs, generator),
        "action_mse": action_mse(actor, teacher, probe_obs, generator),
        "env_steps": float(steps),
        "time_s": time.perf_counter() - start,
    }
    return obs, metrics, returns
