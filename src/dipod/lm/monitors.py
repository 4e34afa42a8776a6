"""Monitors of an RL run going wrong: collapsed reward groups, over-confident rollouts, completion logs.

Group-relative advantages are zero for a prompt whose completions all earn the same reward, so when
most groups are "collapsed" the estimator's gradient is (almost) only the DiPOD term and the run
stops learning. ``group_reward_stats`` measures that per step; ``rollout_confidence`` measures the
sharpness of the policy the rollouts are drawn from; ``CollapseWatch`` turns a streak of mostly
collapsed steps into one warning that names the settings which restore exploration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from dipod.lm.processes.registry import process_of

# The knobs measured to restore spread in reward groups (docs/lm_rl_diagnosis.md).
EXPLORATION_HINT = ("raise --temperature (e.g. 1.5-2.0), use --remasking random for rollouts, raise "
                    "--num_generations, or lower --learning_rate (a policy that sharpened on its own samples "
                    "stops varying)")


def group_reward_stats(rewards_n: Tensor, group_size: int, max_reward: float, atol: float = 1e-6) -> dict[str, float]:
    """Over consecutive groups of ``group_size`` rewards: the fraction of groups whose rewards are all
    equal (TRL's ``frac_reward_zero_std``), the mean within-group std, and the fractions of groups
    that are all-max (every completion earned ``max_reward``: solved) and all-zero."""
    if group_size < 1 or rewards_n.numel() % group_size:
        raise ValueError(f"group_reward_stats: {rewards_n.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards_n.detach().double().reshape(-1, group_size)
    spread = grouped.max(1).values - grouped.min(1).values
    same = spread <= atol
    std = grouped.std(1, unbiased=False)
    return {"frac_reward_zero_std": float(same.double().mean()),
            "reward_std_in_group": float(std.mean()),
            "frac_groups_all_zero": float((same & (grouped[:, 0].abs() <= atol)).double().mean()),
            "frac_groups_all_max": float((grouped.min(1).values >= max_reward - atol).double().mean())}


def rollout_confidence(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_mask_nl: Tensor,
                       chunk: int | None = None) -> dict[str, float]:
    """Sharpness of the policy where every rollout starts: one forward with the whole completion
    masked (the sampler's first step). Returns the mean over live completion positions of the
    predictive entropy (nats) and of the top token's probability (confidence). A policy that has
    collapsed onto one answer has entropy near 0 and confidence near 1 there. ``chunk`` rows at a
    time (the generation batch): the float64 softmax over the vocabulary is the largest tensor. The
    model's diffusion process computes it; a uniform-noise family (DiffusionGemma) starts from random
    tokens, not a masked canvas: NaN, not measured."""
    return process_of(lm).rollout_confidence(lm, prompt_ids, prompt_attn, completion_mask_nl, chunk)


class CollapseWatch:
    """Warns once when, for ``patience`` steps in a row, at least ``fraction`` of the prompt groups
    were stuck: identical rewards short of the maximum. A solved group (every completion at the
    maximum reward) is the goal of RL, not a collapse, so it never counts. ``check`` returns the
    warning text (None otherwise)."""

    def __init__(self, fraction: float, patience: int = 3):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"collapse fraction {fraction} must lie in (0, 1] (1: warn only when every group collapsed)")
        if patience < 1:
            raise ValueError(f"patience {patience} must be >= 1")
        self.fraction, self.patience = fraction, patience
        self.streak, self.warned = 0, False

    def check(self, step: int, frac_same: float, all_zero: float, all_max: float) -> str | None:
        stuck = frac_same - all_max
        self.streak = self.streak + 1 if stuck >= self.fraction else 0
        if self.warned or self.streak < self.patience:
            return None
        self.warned = True
        if all_zero >= 0.5 * stuck:
            return (f"step {step}: for {self.streak} steps, {stuck:.0%} of prompt groups were stuck and most earned "
                    "reward 0 in every completion: the task is too hard for this policy. Start from a better "
                    f"reference or shape the reward; to widen exploration, {EXPLORATION_HINT}.")
        return (f"step {step}: for {self.streak} steps, {stuck:.0%} of prompt groups were stuck (the same reward, short "
                "of the maximum, in every completion: zero advantages, nothing to learn from). To restore "
                f"exploration, {EXPLORATION_HINT}.")


def log_completions(path: Path, step: int, prompts: list[str], completions: list[str], rewards: list[float],
                    limit: int) -> list[str]:
    """Append the first ``limit`` (prompt, completion, reward) of an evaluation to ``path`` (JSON lines)
    and return them as short printable lines."""
    lines = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for prompt, completion, reward in list(zip(prompts, completions, rewards))[:limit]:
            f.write(json.dumps({"step": step, "prompt": prompt, "completion": completion, "reward": reward}) + "\n")
            lines.append(f"  [{reward:.2f}] {_short(prompt)!r} -> {_short(completion)!r}")
    return lines


def _short(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width // 2 - 2] + " .. " + text[-(width // 2 - 2):]

