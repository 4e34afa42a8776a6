"""FPOPlusPlus as an rsl-rl-lib algorithm, trained by rsl-rl's real OnPolicyRunner on PointReachVecEnv."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from rsl_rl.runners import OnPolicyRunner

from dipod.config import ConfigError
from dipod.control.distill import action_mse
from dipod.control.rsl_rl import CLASS_NAME, FPOPlusPlus, FPOPlusPlusConfig, parse_algorithm_config
from dipod.control.toy_vecenv import PointReachVecEnv
from dipod.control.update import value_loss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



def train_cfg(**algorithm) -> dict:
    """A CPU-test-sized config; the speed-ups over FPO++'s published values are named here."""
    return {
        "num_steps_per_env": 16, "save_interval": 1000, "seed": 0,
        "obs_groups": {"actor": ["policy"], "critic": ["critic"]},
        "actor": {"class_name": "MLPModel", "hidden_dims": [64, 64], "obs_normalization": True},
        "critic": {"class_name": "MLPModel", "hidden_dims": [64, 64], "obs_normalization": True},
        "algorithm": {"class_name": CLASS_NAME, "num_learning_epochs": 4, "num_mini_batches": 4, "learning_rate": 1e-3,
                      "clip_param": 0.2, "num_draws": 4, "sampling_steps": 8, **algorithm},
    }


def make_runner(log_dir=None, env_seed: int = 0, **algorithm) -> OnPolicyRunner:
    return OnPolicyRunner(PointReachVecEnv(num_envs=64, seed=env_seed), train_cfg(**algorithm),
                          log_dir=None if log_dir is None else str(log_dir))


def record_updates(runner: OnPolicyRunner) -> list[dict]:
    """Keep every loss dict the runner receives (and the RL optimizer's state size right after)."""
    rows: list[dict] = []
    update = runner.alg.update

    def recorded() -> dict:
        info = update()
        rows.append({**info, "_optimizer_state": len(runner.alg.optimizer.state)})
        return info

    runner.alg.update = recorded
    return rows


@torch.no_grad()
def mean_return(policy, seed: int = 123, num_envs: int = 256) -> float:
    """Mean return of the first episode of every env under the deterministic (zero-noise) policy."""
    env = PointReachVecEnv(num_envs=num_envs, seed=seed)
    obs = env.get_observations()
    total, alive = torch.zeros(num_envs), torch.ones(num_envs, dtype=torch.bool)
    for _ in range(env.max_episode_length):
        obs, rewards, dones, _ = env.step(policy(obs))
        total += rewards * alive
        alive &= dones == 0
    return float(total.mean())


def test_learns_point_reach_through_on_policy_runner(tmp_path):
    torch.manual_seed(0)
    runner = make_runner(tmp_path)
    assert isinstance(runner.alg, FPOPlusPlus)
    rows = record_updates(runner)
    before = mean_return(runner.get_inference_policy())
    runner.learn(20)
    after = mean_return(runner.get_inference_policy())
    assert len(rows) == 20
    for row in rows:
        assert all(math.isfinite(v) for v in row.values()), row
        assert {"cfm_loss_before", "cfm_loss_after", "clip_ratio", "value_loss", "policy_loss"} <= set(row)
    # Standing still returns about -40; measured: -40.0 -> -15.8 after 20 iterations (seed 0).
    assert before < -35
    assert after > before + 15, (before, after)
    assert (tmp_path / "model_19.pt").is_file()  # the runner's own checkpointing went through alg.save()


def test_save_load_round_trip_through_the_runner(tmp_path):
    torch.manual_seed(0)
    runner = make_runner()
    runner.learn(2)
    path = tmp_path / "model.pt"
    runner.save(str(path))
    torch.manual_seed(1)  # a differently initialised twin
    twin = make_runner(env_seed=5)
    obs = PointReachVecEnv(num_envs=32, seed=9).get_observations()
    with torch.no_grad():
        assert not torch.allclose(twin.alg.get_policy()(obs), runner.alg.get_policy()(obs))
    twin.load(str(path))
    assert twin.current_learning_iteration == runner.current_learning_iteration == 1
    assert twin.alg.rl_updates == runner.alg.rl_updates == 2
    with torch.no_grad():
        torch.testing.assert_close(twin.alg.get_policy()(obs), runner.alg.get_policy()(obs), rtol=0, atol=0)
        critic_obs = obs["critic"]
        torch.testing.assert_close(twin.alg.critic(critic_obs), runner.alg.critic(critic_obs), rtol=0, atol=0)
        # Same generator state: the next stochastic rollout actions match too.
        torch.testing.assert_close(twin.alg.act(obs), runner.alg.act(obs), rtol=0, atol=0)
    for key, value in runner.alg.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(twin.alg.optimizer.state_dict()["state"][key]["exp_avg"], value["exp_avg"])


class CountingEnv(PointReachVecEnv):
    """PointReachVecEnv that counts its vector steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, actions):
        self.steps += 1
        return super().step(actions)


def test_initial_self_distillation_runs_algorithm_3_before_rl():
    torch.manual_seed(0)
    env = CountingEnv(num_envs=64, seed=0)
    runner = OnPolicyRunner(env, train_cfg(distill_initial_iterations=6, distill_rollout_steps=3,
                                           distill_minibatch_size=100, ema_warmup_updates=1))
    alg = runner.alg
    rows = record_updates(runner)
    critic_before = {k: v.clone() for k, v in alg.critic.named_parameters()}
    actor_before = alg.actor.state_dict()["obs_in.weight"].clone()
    optimizer_before = alg.optimizer
    with torch.inference_mode():  # as the runner calls it
        alg.act(env.get_observations())  # the pending stage runs first: 6 iterations x its own 3 rollout steps
    assert env.steps == 6 * 3
    for key, value in critic_before.items():  # only the actor trains
        torch.testing.assert_close(dict(alg.critic.named_parameters())[key], value, rtol=0, atol=0)
    assert not torch.equal(alg.actor.state_dict()["obs_in.weight"], actor_before)
    assert alg.optimizer is not optimizer_before and float(alg.actor.obs_norm.count) == 6 * 3 * 64
    runner.learn(1)  # then one runner iteration of num_steps_per_env = 16 RL steps
    assert env.steps == 6 * 3 + 16 and runner.current_learning_iteration == 0 and alg.rl_updates == 1
    row = rows[0]
    assert row["distill_initial_done"] == 1.0 and row["distill_env_steps"] == 6 * 3 * 64
    assert row["distill_buffer"] == 6 * 3 * 64  # under the cap max(4 x 100, 64 x 3 x 8): nothing trimmed
    assert {"distill_action_mse", "distill_cfm_loss_before", "distill_cfm_loss_after", "cfm_loss_before"} <= set(row)
    assert row["distill_cfm_loss_after"] < row["distill_cfm_loss_before"] and row["distill_action_mse"] < 0.05, row
    assert float(alg.actor.obs_norm.count) == 6 * 3 * 64 + 16 * 64  # the statistics kept updating
    runner.learn(1)
    assert "distill_initial_done" not in rows[-1] and env.steps == 6 * 3 + 32


def test_distillation_pulls_the_student_onto_a_different_teacher():
    torch.manual_seed(0)
    runner = make_runner(distill_initial_iterations=20, distill_updates=5, distill_minibatch_size=256)
    alg = runner.alg
    teacher = copy.deepcopy(alg.actor).requires_grad_(False)
    with torch.no_grad():  # a teacher that acts differently from the student
        teacher.trunk[-1].weight.add_(0.3 * torch.randn_like(teacher.trunk[-1].weight))
        teacher.trunk[-1].bias.add_(0.5)
    alg.distill_teacher = teacher
    obs = PointReachVecEnv(num_envs=512, seed=4).get_observations()["policy"]
    before = action_mse(alg.actor, teacher, obs, torch.Generator().manual_seed(0))
    rows = record_updates(runner)
    runner.learn(1)
    after = action_mse(alg.actor, teacher, obs, torch.Generator().manual_seed(0))
    assert after < 0.2 * before, (before, after)
    assert rows[-1]["distill_action_mse"] < 0.2 * before


def test_interleaved_distillation_recreates_the_rl_optimizer_and_resets_the_ema():
    torch.manual_seed(0)
    env = CountingEnv(num_envs=64, seed=0)
    runner = OnPolicyRunner(env, train_cfg(distill_every=2, distill_iterations=2, distill_minibatch_size=256,
                                           ema_warmup_updates=0))
    rows = record_updates(runner)
    runner.learn(4)
    assert ["distill_interleaved_done" in r for r in rows] == [False, False, True, False]
    assert env.steps == 4 * 16 + 2 * 8  # two RL updates, one stage of 2 x 8 steps, two more RL updates
    assert rows[1]["_optimizer_state"] > 0 and runner.current_learning_iteration == 3
    assert all(math.isfinite(v) for r in rows for v in r.values())
    alg = runner.alg
    alg.pending_stage = "interleaved"
    alg.act(env.get_observations())  # a stage alone: the EMA equals the student right after it
    for avg, live in zip(alg.ema.shadow.parameters(), alg.actor.parameters()):
        torch.testing.assert_close(avg, live, rtol=0, atol=0)
    assert len(alg.optimizer.state) == 0


def test_dipod_beta_adds_the_elbo_term():
    torch.manual_seed(0)
    runner = make_runner(dipod_beta=0.5)
    rows = record_updates(runner)
    runner.learn(2)
    for row in rows:
        # dipod_term = -beta * mean ELBO = beta * mean CFM loss of the same minibatch (averaged alike).
        assert row["dipod_loss"] == pytest.approx(0.5 * row["cfm_loss"], rel=1e-5)


def test_value_loss_matches_rsl_rl_ppo_scaling():
    settings = FPOPlusPlusConfig(value_loss_coef=0.7, value_clip_param=0.1, use_clipped_value_loss=True).update_settings()
    gen = torch.Generator().manual_seed(0)
    values, old, returns = (torch.randn(50, generator=gen) for _ in range(3))
    ours = settings.value_coef * value_loss(values, old, returns, settings.value_clip)
    clipped = old + (values - old).clamp(-0.1, 0.1)
    rsl_rl_ppo = 0.7 * torch.max((values - returns).pow(2), (clipped - returns).pow(2)).mean()
    torch.testing.assert_close(ours, rsl_rl_ppo)


def test_config_validation():
    assert parse_algorithm_config({"class_name": CLASS_NAME}) == FPOPlusPlusConfig()
    published = FPOPlusPlusConfig()
    assert (published.clip_param, published.num_draws, published.sampling_steps, published.learning_rate,
            published.num_learning_epochs) == (0.05, 16, 64, 1e-4, 16)
    assert FPOPlusPlusConfig(use_clipped_value_loss=False).update_settings().value_clip == 0.0
    with pytest.raises(ConfigError, match="num_mini_batches=0"):  # the core check, named as the user wrote it
        parse_algorithm_config({"num_mini_batches": 0})
    with pytest.raises(ConfigError, match="valid keys"):
        parse_algorithm_config({"class_name": CLASS_NAME, "num_drawz": 8})
    with pytest.raises(ConfigError, match="rnd"):
        parse_algorithm_config({"class_name": CLASS_NAME, "rnd_cfg": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="clip_param"):
        parse_algorithm_config({"clip_param": 0.0})
    with pytest.raises(ConfigError, match="schedule"):
        parse_algorithm_config({"schedule": "cosine"})
    # A PPO config subclass (mjlab / IsaacLab dataclasses) carries PPO-only keys: accepted, ignored, warned.
    with pytest.warns(UserWarning, match="entropy_coef"):
        cfg = parse_algorithm_config({"class_name": CLASS_NAME, "entropy_coef": 0.005, "desired_kl": 0.01,
                                      "rnd_cfg": None, "symmetry_cfg": None, "dipod_beta": 0.1})
    assert cfg.dipod_beta == 0.1
    bad = train_cfg()
    bad["actor"]["rnn_type"] = "lstm"
    with pytest.raises(ConfigError, match="rnn_type"):
        OnPolicyRunner(PointReachVecEnv(num_envs=8), bad)


def test_construction_fills_the_extension_keys_rsl_rl_reads():
    """rsl-rl-lib 5.4.2 (mjlab's pin) reads cfg["algorithm"]["rnd_cfg"] in its logger and runner without .get;
    its PPO sets the keys while being built, so FPOPlusPlus must as well (KeyError: 'rnd_cfg' otherwise)."""
    cfg = train_cfg()
    assert "rnd_cfg" not in cfg["algorithm"] and "symmetry_cfg" not in cfg["algorithm"]
    env = PointReachVecEnv(num_envs=16)
    FPOPlusPlus.construct_algorithm(env.get_observations(), env, cfg, "cpu")
    assert cfg["algorithm"]["rnd_cfg"] is None and cfg["algorithm"]["symmetry_cfg"] is None


def test_a_ppo_shaped_config_switches_by_class_name():
    """What mjlab / IsaacLab pass after `asdict(agent_cfg)` when only class_name is changed."""
    ppo_algorithm = {"num_learning_epochs": 5, "num_mini_batches": 4, "learning_rate": 1e-3, "schedule": "adaptive",
                     "gamma": 0.99, "lam": 0.95, "entropy_coef": 0.005, "desired_kl": 0.01, "max_grad_norm": 1.0,
                     "value_loss_coef": 1.0, "use_clipped_value_loss": True, "clip_param": 0.2,
                     "normalize_advantage_per_mini_batch": False, "optimizer": "adam", "share_cnn_encoders": False,
                     "rnd_cfg": None, "symmetry_cfg": None, "class_name": CLASS_NAME}
    model = {"hidden_dims": (64, 64), "activation": "elu", "obs_normalization": True, "cnn_cfg": None,
             "rnn_type": None, "rnn_hidden_dim": 256, "rnn_num_layers": 1, "class_name": "MLPModel"}
    cfg = {"num_steps_per_env": 16, "save_interval": 50, "seed": 42, "obs_groups": {"actor": ["policy"], "critic": ["critic"]},
           "actor": {**model, "distribution_cfg": {"class_name": "GaussianDistribution", "init_std": 1.0}},
           "critic": {**model, "distribution_cfg": None}, "algorithm": ppo_algorithm, "clip_actions": None}
    with pytest.warns(UserWarning) as caught:
        runner = OnPolicyRunner(PointReachVecEnv(num_envs=16), cfg)
    messages = " ".join(str(w.message) for w in caught)
    assert "entropy_coef" in messages and "distribution_cfg" in messages
    settings = runner.alg.settings
    assert (settings.clip_param, settings.learning_rate, settings.schedule, settings.num_draws) == (0.2, 1e-3, "adaptive", 16)
    rows = record_updates(runner)
    runner.learn(1)
    assert all(math.isfinite(v) for v in rows[0].values())


def test_rejects_a_checkpoint_of_another_algorithm(tmp_path):
    runner = make_runner()
    torch.save({"actor_state_dict": {}, "critic_state_dict": {}, "optimizer_state_dict": {}, "iter": 0, "infos": None},
               tmp_path / "ppo.pt")
    with pytest.raises(ValueError, match="not written by"):
        runner.load(str(tmp_path / "ppo.pt"))


def test_diverged_update_stops_before_the_runner_saves(tmp_path, monkeypatch):
    import dipod.control.rsl_rl as adapter

    def diverging_update(actor, *args, **kwargs):  # stands in for an update that blew up
        with torch.no_grad():
            actor.trunk[-1].bias.fill_(float("nan"))
        return {}

    runner = make_runner(tmp_path)
    monkeypatch.setattr(adapter, "fpo_plus_plus_update", diverging_update)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        runner.learn(1)
    assert not list(tmp_path.glob("model_*.pt"))


def test_jit_export_matches_the_policy(tmp_path):
    torch.manual_seed(0)
    runner = make_runner()
    runner.learn(1)
    runner.export_policy_to_jit(str(tmp_path))
    exported = torch.jit.load(str(tmp_path / "policy.pt"))
    obs = PointReachVecEnv(num_envs=1, seed=3).get_observations()
    with torch.no_grad():
        torch.testing.assert_close(exported(obs["policy"]), runner.get_inference_policy()(obs))


@pytest.mark.slow
def test_published_fpo_plus_plus_settings_learn():
    """FPO++'s published clip 0.05, 16 draws, 64 Euler steps, lr 1e-4, 16 epochs (about a minute on 1 CPU core)."""
    torch.manual_seed(0)
    runner = make_runner(clip_param=0.05, num_draws=16, sampling_steps=64, learning_rate=1e-4, num_learning_epochs=16)
    rows = record_updates(runner)
    before = mean_return(runner.get_inference_policy())
    runner.learn(40)
    after = mean_return(runner.get_inference_policy())
    assert all(math.isfinite(v) for r in rows for v in r.values())
    # Measured with the earlier defaults: -39.9 -> -25.6; the threshold still holds with the released ones (re-run).
    assert after > before + 8, (before, after)


@pytest.mark.slow
def test_onnx_export_matches_the_policy(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    runner = make_runner()
    runner.learn(1)
    runner.export_policy_to_onnx(str(tmp_path), "policy.onnx")
    model = onnx.load(str(tmp_path / "policy.onnx"))
    onnx.checker.check_model(model)
    obs = PointReachVecEnv(num_envs=1, seed=3).get_observations()
    (actions,) = ReferenceEvaluator(model).run(None, {"obs": obs["policy"].numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(actions), runner.get_inference_policy()(obs))


def test_action_noise_is_stored_and_executed():
    runner = make_runner(action_noise_std=0.02)
    alg = runner.alg
    obs = PointReachVecEnv(num_envs=64, seed=2).get_observations()
    state = alg.generator.get_state()
    with torch.inference_mode():
        executed = alg.act(obs)
    stored = alg.transition.actions
    alg.generator.set_state(state)
    sample = alg.actor.sample(obs["policy"], alg.generator)
    noise = torch.randn(sample.shape, generator=alg.generator)
    torch.testing.assert_close(stored, sample + 0.02 * noise)  # FPO++: the noise is part of the stored action
    torch.testing.assert_close(executed, alg.actor.to_env_action(stored))


def test_a_time_out_bootstraps_the_discounted_value_of_the_state_it_stopped_in():
    """rsl-rl's convention: a truncated (not ended) episode's last reward gains gamma * V(s); an
    undiscounted V would inflate every truncated return by (1 - gamma) V."""
    from types import SimpleNamespace

    stored = []
    transition = SimpleNamespace(values=torch.tensor([[2.0], [4.0], [8.0]]), clear=lambda: None)
    algorithm = SimpleNamespace(transition=transition, settings=SimpleNamespace(gamma=0.9), device="cpu",
                                storage=SimpleNamespace(add_transition=lambda t: stored.append(t.rewards.clone())))
    rewards, dones = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 1, 0])
    FPOPlusPlus.process_env_step(algorithm, None, rewards, dones, {"time_outs": torch.tensor([1, 0, 0])})
    torch.testing.assert_close(stored[0], torch.tensor([1.0 + 0.9 * 2.0, 1.0, 1.0]))
    assert torch.equal(rewards, torch.ones(3))  # the environment's tensor is left as it was
