"""Estimator losses: closed-form values, gradients, and adequacy on the exact two-token model."""

from __future__ import annotations

import math

import pytest
import torch

from dipod import toy
from dipod.objectives import d1_loss, dipod_term, fpo_loss, fpo_plus_plus_loss, spg_loss

F64 = torch.float64


def t(values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


def test_d1_clipped_token_average():
    # ratios [[1.5, 0.5], [1.3, e^0 (masked)]], A = [1, -2], eps = 0.2.
    logp = t([[math.log(1.5), math.log(0.5)], [math.log(1.3), 0.0]], grad=True)
    old, adv, mask = torch.zeros(2, 2, dtype=F64), t([1.0, -2.0]), t([[1.0, 1.0], [1.0, 0.0]])
    loss, info = d1_loss(logp, old, adv, mask, eps=0.2)
    # seq 1: (min(1.5, 1.2) + min(0.5, 0.8)) / 2 = 0.85; seq 2: min(-2.6, -2.4) = -2.6.
    assert loss.item() == pytest.approx(-(0.85 - 2.6) / 2, rel=1e-12)
    assert info["clip_ratio"] == pytest.approx(1 / 3)
    assert info["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.3) / 3)
    assert (info["ratio_min"], info["ratio_max"]) == pytest.approx((0.5, 1.5))
    # d loss / d logp = -(1/N)(1/|o|) A r on unclipped completion tokens, 0 elsewhere.
    expected = t([[0.0, -0.5 * 0.5 * 1.0 * 0.5], [-0.5 * (-2.0) * 1.3, 0.0]])
    torch.testing.assert_close(grad_of(loss, logp), expected)


def test_d1_k3_kl_term():
    logp = t([[math.log(1.5), math.log(0.5)], [math.log(1.3), 0.0]], grad=True)
    old, adv, mask = torch.zeros(2, 2, dtype=F64), t([1.0, -2.0]), t([[1.0, 1.0], [1.0, 0.0]])
    delta = t([[0.1, -0.2], [0.3, 5.0]])  # ref - logp; the masked 5.0 must not count
    loss, info = d1_loss(logp, old, adv, mask, eps=0.2, kl_beta=0.1, logp_ref_nl=logp.detach() + delta)
    k3 = {d: math.exp(d) - d - 1 for d in (0.1, -0.2, 0.3)}
    kl_per_seq = [(k3[0.1] + k3[-0.2]) / 2, k3[0.3]]
    assert loss.item() == pytest.approx(-(0.85 - 2.6) / 2 + 0.1 * sum(kl_per_seq) / 2, rel=1e-12)
    assert info["kl"] == pytest.approx((k3[0.1] + k3[-0.2] + k3[0.3]) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="logp_ref_nl"):
        d1_loss(logp, old, adv, mask, kl_beta=0.1)


def test_d1_ignores_whatever_padding_holds():
    logp = t([[math.log(1.5), -math.inf], [math.log(1.3), math.inf]], grad=True)
    old = t([[0.0, -math.inf], [0.0, 0.0]])
    mask = t([[1.0, 0.0], [1.0, 0.0]])
    loss, info = d1_loss(logp, old, t([1.0, -2.0]), mask, eps=0.2, kl_beta=0.1, logp_ref_nl=t([[0.0, 0.0], [0.0, -math.inf]]))
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    expected = -(1.2 - 2.6) / 2 + 0.1 * (k3(-math.log(1.5)) + k3(-math.log(1.3))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert info["ratio_max"] == pytest.approx(1.5)
    assert bool(torch.isfinite(grad_of(loss, logp)).all())


def test_k3_is_unbiased_for_kl():
    # E_{x ~ pi}[exp(ref - logp) - (ref - logp) - 1] = KL(pi || ref), checked exactly on a categorical.
    pi, ref = t([0.5, 0.3, 0.2]), t([0.2, 0.2, 0.6])
    delta = ref.log() - pi.log()
    k3 = delta.exp() - delta - 1
    assert float((pi * k3).sum()) == pytest.approx(float((pi * (pi.log() - ref.log())).sum()), rel=1e-12)


def test_fpo_clipped_sequence_ratio():
    elbo = t([math.log(1.5), math.log(0.7), math.log(1.1)], grad=True)
    adv = t([1.0, -1.0, 2.0])
    loss, info = fpo_loss(elbo, torch.zeros(3, dtype=F64), adv, eps=0.2)
    # min(1.5, 1.2) = 1.2 (clipped); min(-0.7, -0.8) = -0.8 (clipped); 2.2.
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2) / 3, rel=1e-12)
    assert info["clip_ratio"] == pytest.approx(2 / 3)
    torch.testing.assert_close(grad_of(loss, elbo), t([0.0, 0.0, -2.0 * 1.1 / 3]))
    # [N, K] draws are averaged into one ELBO per sample first.
    elbo_nk = torch.stack([elbo.detach() - 0.3, elbo.detach() + 0.3], dim=1)
    loss_nk, _ = fpo_loss(elbo_nk, torch.zeros(3, 2, dtype=F64), adv, eps=0.2)
    assert loss_nk.item() == pytest.approx(loss.item(), rel=1e-12)


def test_fpo_released_loss_with_kl_and_dipod_by_hand():
    """The d1 fork's FPO loss: -mean min(rho A, clip(rho, 0.5, 1.5) A) - dipod * mean ELBO
    + kl * mean(ELBO - ELBO_ref), ELBOs not divided by length; the KL gradient opposes DiPOD's."""
    elbo = t([-10.0, -20.0, -5.0], grad=True)
    old = t([-10.5, -19.0, -5.0])
    ref = t([-12.0, -18.0, -4.0])
    adv = t([1.0, -1.0, 0.5])
    kl_beta, dipod_beta = 0.04, 0.05
    loss, info = fpo_loss(elbo, old, adv, eps=0.5, kl_beta=kl_beta, elbo_ref=ref)
    total = loss + dipod_term(elbo, dipod_beta)  # per-sequence mean: the released FPO normalisation
    rho = [math.exp(0.5), math.exp(-1.0), 1.0]
    surrogate = [min(rho[0] * 1.0, 1.5 * 1.0), min(-rho[1], -0.5), 0.5]
    expected = -sum(surrogate) / 3 - dipod_beta * (-35.0 / 3) + kl_beta * ((-10 + 12) + (-20 + 18) + (-5 + 4)) / 3
    assert total.item() == pytest.approx(expected, rel=1e-12)
    assert info["kl"] == pytest.approx(-1.0 / 3, rel=1e-12)
    grad = grad_of(total, elbo)
    # row 0 clipped (rho = 1.65 > 1.5, A > 0), row 1 clipped (rho = 0.37 < 0.5, A < 0): only the
    # regularisers act there, net (kl - dipod) / N = -0.01 / 3: DiPOD wins by 0.01 at the released values.
    torch.testing.assert_close(grad, t([(kl_beta - dipod_beta) / 3, (kl_beta - dipod_beta) / 3,
                                        -0.5 / 3 + (kl_beta - dipod_beta) / 3]))
    with pytest.raises(ValueError, match="elbo_ref"):
        fpo_loss(elbo, old, adv, kl_beta=0.04)


def test_spg_released_loss_with_dipod_by_hand():
    """SPG's released loss on per-token values v_n (ELBO_n / L_n): sum_n -A_n v_n L_n / sum L
    + dipod * sum_n -elbo_pt_n L_n / sum L, with v the ELBO where A > 0 and the mix otherwise."""
    lengths = t([4.0, 2.0, 3.0])
    elbo_pt, eubo_pt = t([-1.0, -2.0, -0.5]), t([-0.8, -1.5, -0.2])
    adv = t([0.5, -0.25, -0.25])  # SPG's advantages are centred, not scaled
    mixed = [float(elbo_pt[0]), 0.5 * -1.5 + 0.5 * -2.0, 0.5 * -0.2 + 0.5 * -0.5]
    released = (sum(-float(a) * v * float(n) for a, v, n in zip(adv, mixed, lengths)) / 9.0
                + 0.05 * float((-elbo_pt * lengths).sum()) / 9.0)
    elbo_n = (elbo_pt * lengths).requires_grad_(True)
    loss, _ = spg_loss(adv, elbo_n, eubo_pt * lengths, negative_proxy="mix", mix_weight=0.5, lengths_n=lengths)
    total = loss + dipod_term(elbo_n, 0.05, lengths_n=lengths)
    assert total.item() == pytest.approx(released, rel=1e-12)


def test_fpo_plus_plus_both_branches_and_straight_through_clamp():
    eps = 0.05
    log_ratio = t([[math.log(1.02), math.log(1.5)], [math.log(0.9), 4.0]], grad=True)
    adv = t([1.0, -2.0])
    loss, info = fpo_plus_plus_loss(log_ratio, torch.zeros(2, 2, dtype=F64), adv, eps=eps, log_ratio_max=3.0)
    rho_max = math.exp(3.0)  # 4.0 is clamped to 3.0

    def spo(rho, a):
        return rho * a - abs(a) / (2 * eps) * (rho - 1) ** 2

    objectives = [1.02, 1.05, spo(0.9, -2.0), spo(rho_max, -2.0)]
    assert spo(0.9, -2.0) == pytest.approx(-2.0)
    assert loss.item() == pytest.approx(-sum(objectives) / 4, rel=1e-12)
    assert info["log_ratio_clamped"] == pytest.approx(0.25)
    assert info["clip_ratio"] == pytest.approx(0.75)  # 1.5 clipped; 0.9 and e^3 outside the trust region
    assert info["ratio_max"] == pytest.approx(rho_max)

    def dspo_dlog(rho, a):  # d psi / d log rho = rho * (A - |A| / eps * (rho - 1))
        return rho * (a - abs(a) / eps * (rho - 1))

    # The clamped draw still gets the SPO gradient at the clamped ratio (straight-through).
    expected = -t([[1.02, 0.0], [dspo_dlog(0.9, -2.0), dspo_dlog(rho_max, -2.0)]]) / 4
    torch.testing.assert_close(grad_of(loss, log_ratio), expected)
    assert float(expected[1, 1]) > 0  # and it pulls the ratio down


@pytest.mark.parametrize("proxy, negatives", [
    ("elbo", [-3.0, -4.0]),
    ("eubo", [-2.5, -3.0]),
    ("mix", [-2.75, -3.5]),
])
def test_spg_proxies_and_length_weighting(proxy, negatives):
    adv = t([1.0, -1.0, 0.5, -2.0])
    elbo = t([-2.0, -3.0, -1.0, -4.0], grad=True)
    eubo = t([-1.5, -2.5, -0.5, -3.0], grad=True)
    weighted = 1.0 * -2.0 + (-1.0) * negatives[0] + 0.5 * -1.0 + (-2.0) * negatives[1]
    loss, info = spg_loss(adv, elbo, eubo, negative_proxy=proxy)
    assert loss.item() == pytest.approx(-weighted / 4, rel=1e-12)
    assert info["frac_negative_adv"] == pytest.approx(0.5)
    loss_len, _ = spg_loss(adv, elbo, eubo, negative_proxy=proxy, lengths_n=t([2.0, 3.0, 1.0, 4.0]))
    assert loss_len.item() == pytest.approx(-weighted / 10, rel=1e-12)
    # Gradients: ELBO where A > 0; for A < 0 the EUBO share w (1 for eubo, 0.5 for mix, 0 for elbo).
    w = {"elbo": 0.0, "eubo": 1.0, "mix": 0.5}[proxy]
    g_elbo, g_eubo = torch.autograd.grad(loss_len, (elbo, eubo), allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(g_elbo, -t([1.0, -(1 - w), 0.5, -2.0 * (1 - w)]) / 10)
    torch.testing.assert_close(g_eubo, -t([0.0, -w, 0.0, -2.0 * w]) / 10)


def test_spg_rejects_bad_settings():
    adv, elbo = t([1.0, -1.0]), t([-1.0, -2.0])
    with pytest.raises(ValueError, match="negative_proxy"):
        spg_loss(adv, elbo, elbo, negative_proxy="upper")
    with pytest.raises(ValueError, match="eubo_n"):
        spg_loss(adv, elbo, None, negative_proxy="eubo")
    with pytest.raises(ValueError, match="mix_weight"):
        spg_loss(adv, elbo, elbo, mix_weight=1.5)


def test_dipod_term_values():
    elbo_nk = t([[-1.0, -3.0], [-4.0, -6.0]], grad=True)  # per-sample means -2 and -5
    assert dipod_term(elbo_nk, 0.2).item() == pytest.approx(0.2 * 3.5, rel=1e-12)
    term = dipod_term(elbo_nk, 0.2, lengths_n=t([3.0, 4.0]))
    assert term.item() == pytest.approx(0.2 * 7.0 / 7.0, rel=1e-12)
    torch.testing.assert_close(grad_of(term, elbo_nk), torch.full((2, 2), -0.2 / 7 / 2, dtype=F64))
    zero = dipod_term(elbo_nk, 0.0)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="beta"):
        dipod_term(elbo_nk, -0.1)


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=F64)).requires_grad_(True)

    # Ratios near 1 but away from the clip kinks and the clamp: gradcheck needs a smooth point.
    old_nl, adv, mask = torch.zeros(3, 4, dtype=F64), t([1.0, -0.5, 2.0]), t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    ref = torch.randn(3, 4, generator=gen, dtype=F64)
    checks = {
        "d1+kl": (lambda lp: d1_loss(lp, old_nl, adv, mask, eps=10.0, kl_beta=0.3, logp_ref_nl=ref)[0], rand(3, 4, scale=0.3)),
        "fpo": (lambda e: fpo_loss(e, torch.zeros(3, 2, dtype=F64), adv, eps=10.0)[0], rand(3, 2, scale=0.3)),
        "fpo++": (lambda e: fpo_plus_plus_loss(e, torch.zeros(3, 2, dtype=F64), adv, eps=0.05)[0], rand(3, 2, scale=0.01)),
        "fpo++ spo": (lambda e: fpo_plus_plus_loss(e, torch.zeros(3, 2, dtype=F64), -adv.abs(), eps=0.05)[0], rand(3, 2)),
        "spg mix": (lambda e: spg_loss(adv, e[:, 0], e[:, 1], lengths_n=t([2.0, 5.0, 3.0]))[0], rand(3, 2)),
        "dipod": (lambda e: dipod_term(e, 0.2, lengths_n=t([2.0, 5.0, 3.0])), rand(3, 2)),
    }
    for name, (fn, x) in checks.items():
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7), name


# --- adequacy (Definition 2.1) on the exact two-token model -------------------------------------
#
# An estimator with per-sample gradient g(x) is adequate at theta when sum_x pi(x) g(x) equals the
# true policy gradient sum_x pi(x) A(x) grad log pi(x). Each loss below is evaluated on the four
# outputs as a batch with advantages 4 pi(x) A(x) (detached), on-policy (ratio 1), so its negative
# gradient is exactly that expectation.

PRODUCT = torch.tensor([0.3, 0.3, -0.7, -0.7, 0.3, -0.7], dtype=F64)  # both orders agree, EUBO tight too
LOOSE = torch.tensor([0.0, 1.4, 2.2, 0.0, 0.0, -1.4], dtype=F64)  # orders disagree: ELBO not tight


def consistent_joint(p_aa, p_ab, p_ba, p_bb):
    """Logits whose two decoding orders both produce this joint (ELBO tight, EUBO not)."""
    lg = lambda p: math.log(p / (1 - p))  # noqa: E731
    x1a, x2a = p_aa + p_ab, p_aa + p_ba
    return torch.tensor([lg(p_aa / x2a), lg(x1a), lg(p_aa / x1a), lg(x2a), lg(p_ab / (1 - x2a)), lg(p_ba / (1 - x1a))], dtype=F64)


def expected_gradients(theta: torch.Tensor, beta_e: float = 1.5) -> dict[str, torch.Tensor]:
    theta = theta.clone().requires_grad_(True)
    pi, adv = toy.probs(theta).detach(), toy.advantages(theta).detach()
    weighted_adv = 4 * pi * adv
    elbo, eubo = toy.elbo(theta), toy.eubo(theta, beta_e)
    losses = {
        "true": -(pi * adv * toy.log_likelihood(theta)).sum(),
        "fpo": fpo_loss(elbo, elbo.detach(), weighted_adv)[0],
        "fpo++": fpo_plus_plus_loss(elbo[:, None], elbo.detach()[:, None], weighted_adv)[0],
        "spg": spg_loss(weighted_adv, elbo, eubo, negative_proxy="eubo")[0],
        "spg mix": spg_loss(weighted_adv, elbo, eubo, negative_proxy="mix")[0],
    }
    return {name: -torch.autograd.grad(loss, theta, retain_graph=True)[0] for name, loss in losses.items()}


def test_adequacy_where_the_bounds_are_tight():
    grads = expected_gradients(PRODUCT)
    assert float(grads["true"].norm()) > 1e-2
    for name in ("fpo", "fpo++", "spg", "spg mix"):
        torch.testing.assert_close(grads[name], grads["true"], rtol=1e-10, atol=1e-12, msg=name)
    # The toy's exact update directions are the same expectations.
    g, _, pg = toy.estimator_directions(torch.stack([PRODUCT, PRODUCT]), ["elbo", "spg"], eubo_beta=1.5)
    torch.testing.assert_close(g[0], grads["fpo"])
    torch.testing.assert_close(g[1], grads["spg"])
    torch.testing.assert_close(pg[0], grads["true"])


def test_adequacy_fails_where_the_bound_is_loose():
    assert float(toy.expected_gap(LOOSE)) > 0.05
    grads = expected_gradients(LOOSE)
    true = grads["true"]
    for name in ("fpo", "fpo++", "spg"):
        cosine = float(grads[name] @ true / (grads[name].norm() * true.norm()))
        assert (grads[name] - true).norm() > 0.1 * true.norm(), name
        assert cosine < 0.99, name
    # A tight ELBO with a loose EUBO: FPO is adequate, SPG is not.
    joint = consistent_joint(0.5, 0.1, 0.15, 0.25)
    grads = expected_gradients(joint)
    torch.testing.assert_close(grads["fpo"], grads["true"], rtol=1e-10, atol=1e-12)
    assert (grads["spg"] - grads["true"]).norm() > 0.05 * grads["true"].norm()


# -- boundaries a mutation run found unpinned (docs/results/mutation.md) ---------------------------------

def test_fpo_plus_plus_a_small_positive_advantage_gets_the_clipped_surrogate_not_the_penalty():
    """The trust region switches at A = 0: A = 0.5 with rho = e^0.5 is PPO-clipped (rho capped at 1 + eps)."""
    elbo, old, eps = torch.tensor([[0.5]]), torch.tensor([[0.0]]), 0.05
    loss, _ = fpo_plus_plus_loss(elbo, old, torch.tensor([0.5]), eps=eps)
    assert float(loss) == pytest.approx(-(1 + eps) * 0.5)
    loss_neg, _ = fpo_plus_plus_loss(elbo, old, torch.tensor([-0.5]), eps=eps)
    rho = math.exp(0.5)
    assert float(loss_neg) == pytest.approx(-(rho * -0.5 - 0.5 / (2 * eps) * (rho - 1) ** 2))


def test_fpo_kl_averages_each_samples_reference_draws_and_names_a_negative_beta():
    elbo, ref = torch.tensor([[1.0, 3.0], [0.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    _, info = fpo_loss(elbo, elbo.detach(), torch.zeros(2), kl_beta=0.1, elbo_ref=ref)
    assert info["kl"] == pytest.approx(((2.0 - 0.0) + (1.0 - 2.0)) / 2)
    with pytest.raises(ValueError, match="kl_beta=-0.1 must be >= 0"):
        fpo_loss(elbo, elbo, torch.zeros(2), kl_beta=-0.1)


def test_spg_mix_weight_edges_are_valid():
    adv, elbo, eubo = torch.tensor([-1.0]), torch.tensor([2.0]), torch.tensor([6.0])
    assert float(spg_loss(adv, elbo, eubo, mix_weight=0.0)[0]) == pytest.approx(2.0)  # the ELBO alone
    assert float(spg_loss(adv, elbo, eubo, mix_weight=1.0)[0]) == pytest.approx(6.0)  # the EUBO alone


def test_each_loss_defaults_to_its_documented_trust_region():
    """eps 0.2 (FPO, JustGRPO), eps 0.05 and log-ratio cap 3 (FPO++): the defaults a config that names
    none gets, at ratios where the clip or the cap is active."""
    from dipod.objectives import justgrpo_loss

    elbo, old, adv = torch.tensor([0.5, -0.5]), torch.zeros(2), torch.tensor([1.0, -1.0])
    assert float(fpo_loss(elbo, old, adv)[0]) == float(fpo_loss(elbo, old, adv, eps=0.2)[0])
    logp, logp_old = torch.tensor([[0.5, -0.5]]), torch.zeros(1, 2)
    assert float(justgrpo_loss(logp, logp_old, torch.tensor([1.0]))[0]) == \
        float(justgrpo_loss(logp, logp_old, torch.tensor([1.0]), eps=0.2)[0])
    # a negative advantage reads rho itself (the SPO penalty): its log-ratio 3.5 is capped at 3
    elbo_nk, old_nk, adv_pp = torch.tensor([[3.5, 0.5], [0.2, -0.2]]), torch.zeros(2, 2), torch.tensor([-1.0, 1.0])
    assert float(fpo_plus_plus_loss(elbo_nk, old_nk, adv_pp)[0]) == \
        float(fpo_plus_plus_loss(elbo_nk, old_nk, adv_pp, eps=0.05, log_ratio_max=3.0)[0])


def test_justgrpo_divides_by_the_rows_that_carry_a_signal_even_when_one_does():
    """One row of three with a non-zero advantage: on-policy the loss is -A * L / (L * 1) = -A."""
    from dipod.objectives import justgrpo_loss

    logp = torch.zeros(3, 4)
    loss, info = justgrpo_loss(logp, logp, torch.tensor([0.0, 2.0, 0.0]))
    assert float(loss) == pytest.approx(-2.0) and info["frac_valid_samples"] == pytest.approx(1 / 3)


def test_fpo_kl_reads_one_reference_elbo_per_sample_whatever_the_draw_counts():
    """The reference's draws are averaged per sample, as the policy's are: [N, K] with N != K."""
    elbo, ref = torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0, 3.0], [1.0, 2.0, 3.0]])
    _, info = fpo_loss(elbo, elbo, torch.zeros(2), kl_beta=0.1, elbo_ref=ref)
    assert info["kl"] == pytest.approx(((1.0 - 1.0) + (0.0 - 2.0)) / 2)
    with pytest.raises(ValueError, match=r"^fpo_loss: kl_beta > 0 needs elbo_ref \(reference-model ELBOs\); pass "
                                         r"them or set kl_beta=0$"):
        fpo_loss(elbo, elbo, torch.zeros(2), kl_beta=0.1)


def test_fpo_plus_plus_counts_outside_the_trust_region_strictly_and_zero_advantages_as_ppo():
    """A = 0 draws take the PPO branch (nothing is clipped there); a negative-advantage draw exactly
    on the region's edge |rho - 1| = eps is inside it."""
    log2 = torch.tensor([[math.log(2.0)]], dtype=F64)  # rho = 2 exactly
    _, on_edge = fpo_plus_plus_loss(log2, torch.zeros(1, 1, dtype=F64), t([-1.0]), eps=1.0)
    assert on_edge["clip_ratio"] == 0.0
    _, beyond = fpo_plus_plus_loss(log2, torch.zeros(1, 1, dtype=F64), t([-1.0]), eps=0.5)
    assert beyond["clip_ratio"] == 1.0
    _, zero = fpo_plus_plus_loss(log2, torch.zeros(1, 1, dtype=F64), t([0.0]), eps=0.5)
    assert zero["clip_ratio"] == 0.0


def test_d1_ratio_is_against_the_old_policy_and_its_defaults_and_message():
    """r = exp(logp - logp_old): the same nonzero log-probs are ratio 1 (the on-policy step); eps
    defaults to 0.2; a KL without reference log-probs is refused by name; a batch with one
    completion token averages its KL over that one token."""
    logp = t([[math.log(0.3), math.log(0.6)]])
    mask, adv = t([[1.0, 1.0]]), t([2.0])
    loss, info = d1_loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-2.0) and info["ratio_mean"] == pytest.approx(1.0)
    shifted = logp + t([[0.5, -0.5]])
    assert d1_loss(shifted, logp, adv, mask)[0].item() == d1_loss(shifted, logp, adv, mask, eps=0.2)[0].item()
    with pytest.raises(ValueError, match=r"^d1_loss: kl_beta > 0 needs logp_ref_nl \(reference log-probs\); pass them "
                                         r"or set kl_beta=0$"):
        d1_loss(logp, logp, adv, mask, kl_beta=0.1)
    one = t([[1.0, 0.0]])
    _, info = d1_loss(logp, logp, adv, one, kl_beta=0.1, logp_ref_nl=logp + 0.5)
    assert info["kl"] == pytest.approx(math.exp(0.5) - 0.5 - 1.0) and info["ratio_mean"] == pytest.approx(1.0)


def test_ratio_diagnostics_read_completion_tokens_only_and_survive_a_batch_without_any():
    logp = t([[math.log(1.5), 0.0], [math.log(1.3), 0.0]])
    mask = t([[1.0, 0.0], [1.0, 0.0]])  # padding's ratio is exp(0) = 1, below both real ones
    _, info = d1_loss(logp, torch.zeros(2, 2, dtype=F64), t([1.0, -2.0]), mask)
    assert (info["ratio_min"], info["ratio_max"]) == pytest.approx((1.3, 1.5))
    loss, info = d1_loss(logp, torch.zeros(2, 2, dtype=F64), t([1.0, -2.0]), torch.zeros(2, 2, dtype=F64))
    assert loss.item() == 0.0 and info["clip_ratio"] == 0.0 and math.isfinite(info["ratio_min"])


def test_losses_compute_in_float32_from_half_precision_inputs():
    """bfloat16 proxies (a bf16 model's ELBOs) are widened first: the loss is float32 and exact."""
    adv, elbo = torch.tensor([1.0, -1.0], dtype=torch.bfloat16), torch.tensor([-3.0, -5.0], dtype=torch.bfloat16)
    loss, _ = spg_loss(adv, elbo, negative_proxy="elbo")
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(-(-3.0 + 5.0) / 2)


def test_fpo_plus_plus_counts_log_ratios_strictly_above_the_cap():
    """The diagnostic counts draws whose ELBO - ELBO_old exceeds the cap: 3 - 0 is not above 3;
    4 - 0.5 = 3.5 is, and 2 + 1.5 would be if it were a sum."""
    elbo, old = torch.tensor([[3.0, 4.0, 2.0]], dtype=F64), torch.tensor([[0.0, 0.5, -1.5]], dtype=F64)
    _, info = fpo_plus_plus_loss(elbo, old, t([1.0]), log_ratio_max=3.0)
    assert info["log_ratio_clamped"] == pytest.approx(2 / 3)


def test_spg_and_dipod_divide_by_one_completion_token_and_count_negative_advantages_strictly():
    adv, elbo, eubo = t([-1.5]), t([-2.0]), t([-1.0])
    assert spg_loss(adv, elbo, eubo, "eubo", lengths_n=t([1.0]))[0].item() == pytest.approx(-1.5)
    assert dipod_term(elbo, 0.5, lengths_n=t([1.0])).item() == pytest.approx(1.0)
    _, info = spg_loss(t([-1.0, 0.0, 2.0]), t([1.0, 1.0, 1.0]), negative_proxy="elbo")
    assert info["frac_negative_adv"] == pytest.approx(1 / 3)  # a zero advantage is not negative
