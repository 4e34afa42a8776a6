r"""The ELBO of uniform-noise discrete diffusion (DiffusionGemma's canvas process), per token, in closed form.

Forward process over ``T`` steps, each token on its own: ``q(x_t | x_0) = alpha_t [x_t = x_0] +
(1 - alpha_t) / V`` with ``alpha_0 = 1`` and ``alpha_T = 0`` (the canvas starts as uniform random
tokens, as DiffusionGemma's sampler initialises it). One step keeps a token with probability
``r_t = alpha_t / alpha_{t-1}`` and otherwise draws it uniformly.

Reverse model (x0-parameterisation): the denoiser gives ``p(x_0 | x_t)`` for every position
from the whole noisy canvas, and ``p(x_{t-1} | x_t) = prod_i sum_j q(x_{t-1,i} | x_{t,i}, x_0 = j)
p(x_{0,i} = j | x_t)``. With ``p(x_T)`` uniform (= ``q(x_T | x_0)``, so that KL is 0):

    ELBO(x_0) = E_{q(x_1|x_0)}[sum_i log p(x_{0,i} | x_1)]
                - sum_{t=2}^{T} E_{q(x_t|x_0)}[sum_i KL(q(x_{t-1,i} | x_{t,i}, x_{0,i}) || p(x_{t-1,i} | x_t))]

``elbo_term`` is the bracket at one ``t``; ``T * elbo_term`` at ``t ~ U{1..T}``, ``x_t ~ q(x_t |
x_0)`` is an unbiased one-draw estimate. The derivation (docs/lm_proxies.md) is checked against
exact enumeration of every trajectory on a toy vocabulary (tests/test_lm_uniform_noise.py).
Shapes: ``_bl`` [batch, length] token ids, ``_blv`` [batch, length, V] probabilities, float64 or
float32 as given.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_alphas(steps: int) -> Tensor:
    """``alpha_t = 1 - t / T`` for ``t = 0 .. T`` (float64, ``[T + 1]``)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    return 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps


def noise(x0_bl: Tensor, alpha: float, vocab: int, generator: torch.Generator | None = None) -> Tensor:
    """A draw of ``x_t ~ q(x_t | x_0)``: each token kept with probability ``alpha``, else uniform."""
    keep = torch.rand(x0_bl.shape, generator=generator, device=x0_bl.device) < alpha
    uniform = torch.randint(0, vocab, x0_bl.shape, generator=generator, device=x0_bl.device)
    return torch.where(keep, x0_bl, uniform)


def posterior(x0_bl: Tensor, xt_bl: Tensor, alphas: Tensor, t: int, vocab: int) -> Tensor:
    """``q(x_{t-1} = k | x_t, x_0)`` over ``k``: ``[B, L, V]`` (float64)."""
    a_prev, r = float(alphas[t - 1]), float(alphas[t] / alphas[t - 1])
    k = torch.arange(vocab, device=xt_bl.device)
    step = r * (k == xt_bl[..., None]).double() + (1.0 - r) / vocab  # q(x_t | x_{t-1} = k)
    prior = a_prev * (k == x0_bl[..., None]).double() + (1.0 - a_prev) / vocab  # q(x_{t-1} = k | x_0)
    joint = step * prior
    return joint / joint.sum(-1, keepdim=True)


def reverse(p0_blv: Tensor, xt_bl: Tensor, alphas: Tensor, t: int) -> Tensor:
    """``p(x_{t-1} = k | x_t) = sum_j q(x_{t-1} = k | x_t, x_0 = j) p(x_0 = j | x_t)`` in O(V) per token.

    ``q(x_{t-1} = k | x_t, j) = u_k (a [k = j] + (1 - a) / V) / Z_j`` with ``u_k = q(x_t | x_{t-1} = k)``
    and ``Z_j = q(x_t | x_0 = j)``, so the sum is ``u_k (a w_k + (1 - a) / V sum_j w_j)``, ``w = p / Z``.
    """
    vocab = p0_blv.shape[-1]
    a_prev, a_t, r = float(alphas[t - 1]), float(alphas[t]), float(alphas[t] / alphas[t - 1])
    same = (torch.arange(vocab, device=xt_bl.device) == xt_bl[..., None]).to(p0_blv.dtype)  # j (or k) == x_t
    w = p0_blv / (a_t * same + (1.0 - a_t) / vocab)  # p(x_0 = j | x_t) / q(x_t | x_0 = j)
    u = r * same + (1.0 - r) / vocab  # q(x_t | x_{t-1} = k)
    return u * (a_prev * w + (1.0 - a_prev) / vocab * w.sum(-1, keepdim=True))


def elbo_term(logp0_blv: Tensor, x0_bl: Tensor, xt_bl: Tensor, alphas: Tensor, t: int) -> Tensor:
    """The ELBO's term at step ``t`` for one noisy canvas ``x_t``, summed over positions: ``[B]``.

    ``t = 1``: ``sum_i log p(x_{0,i} | x_1)``; ``t >= 2``: ``-sum_i KL(q(x_{t-1,i} | x_{t,i}, x_{0,i}) ||
    p(x_{t-1,i} | x_t))``. ``logp0_blv``: the denoiser's log-probabilities of ``x_0`` given ``x_t``.
    """
    if t == 1:
        return logp0_blv.gather(-1, x0_bl[..., None]).squeeze(-1).sum(-1)
    q = posterior(x0_bl, xt_bl, alphas, t, logp0_blv.shape[-1]).to(logp0_blv.dtype)
    p = reverse(logp0_blv.exp(), xt_bl, alphas, t)
    kl = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - p.clamp_min(1e-300).log()), 0.0)
    return -kl.sum(-1).sum(-1)
