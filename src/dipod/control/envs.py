"""Vectorised environments behind one small rsl_rl-style protocol, plus reward scaling.

``VecEnv.step(actions) -> (obs, rewards, dones, extras)`` like rsl_rl's ``VecEnv``, with torch
tensors on the CPU. ``extras`` holds:
- ``time_outs`` ``[N]`` bool: the episode was cut by a time limit, not by a terminal state, so the
  learner should bootstrap the value of ``final_obs`` (the "time-out bootstrapping" of rsl_rl);
- ``final_obs`` ``[N, D]``: the last observation of each finished episode (equal to ``obs`` for
  running envs; ``obs`` itself is already the first observation of the next episode);
- ``episode_returns`` / ``episode_lengths``: 1-D tensors, one entry per episode that ended here.

``GymVecEnv`` wraps gymnasium's synchronous vector env with same-step auto-reset. It checks every
observation and reward and raises ``NonFiniteEnvError`` at the step a NaN/inf appears.
"""

from __future__ import annotations

import difflib
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

MUJOCO_TASKS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
TESTED_TASKS = MUJOCO_TASKS + ("Pendulum-v1",)


class NonFiniteEnvError(ValueError):
    """An environment returned a NaN or infinite observation or reward."""


class VecEnv(Protocol):
    num_envs: int
    num_obs: int
    num_actions: int
    action_low: np.ndarray
    action_high: np.ndarray

    def reset(self, seed: int | None = None) -> Tensor: ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]: ...

    def close(self) -> None: ...


def check_env_id(env_id: str) -> None:
    """Raise ``ValueError`` with close matches when gymnasium does not know ``env_id``."""
    import gymnasium as gym

    if env_id in gym.registry:
        return
    known = sorted(gym.registry)
    close = difflib.get_close_matches(env_id, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown environment id {env_id!r}; {hint}tested tasks: {', '.join(TESTED_TASKS)}")


class GymVecEnv:
    """``num_envs`` copies of a gymnasium task (1-D Box observations and actions) in one process."""

    def __init__(self, env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None = None):
        import gymnasium as gym

        check_env_id(env_id)
        self.env_id = env_id
        try:
            self._env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                                     vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
                                     **(env_kwargs or {}))
        except gym.error.DependencyNotInstalled as exc:  # its message names the pip extra to install
            raise ValueError(f"{env_id} needs a package that is not installed: {exc}") from None
        obs_space, act_space = self._env.single_observation_space, self._env.single_action_space
        if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
            self._env.close()
            raise ValueError(f"{env_id} has action space {act_space}; flow and Gaussian policies need a 1-D Box "
                             "(continuous actions). Pick a continuous-control task such as HalfCheetah-v5")
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            self._env.close()
            raise ValueError(f"{env_id} has observation space {obs_space}; only flat 1-D Box observations are supported")
        if not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
            self._env.close()
            raise ValueError(f"{env_id} has unbounded actions {act_space}; the policy needs finite action bounds")
        self.num_envs = num_envs
        self.num_obs = int(obs_space.shape[0])
        self.num_actions = int(act_space.shape[0])
        self.action_low, self.action_high = act_space.low.astype(np.float32), act_space.high.astype(np.float32)
        self.total_steps = 0  # env steps taken by this object (all envs), for error messages
        self._ep_return = np.zeros(num_envs)
        self._ep_length = np.zeros(num_envs, dtype=np.int64)

    def _check_finite(self, what: str, values: np.ndarray) -> None:
        finite = np.isfinite(values.reshape(self.num_envs, -1)).all(-1)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise NonFiniteEnvError(f"{self.env_id} returned a non-finite {what} in env(s) {bad} at vector step "
                                    f"{self.total_steps // self.num_envs} ({self.total_steps} env steps); "
                                    "training stopped before using it (check the task or its physics settings)")

    def reset(self, seed: int | None = None) -> Tensor:
        obs, _ = self._env.reset(seed=seed)
        self._check_finite("observation", obs)
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        return torch.as_tensor(obs, dtype=torch.float32)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        obs, rewards, terminated, truncated, info = self._env.step(actions.detach().cpu().numpy().astype(np.float32))
        self.total_steps += self.num_envs
        self._check_finite("reward", np.asarray(rewards, dtype=np.float64))
        self._check_finite("observation", obs)
        dones = np.logical_or(terminated, truncated)
        final_obs = np.array(obs, dtype=np.float32, copy=True)
        if dones.any():
            ended = np.flatnonzero(dones)
            final_obs[ended] = np.stack([info["final_obs"][i] for i in ended]).astype(np.float32)
            self._check_finite("final observation", final_obs)
        self._ep_return += rewards
        self._ep_length += 1
        extras = {
            "time_outs": torch.as_tensor(np.logical_and(truncated, np.logical_not(terminated))),
            "final_obs": torch.as_tensor(final_obs),
            "episode_returns": torch.as_tensor(self._ep_return[dones], dtype=torch.float32),
            "episode_lengths": torch.as_tensor(self._ep_length[dones]),
        }
        self._ep_return[dones] = 0.0
        self._ep_length[dones] = 0
        return (torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(rewards, dtype=torch.float32),
                torch.as_tensor(dones), extras)

    def close(self) -> None:
        self._env.close()


class RewardScaler:
    """Divides rewards by the running std of the discounted return (as gymnasium's NormalizeReward).

    Keeps value targets O(1) across tasks whose per-step rewards differ by orders of magnitude,
    which is what makes one value-clip and one learning rate work for all of them. The statistics
    start from one pseudo-sample of variance 1: without it the first steps of a task whose envs
    all earn the same reward (InvertedPendulum: +1 per step) have return variance 0 and were scaled
    by 1e4, a first value loss of ~8e5 whose gradient, clipped jointly with the actor's, froze the
    policy for that update.
    """

    def __init__(self, num_envs: int, gamma: float, eps: float = 1e-8):
        self.gamma, self.eps = gamma, eps
        self.running_return = torch.zeros(num_envs, dtype=torch.float64)
        self.count, self.mean, self.var = 1.0, 0.0, 1.0

    def __call__(self, rewards_n: Tensor, dones_n: Tensor) -> Tensor:
        self.running_return = self.running_return * self.gamma + rewards_n.double()
        batch = self.running_return
        n, batch_mean, batch_var = batch.numel(), float(batch.mean()), float(batch.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total
        self.running_return = torch.where(dones_n, torch.zeros_like(batch), batch)
        return (rewards_n.double() / np.sqrt(self.var + self.eps)).float()

    def state_dict(self) -> dict[str, Any]:
        return {"running_return": self.running_return.clone(), "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_return = state["running_return"].clone()
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
