"""Advantage estimators: group-relative (GRPO, for language models) and GAE (for control)."""

from __future__ import annotations

import torch
from torch import Tensor


def group_relative_advantages(rewards_n: Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-4) -> Tensor:
    """``A = r - mean(r over its group)`` (optionally divided by the group's std + eps).

    ``rewards_n`` holds consecutive groups of ``group_size`` completions of the same prompt; a group
    whose rewards are all equal gets advantage 0 exactly, whatever ``eps``.
    """
    if group_size < 1 or rewards_n.numel() % group_size != 0:
        raise ValueError(f"group_relative_advantages: {rewards_n.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards_n.float().reshape(-1, group_size)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (grouped.std(-1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)
    # A group of equal rewards carries no signal: exactly 0 (a float mean leaves ~1e-17 residues,
    # which std scaling with eps = 0 would turn into 0/0 = NaN).
    constant = (grouped == grouped[:, :1]).all(-1, keepdim=True)
    return adv.masked_fill(constant, 0.0).reshape(-1)


def generalized_advantage_estimation(
    rewards_tn: Tensor,
    values_tn: Tensor,
    dones_tn: Tensor,
    last_values_n: Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) over a rollout of T steps and N environments.

    ``dones_tn[t]`` is 1 when the episode ended after step t (the value of the next state is then
    not bootstrapped; time-outs should already be folded into ``rewards_tn`` by the caller).
    Returns ``(advantages_tn, returns_tn)`` with ``returns = advantages + values``.
    """
    steps = rewards_tn.shape[0]
    advantages = torch.zeros_like(rewards_tn, dtype=torch.float32)
    next_adv = torch.zeros_like(last_values_n, dtype=torch.float32)
    next_values = last_values_n.float()
    for t in reversed(range(steps)):
        not_done = 1.0 - dones_tn[t].float()
        delta = rewards_tn[t] + gamma * next_values * not_done - values_tn[t]
        next_adv = delta + gamma * lam * not_done * next_adv
        advantages[t] = next_adv
        next_values = values_tn[t].float()
    return advantages, advantages + values_tn.float()
