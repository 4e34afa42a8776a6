"""FPO++ as released, piece by piece: EMA, k-NN entropy, KL-proxy learning rate, clamps, minibatch order,
time features, networks, skipped non-finite minibatches."""

import math

import pytest
import torch
from torch import nn

from dipod.config import ConfigError
from dipod.control.config import ControlConfig
from dipod.control.ema import ActorEMA
from dipod.control.entropy import knn_entropy
from dipod.control.flow import FlowActor, time_embedding
from dipod.control.update import (RolloutBatch, UpdateSettings, adapt_lr, fpo_plus_plus_update, minibatch_order,
                                  rollout_proxies)


def small_actor(action_dim=2, obs_dim=3, **kw):
    torch.manual_seed(0)
    return FlowActor(obs_dim, action_dim, [-1.0] * action_dim, [1.0] * action_dim, hidden=(16, 16), **kw)


class LinearCritic(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, obs):
        return self.lin(obs).squeeze(-1)


def batch_for(actor, adv, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(adv.shape[0], 3, generator=g)
    actions = actor.sample(obs, g)
    eps, t = actor.draw_noise(adv.shape[0], k, g)
    elbo_old, noise_pred_old = rollout_proxies(actor, obs, actions, eps, t)
    n = adv.shape[0]
    return RolloutBatch(obs, actions, adv, torch.zeros(n), torch.zeros(n), eps, t, elbo_old, noise_pred_old)


def test_ema_warmup_reset_then_decay():
    live = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        live.weight.fill_(1.0)
    ema = ActorEMA(live, decay=0.95, warmup_updates=2)
    set_w = lambda v: live.weight.data.fill_(v)  # noqa: E731
    set_w(3.0)
    ema.step()  # update 1 < warm-up: shadow keeps the copy taken at construction
    assert float(ema.shadow.weight) == 1.0 and not ema.active
    ema.step()  # update 2 == warm-up: reset to the live weights
    assert float(ema.shadow.weight) == 3.0 and not ema.active
    set_w(5.0)
    ema.step()  # 0.95 * 3 + 0.05 * 5
    assert float(ema.shadow.weight) == pytest.approx(3.1) and ema.active
    set_w(7.0)
    ema.step()
    assert float(ema.shadow.weight) == pytest.approx(0.95 * 3.1 + 0.05 * 7.0)


def test_ema_copies_observation_statistics():
    actor = small_actor()
    ema = ActorEMA(actor, decay=0.95, warmup_updates=0)
    actor.obs_norm.update(torch.randn(50, 3) * 4 + 2)
    ema.step()
    assert torch.equal(ema.shadow.obs_norm.mean, actor.obs_norm.mean)


def test_knn_entropy_hand_computed():
    # 1-D points 0, 1, 3 with k = 1: rho = (1, 1, 2); psi(3) - psi(1) = 1 + 1/2; unit 1-ball length 2
    points = torch.tensor([[[0.0], [1.0], [3.0]]])
    expected = 1.5 + math.log(2.0) + (0 + 0 + math.log(2.0)) / 3
    assert float(knn_entropy(points, 1)) == pytest.approx(expected, rel=1e-6)
    # 2-D, k = 2: distances from (0,0),(3,0),(0,4): second neighbours 4, 5, 5; psi(3) - psi(2) = 1/2; c_2 = pi
    points = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]])
    expected = 0.5 + math.log(math.pi) + 2 * (math.log(4) + 2 * math.log(5)) / 3
    assert float(knn_entropy(points, 2)) == pytest.approx(expected, rel=1e-6)


def test_knn_entropy_of_a_gaussian_sample():
    sigma, dim = 0.5, 2
    sample = sigma * torch.randn(4, 2000, dim, generator=torch.Generator().manual_seed(0))
    closed_form = 0.5 * dim * math.log(2 * math.pi * math.e * sigma**2)  # 0.451 nats
    assert float(knn_entropy(sample, 5)) == pytest.approx(closed_form, abs=0.05)
    with pytest.raises(ValueError, match="knn_entropy_k"):
        knn_entropy(sample[:, :5], 5)


def test_knn_entropy_bonus_spreads_the_predicted_actions():
    actor = small_actor()
    batch = batch_for(actor, torch.zeros(32), k=8)  # zero advantages: only the bonus (and weight decay) moves the actor
    opt = torch.optim.SGD(list(actor.parameters()), lr=1e-2)
    settings = UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, knn_entropy_coef=1.0, knn_entropy_k=2)
    first = fpo_plus_plus_update(actor, LinearCritic(), opt, batch, settings, torch.Generator().manual_seed(0))
    for _ in range(10):
        last = fpo_plus_plus_update(actor, LinearCritic(), opt, batch, settings, torch.Generator().manual_seed(0))
    assert last["knn_entropy"] > first["knn_entropy"]


def test_kl_proxy_learning_rate_rule():
    s = UpdateSettings(lr_schedule="kl", desired_kl=1e-4)  # bounds 1e-5 .. 1e-2
    assert adapt_lr(1e-3, 3e-4, 1e-4, s) == pytest.approx(1e-3 / 1.5)  # > 2e-4
    assert adapt_lr(1e-3, 1e-4, 1e-4, s) == 1e-3  # in the band
    assert adapt_lr(1e-3, 1e-5, 1e-4, s) == pytest.approx(1.5e-3)  # < 5e-5
    assert adapt_lr(1e-3, 0.0, 1e-4, s) == 1e-3  # exactly 0: the first minibatch, nothing measured
    assert adapt_lr(9e-3, 1e-6, 1e-4, s) == 1e-2 and adapt_lr(1.2e-5, 1.0, 1e-4, s) == 1e-5


def test_kl_proxy_is_the_change_of_the_predicted_noise_and_sets_the_rate_per_minibatch():
    actor = small_actor()
    batch = batch_for(actor, torch.ones(24), seed=3)
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    settings = UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, lr_schedule="kl", desired_kl=1e-4)
    info = fpo_plus_plus_update(actor, LinearCritic(), opt, batch, settings, torch.Generator().manual_seed(0))
    assert info["kl"] == 0.0 and info["lr"] == 1e-3  # scored before the step: on-policy
    _, _, noise_pred = actor.cfm_terms(batch.obs, batch.actions, batch.eps, batch.t)
    kl = float((noise_pred.detach() - batch.noise_pred_old).pow(2).mean())
    expected_lr = adapt_lr(1e-3, kl, 1e-4, settings)
    assert kl > 0 and expected_lr != 1e-3
    info = fpo_plus_plus_update(actor, LinearCritic(), opt, batch, settings, torch.Generator().manual_seed(0))
    assert info["kl"] == pytest.approx(kl, rel=1e-5) and info["lr"] == pytest.approx(expected_lr)


def test_negative_advantage_clamp_acts_on_the_new_cfm_loss_only():
    actor = small_actor()
    batch = batch_for(actor, -torch.ones(16))
    clamp, eps_clip = 1e-3, 0.05
    settings = UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, cfm_clamp_negative=clamp,
                              clip_eps=eps_clip, log_ratio_max=10.0)
    before = [p.detach().clone() for p in actor.parameters()]
    opt = torch.optim.SGD(actor.parameters(), lr=0.1)
    info = fpo_plus_plus_update(actor, LinearCritic(), opt, batch, settings, torch.Generator().manual_seed(1))
    # new CFM clamped to 1e-3, old not: ratio = exp(min(CFM_old - 1e-3, 10)); ASPO's SPO branch for A = -1
    ratio = torch.exp((-batch.elbo_old - clamp).clamp(max=10.0))
    objective = -ratio - 1.0 / (2 * eps_clip) * (ratio - 1) ** 2
    assert info["policy_loss"] == pytest.approx(float(-objective.mean()), rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))  # clamped draws carry no gradient


def test_symmetric_cfm_clamp_caps_old_and_new():
    actor = small_actor()
    batch = batch_for(actor, torch.ones(16))
    settings = UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, cfm_clamp=1e-3)
    info = fpo_plus_plus_update(actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.1), batch, settings,
                                torch.Generator().manual_seed(1))
    assert info["ratio_mean"] == 1.0 and info["policy_loss"] == pytest.approx(-1.0)  # both capped: ratio 1, loss -A


def test_one_permutation_for_all_epochs():
    settings = UpdateSettings(epochs=3, minibatches=4)
    order = minibatch_order(10, settings, torch.Generator().manual_seed(7))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7))
    assert [len(mb) for mb in order[0]] == [2, 2, 2, 2]  # 10 // 4 = 2 per minibatch; the last 2 samples sit out
    assert torch.equal(torch.cat(order[0]), perm[:8])
    assert all(torch.equal(torch.cat(epoch), perm[:8]) for epoch in order)
    fresh = minibatch_order(10, UpdateSettings(epochs=3, minibatches=4, reshuffle_each_epoch=True),
                            torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat(fresh[0]), perm[:8]) and not torch.equal(torch.cat(fresh[1]), perm[:8])


def test_time_features_and_released_network_shape():
    t = torch.tensor([0.5])
    expected = torch.tensor([[math.cos(0.5), math.cos(1.0), math.cos(2.0), math.cos(4.0),
                              math.sin(0.5), math.sin(1.0), math.sin(2.0), math.sin(4.0)]])
    assert torch.allclose(time_embedding(t, 8), expected)
    actor = FlowActor(5, 3, [-1.0] * 3, [1.0] * 3, hidden=(1024, 512, 256), activation="elu")
    widths = [m.out_features for m in actor.trunk if isinstance(m, nn.Linear)]
    assert actor.obs_in.out_features == 1024 and widths == [512, 256, 3]
    assert actor.xt_in.in_features == 3 + 8 and sum(isinstance(m, nn.ELU) for m in actor.modules()) == 3


def test_non_finite_minibatch_is_skipped(caplog):
    actor = small_actor()
    batch = batch_for(actor, torch.ones(16))
    batch.advantages[3] = float("nan")
    before = [p.detach().clone() for p in actor.parameters()]
    settings = UpdateSettings(epochs=2, minibatches=1, normalize_advantages=False)
    info = fpo_plus_plus_update(actor, LinearCritic(), torch.optim.Adam(actor.parameters()), batch, settings,
                                torch.Generator().manual_seed(0))
    assert info["skipped_minibatches"] == 2.0
    assert sum("skipped a minibatch with non-finite loss" in r.getMessage() for r in caplog.records) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))


@pytest.mark.parametrize("field, value, match", [
    ("clip_eps", 1.5, "clip_eps"), ("log_ratio_max", float("nan"), "log_ratio_max"), ("ema_decay", 1.0, "ema_decay"),
    ("adam_betas", [0.9], "adam_betas"), ("lr_schedule", "adaptive", "lr_schedule"), ("knn_entropy_k", 8, "num_draws"),
    ("time_embed_dim", 7, "time_embed_dim"), ("distill_minibatch_size", 0, "distill_minibatch_size"),
    ("advantage_clip", float("inf"), "advantage_clip"), ("activation", "gelu", "activation"),
])
def test_out_of_range_settings_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ControlConfig(**{field: value})
