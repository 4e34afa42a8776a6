"""Flow actor math: CFM proxy, FPO++ flow-time draws, Euler sampler, GAE, normaliser, FPO++ update."""

import math

import pytest
import torch

from dipod.advantages import generalized_advantage_estimation
from dipod.control.flow import FlowActor, RunningObsNorm, flow_times
from dipod.control.update import (RolloutBatch, UpdateSettings, adapt_lr, fpo_plus_plus_update, prepare_advantages,
                                  rollout_proxies, value_loss)



def small_actor(action_dim=2, obs_dim=3, steps=10):
    torch.manual_seed(0)
    return FlowActor(obs_dim, action_dim, [-1.0] * action_dim, [1.0] * action_dim, hidden=(16, 16), sampling_steps=steps)


def test_cfm_proxy_matches_hand_computation_for_constant_velocity():
    actor = small_actor()
    with torch.no_grad():  # v(o, x, t) = b exactly: zero last-layer weights, bias b
        actor.trunk[-1].weight.zero_()
        actor.trunk[-1].bias.copy_(torch.tensor([0.5, -1.0]))
    obs = torch.zeros(1, 3)
    action = torch.tensor([[1.0, 0.2]])
    eps = torch.tensor([[[0.3, -0.4], [0.0, 0.0]]])  # [N=1, K=2, A=2]
    t = torch.tensor([[0.25, 0.9]])
    # draw 0: target a - eps = (0.7, 0.6); v - target = (-0.2, -1.6); mean of squares = (0.04 + 2.56) / 2
    # draw 1: target (1.0, 0.2); v - target = (-0.5, -1.2); (0.25 + 1.44) / 2
    expected = torch.tensor([[-1.30, -0.845]])
    assert torch.allclose(actor.cfm_elbo(obs, action, eps, t), expected, atol=1e-6)
    actor.cfm_reduction = "sqrt"  # FPO++ locomotion: sum over A / sqrt(A)
    assert torch.allclose(actor.cfm_elbo(obs, action, eps, t), expected * 2 / math.sqrt(2), atol=1e-6)
    # predicted ends of the straight path from x_t: clean action x_t + (1 - t) v, noise x_t - t v
    _, action_pred, noise_pred = actor.cfm_terms(obs, action, eps, t)
    x_t = torch.tensor([0.25 * 1.0 + 0.75 * 0.3, 0.25 * 0.2 + 0.75 * -0.4])
    assert torch.allclose(action_pred[0, 0], x_t + 0.75 * torch.tensor([0.5, -1.0]))
    assert torch.allclose(noise_pred[0, 0], x_t - 0.25 * torch.tensor([0.5, -1.0]))


def test_cfm_proxy_evaluates_velocity_at_the_interpolant():
    actor = small_actor()
    g = torch.Generator().manual_seed(1)
    obs, action = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    eps, t = actor.draw_noise(4, 5, g)
    feat = actor.obs_features(obs)
    by_hand = torch.zeros(4, 5)
    for n in range(4):
        for k in range(5):
            x_t = t[n, k] * action[n] + (1 - t[n, k]) * eps[n, k]
            v = actor.velocity(feat[n], x_t, t[n, k])
            by_hand[n, k] = (v - (action[n] - eps[n, k])).pow(2).mean()
    assert torch.allclose(actor.cfm_loss(obs, action, eps, t), by_hand, atol=1e-5)


def test_flow_time_formula_and_distribution():
    u = torch.tensor([0.0, 0.5, 0.99])
    t = flow_times(u, 2.0)
    assert torch.allclose(t, torch.tensor([0.005, 0.005 + 0.99 * (1 - 0.5**0.5), 0.005 + 0.99 * 0.9]), atol=1e-5)
    # CDF of t: P(t <= x) = 1 - (1 - (x - 0.005) / 0.99)^b
    samples = flow_times(torch.rand(200_000, generator=torch.Generator().manual_seed(0)), 3.0)
    for x in (0.1, 0.3, 0.6):
        cdf = 1 - (1 - (x - 0.005) / 0.99) ** 3
        assert abs(float((samples <= x).float().mean()) - cdf) < 0.005


def test_draw_noise_uses_the_fpo_plus_plus_times_and_is_seeded():
    actor = small_actor()
    actor.time_skew_b = 2.5
    eps, t = actor.draw_noise(3, 4, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    eps_ref = torch.randn(3, 4, 2, generator=g)
    t_ref = flow_times(torch.rand(3, 4, generator=g), 2.5)
    assert torch.equal(eps, eps_ref) and torch.equal(t, t_ref)


def test_euler_sampler_against_closed_form_velocity_fields():
    actor = small_actor(steps=8)
    obs = torch.zeros(3, 3)
    x0 = torch.tensor([[1.0, -2.0], [0.0, 0.5], [3.0, 3.0]])
    c = torch.tensor([0.5, -0.25])
    actor.velocity = lambda feat, x, t: c - x  # dx/dt = c - x: Euler gives c + (x0 - c)(1 - 1/n)^n
    out = actor.sample(obs, noise_na=x0)
    assert torch.allclose(out, c + (x0 - c) * (1 - 1 / 8) ** 8, atol=1e-6)
    fine = actor.sample(obs, noise_na=x0, steps=4000)  # -> the ODE solution c + (x0 - c) e^-1
    assert torch.allclose(fine, c + (x0 - c) * math.exp(-1), atol=1e-3)
    actor.velocity = lambda feat, x, t: t[:, None].expand_as(x)  # left Riemann sum of t: (n - 1) / (2n)
    assert torch.allclose(actor.sample(obs, noise_na=x0), x0 + 7 / 16, atol=1e-6)


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = generalized_advantage_estimation(rewards, values, dones, torch.tensor([2.0]), gamma=0.9, lam=0.8)
    # t=2: 3 + 0.9*2 - 1.5 = 3.3; t=1 (episode ends): 2 - 1 = 1; t=0: 1 + 0.9*1 - 0.5 + 0.9*0.8*1 = 2.12
    assert torch.allclose(adv[:, 0], torch.tensor([2.12, 1.0, 3.3]), atol=1e-6)
    assert torch.allclose(ret[:, 0], torch.tensor([2.62, 2.0, 4.8]), atol=1e-6)


def test_running_obs_norm_matches_batch_statistics():
    data = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 5.0, 0.1]) + 3.0
    norm = RunningObsNorm(4)
    for chunk in data.split(137):
        norm.update(chunk)
    assert torch.allclose(norm.mean, data.mean(0), atol=1e-4)
    assert torch.allclose(norm.var, data.var(0, unbiased=False), rtol=1e-4)
    assert torch.allclose(norm(data).mean(0), torch.zeros(4), atol=1e-4)


def test_advantage_preparation_and_value_loss():
    adv = prepare_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), normalize=True, clip=1.0)
    assert torch.allclose(adv, torch.tensor([-0.5, -0.5, -0.5, 1.0]))  # z-scores (-0.5, 1.5) clamped
    raw = torch.tensor([-300.0, 0.0, 250.0])
    assert torch.equal(prepare_advantages(raw, normalize=False, clip=100.0), torch.tensor([-100.0, 0.0, 100.0]))
    v, v_old, ret = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, 0.6])
    # FPO++: unclipped mean (V - R)^2 = (1 + 9 + 0.01) / 3
    assert float(value_loss(v, v_old, ret, clip=0.0)) == pytest.approx(10.01 / 3)
    # clipped: max(1, 0.2^2) = 1; max(9, (-0.2 - 2)^2) = 9; max(0.01, (1.8 - 0.6)^2 = 1.44) = 1.44
    assert float(value_loss(v, v_old, ret, clip=0.2)) == pytest.approx(11.44 / 3)


def test_fpo_plus_plus_update_starts_on_policy_and_moves_towards_positive_advantages():
    actor = small_actor()
    critic_mod = torch.nn.Linear(3, 1)
    critic = lambda obs: critic_mod(obs).squeeze(-1)  # noqa: E731
    critic.parameters = critic_mod.parameters  # the update collects actor + critic parameters
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(64, 3, generator=g)
    actions = actor.sample(obs, g)
    eps, t = actor.draw_noise(64, 4, g)
    elbo_old, noise_pred_old = rollout_proxies(actor, obs, actions, eps, t)
    adv = torch.where(torch.arange(64) < 32, 1.0, -1.0)
    batch = RolloutBatch(obs, actions, adv, torch.zeros(64), torch.zeros(64), eps, t, elbo_old, noise_pred_old)
    opt = torch.optim.AdamW(list(actor.parameters()) + list(critic_mod.parameters()), lr=1e-3)
    settings = UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False)
    info = fpo_plus_plus_update(actor, critic, opt, batch, settings, g)
    assert info["clip_ratio"] == 0.0 and info["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first step is on-policy
    for _ in range(20):
        fpo_plus_plus_update(actor, critic, opt, batch, settings, g)
    elbo_new = actor.cfm_elbo(obs, actions, eps, t).detach()
    gain = (elbo_new - elbo_old).mean(1)
    assert float(gain[:32].mean()) > 0 > float(gain[32:].mean())  # likelihood up for A>0, down for A<0


def _negative_advantage_batch(actor, generator):
    obs = torch.randn(16, 3, generator=generator)
    actions = actor.sample(obs, generator)
    eps, t = actor.draw_noise(16, 4, generator)
    elbo_old, noise_pred_old = rollout_proxies(actor, obs, actions, eps, t)
    return RolloutBatch(obs, actions, -torch.ones(16), torch.zeros(16), torch.zeros(16), eps, t, elbo_old, noise_pred_old)


def test_cfm_clamp_stops_the_push_on_negative_advantage_draws():
    for clamp, should_move in ((1e-3, False), (100.0, True)):
        actor, critic = small_actor(), torch.nn.Linear(3, 1)
        before = [p.detach().clone() for p in actor.parameters()]
        batch = _negative_advantage_batch(actor, torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(list(actor.parameters()) + list(critic.parameters()), lr=1e-2, weight_decay=0.0)
        settings = UpdateSettings(epochs=1, minibatches=1, normalize_advantages=False, cfm_clamp_negative=clamp)
        critic_fn = lambda obs: critic(obs).squeeze(-1)  # noqa: E731
        critic_fn.parameters = critic.parameters
        fpo_plus_plus_update(actor, critic_fn, opt, batch, settings, torch.Generator().manual_seed(1))
        moved = any(not torch.equal(a, b) for a, b in zip(before, actor.parameters()))
        assert moved == should_move  # every CFM loss (~2) is above 1e-3: clamped draws get no gradient


def test_clip_fraction_schedule_follows_the_clip_fraction():
    settings = UpdateSettings(lr_schedule="clip_fraction", target_clip_fraction=0.1, lr_min=5e-5, lr_max=2e-4)
    step = lambda lr, frac: adapt_lr(lr, frac, settings.target_clip_fraction, settings, zero_counts=True)  # noqa: E731
    assert step(1e-4, 0.3) == pytest.approx(1e-4 / 1.5)  # > 2 x target: divide by 1.5
    assert step(1e-4, 0.1) == pytest.approx(1e-4)  # inside the band: unchanged
    assert step(1e-4, 0.0) == pytest.approx(1.5e-4)  # nothing clipped: raise
    lr = 1e-4
    for _ in range(5):
        lr = step(lr, 0.0)
    assert lr == pytest.approx(2e-4)  # capped at lr_max
    for _ in range(5):
        lr = step(lr, 0.9)
    assert lr == pytest.approx(5e-5)  # floored at lr_min
