"""Independent oracles for estimator pieces the other tests only touch at one point: the control
DiPOD term's gradient, SPG's mix weight away from 0.5, degenerate groups of std-scaled advantages,
SPG's EUBO surrogate as an upper bound on exactly enumerable cases, and the control reward scaler
against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from dipod import toy
from dipod.advantages import group_relative_advantages
from dipod.control.flow import FlowActor
from dipod.control.update import RolloutBatch, UpdateSettings, fpo_plus_plus_update
from dipod.lm.proxies import MaskDraw, eubo_surrogate
from dipod.objectives import spg_loss


class ZeroCritic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, obs):
        return self.bias.expand(obs.shape[0])


def _flow_batch(actor: FlowActor, n: int = 12, k: int = 3, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    obs, actions = torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)
    eps, t = actor.draw_noise(n, k, g)
    with torch.no_grad():
        cfm, _, noise_pred = actor.cfm_terms(obs, actions, eps, t)
    zeros = torch.zeros(n)
    # All-zero advantages: the FPO++ surrogate and its gradient vanish, so the actor moves by the DiPOD term alone.
    return RolloutBatch(obs=obs, actions=actions, advantages=zeros, returns=zeros, values=zeros, eps=eps, t=t,
                        elbo_old=-cfm, noise_pred_old=noise_pred)


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_control_dipod_term_moves_the_actor_by_beta_times_the_cfm_gradient(beta):
    torch.manual_seed(0)
    actor = FlowActor(2, 1, [-1.0], [1.0], hidden=(8, 8), sampling_steps=2)
    batch = _flow_batch(actor)
    critic = ZeroCritic()
    lr = 0.1
    optimizer = torch.optim.SGD(list(actor.parameters()) + list(critic.parameters()), lr=lr)
    before = {name: p.detach().clone() for name, p in actor.named_parameters()}
    # Oracle 1, autograd on the CFM loss written independently of update.py: d/dtheta mean_{n,k} CFM_nk.
    cfm = actor.cfm_terms(batch.obs, batch.actions, batch.eps, batch.t)[0].mean()
    grads = dict(zip(before, torch.autograd.grad(cfm, list(actor.parameters()))))
    # Oracle 2, closed form for the output bias: CFM = mean_a (v - (a - eps))^2, so
    # d CFM / d bias = 2 * mean_{n,k} (v - (a - eps)) for a one-dimensional action.
    with torch.no_grad():
        t = batch.t[..., None]
        x_t = t * batch.actions[:, None] + (1 - t) * batch.eps
        velocity = actor.velocity(actor.obs_features(batch.obs)[:, None, :], x_t, batch.t)
        bias_grad = 2 * (velocity - (batch.actions[:, None] - batch.eps)).mean((0, 1))
    out_bias = [name for name in before if name.endswith("bias")][-1]
    torch.testing.assert_close(grads[out_bias], bias_grad, rtol=1e-4, atol=1e-6)

    settings = UpdateSettings(epochs=1, minibatches=1, dipod_beta=beta, max_grad_norm=1e9, value_coef=1.0)
    info = fpo_plus_plus_update(actor, critic, optimizer, batch, settings, torch.Generator().manual_seed(0))
    assert info["skipped_minibatches"] == 0
    for name, param in actor.named_parameters():
        torch.testing.assert_close(param.detach(), before[name] - lr * beta * grads[name], rtol=1e-5, atol=1e-7)
    if beta > 0:  # the step is real, not a rounding error
        assert (actor.get_parameter(out_bias) - before[out_bias]).abs().max() > 1e-4


def test_spg_mix_weight_away_from_one_half_against_a_hand_computation():
    adv = torch.tensor([1.5, -2.0, -0.5, 0.0])
    elbo = torch.tensor([-3.0, -4.0, -6.0, -1.0], requires_grad=True)
    eubo = torch.tensor([-1.0, -2.5, -5.0, -0.5], requires_grad=True)
    lengths = torch.tensor([3.0, 5.0, 2.0, 4.0])
    w = 0.8
    loss, _ = spg_loss(adv, elbo, eubo, "mix", mix_weight=w, lengths_n=lengths)
    # A > 0 reads the ELBO; A <= 0 reads w * EUBO + (1 - w) * ELBO; sum over the batch / total length 14.
    by_hand = -(1.5 * -3.0 - 2.0 * (0.8 * -2.5 + 0.2 * -4.0) - 0.5 * (0.8 * -5.0 + 0.2 * -6.0)) / 14.0
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(eubo.grad, torch.tensor([0.0, 2.0 * 0.8, 0.5 * 0.8, 0.0]) / 14.0)
    torch.testing.assert_close(elbo.grad, torch.tensor([-1.5, 2.0 * 0.2, 0.5 * 0.2, 0.0]) / 14.0)
    unweighted, _ = spg_loss(adv, elbo, eubo, "mix", mix_weight=0.25)
    assert float(unweighted) == pytest.approx(
        -(1.5 * -3.0 - 2.0 * (0.25 * -2.5 + 0.75 * -4.0) - 0.5 * (0.25 * -5.0 + 0.75 * -6.0)) / 4.0, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_a_group_of_equal_rewards_has_zero_advantage_with_or_without_std_scaling(eps):
    # 0.1 three times: the float mean is 0.10000000000000002-ish, so r - mean is not exactly 0 unless handled
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 3.0, 0.7, 0.7, 0.7])
    for scale in (False, True):
        adv = group_relative_advantages(rewards, 3, scale_by_std=scale, eps=eps)
        assert torch.isfinite(adv).all(), (scale, adv)
        assert torch.equal(adv[[0, 1, 2, 6, 7, 8]], torch.zeros(6))
        expected = torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + eps if scale else 1.0)  # std of (1, 2, 3) is 1
        torch.testing.assert_close(adv[3:6], expected)
    lone = group_relative_advantages(torch.tensor([0.3, 0.9]), 1, scale_by_std=True, eps=eps)
    assert torch.equal(lone, torch.zeros(2))  # a group of one carries no signal


def _enumerated_two_token_draws() -> MaskDraw:
    """SPG's block_random process on two live tokens in one block, enumerated exactly: it masks both
    (probability 1/2) or one uniformly chosen token (1/4 each); four equally likely draws."""
    masked = torch.tensor([[[True, True], [True, True], [True, False], [False, True]]])
    return MaskDraw.from_masks(masked, torch.ones(1, 2), torch.zeros(1, 5, 0, dtype=torch.bool))


def _draw_log_probs(theta_m6: torch.Tensor) -> torch.Tensor:
    """``log p(x_l | draw k)`` ``[M * 4 outputs, 4 draws, 2 tokens]`` from the toy's conditionals."""
    lp = toy.token_log_probs(theta_m6)  # [M, 4, token, context (both masked, other revealed)]
    both = lp[..., 0]
    return torch.stack([both, both, lp[..., 1], lp[..., 1]], dim=-2).flatten(0, 1)


def test_eubo_surrogate_upper_bounds_the_exact_log_likelihood_for_beta_at_least_two():
    theta = 3.0 * torch.randn(500, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draw = _enumerated_two_token_draws()
    logp_nkl = _draw_log_probs(theta)
    rows = logp_nkl.shape[0]
    scored = draw.scored_nkl.expand(rows, -1, -1)
    weight = draw.weight_nk.expand(rows, -1).double()
    log_pi = toy.log_likelihood(theta).flatten()  # exact: the mixture over both decoding orders
    for beta in (2.0, 3.0, 8.0, 1.5):
        eubo = eubo_surrogate(logp_nkl, scored, weight, beta, torch.full((rows,), 2.0))
        # With the draws enumerated the surrogate IS the continuous-time EUBO, which the toy computes in closed form.
        torch.testing.assert_close(eubo, toy.eubo(theta, beta).flatten())
        if beta >= 2.0:
            assert float((eubo - log_pi).min()) >= -1e-10, beta
    # below beta = 2 it is only a surrogate: the toy's counterexample stays below log pi
    theta_ab = torch.tensor([[0.0, 8.0, -8.0, 8.0, -8.0, 0.0]], dtype=torch.float64)
    eubo_ab = eubo_surrogate(_draw_log_probs(theta_ab), draw.scored_nkl.expand(4, -1, -1),
                             draw.weight_nk.expand(4, -1).double(), 1.5, torch.full((4,), 2.0))
    assert float(eubo_ab[1]) < float(toy.log_likelihood(theta_ab)[0, 1]) - 0.2
    assert math.isfinite(float(eubo_ab.sum()))


def test_reward_scaler_divides_by_the_std_of_all_discounted_returns_so_far_reset_at_episode_ends():
    from dipod.control.envs import RewardScaler

    gamma = 0.9
    rewards = torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    dones = torch.tensor([[False, False], [True, False], [False, True], [False, False]])
    scaler = RewardScaler(2, gamma)
    running = [0.0, 0.0]
    seen: list[float] = []
    for r_n, d_n in zip(rewards, dones):
        running = [gamma * g + float(r) for g, r in zip(running, r_n)]
        seen += running
        # the statistics start from one pseudo-sample of mean 0 and variance 1 (second moment 1)
        count = 1 + len(seen)
        mean = sum(seen) / count
        var = (1.0 + sum(g * g for g in seen)) / count - mean ** 2
        out = scaler(r_n.float(), d_n)
        torch.testing.assert_close(out, (r_n / math.sqrt(var + 1e-8)).float())
        running = [0.0 if bool(d) else g for g, d in zip(running, d_n)]  # an episode that ended starts again
