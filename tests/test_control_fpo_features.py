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


# ---- update.py's promises pinned by closed forms (issue 28: mutation testing) ---------------------------------


def test_the_rate_rule_band_edges_leave_the_rate_alone():
    """FPO++'s rule changes the rate strictly above 2 x target and strictly below target / 2: a measure
    exactly on either edge is inside the band (0.5 and 0.125 are exact in binary)."""
    s = UpdateSettings(lr_schedule="kl", desired_kl=0.25, lr_min=1e-5, lr_max=1e-2)
    assert adapt_lr(1e-3, 0.5, 0.25, s) == 1e-3
    assert adapt_lr(1e-3, 0.5 + 1e-12, 0.25, s) == pytest.approx(1e-3 / 1.5)
    assert adapt_lr(1e-3, 0.125, 0.25, s) == 1e-3
    assert adapt_lr(1e-3, 0.125 - 1e-12, 0.25, s) == pytest.approx(1.5e-3)


@pytest.mark.parametrize("missing", ["eps", "t", "elbo_old", "noise_pred_old"])
def test_a_flow_batch_missing_any_draw_field_is_refused_naming_them_all(missing):
    actor = small_actor()
    batch = batch_for(actor, torch.ones(8))
    setattr(batch, missing, None)
    with pytest.raises(ValueError) as caught:
        fpo_plus_plus_update(actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.1), batch,
                             UpdateSettings(epochs=1, minibatches=1), torch.Generator().manual_seed(0))
    assert str(caught.value) == ("fpo_plus_plus_update: the batch needs eps, t, elbo_old and noise_pred_old "
                                 "(the rollout's fixed draws, from rollout_proxies)")


def test_symmetric_cfm_clamp_below_one_caps_an_off_policy_old_loss_too():
    """``cfm_clamp`` in (0, 1) is on: with every old and new CFM loss above 1e-3, both are capped at 1e-3, so a
    rollout whose old CFM losses are 0.3 higher still gives ratio 1 (without the clamp: exp(0.3))."""
    actor = small_actor()
    batch = batch_for(actor, torch.ones(16))
    batch.elbo_old = batch.elbo_old - 0.3
    cfm_new = actor.cfm_loss(batch.obs, batch.actions, batch.eps, batch.t).detach()
    assert float(cfm_new.min()) > 1e-3  # the premise: every draw is capped
    run = lambda clamp: fpo_plus_plus_update(  # noqa: E731
        actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.0), batch,
        UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, cfm_clamp=clamp, clip_eps=0.5),
        torch.Generator().manual_seed(0))
    assert run(1e-3)["ratio_mean"] == 1.0
    assert run(0.0)["ratio_mean"] == pytest.approx(math.exp(0.3), rel=1e-5)


def test_the_negative_advantage_clamp_leaves_zero_and_positive_advantages_alone():
    """Only A < 0 draws get the new CFM loss clamped: with A in {0, 0.5} and a clamp far below every CFM
    loss, the first (on-policy) minibatch still has ratio 1 and the PPO loss -mean(A)."""
    actor = small_actor()
    adv = torch.tensor([0.0, 0.5] * 8)
    batch = batch_for(actor, adv)
    info = fpo_plus_plus_update(actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.0), batch,
                                UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False,
                                               cfm_clamp_negative=1e-3), torch.Generator().manual_seed(0))
    assert info["ratio_mean"] == 1.0 and info["clip_ratio"] == 0.0
    assert info["policy_loss"] == pytest.approx(-0.25, rel=1e-6)


def test_the_extras_report_only_when_on_and_the_dipod_term_is_beta_times_the_cfm_loss():
    actor = small_actor()
    batch = batch_for(actor, torch.ones(16), k=4)
    run = lambda **kw: fpo_plus_plus_update(  # noqa: E731
        actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.0), batch,
        UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, **kw), torch.Generator().manual_seed(0))
    off = run()
    assert "dipod_loss" not in off and "knn_entropy" not in off
    on = run(dipod_beta=0.3, knn_entropy_coef=0.1, knn_entropy_k=2)
    cfm = float(actor.cfm_loss(batch.obs, batch.actions, batch.eps, batch.t).detach().mean())
    assert on["cfm_loss"] == pytest.approx(cfm, rel=1e-5)
    assert on["dipod_loss"] == pytest.approx(0.3 * cfm, rel=1e-5)
    _, action_pred, _ = actor.cfm_terms(batch.obs, batch.actions, batch.eps, batch.t)
    assert on["knn_entropy"] == pytest.approx(float(knn_entropy(action_pred.detach(), 2)), rel=1e-5)
    # the policy loss carries both: -(PPO at ratio 1: mean A = 1) - 0.1 H + 0.3 CFM
    assert on["policy_loss"] == pytest.approx(-1.0 - 0.1 * on["knn_entropy"] + 0.3 * cfm, rel=1e-5)


def _gaussian_batch(n=16, seed=0, log_std=-0.5):
    from dipod.control.gaussian import GaussianActor

    torch.manual_seed(seed)
    actor = GaussianActor(3, 2, [-1.0, -1.0], [1.0, 1.0], hidden=(16,), init_log_std=log_std)
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 3, generator=g)
    actions = actor.sample(obs, g)
    logp = actor.log_prob(obs, actions).detach()
    zeros = torch.zeros(n)
    return actor, RolloutBatch(obs, actions, torch.tensor([1.0, -1.0] * (n // 2)), zeros, zeros, logp_old=logp)


def test_gaussian_ppo_update_is_clipped_ppo_on_exact_log_ratios():
    """PPO baseline: r = exp(log pi - log pi_old) of the exact Gaussian log-likelihood, loss -mean min(r A, clip(r) A),
    kl the k3 estimate mean((r - 1) - log r), action_std exp(log_std)."""
    from dipod.control.update import gaussian_ppo_update

    actor, batch = _gaussian_batch()
    shift = torch.linspace(-0.1, 0.3, 16)  # the log ratio each sample starts the update with (mean 0.1)
    batch.logp_old = batch.logp_old - shift
    info = gaussian_ppo_update(actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.0), batch,
                               UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, clip_eps=0.1),
                               torch.Generator().manual_seed(0))
    ratio, adv = torch.exp(shift), batch.advantages
    clipped = ratio.clamp(0.9, 1.1) * adv
    assert info["ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert info["kl"] == pytest.approx(float(((ratio - 1) - shift).mean()), rel=1e-4)
    assert info["policy_loss"] == pytest.approx(float(-torch.minimum(ratio * adv, clipped).mean()), rel=1e-5)
    assert info["clip_ratio"] == pytest.approx(float((clipped < ratio * adv).float().mean()))
    assert info["action_std"] == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_gaussian_ppo_update_refuses_a_batch_without_rollout_log_probs():
    from dipod.control.update import gaussian_ppo_update

    actor, batch = _gaussian_batch()
    batch.logp_old = None
    with pytest.raises(ValueError) as caught:
        gaussian_ppo_update(actor, LinearCritic(), torch.optim.SGD(actor.parameters(), lr=0.1), batch,
                            UpdateSettings(epochs=1, minibatches=1), torch.Generator().manual_seed(0))
    assert str(caught.value) == "gaussian_ppo_update: the batch needs logp_old (log-probs at rollout time)"


@pytest.mark.parametrize("kind", ["flow", "gaussian"])
def test_the_minibatch_order_comes_from_the_update_generator_alone(kind):
    """Same generator seed, different global RNG state: the same weights after the update (a reproducible
    resume); another generator seed: another minibatch order, other weights (the order matters)."""
    from dipod.control.update import gaussian_ppo_update

    def run(generator_seed, global_seed):
        if kind == "gaussian":
            actor, batch = _gaussian_batch()
        else:
            actor = small_actor()
            batch = batch_for(actor, torch.tensor([1.0, -1.0] * 8))
        critic = LinearCritic()
        torch.manual_seed(global_seed)
        update = gaussian_ppo_update if kind == "gaussian" else fpo_plus_plus_update
        update(actor, critic, torch.optim.SGD(list(actor.parameters()) + list(critic.parameters()), lr=0.1),
               batch, UpdateSettings(epochs=1, minibatches=4, normalize_advantages=False),
               torch.Generator().manual_seed(generator_seed))
        return torch.cat([p.detach().flatten() for p in actor.parameters()])

    first = run(3, global_seed=0)
    assert torch.equal(first, run(3, global_seed=1))
    assert not torch.allclose(first, run(4, global_seed=0))


@pytest.mark.parametrize("shifted, factor", [(0, 1.5), (4, 1.0), (8, 1 / 1.5)])
def test_the_clip_fraction_rate_rule_reads_the_epochs_fraction_of_draws_outside_the_trust_region(shifted, factor):
    """The optimizer holds only a stand-in weight, so the actor stays on the rollout policy: the epoch's measure is
    exactly the share of samples whose old ELBO was lowered by 0.3 (ratio e^0.3 > 1 + eps with A > 0): 0, 1/4 or
    1/2 against target 0.2 -> rate x 1.5, unchanged, / 1.5."""
    actor = small_actor()
    batch = batch_for(actor, torch.ones(16))
    batch.elbo_old[:shifted] -= 0.3
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    info = fpo_plus_plus_update(actor, LinearCritic(), optimizer, batch,
                                UpdateSettings(epochs=1, minibatches=2, normalize_advantages=False, clip_eps=0.05,
                                               lr_schedule="clip_fraction", target_clip_fraction=0.2),
                                torch.Generator().manual_seed(0))
    assert info["clip_ratio"] == pytest.approx(shifted / 16)
    assert info["lr"] == pytest.approx(1e-3 * factor) and optimizer.param_groups[0]["lr"] == info["lr"]


def _nan_gradient_loss(weight):
    """A policy loss whose value is finite (0) but whose gradient is not: d sqrt(x) / dx at 0 is inf, times 0."""
    def policy_loss(idx, adv_mb):
        return torch.sqrt((weight * 0.0).sum()), {"kl": 0.0, "clip_ratio": 0.0}
    return policy_loss


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_and_logged_with_its_numbers(caplog):
    from dipod.control.update import run_update

    critic = LinearCritic()
    weight = nn.Parameter(torch.ones(3))
    params = [weight] + list(critic.parameters())
    batch = RolloutBatch(torch.ones(4, 3), torch.zeros(4, 1), torch.ones(4), torch.zeros(4), torch.zeros(4))
    with torch.no_grad():
        critic.lin.weight.fill_(0.5)
        critic.lin.bias.fill_(0.0)  # V = 1.5 everywhere, returns 0: value loss 2.25
    before = [p.detach().clone() for p in params]
    info = run_update(params, torch.optim.SGD(params, lr=0.1), batch, critic,
                      UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False), torch.Generator(),
                      _nan_gradient_loss(weight))
    assert info["skipped_minibatches"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    (record,) = [r for r in caplog.records if "skipped a minibatch" in r.getMessage()]
    assert record.getMessage() == ("update: skipped a minibatch with non-finite loss 2.25 / gradient norm nan "
                                   "(policy 0.0, value 2.25)")


def test_a_skipped_minibatch_does_not_end_the_epoch():
    """The non-finite minibatch is the epoch's first (the update generator's permutation, seed 0): it is skipped and
    the second, finite one still steps."""
    actor = small_actor()
    batch = batch_for(actor, torch.ones(16))
    first = int(torch.randperm(16, generator=torch.Generator().manual_seed(0))[0])
    batch.advantages[first] = float("nan")
    before = [p.detach().clone() for p in actor.parameters()]
    critic = LinearCritic()
    optimizer = torch.optim.SGD(list(actor.parameters()) + list(critic.parameters()), lr=0.1)
    info = fpo_plus_plus_update(actor, critic, optimizer, batch,
                                UpdateSettings(epochs=1, minibatches=2, normalize_advantages=False),
                                torch.Generator().manual_seed(0))
    assert info["skipped_minibatches"] == 1.0 and math.isfinite(info["policy_loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))
