"""The engine seam: what differs between one process, DDP, DeepSpeed ZeRO-2/3 and FSDP.

The trainer talks to ``accelerate`` only; the things that are not the same under every engine
live here and nowhere else:

- **building the Accelerator** from OUR flags: the micro-batch size, gradient accumulation and
  clipping are the trainer config's. An accelerate / DeepSpeed yaml that sets one of them to another
  value is a ``ConfigError`` naming both values (never a silent override either way).
- **weights dtype**: full fine-tuning keeps float32 master weights (bf16 AdamW rounds most small
  updates away) and computes in the configured dtype through mixed precision; DeepSpeed keeps its
  own float32 master copy, so the model loads in the compute dtype there. LoRA trains float32
  adapters (peft) beside base weights in ``dtype``.
- **clipping and the gradient norm**: DDP / one process clip here; DeepSpeed clips inside its
  engine step (``gradient_clipping`` = our ``max_grad_norm``) and reports the norm; FSDP2 clips
  its sharded gradients with the global norm.
- **checkpoints**: DDP / one process write the trainable weights and the optimizer from the main
  process (every rank holds all of it); DeepSpeed and FSDP write their own sharded state on EVERY
  rank (``Accelerator.save_state``) into a staging folder that the main process then moves into
  the atomic ``checkpoint-STEP`` folder (dipod.checkpoint). A shared filesystem is assumed.
  ``final_model/`` under ZeRO-3 / FSDP: every rank joins the gather, the main process loads the whole
  state into a CPU copy of the policy and saves that (LoRA merged), as under the other engines.
- **mixture-of-experts**: experts that no token of a micro-batch reached get no gradient, and which
  experts run differs per rank; ``prepare`` turns on DDP's ``find_unused_parameters`` and makes each
  MoE block a ZeRO-3 leaf (all its weights gathered at once) for a model with routed experts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from dipod.config import ConfigError

ENGINE_KINDS = ("single", "ddp", "deepspeed", "fsdp")
ENGINE_STATE = "engine"  # the sub-folder of checkpoint-STEP with a sharded engine's own state
_MIXED = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def detect_engine() -> str:
    """The engine of this process, from the environment ``accelerate launch`` sets."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def load_dtype(lora_r: int, dtype: str, kind: str) -> str:
    """The dtype the policy's weights are loaded in (module docstring: master weights)."""
    if lora_r == 0 and dtype != "float32" and kind != "deepspeed":
        return "float32"
    return dtype


def _require_same(what: str, ours, source: str, theirs) -> None:
    if theirs in (None, "auto", "none", "None"):
        return
    if float(theirs) != float(ours):
        raise ConfigError(f"{what}: the trainer's flag says {ours} but {source} says {theirs}; the trainer's flags "
                          f"decide, so remove it from {source} (or set it to 'auto'), or pass the same value")


def deepspeed_batch_settings(ds_config: dict, cfg, micro_batch: int, world: int) -> dict:
    """The DeepSpeed config entries our flags decide; one the config already sets to another value
    (not 'auto') is a ConfigError naming both."""
    source = "the DeepSpeed config"
    _require_same("gradient_accumulation_steps", cfg.gradient_accumulation_steps, source,
                  ds_config.get("gradient_accumulation_steps"))
    _require_same("max_grad_norm (DeepSpeed gradient_clipping)", cfg.max_grad_norm, source,
                  ds_config.get("gradient_clipping"))
    _require_same("micro-batch size (prompts_per_step x num_generations / processes / accumulation)",
                  micro_batch, source, ds_config.get("train_micro_batch_size_per_gpu"))
    _require_same("train_batch_size (micro-batch x accumulation x processes)",
                  micro_batch * cfg.gradient_accumulation_steps * world, source, ds_config.get("train_batch_size"))
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "train_batch_size": micro_batch * cfg.gradient_accumulation_steps * world,
            "gradient_clipping": cfg.max_grad_norm}


class Engine:
    """One process's engine: its Accelerator plus the per-engine rules of the module docstring."""

    def __init__(self, cfg):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin

        self.kind, self.cfg = detect_engine(), cfg
        accumulation = cfg.gradient_accumulation_steps
        _require_same("gradient_accumulation_steps", accumulation, "the accelerate launch config",
                      os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"))
        if self.kind not in ("deepspeed", "fsdp"):
            # A second run in the same process (tests, notebooks) may ask for another precision; the
            # process-wide state accelerate keeps would refuse it. Launched engines own their state.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)
        self.accelerator = Accelerator(
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation),
            mixed_precision=self._mixed_precision(cfg))
        self.weights_dtype = load_dtype(cfg.lora_r, cfg.dtype, self.kind)
        if self.kind == "deepspeed" and getattr(self.accelerator.state, "deepspeed_plugin", None) is None:
            raise ConfigError("the launch asks for DeepSpeed but accelerate started without it (ACCELERATE_USE_CPU=1 "
                              "turns DeepSpeed off); on a CPU host launch with DS_ACCELERATOR=cpu alone")
        if self.kind == "deepspeed":
            _count_deepspeed_cpu_processes(self.accelerator)
        if self.kind == "fsdp":
            _fsdp_on_cpu_processes(self.accelerator)

    def _mixed_precision(self, cfg) -> str | None:
        """Mixed precision = the config's dtype when weights are held in float32 (full fine-tuning under
        DDP / FSDP); a launch config asking for another precision is an error naming both."""
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        wanted = _MIXED[cfg.dtype]
        if launched not in ("no", wanted):
            raise ConfigError(f"precision: the trainer's --dtype is {cfg.dtype} but the accelerate launch config "
                              f"says mixed_precision: {launched}; make them agree ({wanted} for --dtype {cfg.dtype})")
        if self.kind == "deepspeed" and launched != wanted:
            raise ConfigError(f"precision: the trainer's --dtype is {cfg.dtype} but the DeepSpeed launch config says "
                              f"mixed_precision: {launched}; set mixed_precision: {wanted} in it (DeepSpeed casts "
                              f"the model to its own precision)")
        if load_dtype(cfg.lora_r, cfg.dtype, self.kind) != cfg.dtype or launched == wanted:
            return wanted
        return None

    def set_micro_batch(self, micro_batch: int) -> None:
        """The rows of one forward/backward on one process; DeepSpeed needs it in its config before
        ``prepare`` (no dataloader is prepared to infer it), with our accumulation and clipping."""
        if self.kind != "deepspeed":
            return
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(deepspeed_batch_settings(ds, self.cfg, micro_batch, self.accelerator.num_processes))

    @contextlib.contextmanager
    def whole_model_loading(self):
        """Load a model whole, not partitioned: under ZeRO-3, transformers partitions every model it
        loads (zero.Init) for the engine to own; a frozen model no engine wraps (the reference) must
        not be."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def prepare(self, model: torch.nn.Module, optimizer):
        """accelerate's prepare. Under DDP a model that routes tokens to experts (LLaDA2.x) leaves every expert
        no token of a micro-batch reached without a gradient; DDP must be told to look for such parameters
        (``find_unused_parameters``), or its next step stops waiting for their reduction."""
        from dipod.lm.networks.moe import MoE

        routed = any(isinstance(m, MoE) for m in model.modules())
        if routed and self.kind == "ddp":
            from accelerate.utils import DistributedDataParallelKwargs

            self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        if routed and self.planner_engine == "zero3":
            # ZeRO-3 gathers a module's weights when it is called, a collective: ranks whose tokens chose
            # different experts would call different ones. As a leaf, an MoE block gathers all its weights.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [MoE])
        return self.accelerator.prepare(model, optimizer)

    @property
    def planner_engine(self) -> str:
        """This engine's name in dipod.lm.memory."""
        if self.kind == "deepspeed":
            return "zero3" if self.accelerator.state.deepspeed_plugin.zero_stage == 3 else "zero2"
        return "fsdp" if self.kind == "fsdp" else "ddp"

    # ------------------------------------------------------------------ update
    @property
    def steps_in_backward(self) -> bool:
        """DeepSpeed takes the optimizer step inside the last micro-batch's backward."""
        return self.kind == "deepspeed"

    def clip_grad_norm(self, model: torch.nn.Module, max_grad_norm: float) -> float | None:
        """Clip to ``max_grad_norm`` (0: no clipping) and return the global gradient norm before clipping
        (None where the engine reports none)."""
        acc = self.accelerator
        if self.kind == "deepspeed":  # already clipped inside the engine step, with our max_grad_norm
            norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm)
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            norm = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ checkpoints
    @property
    def shards_state(self) -> bool:
        """True when every rank holds only part of the training state (it must save on every rank)."""
        return self.kind in ("deepspeed", "fsdp")

    def staging_dir(self, output_dir: Path, step: int) -> Path:
        """Where every rank writes its shard before the main process seals ``checkpoint-STEP``."""
        return Path(output_dir) / f".checkpoint-{step}.{ENGINE_STATE}"

    def save_shards(self, folder: Path) -> None:
        """Every rank: the engine's own (sharded) model + optimizer state into ``folder`` (emptied first: a
        killed save of the same step may have left part of its shards there)."""
        if self.accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        kwargs = {"exclude_frozen_parameters": True} if self.kind == "deepspeed" else {}
        self.accelerator.save_state(str(folder), **kwargs)

    def gathered_state_dict(self, model: torch.nn.Module) -> dict | None:
        """EVERY rank must call this (a collective under ZeRO-3 / FSDP): the whole model's state dict on the
        main process, gathered from the shards (ZeRO-3: 16-bit, needs ``zero3_save_16bit_model: true``).
        None where the main process's model is already whole (one process, DDP, ZeRO-2)."""
        if not self.shards_weights:
            return None
        return self.accelerator.get_state_dict(model)

    @property
    def shards_weights(self) -> bool:
        """True when no rank holds the whole model (ZeRO-3, FSDP): saving it means gathering first."""
        return self.kind == "fsdp" or self.planner_engine == "zero3"

    def load_shards(self, folder: Path) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint {folder.parent} has no {ENGINE_STATE}/ folder of {self.kind} state; "
                                    f"resume it under the engine that wrote it")
        kwargs = {"load_module_strict": False} if self.kind == "deepspeed" else {}
        self.accelerator.load_state(str(folder), **kwargs)


def _count_deepspeed_cpu_processes(accelerator) -> None:
    """On a host without an accelerator device (DS_ACCELERATOR=cpu, the tests), accelerate starts
    DeepSpeed's process group but records one process of rank 0 in every process; take the count
    and the ranks from the process group DeepSpeed started."""
    import torch.distributed as dist

    from accelerate.state import PartialState

    if dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        PartialState._shared_state.update(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                                          local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        accelerator.state.__dict__.update(PartialState._shared_state)


def _fsdp_on_cpu_processes(accelerator) -> None:
    """accelerate turns an FSDP launch on CPU processes (ACCELERATE_USE_CPU=1, the tests) into plain
    gloo DDP; FSDP2's fully_shard runs on gloo, so select it as a GPU launch would."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if accelerator.state.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.state.mixed_precision)
        # (both shared states: a later AcceleratorState() copies the process state over its own)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
