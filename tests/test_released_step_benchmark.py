"""benchmarks/released_step.py: it runs the paper's SPG(mix)+DiPOD settings, maps them onto the released
trainer's argument names, and reports what it measured. The step itself runs against the released code only
where ``DIPOD_RELEASE`` names a checkout of Astro-Eric/DiPOD-release (skipped otherwise: it is never shipped)."""

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


def test_the_step_uses_the_papers_spg_mix_sudoku4_settings():
    paper = yaml.safe_load((ROOT / "configs/lm/paper/spg_mix_sudoku4_dipod.yaml").read_text())
    assert {k: paper[k] for k in released_step.PAPER} == released_step.PAPER


def test_released_arguments_carry_the_configs_values(tmp_path):
    from dipod.demo import tiny_rl_config
    from dipod.lm.reference import SHIPPED_DIR

    cfg = tiny_rl_config(SHIPPED_DIR / "sudoku4", tmp_path, **released_step.PAPER, gen_length=32, block_length=8,
                         diffusion_steps=16)
    args = released_step.released_args(cfg)
    assert (args.forward_type, args.num_t, args.min_t, args.max_t, args.block_length) == ("block_random", 2, 0.0, 1.0, 8)
    assert (args.use_mask_prompt, args.p_mask_prompt, args.logp_estimation, args.mix_weight) == (True, 0.15, "mix", 0.5)
    assert (args.eubo_beta, args.dipod_beta, args.num_iterations, args.cfg_scale) == (1.0, 0.05, 4, 0.0)


def test_the_report_states_each_sides_fastest_repeat_and_the_ratios():
    run = {"cpu_s": 2.0, "wall_s": 3.0, "generation_s": 1.0, "update_s": 2.0, "reward": 0.5}
    result = {"command": "c", "machine": "m", "started": "s", "shape": "tiny",
              "comparison": {"repeats": {"ours": [run], "released": [run]},
                             "best": {"ours": run, "released": {**run, "cpu_s": 3.0}},
                             "cpu_ratio_released_over_ours": 1.5, "wall_ratio_released_over_ours": 1.0}}
    page = released_step.markdown(result)
    assert "| ours | 2.0 | 3.0 | 1.0 | 2.0 | 0.5 |" in page and "| released | 3.0 | 3.0 | 1.0 | 2.0 | 0.5 |" in page
    assert "CPU ratio released / ours: **1.5x**" in page


def test_one_step_of_each_side_runs_on_the_released_code():
    release = os.environ.get("DIPOD_RELEASE")
    if not release:
        pytest.skip("DIPOD_RELEASE is unset: point it at a checkout of Astro-Eric/DiPOD-release to run its trainer")
    if not (Path(release) / released_step.SPG_FILE).is_file():
        pytest.skip(f"DIPOD_RELEASE={release} holds no {released_step.SPG_FILE}")
    torch.set_num_threads(1)
    released_step.install_stand_ins()
    spg_cls = released_step.load_file(Path(release) / released_step.SPG_FILE, "released_spg_trainer").SPGTrainer
    args = SimpleNamespace(prompts=2, generations=2, gen_length=16, block_length=8, steps=8, repeats=1)
    result = released_step.compare(args, spg_cls)
    for side in ("ours", "released"):
        best = result["best"][side]
        assert best["generation_s"] > 0 and best["update_s"] > 0 and 0.0 <= best["reward"] <= 2.0
    assert result["cpu_ratio_released_over_ours"] == round(result["best"]["released"]["cpu_s"]
                                                           / result["best"]["ours"]["cpu_s"], 3)
