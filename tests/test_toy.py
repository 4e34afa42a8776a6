"""The exact two-token diagnostic: closed-form values, bound inequalities, updates and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dipod import cli, toy

LOG2 = math.log(2.0)


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def theta_of(a: float, b: float, c: float, d: float, e: float, f: float) -> torch.Tensor:
    """Logits from the six conditionals pi(x1=A|MA), pi(x1=A|MM), pi(x2=A|AM), pi(x2=A|MM), pi(x1=A|MB), pi(x2=A|BM)."""
    return torch.tensor([logit(p) for p in (a, b, c, d, e, f)], dtype=torch.float64)


def theta_from_joint(p_aa: float, p_ab: float, p_ba: float, p_bb: float) -> torch.Tensor:
    """Logits under which both decoding orders produce the joint P exactly (a tight ELBO)."""
    p_x1a, p_x2a = p_aa + p_ab, p_aa + p_ba
    return theta_of(a=p_aa / p_x2a, b=p_x1a, c=p_aa / p_x1a, d=p_x2a, e=p_ab / (1 - p_x2a), f=p_ba / (1 - p_x1a))


# A non-tight point: x1 first gives (0.72, 0.08, 0.04, 0.16), x2 first gives 0.25 each.
LOOSE = theta_of(a=0.5, b=0.8, c=0.9, d=0.5, e=0.5, f=0.2)
P_X1_FIRST = [0.8 * 0.9, 0.8 * 0.1, 0.2 * 0.2, 0.2 * 0.8]
P_X2_FIRST = [0.25, 0.25, 0.25, 0.25]


def test_all_zero_logits_give_uniform_tight_model():
    theta = torch.zeros(6, dtype=torch.float64)
    expected = torch.full((4,), math.log(0.25), dtype=torch.float64)
    torch.testing.assert_close(toy.probs(theta), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(toy.log_likelihood(theta), expected)
    torch.testing.assert_close(toy.elbo(theta), expected)
    torch.testing.assert_close(toy.gap(theta), torch.zeros(4, dtype=torch.float64))
    for beta_e in (0.5, 1.5, 4.0):
        torch.testing.assert_close(toy.eubo(theta, beta_e), expected)
    # J = mean reward = 0.875; A = r - J.
    assert float(toy.expected_reward(theta)) == pytest.approx(0.875, abs=1e-15)
    torch.testing.assert_close(toy.advantages(theta), torch.tensor([-0.075, 0.125, -0.175, 0.125], dtype=torch.float64))


def test_closed_form_values_at_a_loose_point():
    pi = [(p + q) / 2 for p, q in zip(P_X1_FIRST, P_X2_FIRST)]
    assert pi == pytest.approx([0.485, 0.165, 0.145, 0.205], abs=1e-15)
    elbo = [0.5 * (math.log(p) + math.log(q)) for p, q in zip(P_X1_FIRST, P_X2_FIRST)]
    torch.testing.assert_close(toy.order_log_probs(LOOSE), torch.log(torch.tensor([P_X1_FIRST, P_X2_FIRST], dtype=torch.float64)).T)
    torch.testing.assert_close(toy.probs(LOOSE), torch.tensor(pi, dtype=torch.float64))
    torch.testing.assert_close(toy.elbo(LOOSE), torch.tensor(elbo, dtype=torch.float64))
    gap = [math.log(p) - e for p, e in zip(pi, elbo)]
    torch.testing.assert_close(toy.gap(LOOSE), torch.tensor(gap, dtype=torch.float64))
    assert float(toy.expected_gap(LOOSE)) == pytest.approx(sum(p * g for p, g in zip(pi, gap)), rel=1e-12)
    assert float(toy.expected_gap(LOOSE)) > 0.05  # clearly not tight
    # EUBO by hand for AA and BA: (token-1 conditionals q1, r1), (token-2 conditionals q2, r2).
    beta = 1.5

    def eubo_hand(q1, r1, q2, r2):
        return sum(math.log((q**beta + r**beta) / 2) / beta for q, r in ((q1, r1), (q2, r2)))

    eubo = toy.eubo(LOOSE, beta)
    assert float(eubo[0]) == pytest.approx(eubo_hand(0.8, 0.5, 0.5, 0.9), rel=1e-12)  # AA
    assert float(eubo[2]) == pytest.approx(eubo_hand(0.2, 0.5, 0.5, 0.2), rel=1e-12)  # BA: x2=A | BM = 0.2
    assert float(toy.expected_reward(LOOSE)) == pytest.approx(0.485 * 0.8 + 0.165 + 0.145 * 0.7 + 0.205, rel=1e-12)


def test_bounds_on_random_points():
    gen = torch.Generator().manual_seed(0)
    theta = 3.0 * torch.randn(2000, 6, generator=gen, dtype=torch.float64)
    logp, elbo = toy.log_likelihood(theta), toy.elbo(theta)
    torch.testing.assert_close(toy.probs(theta).sum(-1), torch.ones(2000, dtype=torch.float64))
    assert float((logp - elbo).min()) >= -1e-12  # ELBO <= log pi everywhere
    # EUBO >= log pi for beta_E >= 2 (Cauchy-Schwarz + power-mean monotonicity) ...
    for beta_e in (2.0, 3.0, 8.0):
        assert float((toy.eubo(theta, beta_e) - logp).min()) >= -1e-12
    # ... and the EUBO grows with beta_E (power means grow with their order).
    assert float((toy.eubo(theta, 2.0) - toy.eubo(theta, 1.5)).min()) >= -1e-12
    assert float((toy.eubo(theta, 1.5) - toy.eubo(theta, 1.0)).min()) >= -1e-12


def test_eubo_is_not_an_upper_bound_for_beta_below_two():
    # AB with q1 = pi(x1=A|MM) ~ 1, r2 = pi(x2=B|AM) ~ 1, r1 = pi(x1=A|MB) ~ 0, q2 = pi(x2=B|MM) ~ 0.
    theta = torch.tensor([0.0, 8.0, -8.0, 8.0, -8.0, 0.0], dtype=torch.float64)
    logp_ab = float(toy.log_likelihood(theta)[1])
    assert logp_ab == pytest.approx(-LOG2, abs=1e-3)
    assert float(toy.eubo(theta, 1.5)[1]) == pytest.approx(-2 * LOG2 / 1.5, abs=1e-3)  # < log pi
    assert float(toy.eubo(theta, 1.5)[1]) < logp_ab - 0.2
    assert float(toy.eubo(theta, 2.0)[1]) >= logp_ab


def test_tight_sets():
    # Product distribution: each token's conditionals agree, so ELBO = EUBO = log pi.
    product = torch.tensor([0.3, 0.3, -0.7, -0.7, 0.3, -0.7], dtype=torch.float64)
    torch.testing.assert_close(toy.gap(product), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(toy.eubo(product, 1.5), toy.log_likelihood(product))
    # Any joint with both orders consistent: ELBO tight, EUBO not.
    joint = theta_from_joint(0.5, 0.1, 0.15, 0.25)
    torch.testing.assert_close(toy.probs(joint), torch.tensor([0.5, 0.1, 0.15, 0.25], dtype=torch.float64))
    torch.testing.assert_close(toy.gap(joint), torch.zeros(4, dtype=torch.float64))
    assert float((toy.eubo(joint, 1.5) - toy.log_likelihood(joint)).abs().max()) > 1e-2


def test_estimator_directions_match_their_definitions():
    theta = torch.stack([LOOSE, LOOSE, LOOSE])
    g, dipod, pg = toy.estimator_directions(theta, ["logpi", "elbo", "spg"], eubo_beta=1.5)

    def expectation_grad(fn):
        t = LOOSE.clone().requires_grad_(True)
        pi, adv = toy.probs(LOOSE), toy.advantages(LOOSE)
        return torch.autograd.grad(fn(t, pi, adv), t)[0]

    true_pg = expectation_grad(lambda t, pi, adv: (pi * adv * toy.log_likelihood(t)).sum())
    fpo = expectation_grad(lambda t, pi, adv: (pi * adv * toy.elbo(t)).sum())
    spg = expectation_grad(lambda t, pi, adv: (pi * adv * torch.where(adv > 0, toy.elbo(t), toy.eubo(t, 1.5))).sum())
    dipod_ref = expectation_grad(lambda t, pi, adv: (pi * toy.elbo(t)).sum())
    for row in range(3):
        torch.testing.assert_close(pg[row], true_pg)  # grad J = E[A grad log pi]
        torch.testing.assert_close(dipod[row], dipod_ref)
    torch.testing.assert_close(g[0], true_pg)
    torch.testing.assert_close(g[1], fpo)
    torch.testing.assert_close(g[2], spg)
    assert not torch.allclose(fpo, true_pg, atol=1e-3)  # the loose point bends the FPO direction


def test_self_distillation_tightens_without_moving_the_policy():
    theta, kl = toy.self_distill(LOOSE, steps=200, lr=2.0)
    assert kl < 1e-8
    torch.testing.assert_close(toy.probs(theta), toy.probs(LOOSE), atol=1e-5, rtol=0)
    assert float(toy.expected_gap(theta)) < 1e-6 < float(toy.expected_gap(LOOSE))


def test_run_toy_short():
    cfg = toy.ToyConfig(steps=200)
    result = toy.run_toy(cfg)
    assert result == toy.run_toy(cfg)  # deterministic
    m = result["methods"]
    assert list(m) == list(toy.METHODS)
    for name, r in m.items():
        assert r["curves"]["gap"][0] == pytest.approx(0.0, abs=1e-15)  # symmetric init is tight
        assert r["final_reward"] > r["curves"]["reward"][0]
    assert all(c == pytest.approx(1.0, abs=1e-12) for c in m["pg"]["curves"]["grad_cosine"])
    # One pg step is theta + lr * grad J.
    theta0 = torch.full((6,), 0.5, dtype=torch.float64, requires_grad=True)
    grad_j = torch.autograd.grad(toy.expected_reward(theta0), theta0)[0]
    assert m["pg"]["curves"]["reward"][1] == pytest.approx(float(toy.expected_reward(theta0.detach() + 0.1 * grad_j)), rel=1e-12)
    # First drift: FPO loosens the bound; DiPOD and interleaving keep it tighter.
    assert m["fpo"]["final_gap"] > 1e-3
    assert m["fpo+dipod"]["final_gap"] < 0.8 * m["fpo"]["final_gap"]
    assert m["spg+dipod"]["final_gap"] < m["spg"]["final_gap"]
    assert m["fpo+interleave"]["max_gap"] < 1e-4
    assert max(m["fpo+interleave"]["distill_kl"]["kl"]) < 1e-6
    assert m["fpo+interleave"]["distill_kl"]["step"][:2] == [10, 20]


def test_run_toy_records_the_cosine_of_the_estimator_without_the_dipod_term():
    """docs/toy.md: the recorded cosine at step k is that of the method's update direction WITHOUT the DiPOD
    term against the true policy gradient, from the state at step k. Replayed by hand for fpo+dipod
    (the +dipod update itself does include beta * grad ELBO, so the states move as the run does)."""
    cfg = toy.ToyConfig(steps=30, beta=1.0, methods=["fpo+dipod"])
    curve = toy.run_toy(cfg)["methods"]["fpo+dipod"]["curves"]
    theta = torch.full((1, 6), cfg.init, dtype=torch.float64)
    with_dipod = []
    for step in range(cfg.steps + 1):
        g, dipod, pg = toy.estimator_directions(theta, ["elbo"], cfg.eubo_beta)
        assert curve["grad_cosine"][step] == pytest.approx(float(toy._cosine(g, pg)[0]), rel=1e-12, abs=1e-15)
        assert curve["reward"][step] == pytest.approx(float(toy.expected_reward(theta)[0]), rel=1e-12)
        with_dipod.append(float(toy._cosine(g + cfg.beta * dipod, pg)[0]))
        theta = theta + cfg.lr * (g + cfg.beta * dipod)
    # The DiPOD term does bend the full update here, so the two cosines are told apart.
    assert abs(with_dipod[-1] - curve["grad_cosine"][-1]) > 1e-6


def test_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "toy"
    assert cli.main(["toy", "--out", str(out), "--steps", "20", "--eubo-beta", "2.0"]) == 0
    printed = capsys.readouterr().out
    assert "fpo+dipod" in printed and "final reward" in printed
    data = json.loads((out / "toy.json").read_text())
    assert data["config"]["steps"] == 20 and data["config"]["eubo_beta"] == 2.0
    assert set(data["methods"]) == set(toy.METHODS)
    for r in data["methods"].values():
        assert {"final_reward", "final_gap", "max_gap", "final_grad_cosine", "curves"} <= set(r)
        assert set(r["curves"]) == {"step", "reward", "gap", "grad_cosine"}
        assert r["curves"]["step"] == list(range(21))
        assert all(len(v) == 21 for v in r["curves"].values())
        assert r["final_gap"] == r["curves"]["gap"][-1] and r["max_gap"] == max(r["curves"]["gap"])
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--eubo-beta", "-1"], "--eubo-beta"),
    (["--beta", "-0.2"], "--beta"),
    (["--methods", "fpo,ppo"], "--methods"),
    (["--steps", "abc"], "steps"),
])
def test_cli_rejects_bad_flags(tmp_path, capsys, flags, named):
    assert cli.main(["toy", "--out", str(tmp_path), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "toy.json").exists()
