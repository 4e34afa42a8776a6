"""A control run killed mid-iteration and resumed equals the run that was never interrupted: the
same metrics rows, weights, optimizer state (Adam moments and the adapted learning rate), reward
scaler, observation normalisers, EMA and random streams."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from dipod.checkpoint import load_checkpoint
from dipod.control.envs import GymVecEnv
from dipod.control.runner import ControlConfig, Runner, train
from dipod.runlog import read_metrics

EPISODE = 4


class ClockEnv(gym.Env):
    """Deterministic 4-step episodes whatever the seed (so a resumed run, which re-seeds its episodes,
    sees the same observations as the uninterrupted one); the reward depends on the action."""

    observation_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return np.array([math.sin(self.t), math.cos(1.3 * self.t)], np.float32)

    def step(self, action):
        target = 0.5 * math.sin(self.t)
        self.t += 1
        return self._obs(), -float((action[0] - target) ** 2) + 0.3 * self.t, self.t >= EPISODE, False, {}


gym.register("DipodTest/Clock-v0", entry_point=ClockEnv)


class KilledAt(GymVecEnv):
    """Raises ``KeyboardInterrupt`` on its ``kill_at``-th step, as a kill between two checkpoints."""

    def __init__(self, env_id: str, num_envs: int, kill_at: int):
        super().__init__(env_id, num_envs)
        self.kill_at, self.calls = kill_at, 0

    def step(self, actions):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt
        return super().step(actions)


ROLLOUT, ENVS = 2 * EPISODE, 2
SETTINGS = dict(env="DipodTest/Clock-v0", num_envs=ENVS, rollout_steps=ROLLOUT, epochs=2, minibatches=2,
                actor_hidden=[16, 16], critic_hidden=[16, 16], sampling_steps=3, num_draws=3, knn_entropy_k=2, progress_bar=False,
                tensorboard=False, total_steps=4 * ROLLOUT * ENVS, save_every=2, lr_schedule="kl",
                ema_warmup_updates=1, action_noise_std=0.05)
TIMING = {"rollout_s", "update_s", "distill_s", "steps_per_s"}


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("policy", ["flow", "gaussian"])
def test_killed_and_resumed_control_run_equals_the_uninterrupted_one(tmp_path, policy):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(ControlConfig(output_dir=str(whole), policy=policy, **SETTINGS))
    # the checkpoint comes after iteration 2; the kill lands in iteration 4's rollout, after iteration 3 was logged
    cfg = ControlConfig(output_dir=str(broken), policy=policy, **SETTINGS)
    runner = Runner(cfg, env=KilledAt(cfg.env, ENVS, kill_at=3 * ROLLOUT + 3))
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    runner.close()
    assert [r["step"] for r in read_metrics(broken / "metrics.jsonl")] == [16, 32, 48]
    train(ControlConfig(output_dir=str(broken), policy=policy, resume="auto", **SETTINGS))

    rows_whole, rows_broken = read_metrics(whole / "metrics.jsonl"), read_metrics(broken / "metrics.jsonl")
    assert [r["step"] for r in rows_broken] == [16, 32, 48, 64]
    for a, b in zip(rows_whole, rows_broken):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    final_whole, final_broken = load_checkpoint(whole / "checkpoint-64"), load_checkpoint(broken / "checkpoint-64")
    weights, state, _ = final_whole
    _assert_same(weights, final_broken[0], "weights")  # actor, critic, EMA and both observation normalisers
    for key in ("optimizer", "reward_scaler", "rng", "recent_returns", "ema_updates", "iteration"):
        _assert_same(state[key], final_broken[1][key], key)
    assert any(k.startswith("critic.obs_norm") for k in weights)
