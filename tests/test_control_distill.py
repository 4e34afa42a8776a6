"""Algorithm 3 as released, through the one SelfDistillation stage: its own rollout length, one step per
iteration on min(minibatch, buffer) pairs drawn without replacement, buffer halving, moving normaliser."""

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
