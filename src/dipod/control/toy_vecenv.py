"""A batched point-mass reaching task in torch that implements rsl-rl-lib's ``VecEnv`` interface.

It exists to check a learner end to end through rsl-rl's real ``OnPolicyRunner`` without a GPU
simulator (``tests/test_control_rsl_rl.py``), and as a smoke test for users wiring
``dipod.control.rsl_rl:FPOPlusPlus`` into their own setup.

Task: a point in the plane starts uniformly in [-1, 1]^2 with a target drawn the same way. The
action (2-D, clipped to [-1, 1]) is a velocity command: ``pos += speed * dt * clip(a)``. Reward per
step is ``-|pos - target|``; reaching within ``success_radius`` ends the episode (a terminal state),
otherwise it times out after ``max_episode_length`` steps (reported in ``extras["time_outs"]``, so
the learner bootstraps). Observation groups: ``policy`` = target - pos (what the actor needs);
``critic`` = [target - pos, pos, fraction of the episode left] (privileged, as in asymmetric
actor-critic setups of IsaacLab / mjlab).
"""

from __future__ import annotations

import torch
from rsl_rl.env import VecEnv
from tensordict import TensorDict


class PointReachVecEnv(VecEnv):
    def __init__(self, num_envs: int = 64, max_episode_length: int = 40, speed: float = 1.0, dt: float = 0.1,
                 success_radius: float = 0.1, seed: int = 0, device: str = "cpu"):
        if num_envs < 1 or max_episode_length < 1 or speed <= 0 or dt <= 0 or success_radius < 0:
            raise ValueError("PointReachVecEnv: need num_envs >= 1, max_episode_length >= 1, speed > 0, dt > 0, "
                             f"success_radius >= 0 (got {num_envs}, {max_episode_length}, {speed}, {dt}, {success_radius})")
        self.num_envs, self.num_actions = num_envs, 2
        self.max_episode_length = max_episode_length
        self.device = device
        self.speed, self.dt, self.success_radius = speed, dt, success_radius
        self.cfg = {"task": "PointReach", "num_envs": num_envs, "max_episode_length": max_episode_length,
                    "speed": speed, "dt": dt, "success_radius": success_radius, "seed": seed}
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.pos = torch.zeros(num_envs, 2, device=device)
        self.target = torch.zeros(num_envs, 2, device=device)
        self.episode_length_buf = torch.zeros(num_envs, dtype=torch.long, device=device)
        self._reset(torch.ones(num_envs, dtype=torch.bool, device=device))

    def _reset(self, mask_n: torch.Tensor) -> None:
        count = int(mask_n.sum())
        if count:
            draws = torch.rand(count, 4, generator=self.generator, device=self.device) * 2 - 1
            self.pos[mask_n], self.target[mask_n] = draws[:, :2], draws[:, 2:]
            self.episode_length_buf[mask_n] = 0

    def get_observations(self) -> TensorDict:
        delta = self.target - self.pos
        left = 1.0 - self.episode_length_buf.float() / float(self.max_episode_length)
        return TensorDict({"policy": delta, "critic": torch.cat([delta, self.pos, left[:, None]], dim=-1)},
                          batch_size=[self.num_envs], device=self.device)

    def step(self, actions: torch.Tensor) -> tuple[TensorDict, torch.Tensor, torch.Tensor, dict]:
        if actions.shape != (self.num_envs, self.num_actions):
            raise ValueError(f"PointReachVecEnv.step: actions must have shape {(self.num_envs, self.num_actions)}, "
                             f"got {tuple(actions.shape)}")
        if not bool(torch.isfinite(actions).all()):
            raise ValueError("PointReachVecEnv.step: actions contain NaN or inf; the policy diverged")
        self.pos = self.pos + self.speed * self.dt * actions.to(self.device).clamp(-1.0, 1.0)
        self.episode_length_buf += 1
        distance = (self.target - self.pos).norm(dim=-1)
        rewards = -distance
        reached = distance < self.success_radius
        time_outs = (self.episode_length_buf >= self.max_episode_length) & ~reached
        dones = reached | time_outs
        extras = {"time_outs": time_outs, "log": {"/distance": distance.mean(), "/reached": reached.float().mean()}}
        self._reset(dones)
        return self.get_observations(), rewards, dones.long(), extras
