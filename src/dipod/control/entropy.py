"""Kozachenko-Leonenko k-nearest-neighbour entropy estimate (FPO++'s exploration bonus for flows).

A flow policy has no closed-form entropy, but each update already scores ``K`` Monte-Carlo draws
per observation, and every draw predicts a clean action. Treating those ``K`` predictions as a
sample of the policy at that observation, the k-NN estimator (in nats) is

    H ~= psi(K) - psi(k) + log c_A + (A / K) * sum_i log rho_k(i)

with ``rho_k(i)`` the Euclidean distance from point i to its k-th nearest neighbour among the other
K - 1 points and ``c_A = pi^(A/2) / Gamma(A/2 + 1)`` the volume of the unit A-ball. Distances are
clamped at 1e-6 so coincident points do not send the log to -inf. It is differentiable in the
points, so ``- coef * H`` in the loss pushes predicted actions apart.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def knn_entropy(points_nka: Tensor, k: int) -> Tensor:
    """Mean over ``N`` groups of the k-NN entropy of each group's ``K`` points in ``A`` dims (scalar)."""
    n_points, dim = points_nka.shape[-2], points_nka.shape[-1]
    if not 1 <= k < n_points:
        raise ValueError(f"knn_entropy: k={k} must lie in [1, K) for K={n_points} points per group; "
                         "lower knn_entropy_k or raise num_draws")
    dist_nkk = torch.cdist(points_nka.float(), points_nka.float())
    eye = torch.eye(n_points, dtype=torch.bool, device=points_nka.device)
    dist_nkk = dist_nkk.masked_fill(eye, float("inf"))  # a point is not its own neighbour
    rho_nk = dist_nkk.topk(k, dim=-1, largest=False).values[..., -1].clamp(1e-6, 1e9)
    log_unit_ball = 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)
    const = torch.special.digamma(torch.tensor(float(n_points))) - torch.special.digamma(torch.tensor(float(k)))
    return (const.to(rho_nk.device) + log_unit_ball + dim * rho_nk.log().mean(-1)).mean()
