"""FPOPlusPlus's rsl-rl contract pinned number by number: what construct_algorithm builds from the config,
the optimizer's settings, act's stored / executed actions and output_std, the generators, update's
draws and refusal, the save / load round trip (EMA included) and the error messages a user reads."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings

import pytest
import torch
from tensordict import TensorDict
from test_control_rsl_rl import train_cfg

from dipod.advantages import generalized_advantage_estimation
from dipod.config import ConfigError
from dipod.control.rsl_rl import FPOPlusPlus, _select
from dipod.control.toy_vecenv import PointReachVecEnv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def small_cfg(**algorithm) -> dict:
    """train_cfg shrunk for speed: 4 steps per env, narrow networks, one epoch, few draws and Euler steps."""
    cfg = train_cfg(**{"num_learning_epochs": 1, "num_draws": 2, "sampling_steps": 4, **algorithm})
    cfg["num_steps_per_env"] = 4
    cfg["actor"]["hidden_dims"] = [16, 16]
    cfg["critic"]["hidden_dims"] = [16, 16]
    return cfg


def build(num_envs: int = 8, cfg: dict | None = None, **algorithm) -> tuple[FPOPlusPlus, PointReachVecEnv, dict]:
    cfg = small_cfg(**algorithm) if cfg is None else cfg
    env = PointReachVecEnv(num_envs=num_envs, seed=0)
    return FPOPlusPlus.construct_algorithm(env.get_observations(), env, cfg, "cpu"), env, cfg


def rollout(alg: FPOPlusPlus, env: PointReachVecEnv, steps: int = 4) -> TensorDict:
    """What OnPolicyRunner does between two updates; returns the last observations."""
    obs = env.get_observations()
    with torch.inference_mode():
        for _ in range(steps):
            obs, rewards, dones, extras = env.step(alg.act(obs))
            alg.process_env_step(obs, rewards, dones, extras)
        alg.compute_returns(obs)
    return obs


def deterministic(actor, obs_nd):
    with torch.no_grad():
        return actor.to_env_action(actor.sample(obs_nd, noise_na=torch.zeros(obs_nd.shape[0], actor.action_dim)))


# ---- _select ----------------------------------------------------------------------------------
def test_select_concatenates_groups_of_different_widths_along_the_feature_axis():
    a, b = torch.arange(6.0).reshape(3, 2), torch.arange(15).reshape(3, 5)
    out = _select(TensorDict({"a": a, "b": b}, batch_size=[3]), ["a", "b"])
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, torch.cat([a, b.float()], dim=1), rtol=0, atol=0)
    # a rollout's [T, N, D] groups: still the last axis
    a3, b3 = torch.randn(4, 3, 2), torch.randn(4, 3, 5)
    out3 = _select(TensorDict({"a": a3, "b": b3}, batch_size=[4, 3]), ["b", "a"])
    assert out3.shape == (4, 3, 7)
    torch.testing.assert_close(out3, torch.cat([b3, a3], dim=-1), rtol=0, atol=0)


# ---- the policy rsl-rl sees ----------------------------------------------------------------------
def test_export_module_is_a_frozen_eval_copy_with_rsl_rl_names_and_a_one_row_dummy_input():
    torch.manual_seed(0)
    alg, env, _ = build()
    policy = alg.get_policy()
    obs = env.get_observations()
    expected = policy(obs)
    exported = policy.as_onnx()
    assert exported.input_names == ["obs"] and exported.output_names == ["actions"]
    (dummy,) = exported.get_dummy_inputs()
    assert dummy.shape == (1, 2) and not dummy.any()
    assert not exported.training and alg.actor.training  # the export's eval() leaves the live actor training
    torch.testing.assert_close(exported(obs["policy"]), expected, rtol=0, atol=0)
    with torch.no_grad():
        alg.actor.trunk[-1].bias.add_(1.0)
    assert not torch.allclose(policy(obs), expected)
    torch.testing.assert_close(exported(obs["policy"]), expected, rtol=0, atol=0)  # a copy, not the live actor


def test_policy_output_std_starts_at_one_and_stochastic_output_samples_from_the_generator_given():
    torch.manual_seed(0)
    alg, env, _ = build()
    policy = alg.get_policy()
    torch.testing.assert_close(policy.output_std, torch.ones(2), rtol=0, atol=0)
    obs = env.get_observations()
    torch.manual_seed(5)
    sampled = policy(obs, stochastic_output=True, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = alg.actor.to_env_action(alg.actor.sample(obs["policy"], torch.Generator().manual_seed(3)))
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    assert not torch.allclose(sampled, policy(obs))


# ---- construction --------------------------------------------------------------------------------
def test_direct_construction_defaults_normalise_both_run_on_cpu_and_seed_zero():
    alg, env, cfg = build()
    direct = FPOPlusPlus(alg.actor, alg.critic, alg.storage, cfg["obs_groups"], alg.settings, env)
    assert direct.normalize_actor_obs is True and direct.normalize_critic_obs is True and direct.device == "cpu"
    assert torch.equal(direct.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert torch.equal(direct.shuffle_generator.get_state(), torch.Generator().manual_seed(1).get_state())


@pytest.mark.parametrize("seed", [None, 0, 1, 7])
def test_seed_and_seed_plus_one_seed_the_two_generators(seed):
    cfg = small_cfg()
    if seed is None:
        del cfg["seed"]
    else:
        cfg["seed"] = seed
    alg, _, _ = build(cfg=cfg)
    s = 0 if seed is None else seed
    assert alg.device == "cpu"
    assert torch.equal(alg.generator.get_state(), torch.Generator().manual_seed(s).get_state())
    assert torch.equal(alg.shuffle_generator.get_state(), torch.Generator().manual_seed(s + 1).get_state())


def test_the_algorithm_and_its_rollout_storage_live_on_the_device_given():
    alg, _, _ = build()
    assert alg.device == "cpu" and alg.storage.device == "cpu"
    assert alg.storage.observations.device == torch.device("cpu")


def test_two_seeds_give_different_streams_in_each_role():
    a, _, _ = build(cfg={**small_cfg(), "seed": 0})
    b, _, _ = build(cfg={**small_cfg(), "seed": 1})
    assert not torch.equal(a.generator.get_state(), b.generator.get_state())
    assert not torch.equal(a.shuffle_generator.get_state(), b.shuffle_generator.get_state())
    assert not torch.equal(a.generator.get_state(), a.shuffle_generator.get_state())


def test_optimizer_settings_are_read_back_from_param_groups():
    alg, _, _ = build(learning_rate=3e-4, adam_betas=[0.8, 0.9], adam_eps=1e-6, weight_decay=0.05)
    (group,) = alg.optimizer.param_groups
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.9), 1e-6, 0.05)
    assert len(group["params"]) == len(list(alg.actor.parameters())) + len(list(alg.critic.parameters()))


def test_construct_algorithm_passes_the_flow_settings_to_the_actor():
    alg, _, _ = build(time_embed_dim=4, sampling_steps=3, time_skew_b=2.0, cfm_reduction="sqrt", action_bound=0.5)
    actor = alg.actor
    assert (actor.time_embed_dim, actor.sampling_steps, actor.time_skew_b, actor.cfm_reduction) == (4, 3, 2.0, "sqrt")
    assert actor.xt_in.in_features == 2 + 4
    torch.testing.assert_close(actor.scaling.half_range, torch.full((2,), 0.5), rtol=0, atol=0)


def test_model_settings_of_actor_and_critic_are_each_their_own():
    cfg = small_cfg()
    cfg["actor"] = {"hidden_dims": [24], "activation": "silu", "obs_normalization": True}
    cfg["critic"] = {"hidden_dims": [32, 16], "activation": "tanh", "obs_normalization": False}
    alg, _, _ = build(cfg=cfg)
    assert alg.normalize_actor_obs is True and alg.normalize_critic_obs is False
    linears = [m for m in alg.critic.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 32), (32, 16), (16, 1)]
    assert all(isinstance(m, torch.nn.Tanh) for m in alg.critic.net if not isinstance(m, torch.nn.Linear))
    assert alg.actor.obs_in.out_features == 24 and isinstance(alg.actor.act, torch.nn.SiLU)
    cfg = small_cfg()
    cfg["actor"]["obs_normalization"], cfg["critic"]["obs_normalization"] = False, True
    alg, _, _ = build(cfg=cfg)
    assert alg.normalize_actor_obs is False and alg.normalize_critic_obs is True


def test_missing_obs_groups_resolve_to_policy_and_critic_and_are_written_back():
    cfg = small_cfg()
    del cfg["obs_groups"]
    alg, _, _ = build(cfg=cfg)
    assert cfg["obs_groups"] == {"actor": ["policy"], "critic": ["critic"]}
    assert alg.policy.obs_groups == ["policy"] and alg.critic_groups == ["critic"]


def test_configured_obs_groups_of_different_widths_are_used():
    cfg = small_cfg()
    cfg["obs_groups"] = {"actor": ["policy"], "critic": ["policy", "critic"]}
    alg, env, _ = build(cfg=cfg)
    assert cfg["obs_groups"] == {"actor": ["policy"], "critic": ["policy", "critic"]}
    assert alg.critic_groups == ["policy", "critic"] and alg.critic.net[0].in_features == 2 + 5
    assert alg.actor.obs_dim == 2
    obs = env.get_observations()
    with torch.inference_mode():
        alg.act(obs)
    with torch.no_grad():
        expected = alg.critic(torch.cat([obs["policy"], obs["critic"]], dim=-1))[:, None]
    torch.testing.assert_close(alg.transition.values, expected, rtol=0, atol=0)


def test_multi_gpu_is_refused_in_full():
    cfg = small_cfg()
    cfg["multi_gpu"] = {"global_rank": 0, "local_rank": 0, "world_size": 2}
    with pytest.raises(ConfigError) as err:
        build(cfg=cfg)
    assert str(err.value) == "FPOPlusPlus runs on one device; multi-GPU training (WORLD_SIZE > 1) is not supported"


def test_a_non_flat_observation_group_is_refused_in_full():
    env = PointReachVecEnv(num_envs=4)
    obs = env.get_observations()
    obs["image"] = torch.zeros(4, 3, 2)
    cfg = small_cfg()
    cfg["obs_groups"] = {"actor": ["policy"], "critic": ["critic", "image"]}
    with pytest.raises(ConfigError) as err:
        FPOPlusPlus.construct_algorithm(obs, env, cfg, "cpu")
    assert str(err.value) == ("observation groups ['image'] of the critic are not flat [num_envs, dim] tensors; "
                              "FPOPlusPlus uses MLPs (flatten them in the environment or leave them out of obs_groups)")


def test_too_few_samples_for_the_minibatches_is_refused_in_full_and_exactly_enough_is_accepted():
    cfg = small_cfg(num_mini_batches=8)
    cfg["num_steps_per_env"] = 3
    with pytest.raises(ConfigError) as err:
        build(num_envs=2, cfg=cfg)
    assert str(err.value) == "num_envs * num_steps_per_env = 6 samples cannot fill num_mini_batches=8"
    cfg = small_cfg(num_mini_batches=8)
    cfg["num_steps_per_env"] = 4
    alg, _, _ = build(num_envs=2, cfg=cfg)
    assert alg.settings.num_mini_batches == 8


def test_torch_compile_mode_is_warned_about_at_the_callers_line_and_only_when_set():
    env = PointReachVecEnv(num_envs=4)
    for mode, expected in ((None, []), ("max-autotune", ["FPOPlusPlus ignores torch_compile_mode"])):
        cfg = small_cfg()
        if mode is not None:
            cfg["torch_compile_mode"] = mode
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            FPOPlusPlus.construct_algorithm(env.get_observations(), env, cfg, "cpu")
        ours = [w for w in caught if "torch_compile" in str(w.message).lower()]
        assert [str(w.message) for w in ours] == expected
        assert all(w.filename == __file__ for w in ours)


# ---- rollout ---------------------------------------------------------------------------------------
def test_act_without_action_noise_stores_the_flow_sample_and_draws_nothing_more():
    alg, env, _ = build(action_noise_std=0.0)
    obs = env.get_observations()
    state = alg.generator.get_state()
    with torch.inference_mode():
        executed = alg.act(obs)
    after = alg.generator.get_state()
    alg.generator.set_state(state)
    sample = alg.actor.sample(obs["policy"], alg.generator)
    torch.testing.assert_close(alg.transition.actions, sample, rtol=0, atol=0)
    assert torch.equal(alg.generator.get_state(), after)
    torch.testing.assert_close(executed, alg.actor.to_env_action(sample), rtol=0, atol=0)


@pytest.mark.parametrize("num_envs", [2, 8])
def test_output_std_is_per_action_dimension_across_environments(num_envs):
    alg, env, _ = build(num_envs=num_envs)
    with torch.inference_mode():
        alg.act(env.get_observations())
    stored = alg.transition.actions
    assert alg.policy.output_std.shape == (2,)
    torch.testing.assert_close(alg.policy.output_std, stored.std(0), rtol=0, atol=0)
    assert not torch.allclose(alg.policy.output_std, torch.ones(2))


def test_output_std_of_a_single_environment_stays_as_it_was():
    alg, env, _ = build(num_envs=1)
    with torch.inference_mode():
        executed = alg.act(env.get_observations())
    assert executed.shape == (1, 2)
    torch.testing.assert_close(alg.policy.output_std, torch.ones(2), rtol=0, atol=0)


# ---- self-distillation stage -----------------------------------------------------------------------
def test_a_stage_without_an_environment_is_refused_in_full():
    alg, env, cfg = build(distill_initial_iterations=1)
    direct = FPOPlusPlus(alg.actor, alg.critic, alg.storage, cfg["obs_groups"], alg.settings)
    assert direct.pending_stage == "initial"
    with pytest.raises(RuntimeError) as err:
        direct.act(env.get_observations())
    assert str(err.value) == "self-distillation needs the environment: build FPOPlusPlus through construct_algorithm"


def test_a_stage_draws_from_the_algorithms_generator_and_honours_the_normalisation_flags():
    cfg = small_cfg(distill_initial_iterations=2, distill_rollout_steps=2, distill_minibatch_size=16)
    cfg["actor"]["obs_normalization"] = False
    alg, _, _ = build(cfg=cfg)
    before = alg.generator.get_state()
    torch.manual_seed(123)
    global_before = torch.get_rng_state()
    alg._run_stage("initial")
    assert torch.equal(torch.get_rng_state(), global_before)  # all of the stage's randomness is the algorithm's
    assert not torch.equal(alg.generator.get_state(), before)
    assert float(alg.actor.obs_norm.count) == 0  # obs_normalization False: the actor's statistics stay put
    assert float(alg.critic.obs_norm.count) == 2 * 2 * 8
    assert alg.pending_stage == "" and alg.save()["fpo_plus_plus_state"]["pending_stage"] == ""


# ---- returns and updates ---------------------------------------------------------------------------
def test_compute_returns_uses_the_configured_gamma_and_lambda():
    alg, env, _ = build(gamma=0.9, lam=0.5)
    last = rollout(alg, env)
    st = alg.storage
    with torch.no_grad():
        advantages, returns = generalized_advantage_estimation(
            st.rewards[..., 0], st.values[..., 0], st.dones[..., 0], alg.critic(last["critic"]), 0.9, 0.5)
    torch.testing.assert_close(st.advantages[..., 0], advantages, rtol=0, atol=0)
    torch.testing.assert_close(st.returns[..., 0], returns, rtol=0, atol=0)


def test_update_scores_its_draws_from_the_algorithms_generator_and_reports_a_positive_cfm_loss_before():
    torch.manual_seed(0)
    alg, env, _ = build()
    rollout(alg, env)
    obs = alg.storage.observations.flatten(0, 1)["policy"]
    actions = alg.storage.actions.flatten(0, 1).clone()
    actor_before = copy.deepcopy(alg.actor)
    draws = torch.Generator()
    draws.set_state(alg.generator.get_state())
    eps, t = actor_before.draw_noise(actions.shape[0], 2, draws)
    with torch.no_grad():
        expected = float(actor_before.cfm_loss(obs, actions, eps, t).mean())
    torch.manual_seed(99)
    info = alg.update()
    assert {"cfm_loss_before", "cfm_loss_after", "policy_loss", "value_loss", "clip_ratio"} <= set(info)
    assert info["cfm_loss_before"] > 0
    assert info["cfm_loss_before"] == pytest.approx(expected, rel=1e-6)


def test_update_does_not_depend_on_the_global_rng():
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        alg, env, _ = build(num_learning_epochs=2)
        rollout(alg, env)
        torch.manual_seed(global_seed)
        info = alg.update()
        results.append((info, [p.detach().clone() for p in alg.actor.parameters()], alg.shuffle_generator.get_state()))
    (info_a, params_a, shuffle_a), (info_b, params_b, shuffle_b) = results
    assert info_a == info_b
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(shuffle_a, torch.Generator().manual_seed(1).get_state())  # the shuffle drew from it


def test_update_steps_the_ema_and_the_policy_then_acts_with_the_average():
    torch.manual_seed(0)
    alg, env, _ = build(ema_decay=0.5, ema_warmup_updates=0)
    rollout(alg, env)
    alg.update()
    assert alg.ema.updates == 1 and alg.ema.active
    assert alg.policy.inference_actor is alg.ema.shadow
    obs = env.get_observations()
    shadow_out = deterministic(alg.ema.shadow, obs["policy"])
    torch.testing.assert_close(alg.policy(obs), shadow_out, rtol=0, atol=0)
    assert not torch.allclose(shadow_out, deterministic(alg.actor, obs["policy"]))


def test_without_ema_there_is_none_and_updates_and_saves_work():
    torch.manual_seed(0)
    alg, env, _ = build(ema_decay=0.0)
    assert alg.ema is None and alg.policy.ema is None
    rollout(alg, env)
    alg.update()
    assert alg.rl_updates == 1 and alg.save()["fpo_plus_plus_state"]["ema"] is None


def test_the_non_finite_refusal_names_the_first_four_weights(monkeypatch):
    import dipod.control.rsl_rl as adapter

    def diverging_update(actor, *args, **kwargs):
        with torch.no_grad():
            for p in actor.parameters():
                p.fill_(float("nan"))
        return {}

    torch.manual_seed(0)
    alg, env, _ = build()
    rollout(alg, env)
    monkeypatch.setattr(adapter, "fpo_plus_plus_update", diverging_update)
    names = [name for name, _ in alg.actor.named_parameters(prefix="actor")]
    assert len(names) > 4
    with pytest.raises(FloatingPointError) as err:
        alg.update()
    assert re.fullmatch(re.escape(f"FPOPlusPlus: non-finite weights {names[:4]} after the update (metrics ")
                        + r"\{'cfm_loss_before': [0-9.e+-]+, 'cfm_loss_after': nan\}"
                        + re.escape("); lower learning_rate or resume from an earlier checkpoint"), str(err.value))


def test_broadcast_parameters_is_refused_in_full():
    alg, _, _ = build()
    with pytest.raises(RuntimeError) as err:
        alg.broadcast_parameters()
    assert str(err.value) == "FPOPlusPlus runs on one device; multi-GPU training is not supported"


# ---- save / load ------------------------------------------------------------------------------------
def trained(seed: int = 0, **algorithm) -> tuple[FPOPlusPlus, PointReachVecEnv]:
    torch.manual_seed(seed)
    alg, env, _ = build(ema_decay=0.5, ema_warmup_updates=0, **algorithm)
    for _ in range(2):
        rollout(alg, env)
        alg.update()
    return alg, env


def test_save_holds_the_settings_and_the_active_ema():
    alg, _ = trained()
    state = alg.save()["fpo_plus_plus_state"]
    assert state["settings"] == dataclasses.asdict(alg.settings)
    assert state["rl_updates"] == 2 and state["ema"]["updates"] == 2
    for key, value in alg.ema.shadow.state_dict().items():
        torch.testing.assert_close(state["ema"]["shadow"][key], value, rtol=0, atol=0)


def test_full_round_trip_restores_ema_generators_and_learning_rate():
    source, env = trained(learning_rate=5e-4)
    saved = source.save()
    torch.manual_seed(1)
    twin, _, _ = build(ema_decay=0.5, ema_warmup_updates=0, learning_rate=1e-3)
    obs = env.get_observations()
    assert not torch.allclose(twin.policy(obs), source.policy(obs))
    assert twin.load(saved, None, strict=True) is True
    assert twin.learning_rate == 5e-4 and twin.optimizer.param_groups[0]["lr"] == 5e-4
    assert twin.rl_updates == 2 and twin.ema.updates == 2 and twin.ema.active
    for a, b in zip(twin.ema.shadow.parameters(), source.ema.shadow.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(twin.policy(obs), source.policy(obs), rtol=0, atol=0)
    assert torch.equal(twin.generator.get_state(), source.generator.get_state())
    assert torch.equal(twin.shuffle_generator.get_state(), source.shuffle_generator.get_state())


def test_an_actor_only_load_leaves_the_rest_and_is_not_a_resume():
    source, env = trained()
    saved = source.save()
    torch.manual_seed(1)
    twin, _, _ = build(ema_decay=0.5, ema_warmup_updates=0)
    critic_before = copy.deepcopy(twin.critic.state_dict())
    generator_before = twin.generator.get_state()
    assert twin.load(saved, {"actor": True}, strict=True) is False
    for a, b in zip(twin.actor.parameters(), source.actor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert twin.ema.updates == 2
    for key, value in critic_before.items():
        torch.testing.assert_close(twin.critic.state_dict()[key], value, rtol=0, atol=0)
    assert twin.rl_updates == 0 and len(twin.optimizer.state) == 0 and twin.learning_rate == 1e-3
    assert torch.equal(twin.generator.get_state(), generator_before)


def test_an_algorithm_without_ema_loads_the_actor_of_a_checkpoint_with_one():
    source, _ = trained()
    torch.manual_seed(1)
    plain, _, _ = build(ema_decay=0.0)
    assert plain.load(source.save(), {"actor": True, "critic": True}, strict=True) is False
    for a, b in zip(plain.actor.parameters(), source.actor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strict_is_passed_to_both_networks():
    source, _ = trained()
    saved = source.save()
    incomplete = {**saved, "actor_state_dict": {k: v for k, v in saved["actor_state_dict"].items() if k != "obs_in.bias"},
                  "critic_state_dict": {k: v for k, v in saved["critic_state_dict"].items() if k != "net.0.bias"}}
    torch.manual_seed(1)
    twin, _, _ = build(ema_decay=0.5, ema_warmup_updates=0)
    for part in ("actor", "critic"):
        with pytest.raises(RuntimeError, match="Missing key"):
            twin.load(incomplete, {part: True}, strict=True)
    assert twin.load(incomplete, {"actor": True, "critic": True}, strict=False) is False
    torch.testing.assert_close(twin.actor.xt_in.weight, source.actor.xt_in.weight, rtol=0, atol=0)
    torch.testing.assert_close(twin.critic.net[2].weight, source.critic.net[2].weight, rtol=0, atol=0)


def test_a_foreign_checkpoint_is_refused_in_full():
    alg, _, _ = build()
    with pytest.raises(ValueError) as err:
        alg.load({"model_state_dict": {}}, None, strict=True)
    assert str(err.value) == ("this checkpoint was not written by dipod.control.rsl_rl:FPOPlusPlus (no flow actor state); "
                              "load it with the algorithm that wrote it")
