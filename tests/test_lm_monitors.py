"""Monitors of an RL run (dipod.lm.monitors): collapsed groups, rollout sharpness, the collapse
warning, completion logs; and their metrics in a real trainer run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from dipod.lm.monitors import CollapseWatch, group_reward_stats, log_completions, rollout_confidence


def test_group_reward_stats_on_hand_computed_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.25, 0.25, 0.75])
    stats = group_reward_stats(rewards, 3, max_reward=1.0)
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 4)  # groups 1 and 3
    assert stats["frac_groups_all_zero"] == pytest.approx(1 / 4)  # group 3
    assert stats["frac_groups_all_max"] == pytest.approx(1 / 4)  # group 1: solved, not stuck
    # population std per group: 0, sqrt(1/6), 0, sqrt(2)/6 (= std of 0.25, 0.25, 0.75)
    assert stats["reward_std_in_group"] == pytest.approx((math.sqrt(1 / 6) + math.sqrt(2) / 6) / 4, rel=1e-12)
    with pytest.raises(ValueError, match="groups of 5"):
        group_reward_stats(rewards, 5, max_reward=1.0)


@dataclass
class _FixedLogits:
    """A stand-in policy whose logits at every completion position are ``row`` (mask token last)."""

    row: torch.Tensor
    mask_id: int

    def __post_init__(self):
        self.model = torch.nn.Linear(1, 1)

    def logits(self, ids, attn, first=0):
        return self.row.expand(ids.shape[0], ids.shape[1] - first, -1).clone()


def test_rollout_confidence_closed_forms():
    # 3 tokens with logits 0 and ln 2 -> probs 1/4, 1/4, 1/2; the mask token (huge logit) is excluded
    lm = _FixedLogits(torch.tensor([0.0, 0.0, math.log(2.0), 50.0]), mask_id=3)
    prompt = torch.ones(2, 3, dtype=torch.long)
    live = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = rollout_confidence(lm, prompt, torch.ones_like(prompt), live)
    assert out["rollout_entropy"] == pytest.approx(1.5 * math.log(2.0), rel=1e-7)  # 2 x 1/4 ln 4 + 1/2 ln 2 (ln 2 in float32)
    assert out["rollout_confidence"] == pytest.approx(0.5, rel=1e-7)
    assert rollout_confidence(lm, prompt, torch.ones_like(prompt), live, chunk=1) == pytest.approx(out)  # chunked
    # a policy sure of one token: entropy 0, confidence 1
    sure = rollout_confidence(_FixedLogits(torch.tensor([0.0, 80.0, 0.0, 0.0]), 3), prompt, torch.ones_like(prompt),
                              live)
    assert sure["rollout_entropy"] == pytest.approx(0.0, abs=1e-12) and sure["rollout_confidence"] == pytest.approx(1.0)


def test_collapse_watch_warns_once_after_a_streak_and_names_the_fixes():
    watch = CollapseWatch(0.75, patience=3)
    seen = [watch.check(step, frac, 0.0, 0.0) for step, frac in enumerate([0.8, 0.9, 0.5, 0.75, 1.0, 0.8, 1.0], 1)]
    assert seen[:5] == [None] * 5  # the healthy step 3 resets the streak
    assert seen[5] is not None and "step 6" in seen[5] and "--temperature" in seen[5] and "--remasking random" in seen[5]
    assert "stuck" in seen[5] and "--dipod_beta" not in seen[5]
    assert seen[6] is None  # once
    hard = CollapseWatch(0.5, patience=1).check(1, 1.0, 1.0, 0.0)
    assert "reward 0 in every completion" in hard
    with pytest.raises(ValueError, match="collapse fraction"):
        CollapseWatch(0.0)


def test_collapse_watch_counts_solved_groups_as_learning_not_collapse():
    """The demo's case: most groups identical because every completion solved the puzzle."""
    watch = CollapseWatch(0.75, patience=3)
    assert [watch.check(step, 0.9, 0.0, 0.8) for step in range(1, 10)] == [None] * 9  # 10% stuck, 80% solved
    mixed = CollapseWatch(0.5, patience=1).check(1, 0.9, 0.1, 0.3)  # 60% stuck: 10% at zero, 50% at a middle reward
    assert mixed is not None and "60%" in mixed and "too hard" not in mixed


def test_group_reward_stats_closed_form():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 1.0, 0.0])  # groups: solved, all-zero, same 0.5, mixed
    stats = group_reward_stats(rewards, 2, max_reward=1.0)
    assert stats["frac_reward_zero_std"] == 0.75 and stats["frac_groups_all_zero"] == 0.25
    assert stats["frac_groups_all_max"] == 0.25 and stats["reward_std_in_group"] == pytest.approx(0.5 / 4)
    assert group_reward_stats(rewards * 2, 2, max_reward=2.0)["frac_groups_all_max"] == 0.25  # weighted rewards


def test_log_completions_appends_json_lines(tmp_path):
    path = tmp_path / "completions.jsonl"
    shown = log_completions(path, 5, ["p1", "p2", "p3"], ["c1", "c2", "c3"], [0.5, 1.0, 0.0], limit=2)
    log_completions(path, 10, ["p1"], ["x" * 500], [0.25], limit=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["prompt"], r["reward"]) for r in rows] == [(5, "p1", 0.5), (5, "p2", 1.0), (10, "p1", 0.25)]
    assert rows[2]["completion"] == "x" * 500  # the file keeps the whole text; the printed line is cut
    assert len(shown) == 2 and "[1.00] 'p2' -> 'c2'" in shown[1]


# --------------------------------------------------------------------------- in a real run

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from dipod.lm.model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2, num_heads=2,
                                intermediate_size=64, max_positions=128))


def test_greedy_rollouts_collapse_every_group_and_the_run_warns(tiny_model, tmp_path, capsys):
    """At temperature 0 with confidence remasking the G rollouts of a prompt are identical, so every
    group has zero reward spread; the third such step prints the warning."""
    from dipod.lm.train_config import TrainConfig
    from dipod.lm.trainer import train
    from dipod.runlog import read_metrics

    cfg = TrainConfig(model=tiny_model, task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                      prompts_per_step=2, num_generations=3, gradient_accumulation_steps=1, gen_length=16,
                      block_length=16, diffusion_steps=4, num_iterations=1, temperature=0.0, max_steps=3,
                      save_steps=0, eval_steps=0, eval_examples=2, log_completions=2, gap_monitor_steps=0,
                      masking="random", dipod_unscored_eos=True, tensorboard=False, progress_bar=False, save_final_model=False,
                      output_dir=str(tmp_path))
    result = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] > 0]
    assert [r["frac_reward_zero_std"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["reward_std_in_group"] == 0.0 for r in rows)
    assert all(0.0 <= r["rollout_entropy"] <= math.log(result.model.config.vocab_size) for r in rows)
    assert all(0.0 < r["rollout_confidence"] <= 1.0 for r in rows)
    out = capsys.readouterr().out
    assert "WARNING step 3: for 3 steps, 100% of prompt groups were stuck" in out
    # both evaluations (before and after) logged their 2 held-out completions, rewards as evaluated
    logged = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 0, 3, 3]
    assert sum(r["reward"] for r in logged[2:]) / 2 == pytest.approx(result.after["eval/reward"])
