"""Our own implementations of the LLaDA, Dream and SDAR networks, and the block KV cache built on them.

LLaDA, Dream and SDAR (dense, block-causal) load into ``Network`` (``transformer.py``) from their hub checkpoint files
(``checkpoint_model.py``); its logits equal the hub code's to float32 rounding (tests/test_lm_networks.py).
ModernBERT (the tiny CPU model) gets the cache too (``modernbert.py``: our attention, its own other modules).

- ``native_network(lm)``: the network of a loaded ``MaskedDiffusionLM``: the model itself when it was
  loaded by us (the default), or, for the legacy hub-code path, one sharing the hub model's modules
  (LoRA adapters and training updates included, nothing copied);
- ``load_network(model_dir, dtype)``: the network straight from a snapshot's ``config.json`` and
  safetensors, without the hub code (``load_checkpoint_model``);
- ``make_cached_forward(lm, mode)``: the sampler's pluggable forward with a ``prefix`` or
  ``dual`` block KV cache (``cache.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dipod.lm.networks.build import assemble, shared_modules
from dipod.lm.networks.cache import MODES, BlockCachedForward
from dipod.lm.networks.checkpoint_model import FAMILIES, CheckpointNetwork, load_checkpoint_model
from dipod.lm.networks.modernbert import ModernBertNetwork
from dipod.lm.networks.transformer import Network, NetworkSpec

# config.model_type values with a native network for the Fast-dLLM block cache, which is bidirectional
# (SDAR, SDAR-MoE and LLaDA2 are block-causal: their process refuses this cache)
SUPPORTED = (*(name for name in FAMILIES if name not in ("sdar", "sdar_moe", "llada2_moe")), "modernbert")

__all__ = ["FAMILIES", "MODES", "SUPPORTED", "BlockCachedForward", "CheckpointNetwork", "ModernBertNetwork", "Network",
           "NetworkSpec", "family_of_config", "load_checkpoint_model",
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
    """Our network for ``lm`` (a ``MaskedDiffusionLM``): its model, or one built on the hub model's own modules."""
    hub = _hub_module(lm.model)
    if isinstance(hub, CheckpointNetwork):
        return hub
    name = family_of_config(hub.config)
    if name == "modernbert":
        return ModernBertNetwork(hub)
    family = FAMILIES[name]
    spec = family.spec(hub.config)
    return assemble(spec, family.paths(spec, family.sizes(hub.config)), shared_modules(hub))


def load_network(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Network:
    """Our network from a hub snapshot's ``config.json`` and safetensors (no hub code run)."""
    return load_checkpoint_model(model_dir, dtype)


def make_cached_forward(lm, mode: str) -> BlockCachedForward:
    """The sampler's forward for ``lm`` with a ``'prefix'`` or ``'dual'`` block KV cache."""
    if mode not in MODES:
        raise ValueError(f"kv_cache={mode!r}; choose one of {MODES}")
    return BlockCachedForward(native_network(lm), mode)
