"""`dipod lm train / eval / generate / sft` end to end on tiny hub-layout LLaDA and Dream checkpoints.

The checkpoints are the suite's own (``hub_models``, tests/hub_layout.py: vocab 128, d_model 64, 2
layers, random weights), so these pin that every path RUNS on the real architectures in the hub's
layout, loaded into our own network (the legacy hub-code path once, on ../shared/models' snapshots,
where transformers 4.56-4.57 can run it) (every estimator, LoRA on and off,
float32 and bfloat16, the LLaDA-1.5 and Dream configs), not accuracy. The default run covers every
estimator per family with LoRA and dtype alternating; the full matrix is marked slow.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hub_snapshots import SNAPSHOTS, needs_hub_code, needs_snapshots  # noqa: E402

from dipod.runlog import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "tests" / "fixtures" / "gsm8k_tiny.jsonl"
FAMILIES = ("llada", "dream")
pytestmark = pytest.mark.filterwarnings("ignore")

ESTIMATORS = ("d1", "fpo", "fpo++", "spg")
# Tiny lengths: a 1-prompt x 2-rollout step with 8 completion tokens in 2 blocks.
TINY = ["--prompts_per_step", "1", "--num_generations", "2", "--gradient_accumulation_steps", "1",
        "--gen_length", "8", "--block_length", "4", "--diffusion_steps", "2", "--num_iterations", "1",
        "--max_prompt_length", "48", "--max_steps", "1", "--eval_examples", "1", "--eval_steps", "0",
        "--save_steps", "0", "--gap_monitor_steps", "1", "--gap_monitor_sequences", "1", "--gap_monitor_orders", "2",
        "--num_draws", "2", "--tensorboard", "false", "--progress_bar", "false"]


def train_one_step(flags: list[str], out: Path) -> dict:
    from dipod.lm.trainer import main

    assert main([*flags, *TINY, "--output_dir", str(out)]) == 0
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["step"] == 1 and last["skipped_updates"] == 0.0
    for key in ("reward", "elbo", "grad_norm", "loss", "gap_lower_bound", "eval/reward"):
        assert isinstance(last[key], float) and math.isfinite(last[key]), key
    return last


def _default(family: str, estimator: str, lora: str, dtype: str) -> bool:
    """Every estimator of each family once, LoRA and dtype alternating so each family meets all four."""
    i = ESTIMATORS.index(estimator) + (family == "dream")
    return (lora == "4") == (i % 2 == 1) and (dtype == "bfloat16") == ((i // 2) % 2 == 1)


MATRIX = [pytest.param(f, e, lr, dt, marks=() if _default(f, e, lr, dt) else pytest.mark.slow)
          for f, e, lr, dt in itertools.product(FAMILIES, ESTIMATORS, ("0", "4"), ("float32", "bfloat16"))]


@pytest.mark.parametrize("family,estimator,lora_r,dtype", MATRIX)
def test_train_runs_one_step(hub_models, family, estimator, lora_r, dtype, tmp_path):
    flags = ["--model", str(hub_models[family]), "--task", "sudoku4",
             "--prompt_style", "chat", "--estimator", estimator, "--lora_r", lora_r, "--dtype", dtype,
             "--gradient_checkpointing", "true", "--save_final_model", "true"]
    if estimator == "d1":
        flags += ["--kl_beta", "0.01"]  # also loads the frozen reference model
    train_one_step(flags, tmp_path)
    from dipod.lm.model import load_masked_lm

    saved = load_masked_lm(tmp_path / "final_model")  # LoRA merged
    assert saved.family.name == family and saved.mask_id == 120


@needs_snapshots
@needs_hub_code
@pytest.mark.parametrize("family", FAMILIES)
def test_the_legacy_hub_code_path_trains_and_saves(family, tmp_path):
    """--trust_remote_code true runs the hub code (transformers 4.56-4.57); its saved model loads in ours."""
    from dipod.lm.model import load_masked_lm

    train_one_step(["--model", str(SNAPSHOTS[family]), "--trust_remote_code", "true", "--task", "sudoku4",
                    "--prompt_style", "chat", "--lora_r", "4", "--save_final_model", "true"], tmp_path)
    hub, ours = (load_masked_lm(tmp_path / "final_model", trust_remote_code=remote) for remote in (True, False))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    torch.testing.assert_close(ours.logits(ids, attn), hub.logits(ids, attn), rtol=0, atol=1e-5)


@pytest.mark.parametrize("config,family", [("llada15_gsm8k_spg_dipod.yaml", "llada"),
                                           ("dream_gsm8k_spg_dipod.yaml", "dream")])
def test_model_configs_run_one_step_through_the_snapshots(hub_models, config, family, tmp_path):
    """Every setting of the file but the model (its tiny checkpoint), lengths and data scale."""
    from dipod.config import parse_config
    from dipod.lm.train_config import TrainConfig

    path = ROOT / "configs" / "lm" / config
    cfg = parse_config(TrainConfig, ["--config", str(path)], "t")
    assert not cfg.trust_remote_code and cfg.mask_token_id is None and cfg.gradient_checkpointing
    assert {"GSAI-ML/LLaDA-1.5": "llada", "Dream-org/Dream-v0-Instruct-7B": "dream"}[cfg.model] == family
    flags = ["--config", str(path), "--model", str(hub_models[family]), "--lora_r", "4", "--generation_batch_size", "2",
             "--train_data", str(GSM8K), "--eval_data", str(GSM8K), "--save_final_model", "false"]
    train_one_step(flags, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_generate_run_on_the_snapshot(hub_models, family, tmp_path, capsys):
    from dipod.lm.evaluate import main as eval_main
    from dipod.lm.generate import main as generate_main

    common = ["--model", str(hub_models[family]), "--task", "sudoku4",
              "--prompt_style", "chat", "--gen_length", "8", "--block_length", "4", "--steps", "4",
              "--max_prompt_length", "48"]
    assert eval_main([*common, "--limit", "3", "--batch_size", "2", "--dtype", "bfloat16",
                      "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_examples"] == 3 and 0.0 <= report["mean_reward"] <= 1.0
    assert generate_main([*common, "--n", "2"]) == 0
    assert capsys.readouterr().out.count("--- example") == 2


@pytest.mark.parametrize("family,dtype", [("llada", "float32"), ("dream", "bfloat16")])
def test_sft_trains_and_saves_a_reloadable_model(hub_models, family, dtype, tmp_path):
    from dipod.lm.model import load_masked_lm
    from dipod.lm.sft import main as sft_main

    out = tmp_path / "sft"
    assert sft_main(["--model", str(hub_models[family]), "--task", "sudoku4",
                     "--prompt_style", "chat", "--train_examples", "4", "--eval_examples", "1", "--eval_every", "0",
                     "--gen_length", "16", "--block_length", "8", "--steps", "4", "--max_prompt_length", "48",
                     "--max_steps", "2", "--batch_size", "2", "--learning_rate", "1e-2", "--warmup_steps", "0",
                     "--dtype", dtype, "--progress_bar", "false", "--output_dir", str(out)]) == 0
    result = json.loads((out / "sft_result.json").read_text())
    trained = load_masked_lm(result["model_dir"], dtype=dtype)
    start = load_masked_lm(hub_models[family], dtype=dtype)
    assert trained.family is start.family
    moved = [name for name, p in trained.model.named_parameters()
             if not torch.equal(p, dict(start.model.named_parameters())[name])]
    assert moved  # two AdamW steps changed the saved weights
