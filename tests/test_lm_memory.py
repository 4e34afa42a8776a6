"""`dipod lm memory`: its per-token activation figures against the bytes autograd really keeps in
our LLaDA network (small shapes, CPU), its parameter count at 8B, and the paper configs' plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dipod.config import parse_config
from dipod.lm.memory import Shape, activation_bytes_per_token, main, model_shape, plan
from dipod.lm.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "lm" / "paper").glob("*.yaml"))
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj")


def saved_bytes(llada: Path, d: int, f: int, layers: int, tokens: int, lora_r: int, checkpointing: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of our LLaDA network
    (the default path for LLaDA checkpoints), float32, at the tiny checkpoint ``llada``'s config with
    d / f / layers changed."""
    from dipod.lm.families import FAMILIES
    from dipod.lm.model import LoraSettings, apply_lora
    from dipod.lm.networks.checkpoint_model import CheckpointNetwork, ModelConfig

    config = json.loads((llada / "config.json").read_text())
    config.update(d_model=d, mlp_hidden_size=f, n_layers=layers)
    model = CheckpointNetwork(ModelConfig(**config)).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    if checkpointing:
        FAMILIES["llada"].enable_activation_checkpointing(model)
    if lora_r:
        model = apply_lora(model, LoraSettings(r=lora_r, alpha=8.0, dropout=0.0, target_modules=TARGETS))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 100, (1, tokens), generator=generator))
    return sum(kept.values())


@pytest.mark.parametrize("lora_r,checkpointing", [(0, False), (8, False), (0, True), (8, True)])
def test_per_token_activation_bytes_match_what_autograd_keeps(hub_models, lora_r, checkpointing):
    """One more decoder layer adds the planner's per-layer bytes per token (a shape the coefficients
    were not read from: d 96, f 352). Measured: exactly the planner's figure + (n_heads + 2) elements
    (attention's log-sum-exp per head, the two RMS norms' scale), 0.3 % here, < 0.1 % at 8B."""
    torch.set_num_threads(1)
    d, f, tokens = 96, 352, 48
    per_layer = (saved_bytes(hub_models["llada"], d, f, 3, tokens, lora_r, checkpointing)
                 - saved_bytes(hub_models["llada"], d, f, 2, tokens, lora_r, checkpointing)) / tokens
    shape = Shape(d=d, layers=1, f=f, vocab=128)
    one, two = (activation_bytes_per_token(dataclass_layers(shape, n), 4, checkpointing, lora_r, len(TARGETS))
                for n in (1, 2))
    assert per_layer == pytest.approx(two - one, rel=0.005)


def dataclass_layers(shape: Shape, layers: int) -> Shape:
    import dataclasses

    return dataclasses.replace(shape, layers=layers)


def test_llada_8b_has_the_parameter_count_of_its_network():
    assert model_shape("GSAI-ML/LLaDA-8B-Instruct").params == pytest.approx(8.016e9, rel=1e-3)


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_every_paper_config_plans_under_80_gib_on_8_gpus(path):
    cfg = parse_config(TrainConfig, ["--config", str(path)], "test")
    result = plan(cfg, num_gpus=8, engine="zero2")
    assert 15 < result["peak_gib_per_gpu"] <= 80, result


def test_an_over_budget_plan_warns_naming_checkpointing(capsys):
    """FPO gsm8k plans 68.2 GiB per GPU without checkpointing and 26.6 with it: on 60 GiB GPUs the
    warning names the flag that fits. (Logits: 6 rows x 4 draws x 256 completion tokens x 126464
    x (2 + 4 + 4) bytes = 7.2 GiB of the 26.6.)"""
    path = ROOT / "configs" / "lm" / "paper" / "fpo_gsm8k_dipod.yaml"
    assert main(["--config", str(path), "--num_gpus", "8", "--gpu_memory_gib", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_gib_per_gpu"] == pytest.approx(26.6, abs=0.1)
    assert main(["--config", str(path), "--gradient_checkpointing", "false", "--num_gpus", "8",
                 "--gpu_memory_gib", "60"]) == 1
    err = capsys.readouterr().err
    assert "WARNING" in err and "--gradient_checkpointing true" in err


def test_full_fine_tuning_state_per_engine_follows_the_byte_counts():
    cfg = parse_config(TrainConfig, ["--config", str(PAPER[0]), "--lora_r", "0", "--kl_beta", "0"], "test")
    P = model_shape(cfg.model).params
    ddp, zero2, zero3 = (plan(cfg, 8, e)["update_gib"] for e in ("ddp", "zero2", "zero3"))
    gib = 2 ** 30
    assert ddp["weights"] + ddp["optimizer_and_gradients"] == pytest.approx(16 * P / gib)
    assert zero2["weights"] + zero2["optimizer_and_gradients"] == pytest.approx((2 * P + 14 * P / 8) / gib)
    assert zero3["weights"] + zero3["optimizer_and_gradients"] == pytest.approx(16 * P / 8 / gib)


def test_the_trainer_warns_before_loading_a_model_that_would_not_fit(tmp_path, capsys, monkeypatch):
    """The plan runs before the model loads: a model that cannot load shows the warning came first."""
    from dipod.lm import train_engine
    from dipod.lm.trainer import Trainer

    def refuse(*args, **kwargs):
        raise RuntimeError("model load reached")

    monkeypatch.setattr(train_engine, "load_policy", refuse)
    path = ROOT / "configs" / "lm" / "paper" / "fpo_sudoku4_dipod.yaml"  # data on disk
    cfg = parse_config(TrainConfig, ["--config", str(path), "--gradient_checkpointing", "false", "--gpu_memory_gib",
                                     "80", "--prompts_per_step", "128", "--output_dir", str(tmp_path)], "test")
    with pytest.raises(RuntimeError, match="model load reached"):
        Trainer(cfg)
    out = capsys.readouterr().out
    assert "WARNING dipod lm memory plans" in out and "--gradient_checkpointing true" in out
