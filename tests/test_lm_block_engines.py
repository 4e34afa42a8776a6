"""Block-causal paper configs launch on every engine (slow: 2 CPU processes each): the SDAR one and the
mixture-of-experts LLaDA2 one.

configs/lm/paper/block/sdar_8b_spg_mix_gsm8k_dipod.yaml (SPG(mix) + DiPOD, full fine-tuning, gradient
checkpointing, the prefix KV cache, threshold decoding) with only the sizes shrunk: a tiny SDAR built
here in the hub's layout (dipod.lm.networks.tiny_block), sudoku4 data from disk, float32. Launched
through ``accelerate launch -m dipod.lm.trainer --config`` exactly as the config's own launch line,
under gloo DDP, DeepSpeed ZeRO-2 / ZeRO-3 (DS_ACCELERATOR=cpu) and FSDP2. Each run must train (finite
losses, a gradient, weights that moved), save its sharded checkpoint and a final model that loads
back as SDAR; and its first step, taken before any update from the same seeded rollouts, must read
the same ELBO as the DDP run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_lm_engines import ENGINES, _free_port

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "lm" / "paper" / "block"
CONFIG = PAPER / "sdar_8b_spg_mix_gsm8k_dipod.yaml"
SHRUNK = dict(task="sudoku4", train_data=None, prompt_style="compact", dtype="float32", max_prompt_length=96,
              prompts_per_step=2, num_generations=4, gradient_accumulation_steps=2, generation_batch_size=None,
              gen_length=8, diffusion_steps=8, learning_rate=1e-3, max_steps=2, save_steps=2, eval_examples=2,
              tensorboard=False, progress_bar=False)


@pytest.fixture(scope="module")
def tiny_sdar(tmp_path_factory):
    from dipod.lm.networks.tiny_block import build_tiny_block_model

    return build_tiny_block_model(tmp_path_factory.mktemp("block_engines") / "tiny-sdar", "sdar")


def _launch(model: Path, engine: str, out: Path, config: Path = CONFIG, **changes) -> tuple[list[dict], Path]:
    """Runs the shrunk paper ``config`` (plus ``changes``) under ``engine`` into ``out``; returns its metrics rows
    and ``out``."""
    values = yaml.safe_load(config.read_text())
    values.update(SHRUNK, model=str(model), output_dir=str(out), **changes)
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(yaml.safe_dump(values))
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    accelerate_config, extra = ENGINES[engine]
    env = {**os.environ, **extra, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [launcher, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / accelerate_config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "dipod.lm.trainer", "--config", str(config_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


@pytest.fixture(scope="module")
def ddp_run(tiny_sdar, tmp_path_factory):
    return _launch(tiny_sdar, "ddp", tmp_path_factory.mktemp("block_ddp") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_block_paper_config_trains_under_each_engine(tiny_sdar, ddp_run, engine, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    rows, out = ddp_run if engine == "ddp" else _launch(tiny_sdar, engine, tmp_path / "run")
    updates = [r for r in rows if "loss" in r]
    assert [r["step"] for r in updates] == [1, 2]
    for row in updates:
        for key in ("loss", "elbo", "eubo", "grad_norm"):
            assert math.isfinite(row[key]), (engine, key, row)
        assert row["grad_norm"] > 0
    # step 1: same seeded rollouts, same initial weights -> the same proxies as under DDP
    assert updates[0]["elbo"] == pytest.approx(next(r for r in ddp_run[0] if "loss" in r)["elbo"], rel=1e-4)
    meta = json.loads((out / "checkpoint-2" / "meta.json").read_text())
    assert meta["engine"] == {"ddp": "ddp", "zero2": "deepspeed", "zero3": "deepspeed", "fsdp": "fsdp"}[engine]
    assert (out / "checkpoint-2" / "engine").is_dir() == (engine != "ddp")
    from dipod.lm.model import load_masked_lm

    trained, initial = load_masked_lm(str(out / "final_model")), load_masked_lm(str(tiny_sdar))
    assert trained.family.name == "sdar"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = (trained.logits(ids, torch.ones_like(ids)) - initial.logits(ids, torch.ones_like(ids))).abs().max()
    assert moved > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_moe_paper_config_trains_under_each_engine(engine, tmp_path):
    """configs/lm/paper/block/llada2_mini_spg_mix_gsm8k_dipod.yaml, shrunk the same way onto a tiny LLaDA2
    (8 experts, top-2, a shared expert). Experts that no token of a micro-batch reached have no gradient
    (DDP: find_unused_parameters) and ranks run different experts (ZeRO-3: each MoE block a leaf)."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    from dipod.lm.model import load_masked_lm
    from dipod.lm.networks.tiny_block import build_tiny_block_model

    model = build_tiny_block_model(tmp_path / "tiny-llada2", "llada2_moe")
    rows, out = _launch(model, engine, tmp_path / "run", PAPER / "llada2_mini_spg_mix_gsm8k_dipod.yaml",
                        gen_length=32, diffusion_steps=32)  # one block of the model's 32
    updates = [r for r in rows if "loss" in r]
    assert [r["step"] for r in updates] == [1, 2]
    assert all(math.isfinite(r[key]) for r in updates for key in ("loss", "elbo", "eubo", "grad_norm"))
    assert all(r["grad_norm"] > 0 for r in updates)
    assert load_masked_lm(str(out / "final_model")).family.name == "llada2_moe"
