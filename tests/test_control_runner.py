"""Environments, runner, distillation, checkpoints and bad input for `dipod control`."""

import json
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from dipod.checkpoint import latest_checkpoint, load_checkpoint
from dipod.cli import main as cli_main
from dipod.config import ConfigError, coerce_value, config_fields, parse_config
from dipod.control.distill import DistillSettings, SelfDistillation
from dipod.control.envs import GymVecEnv, NonFiniteEnvError
from dipod.control.evaluate import EvalConfig, evaluate
from dipod.control.flow import FlowActor, RunningObsNorm
from dipod.control.runner import ControlConfig, Runner, build_actor, config_from_checkpoint, train
from dipod.runlog import read_metrics



class ConstantEnv(gym.Env):
    """Reward 1 every step, constant observation, never terminates (only the time limit ends it)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, nan_at: int | None = None):
        self.nan_at, self.t = nan_at, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.5, -0.5], np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([0.5, -0.5 + 0.1 * self.t], np.float32)
        if self.nan_at is not None and self.t >= self.nan_at:
            obs[0] = np.nan
        return obs, 1.0, False, False, {}


class BanditEnv(gym.Env):
    """One-step episodes: reward -(a - 0.6 o_0)^2, so the best policy is a narrow, observation-dependent one."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.obs = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return self.obs.copy(), {}

    def step(self, action):
        return self.obs.copy(), -float((action[0] - 0.6 * self.obs[0]) ** 2), True, False, {}


gym.register("DipodTest/Bandit-v0", entry_point=BanditEnv)
gym.register("DipodTest/Constant-v0", entry_point=ConstantEnv, max_episode_steps=3)
gym.register("DipodTest/NaN-v0", entry_point=ConstantEnv, kwargs={"nan_at": 150}, max_episode_steps=1000)

FAST = dict(num_envs=2, rollout_steps=128, epochs=2, minibatches=4, actor_hidden=[32, 32], critic_hidden=[32, 32],
            sampling_steps=4, num_draws=4, knn_entropy_k=3, progress_bar=False, tensorboard=False)


def test_time_outs_are_reported_with_the_final_observation():
    env = GymVecEnv("DipodTest/Constant-v0", 2)
    env.reset(seed=0)
    for _ in range(2):
        _, _, done, extras = env.step(torch.zeros(2, 1))
        assert not done.any() and not extras["time_outs"].any()
    obs, reward, done, extras = env.step(torch.zeros(2, 1))
    assert done.all() and extras["time_outs"].all()
    assert torch.allclose(extras["final_obs"], torch.tensor([[0.5, -0.2]] * 2))  # last obs of the episode
    assert torch.allclose(obs, torch.tensor([[0.5, -0.5]] * 2))  # already the next episode's first obs
    assert extras["episode_returns"].tolist() == [3.0, 3.0] and extras["episode_lengths"].tolist() == [3, 3]


def test_time_out_bootstrapping_makes_returns_match_the_infinite_horizon_value(tmp_path):
    # V = 10 everywhere and r = 1 forever is the exact infinite-horizon value for gamma = 0.9.
    # With bootstrapping the GAE targets equal 10; without it they would be 2.71, 1.9, 1.
    cfg = ControlConfig(env="DipodTest/Constant-v0", output_dir=str(tmp_path), gamma=0.9, gae_lambda=1.0,
                        normalize_rewards=False, total_steps=6, **{**FAST, "rollout_steps": 3, "minibatches": 1})
    runner = Runner(cfg)
    with torch.no_grad():
        runner.critic.net[-1].weight.zero_()
        runner.critic.net[-1].bias.fill_(10.0)
    _, batch, stats = runner.collect(runner.env.reset(seed=0))
    assert torch.allclose(batch.returns, torch.full((6,), 10.0), atol=1e-5)
    assert stats["episode_return"] == 3.0
    runner.close()


class _SlopeValue(torch.nn.Module):
    """V(o) = 10 + 20 o_1 on the raw observation (own obs_norm so the runner can keep updating one)."""

    def __init__(self):
        super().__init__()
        self.obs_norm = RunningObsNorm(2)

    def forward(self, obs_nd):
        return 10.0 + 20.0 * obs_nd[..., 1]


def test_time_out_bootstrap_uses_the_value_of_the_final_observation_not_of_the_next_episode(tmp_path):
    """docs/control.md: where an episode was cut by its time limit, that step's reward gets + gamma * V(final
    observation). ConstantEnv's o_1 is -0.5, -0.4, -0.3 and the cut episode ends in o_1 = -0.2 (V = 6), while the
    next episode starts again at -0.5 (V = 0): with lambda = 1 the targets are 7.084, 6.76, 6.4 (1 + 0.9 * 6 at
    the cut), not 2.71, 1.9, 1 (the next episode's first value bootstrapped)."""
    cfg = ControlConfig(env="DipodTest/Constant-v0", output_dir=str(tmp_path), gamma=0.9, gae_lambda=1.0,
                        normalize_rewards=False, total_steps=6, **{**FAST, "rollout_steps": 3, "minibatches": 1})
    runner = Runner(cfg)
    runner.critic = _SlopeValue()
    _, batch, _ = runner.collect(runner.env.reset(seed=0))
    runner.close()
    torch.testing.assert_close(batch.values, torch.tensor([0.0, 0.0, 2.0, 2.0, 4.0, 4.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.returns, torch.tensor([7.084, 7.084, 6.76, 6.76, 6.4, 6.4]), atol=1e-5, rtol=0)


def test_short_pendulum_run_writes_metrics_and_checkpoint_then_resumes(tmp_path):
    out = tmp_path / "run"
    last = train(ControlConfig(env="Pendulum-v1", output_dir=str(out), total_steps=1024, save_every=1, **FAST))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [256, 512, 768, 1024] and last["iteration"] == 4
    for key in ("cfm_loss_before", "cfm_loss_after", "clip_ratio", "value_loss", "steps_per_s", "lr"):
        assert np.isfinite(rows[-1][key])
    assert latest_checkpoint(out).name == "checkpoint-1024"
    weights, _, meta = load_checkpoint(latest_checkpoint(out))
    with pytest.raises(ValueError, match="pass --resume to continue"):  # a fresh run never overwrites one that exists
        train(ControlConfig(env="Pendulum-v1", output_dir=str(out), total_steps=1536, **FAST))
    runner = Runner(ControlConfig(env="Pendulum-v1", output_dir=str(out), total_steps=1536, resume="auto", **FAST))
    assert runner.global_step == 1024 and runner.iteration == 4
    assert torch.equal(runner.actor.obs_in.weight, weights["actor.obs_in.weight"])
    runner.train()
    runner.close()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [256, 512, 768, 1024, 1280, 1536]
    assert latest_checkpoint(out).name == "checkpoint-1536"
    result = evaluate(EvalConfig(checkpoint=str(out), episodes=2, num_envs=2))
    assert result["episodes"] == 2 and result["length_mean"] == 200 and np.isfinite(result["return_mean"])
    assert json.loads((out / "checkpoint-1536" / "eval.json").read_text())["step"] == 1536


def test_eval_runs_the_checkpoint_policy_and_leaves_its_observation_statistics_alone(tmp_path):
    """`dipod control eval` rolls out the policy the checkpoint holds: its observation statistics are read, never
    updated (they change only in training rollouts). With deterministic zero-noise sampling the returns equal a
    hand rollout of the checkpoint's actor, frozen, from the same seed."""
    runner = Runner(ControlConfig(env="Pendulum-v1", output_dir=str(tmp_path), total_steps=256, **FAST))
    with torch.no_grad():  # statistics far from Pendulum's, so any update during eval would move the actions
        runner.actor.obs_norm.mean.copy_(torch.tensor([0.5, -0.5, 1.0]))
        runner.actor.obs_norm.var.copy_(torch.tensor([0.2, 3.0, 9.0]))
        runner.actor.obs_norm.count.fill_(4.0)
        runner.actor.trunk[-1].weight.mul_(10.0)  # actions that depend on the normalised observation
    path = runner.save()
    runner.close()
    result = evaluate(EvalConfig(checkpoint=str(path), episodes=2, num_envs=2, seed=7))
    assert result["weights"] == "actor"
    weights, _, meta = load_checkpoint(path)
    actor = build_actor(config_from_checkpoint(meta), meta["num_obs"], meta["num_actions"], meta["action_low"],
                        meta["action_high"])
    actor.load_state_dict({k[len("actor."):]: v for k, v in weights.items() if k.startswith("actor.")})
    env = GymVecEnv("Pendulum-v1", 2)
    obs, returns = env.reset(seed=7), []
    while len(returns) < 2:
        action = actor.sample(obs, noise_na=torch.zeros(2, 1))
        obs, _, _, extras = env.step(actor.to_env_action(action))
        returns += extras["episode_returns"].tolist()
    env.close()
    assert result["returns"] == returns[:2]


def test_gaussian_ppo_and_dipod_variants_run(tmp_path):
    train(ControlConfig(env="Pendulum-v1", policy="gaussian", output_dir=str(tmp_path / "g"), total_steps=256, **FAST))
    assert "ratio_mean" in read_metrics(tmp_path / "g" / "metrics.jsonl")[-1]
    train(ControlConfig(env="Pendulum-v1", output_dir=str(tmp_path / "d"), total_steps=768, dipod_beta=0.1,
                        distill_initial_iterations=1, distill_every=2, distill_iterations=1, distill_rollout_steps=8,
                        distill_updates=2, distill_minibatch_size=16, **FAST))
    rows = read_metrics(tmp_path / "d" / "metrics.jsonl")
    kinds = [r.get("distill/kind") for r in rows if "distill/kind" in r]
    assert kinds == ["initial", "interleaved"]  # before iteration 1 and before iteration 3
    assert rows[-1]["step"] == 768 and rows[-1]["dipod_loss"] > 0  # distillation steps are not in the RL budget
    assert rows[-1]["distill_env_steps"] == 2 * (1 * 8 * 2)  # two stages of 1 iteration x 8 steps x 2 envs


def _pendulum_actor(seed):
    torch.manual_seed(seed)
    actor = FlowActor(3, 1, [-2.0], [2.0], hidden=(64, 64), sampling_steps=8)
    actor.obs_norm.update(torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.7, 0.7, 4.0]))
    return actor


def run_stage(student, settings, teacher=None):
    env = GymVecEnv("Pendulum-v1", 4)
    stage = SelfDistillation(student, settings, env.num_envs, torch.Generator().manual_seed(0), teacher=teacher)
    stage.run(env.reset(seed=0), lambda action: env.step(student.to_env_action(action))[0])
    env.close()
    return stage.finish()


def test_self_distillation_tightens_the_bound_and_preserves_the_policy():
    actor = _pendulum_actor(0)
    settings = DistillSettings(iterations=4, rollout_steps=16, updates_per_iteration=50, minibatch_size=64, num_draws=8)
    info = run_stage(actor, settings)
    assert info["cfm_loss_after"] < info["cfm_loss_before"]  # the ELBO got tighter on the teacher's samples
    assert info["action_mse_before"] == 0.0 and info["action_mse"] < 0.02  # actions from the same noise barely moved
    assert info["env_steps"] == 4 * 16 * 4


def test_distillation_pulls_a_different_student_onto_the_teacher():
    teacher, student = _pendulum_actor(0), _pendulum_actor(1)
    with torch.no_grad():  # a teacher that clearly depends on the observation
        teacher.trunk[-1].weight.mul_(5.0)
    settings = DistillSettings(iterations=4, rollout_steps=16, updates_per_iteration=50, minibatch_size=64, num_draws=8)
    info = run_stage(student, settings, teacher)
    assert info["action_mse"] < 0.5 * info["action_mse_before"]


def test_nan_observation_stops_with_a_clear_error_and_keeps_outputs(tmp_path):
    cfg = ControlConfig(env="DipodTest/NaN-v0", output_dir=str(tmp_path), total_steps=2048, save_every=1, **FAST)
    with pytest.raises(NonFiniteEnvError, match=r"non-finite observation in env\(s\) \[0, 1\] at vector step 150"):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [256]
    load_checkpoint(latest_checkpoint(tmp_path))  # the checkpoint written before the NaN is intact


class NaNRewardEnv(ConstantEnv):
    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, float("nan") if self.t >= 2 else 1.0, terminated, truncated, info


gym.register("DipodTest/NaNReward-v0", entry_point=NaNRewardEnv, max_episode_steps=1000)


def test_nan_reward_is_named_at_its_step():
    env = GymVecEnv("DipodTest/NaNReward-v0", 2)
    env.reset(seed=0)
    env.step(torch.zeros(2, 1))
    with pytest.raises(NonFiniteEnvError, match=r"non-finite reward in env\(s\) \[0, 1\] at vector step 2"):
        env.step(torch.zeros(2, 1))
    env.close()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    runner = Runner(ControlConfig(env="Pendulum-v1", output_dir=str(tmp_path), total_steps=256, **FAST))
    runner.save()
    with torch.no_grad():
        runner.actor.obs_in.bias[0] = float("nan")
    runner.global_step = 256
    with pytest.raises(FloatingPointError, match="actor.obs_in.bias"):
        runner.save()
    runner.close()
    assert latest_checkpoint(tmp_path).name == "checkpoint-0"  # the finite one stays the latest


def test_bad_env_and_incompatible_settings_fail_before_compute(tmp_path, capsys):
    with pytest.raises(ValueError, match="did you mean.*HalfCheetah-v5"):
        GymVecEnv("HalfCheeta-v5", 1)
    with pytest.raises(ValueError, match="1-D Box"):
        GymVecEnv("CartPole-v1", 1)
    with pytest.raises(ConfigError, match="policy=gaussian"):
        ControlConfig(policy="gaussian", dipod_beta=0.1)
    with pytest.raises(ConfigError, match="minibatches"):
        ControlConfig(num_envs=1, rollout_steps=8, minibatches=16, total_steps=100)
    code = cli_main(["control", "train", "--env", "NoSuchTask-v0", "--output_dir", str(tmp_path / "x")])
    assert code == 2 and "unknown environment id 'NoSuchTask-v0'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_released_settings_are_one_config_away():
    path = Path(__file__).resolve().parents[1] / "configs" / "control" / "g1_tracking.yaml"
    cfg = parse_config(ControlConfig, ["--config", str(path), "--epochs", "4"], "test")
    assert (cfg.clip_eps, cfg.num_draws, cfg.sampling_steps, cfg.learning_rate) == (0.01, 16, 64, 1e-4)
    assert cfg.epochs == 4  # flags still override the file


def test_flag_table_defaults_in_docs_are_the_config_defaults():
    """docs/control.md's flag table states each default ("| `--gamma`, `--gae_lambda` | 0.99, 0.95 | ..."): every
    row that names as many flags as values must equal ControlConfig's default, so the docs and the code cannot
    drift apart silently."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "control.md").read_text()
    table = text.split("## Flags", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    defaults, fields, checked = ControlConfig(), config_fields(ControlConfig), []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`--(\w+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split(",")]
        if len(names) != len(values):
            continue
        for name, value in zip(names, values):
            default = getattr(defaults, name)
            expected = None if value == "none" else coerce_value(name, fields[name].type, value)
            assert default == expected, f"--{name}: docs say {value}, ControlConfig says {default!r}"
            checked.append(name)
    assert {"gamma", "gae_lambda", "total_steps", "time_skew_b", "distill_iterations", "save_every"} <= set(checked)


@pytest.mark.slow
@pytest.mark.parametrize("policy, min_gain", [("flow", 0.1), ("gaussian", 0.3)])
def test_policies_learn_a_contextual_bandit(tmp_path, policy, min_gain):
    # Measured with the earlier defaults (seed 0, 40960 steps): flow -0.63 -> -0.09 (-0.47 with clip_eps 0.05),
    # gaussian -0.61 -> -0.15; the thresholds still hold with the released-FPO++ defaults (re-run, not re-measured).
    train(ControlConfig(env="DipodTest/Bandit-v0", policy=policy, output_dir=str(tmp_path), total_steps=40960,
                        actor_hidden=[64, 64], critic_hidden=[64, 64], gamma=0.0, normalize_rewards=False,
                        progress_bar=False, tensorboard=False))
    returns = [r["episode_return"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert sum(returns[-3:]) / 3 > returns[0] + min_gain
