"""The engine seam (dipod.lm.engines): our flags decide the batch, accumulation, clipping and
precision under every engine; full fine-tuning keeps float32 master weights; and (slow) N steps +
resume for M equals N+M uninterrupted under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 on 2 CPU processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dipod.config import ConfigError
from dipod.lm.engines import Engine, deepspeed_batch_settings, load_dtype
from dipod.lm.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("lm_engine_worker.py")
TIMING = {"step_time", "generation_time", "update_time", "tokens_per_s"}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a test that picked bf16 mixed precision must not
    hand it to the next one."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def config(**changes) -> TrainConfig:
    values = dict(model="tiny", task="sudoku4", prompt_style="compact", prompts_per_step=2, num_generations=4,
                  gradient_accumulation_steps=2, max_grad_norm=0.2)
    values.update(changes)
    return TrainConfig(**values)


def test_deepspeed_settings_come_from_our_flags():
    cfg = config(gradient_accumulation_steps=4, max_grad_norm=0.5)
    auto = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    assert deepspeed_batch_settings(auto, cfg, micro_batch=3, world=8) == {
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4, "train_batch_size": 96,
        "gradient_clipping": 0.5}
    assert deepspeed_batch_settings({"gradient_accumulation_steps": 4, "gradient_clipping": 0.5}, cfg, 3, 8)[
        "train_batch_size"] == 96  # agreeing values are fine


@pytest.mark.parametrize("key,value,names", [
    ("gradient_accumulation_steps", 2, ("gradient_accumulation_steps", "4", "2")),
    ("gradient_clipping", 1.0, ("max_grad_norm", "0.5", "1.0")),
    ("train_micro_batch_size_per_gpu", 1, ("micro-batch size", "3", "1")),
])
def test_a_deepspeed_config_that_contradicts_a_flag_names_both_values(key, value, names):
    cfg = config(gradient_accumulation_steps=4, max_grad_norm=0.5)
    with pytest.raises(ConfigError) as err:
        deepspeed_batch_settings({key: value}, cfg, micro_batch=3, world=8)
    assert all(name in str(err.value) for name in names), str(err.value)


def test_launch_config_accumulation_or_precision_that_contradicts_our_flags_fails_before_any_model(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps: the trainer's flag says 2 .* says 8"):
        Engine(config())
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match=r"--dtype is bfloat16 .* mixed_precision: fp16"):
        Engine(config(dtype="bfloat16"))


def test_a_deepspeed_launch_that_accelerate_started_without_deepspeed_is_one_message(monkeypatch):
    """ACCELERATE_USE_CPU=1 beside a DeepSpeed config: accelerate drops DeepSpeed; say so, not AttributeError."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(ConfigError, match="asks for DeepSpeed but accelerate started without it.*DS_ACCELERATOR=cpu"):
        Engine(config(dtype="float32"))


def test_full_fine_tuning_keeps_float32_master_weights_except_under_deepspeed():
    assert load_dtype(0, "bfloat16", "ddp") == "float32" and load_dtype(0, "bfloat16", "fsdp") == "float32"
    assert load_dtype(0, "bfloat16", "single") == "float32"
    assert load_dtype(0, "bfloat16", "deepspeed") == "bfloat16"  # ZeRO keeps its own float32 copy
    assert load_dtype(128, "bfloat16", "ddp") == "bfloat16"  # frozen LoRA base; adapters are float32 (peft)


def test_full_fine_tuning_in_bfloat16_updates_float32_weights_below_bfloat16_resolution(tmp_path):
    """A tiny lr step: every change lands in float32 weights; most of them are smaller than half a
    bfloat16 ulp of the weight, so bf16 AdamW would have rounded them away (the issue's 3.7%)."""
    from dipod.lm.model import build_tiny_model
    from dipod.lm.trainer import Trainer

    torch.set_num_threads(1)
    model = build_tiny_model(tmp_path / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_positions=128)
    cfg = config(model=str(model), lora_r=0, dtype="bfloat16", gen_length=8, block_length=8, diffusion_steps=2,
                 num_iterations=1, estimator="fpo", learning_rate=1e-5, max_steps=1, save_steps=0, eval_steps=0,
                 eval_examples=1, gap_monitor_steps=0, tensorboard=False, progress_bar=False, save_final_model=False,
                 output_dir=str(tmp_path / "run"), max_grad_norm=0.0)
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in trainer.lm.model.named_parameters()}
    assert all(v.dtype == torch.float32 for v in before.values())
    trainer.step(1)
    after = dict(trainer.lm.model.named_parameters())
    moved = below = 0
    for name, old in before.items():
        delta = (after[name].detach() - old).abs()
        half_ulp = old.abs().to(torch.bfloat16).float().mul(2.0 ** -8)  # bf16 keeps 8 significant bits
        changed = delta > 0
        moved += int(changed.sum())
        below += int((changed & (delta < half_ulp)).sum())
    assert moved > 0 and below / moved > 0.5, (moved, below)


# ----------------------------------------------------------------------------- slow: 2 processes

ENGINES = {  # accelerate config -> extra environment
    "ddp": ("ddp.yaml", {"ACCELERATE_USE_CPU": "1"}),
    "zero2": ("deepspeed_zero2.yaml", {"DS_ACCELERATOR": "cpu"}),
    "zero3": ("deepspeed_zero3.yaml", {"DS_ACCELERATOR": "cpu"}),
    "fsdp": ("fsdp.yaml", {"ACCELERATE_USE_CPU": "1"}),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(llada: Path, engine: str, out: Path, lora_r: int, stop_after: int, resume: bool = False) -> None:
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    config_file, extra = ENGINES[engine]
    env = {**os.environ, **extra, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [launcher, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / config_file),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           str(WORKER), str(out), str(llada), "3", str(lora_r), str(stop_after), *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [4, 0], ids=["lora", "full"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_resume_under_each_engine_equals_an_uninterrupted_run(hub_models, engine, lora_r, tmp_path):
    """1 step + resume for 2 == 3 steps, exactly: on CPU every operation and every collective is
    deterministic for a fixed process count, and the checkpoint holds the whole state (weights and
    optimizer through the engine's own save, schedule, RNG), so the tolerance is zero."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    llada = hub_models["llada"]
    _launch(llada, engine, tmp_path / "straight", lora_r, stop_after=0)
    _launch(llada, engine, tmp_path / "resumed", lora_r, stop_after=1)
    assert [p.name for p in sorted((tmp_path / "resumed").glob("checkpoint-*"))] == ["checkpoint-1"]
    _launch(llada, engine, tmp_path / "resumed", lora_r, stop_after=0, resume=True)

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "final_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final_weights.safetensors"))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "resumed")]
    assert [r["step"] for r in rows[1]] == [0, 1, 2, 3] and rows[0] == rows[1]
    assert rows[0][3]["learning_rate"] != rows[0][2]["learning_rate"]  # the cosine schedule moved
    meta = json.loads((tmp_path / "resumed" / "checkpoint-3" / "meta.json").read_text())
    assert meta["engine"] == {"ddp": "ddp", "zero2": "deepspeed", "zero3": "deepspeed", "fsdp": "fsdp"}[engine]
    assert (tmp_path / "resumed" / "checkpoint-3" / "engine").is_dir() == (engine != "ddp")
    _final_model_is_the_trained_policy(llada, tmp_path / "straight", lora_r)


def _final_model_is_the_trained_policy(llada: Path, run: Path, lora_r: int) -> None:
    """final_model/ (LoRA merged; under ZeRO-3 / FSDP gathered from the shards) has the logits of the
    initial model carrying the trained weights gathered by the worker."""
    from safetensors.torch import load_file

    from dipod.lm.model import LoraSettings, load_masked_lm

    lora = LoraSettings(r=lora_r, alpha=16.0, dropout=0.0) if lora_r else None
    policy = load_masked_lm(str(llada), lora=lora)
    missing, unexpected = policy.model.load_state_dict(load_file(str(run / "final_weights.safetensors")), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k or not lora_r], (missing, unexpected)
    saved = load_masked_lm(str(run / "final_model"))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(saved.logits(ids, attn), policy.logits(ids, attn), rtol=0, atol=1e-5)
        assert (saved.logits(ids, attn) - load_masked_lm(str(llada)).logits(ids, attn)).abs().max() > 1e-4


def test_lora_kl_reference_is_the_policy_with_adapters_disabled(tmp_path):
    """No second copy of the weights under LoRA: the reference proxies equal those of a freshly loaded
    initial model, even once the adapters have moved the policy away from it."""
    from dipod.lm import train_engine
    from dipod.lm.model import build_tiny_model
    from dipod.lm.trainer import Trainer

    torch.set_num_threads(1)
    model = build_tiny_model(tmp_path / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_positions=128)
    cfg = config(model=str(model), lora_r=4, lora_alpha=8.0, lora_dropout=0.0, dtype="float32", gen_length=8,
                 block_length=8, diffusion_steps=2, estimator="fpo", kl_beta=0.04, num_draws=2, masking="unbiased_random",
                 output_dir=str(tmp_path / "run"), tensorboard=False, progress_bar=False)
    trainer = Trainer(cfg)
    assert trainer.ref_lm is None
    with torch.no_grad():
        for name, p in trainer.lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # the adapters now change the policy
    ids, attn = trainer.encode(trainer.step_examples(1)[:4])
    batch = {"prompt_ids": ids, "prompt_attn": attn, "completion_ids": torch.randint(4, 20, (4, 8))}
    rows = slice(0, 4)
    with torch.no_grad():
        ours = trainer._reference_proxies(batch, rows, seed=7).elbo_n
        fresh = trainer._proxies(train_engine.load_reference(cfg, device="cpu"), batch, rows, seed=7).elbo_n
        policy = trainer._proxies(trainer.frozen_view, batch, rows, seed=7).elbo_n
    assert torch.allclose(ours, fresh, atol=1e-5) and not torch.allclose(policy, fresh, atol=1e-3)


@pytest.mark.slow
def test_two_machine_ranks_on_one_host_train_as_one_machine_with_two_processes(hub_models, tmp_path):
    """`--num_machines 2 --machine_rank 0/1` on localhost (one process each) == one machine with 2
    processes, bit for bit: the multi-node launch changes who starts the processes, not the run."""
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    port = str(_free_port())
    nodes = [subprocess.Popen([launcher, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
                               "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                               "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                               str(WORKER), str(tmp_path / "nodes"), str(hub_models["llada"]), "3", "4", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-2000:] + logs[1][-2000:]
    _launch(hub_models["llada"], "ddp", tmp_path / "one", 4, stop_after=0)

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "final_weights.safetensors"))
    b = load_file(str(tmp_path / "nodes" / "final_weights.safetensors"))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the update rules, one process

def _accumulated_gradient(accumulation: int, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The trainer's update loop (Trainer.update) on a linear model: one micro-batch per ``accumulate``
    block, ``accelerator.backward``, then the engine's clip. Returns (gradient after the clip, the
    gradient of the mean micro-batch loss by autograd, the norm the engine reported)."""
    engine = Engine(config(gradient_accumulation_steps=accumulation))
    acc = engine.accelerator
    model = acc.prepare(torch.nn.Linear(3, 1, bias=False))
    torch.nn.init.constant_(model.weight, 0.5)
    xs = [torch.tensor([[1.0, 2.0, -1.0]]) * (m + 1) for m in range(accumulation)]
    for x in xs:
        with acc.accumulate(model):
            acc.backward(model(x).pow(2).sum())
    norm = engine.clip_grad_norm(model, max_grad_norm)
    weight = torch.full((1, 3), 0.5, requires_grad=True)
    torch.stack([(x @ weight.T).pow(2).sum() for x in xs]).mean().backward()
    return model.weight.grad.detach().clone(), weight.grad, norm


def test_accumulated_micro_batches_give_the_gradient_of_their_mean_loss():
    """Accumulation 2 is one batch split in two: the gradient (and so the clipping threshold it meets)
    is that of the mean loss, not the sum of the micro-batch gradients (twice as large)."""
    grad, expected, norm = _accumulated_gradient(accumulation=2, max_grad_norm=0.0)
    torch.testing.assert_close(grad, expected)
    assert norm == pytest.approx(float(expected.norm()))


def test_max_grad_norm_zero_means_no_clipping_and_a_positive_one_clips_to_it():
    grad, expected, norm = _accumulated_gradient(accumulation=1, max_grad_norm=0.0)
    torch.testing.assert_close(grad, expected)  # untouched, not zeroed
    assert norm == pytest.approx(float(expected.norm())) and norm > 1.0
    clipped, _, before = _accumulated_gradient(accumulation=1, max_grad_norm=1.0)
    assert before == pytest.approx(norm)
    torch.testing.assert_close(clipped, expected / expected.norm(), rtol=1e-4, atol=1e-6)
