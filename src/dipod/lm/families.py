"""Model families: how to call each kind of mask predictor, decided once when the model is loaded.

A family says everything dipod must know about an architecture that its ``config.json`` does not:

* the attention input its forward takes (``attention``): ``"2d"`` (Hugging Face ``[B, T]`` 0/1
  mask), ``"4d_bool"`` (Dream: ``[B, 1, T, T]``-broadcastable boolean, plus position ids that
  restart at the first real token) or ``"none"`` (LLaDA: the code ignores any mask);
* whether its logits are shifted (``shifted_logits``: Dream predicts token i from the logits at
  i - 1). ``logits`` always returns logits re-aligned so that ``[:, i]`` predicts token i;
* the end-of-turn token of its chat format (``end_of_turn_token``);
* its default LoRA targets (``lora_targets``), how to turn on activation checkpointing
  (``enable_activation_checkpointing``) and how to save it (``saving``);
* its decoding defaults (``sampler_defaults``).

Families: ``llada`` (LLaDA-8B-Instruct / -Base, LLaDA-1.5: one code base), ``dream``
(Dream-v0-Instruct-7B / -Base-7B), ``sdar`` (SDAR / TraDo dense: block-causal, the ``block_causal``
process), ``sdar_moe`` (SDAR-30B-A3B, the same process), ``llada2_moe`` (LLaDA2.x, MoE, the same process),
``diffusion_gemma`` (transformers' own block-diffusion model
with uniform noise, ``noise = "uniform"``: dipod.lm.diffusion_gemma) and ``hf_masked_lm`` (any
``AutoModelForMaskedLM`` of transformers, e.g. our tiny ModernBERT). LLaDA and Dream load into our
own network by default (``native``: dipod.lm.networks.checkpoint_model, called by
``native_forward``); the attention conventions above describe their hub code, the legacy
``trust_remote_code`` path. ``detect_family`` reads ``model_type`` and ``auto_map`` of the config;
``--model_family`` names one explicitly. See docs/lm_models.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn


class ModelFamily:
    """Base class: one instance per family in ``FAMILIES``; subclasses override what differs."""

    name: str = ""
    attention: str = "2d"  # "2d", "4d_bool" or "none": how ``forward`` passes the padding (module docstring)
    forward_kwargs: Mapping[str, Any] = MappingProxyType({})  # extra keyword arguments of every forward call
    shifted_logits: bool = False
    needs_remote_code: bool = False  # the legacy path: its hub snapshot ships model code (auto_map)
    # [low, high) transformers (major, minor) on which the family's own hub code loads (the legacy
    # ``trust_remote_code`` path); None where it has no such limit known here
    hub_code_transformers: tuple[tuple[int, int], tuple[int, int]] | None = None
    native: bool = False  # loaded into our own network (dipod.lm.networks) unless trust_remote_code asks otherwise
    # "masking" (mask tokens) or "uniform" (uniform-noise block diffusion: no mask token)
    noise: str = "masking"
    # The diffusion process that decodes and scores it (dipod.lm.processes.DIFFUSION_PROCESSES name)
    process: str = "masked"
    end_of_turn_token: str | None = None
    # LoRA target module-name suffixes, or "all-linear". The output head is never adapted
    # (dipod.lm.model.apply_lora drops it). ``hub_lora_targets``: the same layers named as in the
    # hub code (legacy path); ``hub_module_names``: hub name -> our name, so configs written for the
    # hub code keep working on ours.
    lora_targets: str | tuple[str, ...] = "all-linear"
    hub_lora_targets: str | tuple[str, ...] | None = None
    hub_module_names: Mapping[str, str] = MappingProxyType({})
    # Decoding defaults of the family: a plain dict of SamplerSettings field names -> values that
    # dipod.lm.sampler applies where the user left a field unset. Keys must be SamplerSettings
    # fields ("schedule": "blocks" (LLaDA's semi-autoregressive blocks, even split per block) or
    # "global" (Dream: one schedule over the whole completion); "remasking": the confidence rule,
    # LLaDA "low_confidence", Dream "maskgit_plus" / "topk_margin" / "entropy").
    sampler_defaults: Mapping[str, Any] = MappingProxyType({})

    def __reduce__(self):
        # Families are stateless singletons: a copy or an unpickled one is the registered object.
        return get_family, (self.name,)

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether a raw ``config.json`` dict belongs to this family."""
        return False

    def auto_class(self) -> str:
        """Name of the transformers Auto class that builds the model."""
        return "AutoModel"

    def forward(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int = 0) -> Tensor:
        """Raw outputs ``[B, T - first, V]`` at positions ``first ..`` for ``ids`` with 0/1 mask ``attn``
        (0 = padding). Our network computes its head at those positions only; hub code computes all."""
        if is_checkpoint_network(model):
            return self.native_forward(model, ids, attn, first)
        if self.attention == "none":
            out = without_padding(lambda x: _logits_of(model(input_ids=x, **self.forward_kwargs)), ids, attn)
        elif self.attention == "4d_bool" and bool(attn.all()):
            out = _logits_of(model(input_ids=ids, **self.forward_kwargs))
        elif self.attention == "4d_bool":
            keep = attn.bool()
            # Position ids count from each row's first real token; padding gets 1 (Dream's tok_idx).
            positions = (attn.long().cumsum(-1) - 1).masked_fill(~keep, 1)
            out = _logits_of(model(input_ids=ids, attention_mask=keep[:, None, None, :], position_ids=positions,
                                   **self.forward_kwargs))
        else:
            out = _logits_of(model(input_ids=ids, attention_mask=attn, **self.forward_kwargs))
        return out[:, first:]

    def native_forward(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int) -> Tensor:
        """Our network (dipod.lm.networks): padding keys masked, positions absolute."""
        return model(ids, attn, first=first)

    def logits(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int = 0) -> Tensor:
        """float32 logits ``[B, T - first, V]``, ``[:, i]`` predicting token ``first + i`` whatever the
        family's convention. Only these positions are cast to float32 (at 8B the vocabulary is 126k:
        float32 logits over a prompt the loss never reads cost GiBs)."""
        if not self.shifted_logits:
            return self.forward(model, ids, attn, first).float()
        # The model's output at i predicts token i + 1. Position 0 has no prediction; it gets
        # position 0's output, as Dream's own sampler does (it is a prompt token, never scored).
        if first > 0:
            return self.forward(model, ids, attn, first - 1)[:, :-1].float()
        logits = self.forward(model, ids, attn)
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1).float()

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        """Recompute activations in backward (Hugging Face gradient checkpointing, non-reentrant)."""
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support Hugging Face gradient checkpointing; "
                             "set gradient_checkpointing false")
        # Non-reentrant checkpointing also works when only LoRA adapters require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @contextlib.contextmanager
    def saving(self, model: nn.Module) -> Iterator[None]:
        """Context in which ``model.save_pretrained`` works for this family."""
        yield


def is_checkpoint_network(model: nn.Module) -> bool:
    """Whether ``model`` (under DDP / PEFT wrappers) is our own network read from a checkpoint."""
    from dipod.lm.networks.checkpoint_model import CheckpointNetwork

    model = getattr(model, "module", model)  # DistributedDataParallel
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(model, CheckpointNetwork)


def _logits_of(out: Any) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError("the model returned no .logits; dipod needs a mask predictor whose forward returns "
                         "logits over the full sequence (e.g. LLaDA, Dream, or an AutoModelForMaskedLM)")
    return logits


class HFMaskedLM(ModelFamily):
    """Any transformers ``AutoModelForMaskedLM``: honours a 2-D attention mask, unshifted logits."""

    name = "hf_masked_lm"

    def matches(self, config: Mapping[str, Any]) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        return "auto_map" not in config and config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def auto_class(self) -> str:
        return "AutoModelForMaskedLM"


class LLaDA(ModelFamily):
    """LLaDA-8B-Instruct / -Base and LLaDA-1.5 (hub code ``modeling_llada.py``).

    Our network masks padding keys, so a row's logits are those of the row alone; padding positions
    get zero logits (never read), as on the legacy path. The hub code's attention is called without
    a mask, so there rows are grouped by their padding pattern and each group runs without its
    padding columns.
    """

    name = "llada"
    attention = "none"
    forward_kwargs = MappingProxyType({"use_cache": False})  # no key/value outputs during training
    needs_remote_code = True
    native = True
    hub_code_transformers = ((4, 56), (4, 58))  # 5.x: all_tied_weights_keys, tie_weights(recompute_mapping=)
    end_of_turn_token = "<|eot_id|>"
    # Every linear layer of a block (attention q/k/v/out, SwiGLU gate/up/down).
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    hub_lora_targets = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    hub_module_names = MappingProxyType({"attn_out": "o_proj", "ff_proj": "gate_proj", "ff_out": "down_proj"})
    sampler_defaults = MappingProxyType({"schedule": "blocks", "remasking": "low_confidence"})

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") == "llada"

    def native_forward(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int) -> Tensor:
        logits = model(ids, attn, first=first)
        return logits if bool(attn.all()) else logits.masked_fill(~attn[:, first:].bool()[..., None], 0.0)

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        if is_checkpoint_network(model):
            return super().enable_activation_checkpointing(model)
        # LLaDA does not declare Hugging Face gradient checkpointing; its LLaDAModel has its own
        # (torch.utils.checkpoint, non-reentrant) with per-layer strategies.
        inner = getattr(model, "model", None)
        if not hasattr(inner, "set_activation_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no model.set_activation_checkpointing; is this LLaDA's code?")
        config_module = sys.modules.get(type(model.config).__module__)
        strategy = getattr(getattr(config_module, "ActivationCheckpointingStrategy", None), "whole_layer", "whole_layer")
        inner.set_activation_checkpointing(strategy)


class Dream(ModelFamily):
    """Dream-v0-Instruct-7B / -Base-7B (hub code ``modeling_dream.py``, Qwen2-style network).

    The forward takes a boolean attention mask (a 2-D long mask crashes SDPA) and position ids
    that start at 0 on each row's first real token, as Dream's ``diffusion_generate`` builds
    them; logits are shifted by one. Only the key side is masked (padding queries still attend
    to real tokens), which leaves real positions exactly as Dream computes them and keeps the
    padding rows finite.
    """

    name = "dream"
    attention = "4d_bool"
    shifted_logits = True
    needs_remote_code = True
    native = True
    hub_code_transformers = ((4, 56), (4, 58))  # 5.x: rope_type 'default' fails as shipped
    end_of_turn_token = "<|im_end|>"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    sampler_defaults = MappingProxyType({"schedule": "global", "remasking": "maskgit_plus"})

    def matches(self, config: Mapping[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() == "dream"

    def native_forward(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int) -> Tensor:
        if bool(attn.all()):
            return model(ids, attn, first=first)
        # Dream's own positions (count from the first real token, padding at 1): padding rows then
        # equal the hub code's too, not only the real ones.
        return model(ids, attn, (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 1), first=first)

    @contextlib.contextmanager
    def saving(self, model: nn.Module) -> Iterator[None]:
        # transformers 4.57 saves a generation config after validate(strict=True); Dream's
        # DreamGenerationConfig.validate takes no `strict`. Write its JSON directly instead.
        if is_checkpoint_network(model):  # ours copies the snapshot's generation_config.json as it is
            yield
            return
        original = model.generation_config
        model.generation_config = _GenerationConfigWriter(original)
        try:
            yield
        finally:
            model.generation_config = original


class SDAR(ModelFamily):
    """SDAR / TraDo (dense; hub code ``modeling_sdar.py``, a Qwen3 network): block diffusion with block-causal
    attention (``block_size`` in ``config.json``, 4), unshifted logits, mask id in ``config.json``.

    Loaded into our network only: its hub code needs transformers 4.52-4.53 and flash-attn. Our network
    counts blocks and positions from each row's first real token, so a left-padded row computes as it
    would alone. Decoded and scored by the block-causal process (``dipod.lm.processes.block_causal``).
    """

    name = "sdar"
    needs_remote_code = True
    native = True
    # modeling_sdar.py imports LossKwargs (gone in 4.54) and SlidingWindowCache (gone in 5.0)
    hub_code_transformers = ((4, 52), (4, 54))
    process = "block_causal"
    end_of_turn_token = "<|im_end|>"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    sampler_defaults = MappingProxyType({"schedule": "blocks", "remasking": "low_confidence"})

    def matches(self, config: Mapping[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() == "sdar"

    def native_forward(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int) -> Tensor:
        from dipod.lm.networks.transformer import row_positions

        return model(ids, attn, row_positions(attn), first=first)


class SDARMoE(SDAR):
    """SDAR-MoE (SDAR-30B-A3B; hub code ``modeling_sdar_moe.py``, ``SDARMoeForCausalLM``): SDAR's network with
    Qwen3-MoE's feed-forward (softmax top-k routing, no shared expert; ``dipod.lm.networks.sdar``). Loaded into
    our network only; decoded and scored by the block-causal process. LoRA targets attention, dense MLPs and
    every expert's projections (the same suffixes as SDAR's); never the router."""

    name = "sdar_moe"
    # its hub code (modeling_sdar_moe.py) was not available to this project, so no range is claimed; the
    # legacy path is refused for every block-causal family anyway (dipod.lm.model)
    hub_code_transformers = None

    def matches(self, config: Mapping[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() == "sdar_moe"


class LLaDA2(SDAR):
    """LLaDA2.0 / 2.1 (hub code ``modeling_llada2_moe.py``, ``LLaDA2MoeModelLM``): a mixture-of-experts network
    with block-causal attention in blocks of 32, unshifted logits, the mask id from the tokenizer
    (``<|mask|>``). Loaded into our network only (its hub code loads on transformers 4.54-4.57 and
    computes garbage on 5.x); decoded by the block-causal process. LoRA targets attention (the fused
    ``qkv_proj``, ``o_proj``), the dense MLPs and every expert's projections (same suffixes)."""

    name = "llada2_moe"
    # modeling_llada2_moe.py imports TransformersKwargs (new in 4.54); on 5.x its rotary buffer is left
    # uninitialised and the logits are garbage
    hub_code_transformers = ((4, 54), (4, 58))
    end_of_turn_token = "<|role_end|>"
    lora_targets = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def matches(self, config: Mapping[str, Any]) -> bool:
        return str(config.get("model_type", "")).lower() == "llada2_moe"


class _GenerationConfigWriter:
    """Stands in for a generation config during save_pretrained: writes its JSON, no validation."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self._config.to_json_file(os.path.join(save_directory, "generation_config.json"), use_diff=True)


class DiffusionGemma(ModelFamily):
    """DiffusionGemma (transformers' own ``DiffusionGemmaForBlockDiffusion``): block diffusion, uniform noise.

    Not a mask predictor: its decoder denoises a canvas after an encoder's cache, so ``lm.logits``
    does not apply; dipod.lm.diffusion_gemma decodes it (its own sampler) and scores it (the
    uniform-noise ELBO). LoRA targets the text attention and dense MLP projections of encoder and
    decoder (the MoE experts are packed parameters, not linear layers).
    """

    name = "diffusion_gemma"
    noise = "uniform"
    process = "uniform"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def matches(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") == "diffusion_gemma"

    def auto_class(self) -> str:
        return "DiffusionGemmaForBlockDiffusion"

    def forward(self, model: nn.Module, ids: Tensor, attn: Tensor, first: int = 0) -> Tensor:
        raise ValueError("DiffusionGemma has no masked forward over the full sequence (it denoises a canvas "
                         "after its encoder); decode and score it through dipod.lm.diffusion_gemma")


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLaDA(), Dream(), SDAR(), SDARMoE(), LLaDA2(), DiffusionGemma(),
                                                         HFMaskedLM())}
# the help text of every command's --model_family flag, so a new family shows up in all of them
FAMILY_HELP = f"model family: {', '.join(FAMILIES)} (None: detected from config.json)"


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"model_family={name!r} is unknown; choose one of {sorted(FAMILIES)} (docs/lm_models.md)")
    return FAMILIES[name]


def detect_family(config: Mapping[str, Any], source: str = "") -> ModelFamily:
    """The family of a raw ``config.json`` dict; a clear error when none matches."""
    for family in FAMILIES.values():
        if family.matches(config):
            return family
    auto_map = config.get("auto_map")
    what = (f"model_type={config.get('model_type')!r}" + (f" with its own code (auto_map {dict(auto_map)})"
                                                            if auto_map else ""))
    raise ValueError(
        f"model {source!r} ({what}) is not a known family; dipod supports {sorted(FAMILIES)} (docs/lm_models.md). "
        "If it is a bidirectional mask predictor called like a Hugging Face masked LM, pass "
        "--model_family hf_masked_lm")


def without_padding(forward: Callable[[Tensor], Tensor], ids: Tensor, attn: Tensor) -> Tensor:
    """Logits of ``forward`` for a model that ignores masks, each row computed without its padding.

    Rows with the same 0/1 pattern in ``attn`` run together with the padding columns removed, so a
    row's logits equal those of running it alone; padding positions get zeros.
    """
    keep = attn.bool()
    if bool(keep.all()):
        return forward(ids)
    patterns, group = torch.unique(keep, dim=0, return_inverse=True)
    out = None
    for g, pattern in enumerate(patterns):
        cols = pattern.nonzero().squeeze(1)
        if cols.numel() == 0:
            continue  # an all-padding row has nothing to predict
        rows = (group == g).nonzero().squeeze(1)
        logits = forward(ids[rows][:, cols])
        if out is None:
            out = logits.new_zeros(*ids.shape, logits.shape[-1])
        out[rows[:, None], cols[None, :]] = logits
    return out if out is not None else forward(ids)
