"""benchmarks/released_step.py: it runs the paper's settings, hands them to the released trainers under their
own names, and reports what it measured. The step itself runs against the released code only where
``DIPOD_RELEASE`` names a checkout of Astro-Eric/DiPOD-release (skipped otherwise: it is never shipped)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import released_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOT_IN_PAPER_FILE = {"dipod_unscored_eos"}  # SPG's yaml leaves it at TrainConfig's default (false)


@pytest.mark.parametrize("trainer", sorted(released_step.TRAINERS))
def test_the_step_uses_the_papers_settings(trainer):
    released = released_step.TRAINERS[trainer]
    paper = yaml.safe_load((ROOT / "configs/lm/paper" / released["paper"]).read_text())
    settings = {k: v for k, v in released["settings"].items() if k in paper or k not in NOT_IN_PAPER_FILE}
    assert {k: paper[k] for k in settings} == settings


def config(tmp_path, trainer: str):
    from dipod.demo import tiny_rl_config
    from dipod.lm.reference import SHIPPED_DIR

    return tiny_rl_config(SHIPPED_DIR / "sudoku4", tmp_path, **released_step.TRAINERS[trainer]["settings"],
                          gen_length=32, block_length=8, diffusion_steps=16)


class Released:
    """Stands in for a released trainer class: only ``bare_instance`` touches it here."""


def test_the_released_spg_trainer_gets_the_configs_values(tmp_path):
    stub = released_step.released_instance(Released, config(tmp_path, "spg"), mask_id=7)
    args = stub.args
    assert (args.mask_id, args.forward_type, args.num_t, args.min_t, args.max_t) == (7, "block_random", 2, 0.0, 1.0)
    assert (args.block_length, args.use_mask_prompt, args.p_mask_prompt, args.logp_estimation) == (8, True, 0.15, "mix")
    assert (args.mix_weight, args.eubo_beta, args.dipod_beta, args.num_iterations) == (0.5, 1.0, 0.05, 4)
    assert stub.beta == 0.0 and not stub.control.should_evaluate


def test_the_released_fpo_trainer_gets_the_configs_values(tmp_path):
    stub = released_step.released_instance(Released, config(tmp_path, "fpo"), mask_id=7)
    assert (stub.fpo, stub.elbo_num_samples, stub.epsilon, stub.beta) == (True, 4, 0.5, 0.04)
    assert (stub.args.dipod_beta, stub.args.num_iterations, stub.args.use_mask_prompt) == (0.05, 8, False)
    stub._metrics["train"]["loss"].append(1.0)  # what its compute_loss logs into
    assert stub.accelerator.gather_for_metrics(torch.ones(2)).tolist() == [1.0, 1.0]


def test_the_report_states_each_sides_fastest_repeat_and_the_ratios():
    run = {"cpu_s": 2.0, "wall_s": 3.0, "generation_s": 1.0, "update_s": 2.0, "reward": 0.5}
    result = {"command": "c", "machine": "m", "started": "s", "shape": "tiny", "trainer": "T",
              "comparison": {"repeats": {"ours": [run], "released": [run]},
                             "best": {"ours": run, "released": {**run, "cpu_s": 3.0}},
                             "cpu_ratio_released_over_ours": 1.5, "wall_ratio_released_over_ours": 1.0}}
    page = released_step.markdown(result)
    assert "| ours | 2.0 | 3.0 | 1.0 | 2.0 | 0.5 |" in page and "| released | 3.0 | 3.0 | 1.0 | 2.0 | 0.5 |" in page
    assert "CPU ratio released / ours: **1.5x**" in page


@pytest.mark.parametrize("trainer", sorted(released_step.TRAINERS))
def test_one_step_of_each_side_runs_on_the_released_code(trainer):
    release = os.environ.get("DIPOD_RELEASE")
    if not release:
        pytest.skip("DIPOD_RELEASE is unset: point it at a checkout of Astro-Eric/DiPOD-release to run its trainers")
    released = released_step.TRAINERS[trainer]
    if not (Path(release) / released["file"]).is_file():
        pytest.skip(f"DIPOD_RELEASE={release} holds no {released['file']}")
    torch.set_num_threads(1)
    released_step.install_stand_ins()
    trainer_cls = getattr(released_step.load_file(Path(release) / released["file"], f"released_{trainer}"),
                          released["cls"])
    args = SimpleNamespace(trainer=trainer, prompts=2, generations=2, gen_length=16, block_length=8, steps=8,
                           repeats=1)
    result = released_step.compare(args, trainer_cls)
    for side in ("ours", "released"):
        best = result["best"][side]
        assert best["generation_s"] > 0 and best["update_s"] > 0 and 0.0 <= best["reward"] <= 2.0
