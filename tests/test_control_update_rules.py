"""control/update.py's small rules at their exact edges: which settings an update accepts and the
message that refuses the rest, advantage preparation, the value loss and the minibatch split."""

import math

import pytest
import torch
from torch import nn

from dipod.config import ConfigError
from dipod.control.update import RolloutBatch, UpdateSettings, minibatch_order, prepare_advantages, run_update, value_loss

AT_LEAST_ONE = ("epochs", "minibatches", "knn_entropy_k")
POSITIVE = ("log_ratio_max", "cfm_clamp_negative", "max_grad_norm", "value_coef", "desired_kl",
            "target_clip_fraction", "lr_min")
ZERO_TURNS_OFF = ("cfm_clamp", "knn_entropy_coef", "dipod_beta", "value_clip", "advantage_clip")
# clip_eps is checked against (0, 1) before finiteness, and lr_min against lr_max, so inf reaches the
# finiteness check only for these
MUST_BE_FINITE = ("log_ratio_max", "cfm_clamp", "cfm_clamp_negative", "knn_entropy_coef", "dipod_beta",
                  "value_coef", "value_clip", "max_grad_norm", "advantage_clip", "desired_kl", "lr_max")


def refusal(**fields) -> str:
    with pytest.raises(ConfigError) as err:
        UpdateSettings(**fields)
    return str(err.value)


def test_the_released_defaults_are_accepted():
    s = UpdateSettings()
    assert (s.epochs, s.minibatches, s.clip_eps, s.lr_schedule) == (16, 6, 0.05, "fixed")


@pytest.mark.parametrize("schedule", ["fixed", "kl", "clip_fraction"])
def test_every_documented_rate_schedule_is_accepted(schedule):
    assert UpdateSettings(lr_schedule=schedule).lr_schedule == schedule


def test_an_unknown_rate_schedule_is_refused_with_the_choices():
    assert refusal(lr_schedule="adaptive") == ("lr_schedule='adaptive'; choose one of "
                                               "('fixed', 'kl', 'clip_fraction')")


@pytest.mark.parametrize("name", AT_LEAST_ONE)
def test_counts_take_one_and_refuse_zero(name):
    assert getattr(UpdateSettings(**{name: 1}), name) == 1
    assert refusal(**{name: 0}) == f"{name}=0 must be >= 1"


@pytest.mark.parametrize("name", POSITIVE)
def test_strictly_positive_settings_take_a_tiny_value_and_refuse_zero(name):
    tiny = 1e-12
    assert getattr(UpdateSettings(**{name: tiny}), name) == tiny
    assert refusal(**{name: 0.0}) == f"{name}=0.0 must be > 0"
    assert refusal(**{name: -1.0}) == f"{name}=-1.0 must be > 0"


@pytest.mark.parametrize("name", ZERO_TURNS_OFF)
def test_switchable_settings_take_zero_and_refuse_a_negative_value(name):
    assert getattr(UpdateSettings(**{name: 0.0}), name) == 0.0
    assert refusal(**{name: -0.5}) == f"{name}=-0.5 must be >= 0 (0 turns it off)"


@pytest.mark.parametrize("clip_eps", [0.0, 1.0, -0.1, 1.5])
def test_the_trust_region_must_lie_strictly_inside_zero_and_one(clip_eps):
    assert refusal(clip_eps=clip_eps) == f"clip_eps={clip_eps} must lie in (0, 1) (FPO++: 0.05, tracking 0.01)"


@pytest.mark.parametrize("clip_eps", [1e-9, 0.5, 1 - 1e-9])
def test_a_trust_region_inside_zero_and_one_is_accepted(clip_eps):
    assert UpdateSettings(clip_eps=clip_eps).clip_eps == clip_eps


def test_the_rate_bounds_may_meet_but_not_cross():
    assert UpdateSettings(lr_min=1e-3, lr_max=1e-3).lr_max == 1e-3
    assert refusal(lr_min=2e-3, lr_max=1e-3) == "lr_min=0.002 must not exceed lr_max=0.001"


@pytest.mark.parametrize("name", MUST_BE_FINITE)
def test_an_infinite_setting_is_refused_by_name(name):
    assert refusal(**{name: math.inf}) == f"[{name!r}] must be finite numbers"


def test_every_infinite_setting_is_named_at_once():
    assert refusal(dipod_beta=math.inf, lr_max=math.inf) == "['dipod_beta', 'lr_max'] must be finite numbers"


# ---- advantages, value loss, minibatches ---------------------------------------------------------------------


def test_a_single_advantage_is_not_normalised():
    """The z-score of one sample is undefined (std of one value is NaN): it passes through unchanged."""
    assert torch.equal(prepare_advantages(torch.tensor([3.0]), normalize=True, clip=100.0), torch.tensor([3.0]))


def test_two_advantages_are_normalised():
    """Two samples are the smallest batch with a spread: they become -+1/sqrt(2) (unbiased std)."""
    adv = prepare_advantages(torch.tensor([1.0, 3.0]), normalize=True, clip=100.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / math.sqrt(2.0))


def test_a_near_constant_batch_shrinks_towards_zero_and_keeps_its_signs():
    """The 1e-8 added to the std bounds the z-scores when the spread is below it: advantages 0 and 1e-8
    (std 1e-8 / sqrt 2) become -+0.5 / (1 / sqrt 2 + 1), never larger and never with flipped signs."""
    adv = prepare_advantages(torch.tensor([0.0, 1e-8]), normalize=True, clip=100.0)
    expected = 0.5 / (1 / math.sqrt(2.0) + 1)
    torch.testing.assert_close(adv, torch.tensor([-expected, expected]), rtol=1e-4, atol=0.0)


def test_advantage_clip_zero_means_no_clamp_and_the_result_is_float32():
    raw = torch.tensor([-300.0, 0.0, 250.0], dtype=torch.float64)
    out = prepare_advantages(raw, normalize=False, clip=0.0)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([-300.0, 0.0, 250.0]))


def test_integer_advantages_are_normalised_as_floats():
    out = prepare_advantages(torch.tensor([0, 0, 0, 4]), normalize=True, clip=100.0)
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5, -0.5, 1.5]))


def test_value_clip_zero_is_the_plain_squared_error_even_when_old_values_are_far():
    v, v_old, ret = torch.tensor([1.0, -1.0]), torch.tensor([50.0, -50.0]), torch.tensor([0.0, 0.0])
    assert float(value_loss(v, v_old, ret, clip=0.0)) == 1.0


def test_a_reshuffled_epoch_draws_from_the_update_generator_alone():
    """Per-epoch permutations come from the generator handed in (so a resumed run replays them), not from
    torch's global generator, whatever state that is in."""
    settings = UpdateSettings(epochs=3, minibatches=2, reshuffle_each_epoch=True)
    torch.manual_seed(1)
    first = minibatch_order(8, settings, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    second = minibatch_order(8, settings, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    perms = [torch.randperm(8, generator=g) for _ in range(3)]
    for epoch, again, perm in zip(first, second, perms):
        assert torch.equal(torch.cat(epoch), perm) and torch.equal(torch.cat(again), perm)


def test_a_minibatch_of_one_sample_is_allowed_and_fewer_is_refused_in_one_line():
    order = minibatch_order(4, UpdateSettings(epochs=2, minibatches=4), torch.Generator().manual_seed(0))
    assert [[len(mb) for mb in epoch] for epoch in order] == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert sorted(int(mb) for mb in order[0]) == [0, 1, 2, 3]
    with pytest.raises(ValueError) as err:
        minibatch_order(3, UpdateSettings(minibatches=4), torch.Generator().manual_seed(0))
    assert str(err.value) == ("update: 3 samples cannot fill 4 minibatches; "
                              "lower minibatches or collect more steps per iteration")


def test_the_update_reports_its_losses_and_the_gradient_norm_before_clipping():
    """One minibatch in closed form: policy loss 3 w0 at w = (1, 0) (gradient (3, 0)); a linear critic with
    weights 0.5 on all-ones observations predicts 1.5 against returns 0 (value loss 2.25, gradient 3 on each
    of its 3 weights and its bias, norm 6). The report carries the policy's own diagnostics, both losses and
    the total norm sqrt(9 + 36) measured before clipping; the step is the clipped one."""
    critic = nn.Linear(3, 1)
    with torch.no_grad():
        critic.weight.fill_(0.5)
        critic.bias.fill_(0.0)
    weight = nn.Parameter(torch.tensor([1.0, 0.0]))
    params = [weight, *critic.parameters()]
    batch = RolloutBatch(torch.ones(4, 3), torch.zeros(4, 1), torch.ones(4), torch.zeros(4), torch.zeros(4))

    def policy_loss(idx, adv_mb):
        return 3.0 * weight[0], {"kl": 0.25, "clip_ratio": 0.5}

    report = run_update(params, torch.optim.SGD(params, lr=0.1), batch, lambda obs: critic(obs).squeeze(-1),
                        UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, max_grad_norm=1.0),
                        torch.Generator().manual_seed(0), policy_loss)
    norm = math.sqrt(45.0)
    assert report == pytest.approx({"kl": 0.25, "clip_ratio": 0.5, "policy_loss": 3.0, "value_loss": 2.25,
                                    "grad_norm": norm, "lr": 0.1, "skipped_minibatches": 0.0})
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0 - 0.1 * 3.0 / norm, 0.0]))
