"""Sanity of the RL loop: every estimator drives a handful of training puzzles that the tiny sudoku4
reference policy gets wrong to greedy reward 1.0 (the overfit probe of docs/lm_rl_diagnosis.md).

Slow (about a minute per estimator; the reference policy is trained first unless $DIPOD_CACHE
holds it):

    python -m pytest -q -m slow tests/test_lm_overfit.py

The puzzles are failed by greedy decoding but solved by at least one of 4 samples at temperature 1
(``failing_training_examples(..., reachable_in=4)``): group-relative RL can only reinforce answers
the policy samples, so a puzzle the policy (almost) never samples right tests exploration luck, not
the update. With 16 rollouts per puzzle the loop must turn those successes into the greedy answer.
With ``reachable_in=16`` (a success rate near 1/16) FPO++ froze one puzzle short in all six settings
tried, while FPO and SPG solved that set by step 4 and d1 by step 14 (docs/lm_rl_diagnosis.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

PUZZLES, GENERATIONS, MAX_STEPS, EVAL_EVERY = 4, 16, 30, 2
# Per estimator, no DiPOD (the test is about the estimators), the setting measured to solve these
# puzzles (first solved at step: d1 12, FPO 4, FPO++ 10, SPG 18; docs/lm_rl_diagnosis.md). d1 at 3e-4
# reached 0.94 at step 4 and then drifted down; SPG(mix) with the recipe's 2 masking draws drifted
# (the ELBO per token falling, the gap growing) at 3e-4 and at 1e-4, with DiPOD 0.05 it froze at 0.88,
# and with 8 draws (a quarter of the mask noise) it holds.
SETTINGS = {
    "d1": {"learning_rate": 1e-4},
    "fpo": {"learning_rate": 3e-4},
    "fpo++": {"learning_rate": 3e-4},
    "spg": {"learning_rate": 3e-4, "num_draws": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(SETTINGS))
def test_each_estimator_overfits_failing_puzzles_to_greedy_reward_one(estimator, tmp_path):
    from lm_rl_probe import probe_config, write_csv

    from dipod.lm.reference import ensure_reference_policy, failing_training_examples
    from dipod.lm.trainer import Trainer

    model_dir = ensure_reference_policy("sudoku4", progress_bar=False)
    puzzles = failing_training_examples(model_dir, "sudoku4", PUZZLES, reachable_in=4)
    data = write_csv(puzzles, tmp_path / "puzzles.csv")
    cfg = probe_config(model_dir, data, tmp_path / "run", estimator, MAX_STEPS, PUZZLES, GENERATIONS,
                       eval_every=EVAL_EVERY, seed=0, changes={"dipod_beta": 0.0, **SETTINGS[estimator]})
    trainer = Trainer(cfg)
    start = trainer.evaluate(0)
    assert start["eval/accuracy"] == 0.0  # the reference fails every probe puzzle greedily
    rewards = [start["eval/reward"]]
    for step in range(1, MAX_STEPS + 1):
        trainer.step(step)
        if step % EVAL_EVERY == 0:
            rewards.append(trainer.evaluate(step)["eval/reward"])
            if rewards[-1] >= 1.0 - 1e-9:
                break
    assert rewards[-1] >= 1.0 - 1e-9, f"{estimator}: greedy reward every {EVAL_EVERY} steps {rewards}"
