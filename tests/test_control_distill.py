"""Algorithm 3 as released, through the one SelfDistillation stage: its own rollout length, one step per
iteration on min(minibatch, buffer) pairs drawn without replacement, buffer halving, moving normaliser."""

import time

import pytest
import torch

from dipod.config import ConfigError
from dipod.control.distill import DistillSettings, SelfDistillation
from dipod.control.flow import FlowActor


def tiny_actor():
    torch.manual_seed(0)
    return FlowActor(2, 1, [-1.0], [1.0], hidden=(8,), sampling_steps=2)


class CountingStep:
    """Stands in for the environments: every call returns fresh, distinct observations."""

    def __init__(self, num_envs):
        self.num_envs, self.calls = num_envs, 0

    def __call__(self, action_na):
        self.calls += 1
        base = 0.1 * torch.arange(self.num_envs, dtype=torch.float32) + 0.001 * self.calls  # no clipping, no repeats
        return torch.stack([base, -base], dim=1)


def test_one_step_per_iteration_on_min_minibatch_buffer_without_replacement():
    actor = tiny_actor()
    settings = DistillSettings(iterations=4, rollout_steps=3, minibatch_size=20, num_draws=2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    seen = []
    original = actor.cfm_loss

    def recording(obs, *args, **kwargs):
        if torch.is_grad_enabled():  # the training steps (finish() scores without a graph)
            seen.append(obs.detach().clone())
        return original(obs, *args, **kwargs)

    actor.cfm_loss = recording
    step = CountingStep(4)
    stage.run(step(None), step)
    assert step.calls == 1 + 4 * 3  # the first observation, then the stage's own rollout length
    assert [m.shape[0] for m in seen] == [12, 20, 20, 20]  # one step per iteration, min(20, buffer = 12, 24, 36, 48)
    for minibatch in seen:
        assert torch.unique(minibatch, dim=0).shape[0] == minibatch.shape[0]  # without replacement
    info = stage.finish()
    assert info["env_steps"] == 48 and info["buffer"] == 48
    assert {"cfm_loss_before", "cfm_loss_after", "action_mse", "action_mse_before"} <= set(info)


def test_buffer_drops_its_older_half_past_the_cap():
    actor = tiny_actor()
    settings = DistillSettings(iterations=13, rollout_steps=1, minibatch_size=1, num_draws=2)
    assert settings.buffer_cap(num_envs=1) == max(4 * 1, 1 * 1 * 8) == 8
    stage = SelfDistillation(actor, settings, num_envs=1, generator=torch.Generator().manual_seed(0))
    sizes, step = [], CountingStep(1)
    obs = step(None)
    for _ in range(settings.iterations):
        obs = step(stage.act(obs))
        stage.train_step()
        sizes.append(len(stage.obs_chunks))
    # 9 > 8 pairs: keep the newest 5 chunks (9 - 9 // 2), then grow again
    assert sizes == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 5]


def test_teacher_is_frozen_and_shares_the_moving_normaliser():
    actor = tiny_actor()
    settings = DistillSettings(iterations=3, rollout_steps=2, minibatch_size=8, num_draws=2, lr=1e-2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    teacher_before = [p.clone() for p in stage.teacher.parameters()]
    step = CountingStep(4)
    stage.run(step(None), step)
    assert stage.teacher.obs_norm is actor.obs_norm
    assert not any(p.requires_grad for p in stage.teacher.parameters())  # no graph is ever built through it
    assert float(actor.obs_norm.count) == 3 * 2 * 4  # every observation the teacher acted on
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, stage.teacher.parameters()))
    assert not torch.equal(stage.teacher.obs_in.weight, actor.obs_in.weight)  # the student moved
    frozen = tiny_actor()
    still = SelfDistillation(frozen, settings, num_envs=4, generator=torch.Generator().manual_seed(0), update_norm=False)
    step = CountingStep(4)
    still.run(step(None), step)
    assert float(frozen.obs_norm.count) == 0.0


@pytest.mark.parametrize("field", ["iterations", "rollout_steps", "updates_per_iteration", "minibatch_size"])
def test_settings_name_the_front_end_field(field):
    with pytest.raises(ConfigError, match=f"distill_{field}=0"):
        DistillSettings(**{field: 0})


def test_finish_reports_the_stage_numbers_recomputed_from_its_buffer_and_generator():
    """finish() scores the final buffer with one fresh noise draw for before and after (so the two are
    comparable), from the stage's own generator; before any step the student is the teacher (action MSE 0)."""
    from dipod.control.distill import action_mse
    from dipod.control.update import mean_cfm_loss

    actor = tiny_actor()
    settings = DistillSettings(iterations=3, rollout_steps=2, minibatch_size=8, num_draws=3, lr=1e-2)
    started = time.perf_counter()
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    step = CountingStep(4)
    stage.run(step(None), step)
    state = stage.generator.get_state()
    info = stage.finish()
    elapsed = time.perf_counter() - started

    replay = torch.Generator()
    replay.set_state(state)
    obs, actions = torch.cat(stage.obs_chunks), torch.cat(stage.action_chunks)
    eps, t = actor.draw_noise(obs.shape[0], 3, replay)
    assert info["cfm_loss_before"] == pytest.approx(mean_cfm_loss(stage.initial, obs, actions, eps, t, normalized=True), rel=1e-6)
    assert info["cfm_loss_after"] == pytest.approx(mean_cfm_loss(actor, obs, actions, eps, t, normalized=True), rel=1e-6)
    assert info["cfm_loss_after"] != pytest.approx(info["cfm_loss_before"], rel=1e-3)  # the student moved
    assert info["action_mse_before"] == action_mse(stage.initial, stage.teacher, obs, replay, normalized=True) == 0.0
    # (the default teacher is the initial policy itself; the call above draws the same noise finish() drew)
    assert info["action_mse"] == pytest.approx(action_mse(actor, stage.teacher, obs, replay, normalized=True), rel=1e-6)
    assert info["action_mse"] > 0.0
    assert info["distill_loss_first"] == stage.losses[0] and info["distill_loss_last"] == stage.losses[-1]
    assert len(stage.losses) == 3 and info["skipped_steps"] == 0.0
    assert info["env_steps"] == 24.0 and info["buffer"] == float(obs.shape[0]) == 24.0
    assert 0.0 < info["time_s"] <= elapsed  # seconds since the stage began, not a clock reading


def test_finish_before_any_step_reports_no_distillation_loss_and_an_unmoved_student():
    actor = tiny_actor()
    settings = DistillSettings(iterations=1, rollout_steps=1, minibatch_size=8, num_draws=2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(1))
    stage.act(CountingStep(4)(None))
    info = stage.finish()
    assert info["cfm_loss_before"] == info["cfm_loss_after"]
    assert info["action_mse_before"] == info["action_mse"] == 0.0
    assert torch.isnan(torch.tensor(info["distill_loss_first"])) and torch.isnan(torch.tensor(info["distill_loss_last"]))
    assert info["env_steps"] == info["buffer"] == 4.0 and info["skipped_steps"] == 0.0


def _trained_stage(global_seed: int):
    actor = tiny_actor()
    settings = DistillSettings(iterations=2, rollout_steps=2, minibatch_size=3, num_draws=2, lr=1e-2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(global_seed)  # the global stream must not matter
    step = CountingStep(4)
    stage.run(step(None), step)
    return actor, stage


def test_the_student_steps_draw_their_minibatches_and_noise_from_the_stage_generator_only():
    (a, sa), (b, sb) = _trained_stage(123), _trained_stage(456)
    assert sa.losses == sb.losses
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_student_step_minimises_the_cfm_loss_of_the_normalised_buffer_pairs():
    import copy

    actor = tiny_actor()
    settings = DistillSettings(iterations=1, rollout_steps=2, minibatch_size=3, num_draws=2, lr=1e-2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    step = CountingStep(4)
    obs = step(None)
    for _ in range(2):
        obs = step(stage.act(obs))
    before, state = copy.deepcopy(actor), stage.generator.get_state()
    stage.train_step()
    replay = torch.Generator()
    replay.set_state(state)
    buffer_obs, buffer_actions = torch.cat(stage.obs_chunks), torch.cat(stage.action_chunks)
    idx = torch.randperm(8, generator=replay)[:3]
    eps, t = before.draw_noise(3, 2, replay)
    expected = before.cfm_loss(buffer_obs[idx], buffer_actions[idx], eps, t, normalized=True).mean().detach()
    assert stage.losses == [pytest.approx(float(expected), rel=1e-6)]
    # the buffer already holds normalised observations: normalising them again scores something else
    assert float(before.cfm_loss(buffer_obs[idx], buffer_actions[idx], eps, t, normalized=False).mean().detach()) != pytest.approx(
        float(expected), rel=1e-4)


def test_non_finite_student_steps_are_skipped_one_by_one_and_leave_the_student_unchanged():
    actor = tiny_actor()
    settings = DistillSettings(iterations=3, rollout_steps=1, minibatch_size=4, num_draws=2, lr=1e-2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    start = [p.detach().clone() for p in actor.parameters()]
    step = CountingStep(4)
    obs = step(None)
    for _ in range(3):
        obs = step(stage.act(obs))
        stage.action_chunks[-1] = torch.full_like(stage.action_chunks[-1], float("nan"))
        stage.train_step()
    assert stage.skipped == 3 * settings.updates_per_iteration and stage.losses == []
    for p, p0 in zip(actor.parameters(), start):
        assert torch.equal(p, p0)
    assert stage.finish()["skipped_steps"] == float(stage.skipped)


@pytest.mark.parametrize("field,bad,message", [
    ("num_draws", 0, "distill_num_draws=0 must be >= 1"),
    ("lr", 0.0, "distill_lr=0.0 must be > 0"),
    ("max_grad_norm", 0.0, "distill_max_grad_norm=0.0 must be > 0"),
    ("lr", float("nan"), "distill_lr=nan must be > 0"),
    ("weight_decay", -1e-4, "distill_weight_decay=-0.0001 must be >= 0"),
])
def test_settings_refuse_each_out_of_range_value_in_one_line(field, bad, message):
    with pytest.raises(ConfigError) as refused:
        DistillSettings(**{field: bad})
    assert str(refused.value) == message


def test_settings_accept_the_edges_of_each_range():
    edges = DistillSettings(num_draws=1, lr=1e-12, max_grad_norm=1e-12, weight_decay=0.0, iterations=1,
                            rollout_steps=1, updates_per_iteration=1, minibatch_size=1)
    assert (edges.weight_decay, edges.num_draws) == (0.0, 1)


def test_buffer_cap_is_four_minibatches_or_eight_rollouts_whichever_is_larger():
    settings = DistillSettings(rollout_steps=3, minibatch_size=10)
    assert settings.buffer_cap(num_envs=1) == 40  # 4 x 10 > 1 x 3 x 8
    assert settings.buffer_cap(num_envs=2) == 48  # 2 x 3 x 8 > 40


def test_a_stage_from_the_front_end_takes_every_distill_field_under_its_name():
    from types import SimpleNamespace

    cfg = SimpleNamespace(distill_rollout_steps=3, distill_updates=2, distill_minibatch_size=64, num_draws=5,
                          distill_lr=2e-3, distill_weight_decay=3e-2, distill_max_grad_norm=0.7)
    settings = DistillSettings.from_front_end(cfg, iterations=9)
    assert settings == DistillSettings(iterations=9, rollout_steps=3, updates_per_iteration=2, minibatch_size=64,
                                       num_draws=5, lr=2e-3, weight_decay=3e-2, max_grad_norm=0.7)


def test_the_student_optimizer_is_adamw_with_the_stage_settings():
    settings = DistillSettings(lr=2e-3, weight_decay=3e-2)
    stage = SelfDistillation(tiny_actor(), settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    group = stage.optimizer.param_groups[0]
    assert isinstance(stage.optimizer, torch.optim.AdamW)
    assert (group["lr"], group["weight_decay"]) == (2e-3, 3e-2)  # not AdamW's default decay of 1e-2


def test_a_stage_begun_under_inference_mode_still_trains_a_normal_module():
    """rsl-rl rolls out under torch.inference_mode(): the stage built there keeps teacher and student
    normal modules (inference tensors could not be saved for backward or loaded into later)."""
    actor = tiny_actor()
    settings = DistillSettings(iterations=2, rollout_steps=2, minibatch_size=8, num_draws=2, lr=1e-2)
    with torch.inference_mode():
        stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
        step = CountingStep(4)
        stage.run(step(None), step)
    assert len(stage.losses) == 2
    for module in (stage.teacher, actor):
        assert not any(p.is_inference() for p in module.parameters())
    stage.teacher.load_state_dict(actor.state_dict())  # a normal module takes weights in place


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_and_the_iterations_next_update_still_runs():
    actor = tiny_actor()
    settings = DistillSettings(iterations=1, rollout_steps=2, updates_per_iteration=2, minibatch_size=4,
                               num_draws=2, lr=1e-2)
    stage = SelfDistillation(actor, settings, num_envs=4, generator=torch.Generator().manual_seed(0))
    step = CountingStep(4)
    obs = step(None)
    for _ in range(2):
        obs = step(stage.act(obs))
    backward_calls = []

    def poison_first_gradient(grad):
        backward_calls.append(1)
        return grad * float("nan") if len(backward_calls) == 1 else grad

    actor.obs_in.weight.register_hook(poison_first_gradient)
    start = [p.detach().clone() for p in actor.parameters()]
    stage.train_step()
    assert len(backward_calls) == 2 and stage.skipped == 1 and len(stage.losses) == 1
    assert all(torch.isfinite(p).all() for p in actor.parameters())
    assert not torch.equal(actor.obs_in.weight, start[0])  # the second update stepped


def test_finish_probes_actions_on_the_first_4096_buffer_rows_through_the_normaliser():
    """With a teacher other than the initial policy, action_mse_before is the initial policy's distance
    to it; both action probes read the first 4096 normalised rows, noise from the stage generator."""
    from dipod.control.distill import action_mse

    actor = tiny_actor()
    torch.manual_seed(1)
    teacher = FlowActor(2, 1, [-1.0], [1.0], hidden=(8,), sampling_steps=2)
    settings = DistillSettings(iterations=1, rollout_steps=1, minibatch_size=8, num_draws=2)
    stage = SelfDistillation(actor, settings, num_envs=4100, generator=torch.Generator().manual_seed(0),
                             teacher=teacher)
    stage.act(torch.randn(4100, 2, generator=torch.Generator().manual_seed(2)) * 3.0 + 5.0)
    state = stage.generator.get_state()
    info = stage.finish()
    replay = torch.Generator()
    replay.set_state(state)
    obs = torch.cat(stage.obs_chunks)
    actor.draw_noise(obs.shape[0], settings.num_draws, replay)
    before = action_mse(stage.initial, stage.teacher, obs[:4096], replay, normalized=True)
    after = action_mse(actor, stage.teacher, obs[:4096], replay, normalized=True)
    assert before > 0.0 and info["action_mse_before"] == pytest.approx(before, rel=1e-6)
    assert info["action_mse"] == pytest.approx(after, rel=1e-6)
