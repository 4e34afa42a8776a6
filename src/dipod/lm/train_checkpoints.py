"""The trainer's checkpoints: ``checkpoint-STEP`` (save, and restore for ``--resume``) and ``final_model/``.

Functions of a ``dipod.lm.trainer.Trainer``; what differs per engine (who writes, sharded or not) is
asked of its ``runtime`` (dipod.lm.engines), the files and their atomic sealing of dipod.checkpoint.
A checkpoint holds the whole training state (weights, optimizer, schedule, RNG, skip streak), so
N steps + resume for M equals N + M steps exactly on CPU (tests/test_lm_engines.py).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from dipod.checkpoint import capture_rng_state, copy_weights, restore_rng_state, resume_checkpoint, save_checkpoint
from dipod.config import config_to_dict
from dipod.lm.engines import ENGINE_STATE
from dipod.lm.recipe import RECIPE_FILE, DecodingRecipe


def trainable_weights(trainer) -> dict[str, Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save(trainer, step: int) -> None:
    """``checkpoint-STEP``: weights + optimizer (DDP: from the main process; DeepSpeed / FSDP: each
    rank's shard through the engine's own save), schedule, RNG and skip streak, sealed atomically."""
    acc, runtime, out = trainer.accelerator, trainer.runtime, Path(trainer.cfg.output_dir)
    shards = runtime.staging_dir(out, step) if runtime.shards_state else None
    if shards is not None:
        runtime.save_shards(shards)
        acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"scheduler": trainer.scheduler.state_dict(), "rng": capture_rng_state(),
                 "nonfinite_streak": trainer.nonfinite_streak}
        weights = {}
        if shards is None:
            state["optimizer"] = trainer.optimizer.state_dict()
            weights = trainable_weights(trainer)
        save_checkpoint(out, step, weights, state, {"config": _yaml_safe(config_to_dict(trainer.cfg)),
                                                    "engine": runtime.kind},
                        keep_last=trainer.cfg.keep_checkpoints, extra_dirs={ENGINE_STATE: shards} if shards else None)
    acc.wait_for_everyone()


def restore(trainer) -> None:
    cfg = trainer.cfg
    found = resume_checkpoint(Path(cfg.output_dir), cfg.resume)  # None: no checkpoint yet, start from step 0
    if found is None:
        return
    path, (weights, state, meta) = found
    written_by = meta.get("engine", "ddp")
    if (written_by in ("deepspeed", "fsdp") or trainer.runtime.shards_state) and written_by != trainer.runtime.kind:
        raise ValueError(f"checkpoint {path} was written under {written_by}, this run is {trainer.runtime.kind}; "
                         f"resume under the same engine (accelerate config) that wrote it")
    if trainer.runtime.shards_state:
        trainer.runtime.load_shards(path / ENGINE_STATE)
    else:
        copy_weights(trainer.accelerator.unwrap_model(trainer.model), weights, path,
                     "resume with the same --model and LoRA settings", required=set(trainable_weights(trainer)))
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    trainer.nonfinite_streak = int(state["nonfinite_streak"])
    trainer.start_step = int(meta["step"])


def save_final_model(trainer, folder: Path) -> None:
    """``final_model/``, a checkpoint ``--model`` loads (LoRA merged into a copy). Under ZeRO-3 / FSDP no
    rank holds the whole model: every rank joins the gather and the main process saves a CPU copy
    of the policy holding the gathered weights (8B: ~16 GB of host memory in bf16)."""
    state = trainer.runtime.gathered_state_dict(trainer.model)
    if not trainer.accelerator.is_main_process:
        return
    view = trainer.frozen_view
    if state is not None:
        with trainer.runtime.whole_model_loading():
            view = trainer.engine.load_policy(trainer.cfg.with_changes(dtype=trainer.runtime.weights_dtype), device="cpu")
        view.model.load_state_dict(state, strict=True)
    view.save_pretrained(folder, extra_files={RECIPE_FILE: train_recipe(trainer.cfg).to_json()})


def train_recipe(cfg) -> DecodingRecipe:
    """The decoding of the run's held-out evaluation (greedy, its length / blocks / steps / prompts),
    recorded in ``final_model/dipod_recipe.json`` so that `dipod lm eval` repeats it by default."""
    return DecodingRecipe.of(cfg.sampler_settings(0.0), prompt_style=cfg.prompt_style,
                             max_prompt_length=cfg.max_prompt_length, task=cfg.task)


def _yaml_safe(values: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
