"""Our own implementations of the LLaDA and Dream networks, and the block KV cache built on them.

The hub code of these models has no cache interface, so fast rollouts run the same weights through
``Network`` (``transformer.py``), which matches the hub's logits to float32 rounding (tests/test_lm_networks.py).

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
from dipod.lm.networks.transformer import Network, NetworkSpec

FAMILIES = {"llada": llada, "dream": dream}

__all__ = ["FAMILIES", "MODES", "BlockCachedForward", "Network", "NetworkSpec", "family_of_config",
           "load_network", "make_cached_forward", "native_network"]


def family_of_config(config) -> str:
    """Our family name for a hub config (``model_type`` 'llada' or 'Dream'); a clear error otherwise."""
    model_type = str(getattr(config, "model_type", "")).lower()
    if model_type not in FAMILIES:
        raise ValueError(f"model family {model_type or 'unknown'!r} has no native network for the KV cache; "
                         f"supported families: {sorted(FAMILIES)}. Run without kv_cache for this model")
    return model_type


def _hub_module(model: nn.Module) -> nn.Module:
    """The hub model under DDP / PEFT wrappers (whose submodule paths our weight names follow)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def native_network(lm) -> Network:
    """Our network for ``lm`` (a ``MaskedDiffusionLM``), built on the hub model's own modules."""
    hub = _hub_module(lm.model)
    family = FAMILIES[family_of_config(hub.config)]
    spec = family.spec(hub.config)
    return assemble(spec, family.paths(spec), shared_modules(hub))


def load_network(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Network:
    """Our network from a hub snapshot's ``config.json`` and ``model.safetensors`` (no hub code run)."""
    config, tensors = read_checkpoint(model_dir, dtype)
    family = FAMILIES[family_of_config(config)]
    spec = family.spec(config)
    return assemble(spec, family.paths(spec), modules_from_tensors(tensors))


def make_cached_forward(lm, mode: str) -> BlockCachedForward:
    """The sampler's forward for ``lm`` with a ``'prefix'`` or ``'dual'`` block KV cache."""
    if mode not in MODES:
        raise ValueError(f"kv_cache={mode!r}; choose one of {MODES}")
    return BlockCachedForward(native_network(lm), mode)
