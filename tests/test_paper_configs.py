"""configs/lm/paper/: one YAML per released run of the paper (Astro-Eric/DiPOD-release, language/SPG
spg_mix scripts and language/d1 FPO scripts). The table below is the release's values, written out
by hand from its sbatch scripts, train.yaml files and diffu_grpo_train.py; every config must carry
them and parse into a TrainConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dipod.config import ConfigError, parse_config
from dipod.lm.train_config import TrainConfig

PAPER = Path(__file__).resolve().parents[1] / "configs" / "lm" / "paper"

# shared by every released run (train.yaml + diffu_grpo_train.py)
COMMON = dict(
    model="GSAI-ML/LLaDA-8B-Instruct", dtype="bfloat16", lora_r=128, lora_alpha=64.0, lora_dropout=0.05,
    lora_target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],  # the release's list, as far as LLaDA has it
    prompts_per_step=16, num_generations=6, generation_batch_size=6, gen_length=256, block_length=32,
    diffusion_steps=128, remasking="low_confidence", cfg_scale=0.0, scale_rewards=False, learning_rate=3e-6,
    weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=0.2, lr_scheduler="constant", seed=42,
    keep_checkpoints=500, load_in_4bit=False,  # the release's NF4 base is opt-in here (needs CUDA)
)
SPG = dict(estimator="spg", spg_negative_proxy="mix", spg_mix_weight=0.5, masking="block_random", num_draws=2,
           min_t=0.0, max_t=1.0, p_mask_prompt=0.15, reseed_masks=True, num_iterations=4, save_steps=25)
FPO = dict(estimator="fpo", clip_eps=0.5, kl_beta=0.04, masking="random", num_draws=4, p_mask_prompt=0.0,
           reseed_masks=False)
TASKS = {
    "gsm8k": dict(task="gsm8k", temperature=0.9, max_prompt_length=200, train_data="openai/gsm8k", eval_split="test"),
    "math500": dict(task="math500", temperature=0.9, max_prompt_length=200, train_data="ankner/math-500",
                    eval_split="test"),
    "countdown": dict(task="countdown", temperature=0.9, max_prompt_length=200, eval_split="d1_test"),
    "sudoku4": dict(task="sudoku4", temperature=0.3, train_split="paper_train"),
}
# name -> the run's own values (the released script that sets them in the comment)
RUNS = {}
for _dipod in (True, False):
    _beta = dict(dipod_beta=0.05 if _dipod else 0.0)
    _tag = "dipod" if _dipod else "nodipod"
    for _task in ("gsm8k", "math500", "countdown"):
        # spg_mix/{gsm,math,countdown}_base_spg_mix_beta1.5_weight0.5_dipod_beta{0.05,0}.sbatch
        RUNS[f"spg_mix_{_task}_{_tag}"] = dict(**SPG, **TASKS[_task], **_beta, eubo_beta=1.5, prompt_style="d1",
                                               gradient_accumulation_steps=2,
                                               **({"dipod_normalisation": "per_token"} if _dipod else {}))
        # d1/diffu-grpo/slurm_scripts/{gsm,math,countdown}_base_dipod_beta{0.05,0}.sbatch: NUM_ITER 12, 12, 8
        iterations = 8 if _task == "countdown" else 12
        RUNS[f"fpo_{_task}_{_tag}"] = dict(**FPO, **TASKS[_task], **_beta, prompt_style="d1", num_iterations=iterations,
                                           gradient_accumulation_steps=2, save_steps=100 // iterations,
                                           **({"dipod_normalisation": "per_sequence", "dipod_unscored_eos": True}
                                              if _dipod else {}))
    for _shots, _style in ((0, "d1"), (3, "d1_3shot")):
        # spg_mix/sudoku_new[_3shot]_base_spg_mix_beta1.0_weight0.5_dipod_beta{0.05,0}.sbatch
        RUNS[f"spg_mix_sudoku4{'_3shot' if _shots else ''}_{_tag}"] = dict(
            **SPG, **TASKS["sudoku4"], **_beta, eubo_beta=1.0, prompt_style=_style, max_prompt_length=1500,
            eval_split="spg_test", gradient_accumulation_steps=4,
            **({"dipod_normalisation": "per_token"} if _dipod else {}))
    # d1/diffu-grpo/slurm_scripts/sudoku_base_dipod_beta{0.05,0}.sbatch: NUM_ITER 8, --temperature 0.3
    RUNS[f"fpo_sudoku4_{_tag}"] = dict(**FPO, **TASKS["sudoku4"], **_beta, prompt_style="d1", max_prompt_length=200,
                                       eval_split="d1_test", num_iterations=8, gradient_accumulation_steps=2,
                                       save_steps=12, **({"dipod_normalisation": "per_sequence", "dipod_unscored_eos": True}
                                                         if _dipod else {}))


def _load(name: str) -> TrainConfig:
    return parse_config(TrainConfig, ["--config", str(PAPER / f"{name}.yaml")], "test")


def test_one_config_per_released_run():
    assert len(RUNS) == 18  # SPG(mix): 5 settings x 2; FPO: 4 tasks x 2
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_config_carries_the_released_values(name):
    cfg = _load(name)
    expected = {**COMMON, **RUNS[name]}
    actual = {key: getattr(cfg, key) for key in expected}
    assert actual == expected
    # 96 completions per rollout batch over the release's 8 processes, and an ELBO-only config
    # never names a normalisation it does not use
    assert cfg.prompts_per_step * cfg.num_generations == 96
    assert (cfg.prompts_per_step * cfg.num_generations // 8) % cfg.gradient_accumulation_steps == 0
    assert cfg.save_steps * cfg.num_iterations <= 100 < (cfg.save_steps + 1) * cfg.num_iterations
    assert cfg.output_dir == f"runs/paper/{name}"


def test_fpo_kl_term_is_on_and_opposes_dipod():
    cfg = _load("fpo_gsm8k_dipod")
    options = cfg.estimator_options()
    assert options["kl_beta"] == 0.04 and cfg.dipod_beta == 0.05 and options["dipod_normalisation"] == "per_sequence"
    assert cfg.kl_beta_value() > 0  # the trainer loads the reference model for it


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine 4-bit may be available")
def test_4bit_base_fails_before_compute_without_cuda():
    with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA device"):
        parse_config(TrainConfig, ["--config", str(PAPER / "spg_mix_gsm8k_dipod.yaml"), "--load_in_4bit", "true"],
                     "test")


@pytest.mark.parametrize("name", ["fpo_sudoku4_dipod",
                                  pytest.param("spg_mix_sudoku4_3shot_dipod", marks=pytest.mark.slow)])
def test_paper_config_trains_one_step_on_the_tiny_llada_snapshot(hub_models, name, tmp_path):
    """The released settings end to end on a tiny LLaDA in the hub's layout (the suite's own, loaded into
    our network): the LoRA targets exist, the d1 prompts encode, FPO's KL reads the reference model's ELBOs
    and SPG redraws its masks."""
    from dipod.lm.trainer import train

    flags = ["--config", str(PAPER / f"{name}.yaml"), "--model", str(hub_models["llada"]), "--lora_r", "4",
             "--dtype", "float32", "--prompts_per_step", "1", "--num_generations", "2",
             "--gradient_accumulation_steps", "1", "--generation_batch_size", "2", "--gen_length", "16",
             "--block_length", "8", "--diffusion_steps", "4", "--num_iterations", "2", "--max_steps", "1",
             "--max_prompt_length", "1000", "--eval_examples", "1", "--save_steps", "0", "--output_dir",
             str(tmp_path / "run"), "--tensorboard", "false", "--progress_bar", "false", "--save_final_model", "false"]
    cfg = parse_config(TrainConfig, flags, "test")
    result = train(cfg)
    row = result.history[-1]
    assert row["step"] == 1 and row["skipped_updates"] == 0.0
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "elbo", "dipod_loss"))
    if cfg.estimator == "fpo":
        assert "kl" in row and torch.isfinite(torch.tensor(row["kl"]))
