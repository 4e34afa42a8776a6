"""The uniform-noise ELBO (dipod.lm.uniform_noise) against exact enumeration on a toy vocabulary.

A toy denoiser is an arbitrary table ``p(x_0 | x_t)`` over every canvas ``x_t`` of length 2 on a
3-token vocabulary (it sees no step index, like DiffusionGemma's). With 3 steps there are 9^3
trajectories ``x_{1:3}``: the exact ELBO ``E_q[log p(x_{0:T}) / q(x_{1:T} | x_0)]`` and the exact
likelihood ``log sum p(x_{0:T})`` are sums over them, built from transition matrices (no formula
of the module). The module's per-step closed form, averaged exactly over ``q(x_t | x_0)``, must
equal that ELBO; its one-draw estimate must be unbiased.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from dipod.lm.uniform_noise import elbo_term, linear_alphas, noise, posterior, reverse

V, L, T = 3, 2, 3
CANVASES = [torch.tensor(c) for c in itertools.product(range(V), repeat=L)]


def _index(canvas: torch.Tensor) -> int:
    return int(sum(int(tok) * V ** (L - 1 - i) for i, tok in enumerate(canvas)))


def _denoiser(seed: int) -> torch.Tensor:
    """``p(x_0 | x_t)`` as a table ``[V^L canvases, L, V]`` (float64, sharp enough to matter)."""
    return torch.softmax(3.0 * torch.randn(V ** L, L, V, generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64), dim=-1)


def _matrices(alphas):
    eye = torch.eye(V, dtype=torch.float64)
    marginal = [a * eye + (1 - a) / V for a in alphas.tolist()]  # [i, j] = q(x_t = j | x_0 = i)
    step = [None] + [(alphas[t] / alphas[t - 1]).item() * eye + (1 - (alphas[t] / alphas[t - 1]).item()) / V
                     for t in range(1, T + 1)]  # [k, j] = q(x_t = j | x_{t-1} = k)
    return marginal, step


def _reverse_brute(table, alphas, t, x_prev, x_t):
    """``p(x_{t-1} | x_t)`` by Bayes on the matrices, token by token."""
    marginal, step = _matrices(alphas)
    p0 = table[_index(x_t)]
    prob = 1.0
    for i in range(L):
        j, k = int(x_t[i]), int(x_prev[i])
        post = [step[t][k, j] * marginal[t - 1][x0, k] / marginal[t][x0, j] for x0 in range(V)]
        prob *= sum(post[x0] * p0[i, x0] for x0 in range(V))
    return float(prob)


def _exact(table, x0, alphas):
    """(exact ELBO, exact log-likelihood) of ``x0`` by enumerating every trajectory ``x_1 .. x_T``."""
    _, step = _matrices(alphas)
    elbo, likelihood = 0.0, 0.0
    for path in itertools.product(CANVASES, repeat=T):
        xs = [x0, *path]
        q = math.prod(float(step[t][xs[t - 1][i], xs[t][i]]) for t in range(1, T + 1) for i in range(L))
        p = V ** -L * math.prod(float(table[_index(xs[1])][i, xs[0][i]]) for i in range(L))
        p *= math.prod(_reverse_brute(table, alphas, t, xs[t - 1], xs[t]) for t in range(2, T + 1))
        elbo += q * math.log(p / q)
        likelihood += p
    return elbo, math.log(likelihood)


def _closed_form(table, x0, alphas):
    """sum_t E_{q(x_t | x_0)}[elbo_term], the expectation taken exactly over every canvas."""
    marginal, _ = _matrices(alphas)
    total = 0.0
    for t in range(1, T + 1):
        for x_t in CANVASES:
            weight = math.prod(float(marginal[t][x0[i], x_t[i]]) for i in range(L))
            logp0 = table[_index(x_t)].log()[None]
            total += weight * float(elbo_term(logp0, x0[None], x_t[None], alphas, t)[0])
    return total


def test_closed_form_equals_the_elbo_by_enumeration_and_bounds_the_likelihood():
    alphas = linear_alphas(T)
    for seed, x0 in ((0, torch.tensor([0, 2])), (1, torch.tensor([1, 1])), (2, torch.tensor([2, 0]))):
        table = _denoiser(seed)
        exact_elbo, log_likelihood = _exact(table, x0, alphas)
        assert abs(_closed_form(table, x0, alphas) - exact_elbo) < 1e-10
        assert exact_elbo < log_likelihood - 1e-3  # a real gap for a denoiser that is not the true posterior


def test_reverse_and_posterior_are_distributions_and_match_bayes():
    alphas = linear_alphas(T)
    table = _denoiser(3)
    for t in range(2, T + 1):
        for x_t in CANVASES:
            p = reverse(table[_index(x_t)][None], x_t[None], alphas, t)[0]  # [L, V]
            torch.testing.assert_close(p.sum(-1), torch.ones(L, dtype=torch.float64))
            for x_prev in CANVASES:
                assert abs(math.prod(float(p[i, x_prev[i]]) for i in range(L))
                           - _reverse_brute(table, alphas, t, x_prev, x_t)) < 1e-12
            q = posterior(torch.tensor([[1, 2]]), x_t[None], alphas, t, V)[0]
            torch.testing.assert_close(q.sum(-1), torch.ones(L, dtype=torch.float64))


def test_one_draw_estimate_is_unbiased():
    alphas = linear_alphas(T)
    table, x0 = _denoiser(4), torch.tensor([0, 2])
    exact_elbo, _ = _exact(table, x0, alphas)
    g = torch.Generator().manual_seed(0)
    n = 6000
    t_n = torch.randint(1, T + 1, (n,), generator=g)
    estimates = torch.empty(n, dtype=torch.float64)
    for t in range(1, T + 1):
        rows = (t_n == t).nonzero().squeeze(1)
        x_t = noise(x0.expand(len(rows), L), float(alphas[t]), V, g)
        logp0 = table[[_index(c) for c in x_t]].log()
        estimates[rows] = T * elbo_term(logp0, x0.expand(len(rows), L), x_t, alphas, t)
    stderr = float(estimates.std()) / math.sqrt(n)
    assert abs(float(estimates.mean()) - exact_elbo) < 4 * stderr


def test_linear_schedule_is_float64_from_one_step_up():
    """``alpha_t = 1 - t / T`` in float64 (2/3 exactly as float64 has it, not float32's); one step is the
    shortest schedule (clean, then uniform), zero steps are refused."""
    assert torch.equal(linear_alphas(1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    alphas = linear_alphas(3)
    assert alphas.dtype == torch.float64 and alphas.tolist() == [1.0, 1.0 - 1 / 3, 1.0 - 2 / 3, 0.0]
    with pytest.raises(ValueError, match=r"^steps=0 must be >= 1$"):
        linear_alphas(0)


def test_a_noise_draw_is_reproducible_from_its_generator_alone():
    """``noise`` draws both its keep decisions and its uniform tokens from the generator it is given: the
    same seed gives the same canvas whatever the global RNG did in between, another seed another canvas."""
    x0 = torch.arange(40).remainder(V).view(2, 20)
    draws = []
    for global_seed, seed in ((0, 3), (1, 3), (0, 4)):
        torch.manual_seed(global_seed)
        draws.append(noise(x0, 0.5, V, torch.Generator().manual_seed(seed)))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    kept = noise(x0, 1.0, V, torch.Generator().manual_seed(3))  # alpha = 1 keeps every token
    assert torch.equal(kept, x0)


def test_a_step_that_keeps_every_token_adds_nothing():
    """A schedule step with ``alpha_t = alpha_{t-1}`` (``r_t = 1``) changes no token: both the posterior
    ``q(x_{t-1} | x_t, x_0)`` and the model's ``p(x_{t-1} | x_t)`` are the point mass on ``x_t``, so the
    step's KL term is 0 (up to float32 rounding), in float64 and in float32 (where 1e-300 underflows to 0)."""
    alphas = torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    x0, x_t = torch.tensor([[0, 2]]), torch.tensor([[1, 2]])
    for dtype in (torch.float64, torch.float32):
        logp0 = _denoiser(7)[_index(x_t[0])].log()[None].to(dtype)
        term = elbo_term(logp0, x0, x_t, alphas, 2)
        assert term.dtype == dtype and abs(float(term[0])) < 1e-6  # float32: p(x_t | x_t) rounds to 1 - 1e-7
    assert float(elbo_term(_denoiser(7)[_index(x_t[0])].log()[None], x0, x_t, alphas, 3)[0]) < 0  # a real step


class _TableDenoiser(torch.nn.Module):
    """DiffusionGemma's call signature over a toy table: logits ``log p(x_0 | x_t)`` of each row's canvas."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(canvas_length=L, text_config=SimpleNamespace(vocab_size=V))

    def forward(self, input_ids, decoder_input_ids):
        rows = decoder_input_ids @ torch.tensor([V ** (L - 1 - i) for i in range(L)])
        return SimpleNamespace(logits=self.table[rows].log().float())


def test_diffusion_gemma_block_elbo_is_the_unbiased_estimate_over_every_step():
    """dipod.lm.diffusion_gemma draws ``t ~ U{1..T}`` and weights by T: its mean is the exact ELBO (a draw
    that never reaches t = T, or weights wrongly, is biased)."""
    from dipod.lm.diffusion_gemma import block_elbo_terms

    alphas, table, x0 = linear_alphas(T), _denoiser(5), torch.tensor([[2, 1]])
    exact_elbo, _ = _exact(table, x0[0], alphas)
    terms = block_elbo_terms(_TableDenoiser(table), torch.ones(1, 2, dtype=torch.long), x0, 20000, alphas,
                             torch.Generator().manual_seed(0)).double()[0]
    stderr = float(terms.std()) / math.sqrt(terms.numel())
    assert abs(float(terms.mean()) - exact_elbo) < 4 * stderr, (float(terms.mean()), exact_elbo, stderr)


def test_diffusion_gemma_ancestral_sampler_draws_from_the_model_the_elbo_scores():
    """The sampler's canvases follow the exact marginal ``p(x_0) = sum over x_{1:T} of p(x_{0:T})`` of the
    generative model whose ELBO is computed here (every reverse step taken, x_0 drawn only at t = 1)."""
    from dipod.lm.diffusion_gemma import decode_ancestral

    alphas, table, n = linear_alphas(T), _denoiser(6), 20000
    lm = SimpleNamespace(model=_TableDenoiser(table))
    settings = SimpleNamespace(gen_length=L, steps=T, temperature=1.0)  # more steps than tokens: fine for this process
    prompts = torch.ones(n, 1, dtype=torch.long)
    drawn = decode_ancestral(lm, prompts, prompts, settings, torch.Generator().manual_seed(0)).completion_bg
    counts = torch.bincount(drawn @ torch.tensor([V ** (L - 1 - i) for i in range(L)]), minlength=V ** L).double()
    exact = torch.tensor([math.exp(_exact(table, x0, alphas)[1]) for x0 in CANVASES], dtype=torch.float64)
    assert abs(float(exact.sum()) - 1.0) < 1e-9
    sigma = (n * exact * (1 - exact)).sqrt()
    assert bool(((counts - n * exact).abs() < 4.5 * sigma).all()), (counts / n, exact)
