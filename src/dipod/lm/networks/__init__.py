"""Our own implementations of the LLaDA and Dream networks, and the block KV cache built on them.

The hub code of these models has no cache interface, so fast rollouts run the same weights through
``Network`` (``transformer.py``), which matches the hub's logits to float32 rounding (tests/test_lm_networks.py).
ModernBERT (the tiny CPU model) gets the cache too (``modernbert.py``: our attention, its own other modules).

- ``native_network(lm)``: the network of a loaded ``MaskedDiffusionLM``, sharing its modules
  (LoRA adapters and training updates included, nothing copied);
- ``load_network(model_dir, dtype)``: the network straight from a snapshot's ``config.json`` and
  safetensors, without the hub code;
- ``make_cached_forward(lm, mode)``: the sampler's pluggable forward with a ``prefix`` or
  ``dual`` block KV cache (``cache.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dipod.lm.networks import dream, llada
from dipod.lm.networks.build import assemble, modules_from_tensors, read_checkpoint, shared_modules
from dipod.lm.networks.cache import MODES, BlockCachedForward
from dipod.lm.networks.modernbert import ModernBertNetwork
from dipod.lm.networks.transformer import Network, NetworkSpec

FAMILIES = {"llada": llada, "dream": dream}  # written from the architecture, loadable from safetensors
SUPPORTED = (*FAMILIES, "modernbert")  # config.model_type values with a native network

__all__ = ["FAMILIES", "MODES", "SUPPORTED", "BlockCachedForward", "ModernBertNetwork", "Network", "NetworkSpec",
           "family_of_config",
           "load_network", "make_cached_forward", "native_network"]


def family_of_config(config) -> str:
    """Our name for a hub config's architecture (``model_type``, lower case); a clear error when unsupported."""
    model_type = str(getattr(config, "model_type", "")).lower()
    if model_type not in SUPPORTED:
        raise ValueError(f"model family {model_type or 'unknown'!r} has no native network for the KV cache; "
                         f"supported: {sorted(SUPPORTED)}. Run without kv_cache for this model")
    return model_type


def _hub_module(model: nn.Module) -> nn.Module:
    """The hub model under DDP / PEFT wrappers (whose submodule paths our weight names follow)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def native_network(lm) -> Network | ModernBertNetwork:
    """Our network for ``lm`` (a ``MaskedDiffusionLM``), built on the hub model's own modules."""
    hub = _hub_module(lm.model)
    name = family_of_config(hub.config)
    if name == "modernbert":
        return ModernBertNetwork(hub)
    family = FAMILIES[name]
    spec = family.spec(hub.config)
    return assemble(spec, family.paths(spec), shared_modules(hub))


def load_network(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Network:
    """Our network from a hub snapshot's ``config.json`` and ``model.safetensors`` (no hub code run)."""
    config, tensors = read_checkpoint(model_dir, dtype)
    name = family_of_config(config)
    if name not in FAMILIES:
        raise ValueError(f"load_network reads {sorted(FAMILIES)} snapshots; for {name!r} load the model and use "
                         "native_network(lm)")
    family = FAMILIES[name]
    spec = family.spec(config)
    return assemble(spec, family.paths(spec), modules_from_tensors(tensors))


def make_cached_forward(lm, mode: str) -> BlockCachedForward:
    """The sampler's forward for ``lm`` with a ``'prefix'`` or ``'dual'`` block KV cache."""
    if mode not in MODES:
        raise ValueError(f"kv_cache={mode!r}; choose one of {MODES}")
    return BlockCachedForward(native_network(lm), mode)
