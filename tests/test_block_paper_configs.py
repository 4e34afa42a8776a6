"""configs/lm/paper/block/: SPG(mix) with and without DiPOD on LLaDA2.0-mini and SDAR-8B (DARE's verl
recipes) and TraDo-8B (TraceRL's dLLM-RL recipe), GSM8K and MATH500. The table below is written by hand
from the recipes (yjyddq/DARE@83ae8a3 recipe/llada2_mini/run_ebpo_llada2_mini.sh and
recipe/sdar/run_ebpo_sdar_8b_chat.sh; Gen-Verse/dLLM-RL@10b4fd1 configs/rl_trado.yaml); every config must
carry it and parse into a TrainConfig whose block length is the model's."""

from __future__ import annotations

from pathlib import Path

import pytest

from dipod.config import parse_config
from dipod.lm.memory import model_shape
from dipod.lm.train_config import TrainConfig

BLOCK = Path(__file__).resolve().parents[1] / "configs" / "lm" / "paper" / "block"

SPG = dict(estimator="spg", spg_negative_proxy="mix", spg_mix_weight=0.5, eubo_beta=1.5, num_draws=2, min_t=0.0,
           max_t=1.0, p_mask_prompt=0.0, lora_r=0, gradient_checkpointing=True, dtype="bfloat16", scale_rewards=True,
           num_iterations=1, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, lr_scheduler="constant",
           warmup_steps=0, prompt_style="chat", kv_cache="prefix", remasking="low_confidence", eval_split="test")
DARE = dict(prompts_per_step=16, num_generations=8, gradient_accumulation_steps=16, max_prompt_length=512,
            gen_length=2048, learning_rate=5e-7, weight_decay=0.01, confidence_threshold=0.95, save_steps=100)
MODELS = {
    "llada2_mini": dict(DARE, model="inclusionAI/LLaDA2.0-mini", block_length=32, diffusion_steps=1024,
                        temperature=0.6, generation_batch_size=4),
    "sdar_8b": dict(DARE, model="JetLM/SDAR-8B-Chat", block_length=4, diffusion_steps=2048, temperature=1.0,
                    top_k=50, generation_batch_size=4),
    "trado_8b": dict(model="Gen-Verse/TraDo-8B-Instruct", prompts_per_step=64, num_generations=16,
                     gradient_accumulation_steps=128, max_prompt_length=784, gen_length=2000, block_length=4,
                     diffusion_steps=2000, confidence_threshold=0.9, temperature=1.0, learning_rate=1e-6,
                     weight_decay=0.0, seed=10086, max_steps=80, save_steps=10, generation_batch_size=4),
}
TASKS = {"gsm8k": dict(task="gsm8k", train_data="openai/gsm8k"), "math500": dict(task="math500", train_data="ankner/math-500")}
DARE_STEPS = {"gsm8k": 468, "math500": 750}  # one epoch of 7473 / 12000 prompts, 16 a step
RUNS = {f"{model}_spg_mix_{task}_{tag}": {**SPG, **values, **TASKS[task], "dipod_beta": beta,
                                          **({} if model == "trado_8b" else {"max_steps": DARE_STEPS[task]}),
                                          **({"dipod_normalisation": "per_token"} if beta else {})}
        for model, values in MODELS.items() for task in TASKS for tag, beta in (("dipod", 0.05), ("nodipod", 0.0))}


def _load(name: str) -> TrainConfig:
    return parse_config(TrainConfig, ["--config", str(BLOCK / f"{name}.yaml")], "test")


def test_one_config_per_model_task_and_estimator():
    assert len(RUNS) == 12 and sorted(p.stem for p in BLOCK.glob("*.yaml")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_config_carries_the_recipes_values(name):
    cfg = _load(name)
    expected = RUNS[name]
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert cfg.block_length == model_shape(cfg.model).block_size
    assert cfg.output_dir == f"runs/paper/block/{name}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_value_cites_its_source(name):
    """Each setting taken from a recipe names the recipe's own key or value beside it."""
    uncommented = [line.split(":")[0] for line in (BLOCK / f"{name}.yaml").read_text().splitlines()
                   if line and not line.startswith("#") and "#" not in line]
    assert set(uncommented) <= {"task", "adam_beta2", "remasking", "spg_negative_proxy", "max_t", "eval_examples",
                                "output_dir"}, uncommented
