"""Tiny SDAR- and LLaDA2-shaped checkpoints with random weights, written by dipod itself (no hub code).

``build_tiny_block_model(out_dir, family)`` writes ``config.json`` (the hub's keys, at the sizes of
``../shared/models/tiny-sdar`` and ``tiny-llada2-moe``: hidden 64, 2 layers, 4 query heads of 16;
LLaDA2: layer 0 dense, layer 1 8 experts in 4 groups, top-2, a shared expert), ``model.safetensors``
under the hub's tensor names and dipod's character tokenizer (``<mask>`` is the mask token), so that
``load_masked_lm(out_dir)`` loads it exactly as a hub snapshot. Tests and demos of the block-causal
process use it where ``../shared`` is absent.

``sizes`` changes the width and depth (``hidden_size``, ``num_layers``, ``num_heads``,
``intermediate_size``; SDAR only): ``dipod lm sft --model tiny-sdar`` trains such a model from
scratch (the block-causal reference policy, ``dipod.lm.reference``). ``head_std`` is the standard
deviation of the output head: the default 0.5 makes a random model's predictions peak (decoding tests
want decisive tokens), a model meant for training starts near uniform (0.05).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIGS = {
    "sdar": {"architectures": ["SDARForCausalLM"], "model_type": "sdar", "block_size": 4, "head_dim": 16,
             "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 4,
             "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_scaling": None,
             "rope_theta": 1000000, "tie_word_embeddings": False, "use_sliding_window": False,
             "attention_bias": False, "vocab_size": 128},
    "llada2_moe": {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "first_k_dense_replace": 1,
                   "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 160,
                   "moe_intermediate_size": 32, "n_group": 4, "num_attention_heads": 4, "num_experts": 8,
                   "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
                   "num_shared_experts": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-6,
                   "rope_scaling": None, "rope_theta": 600000, "routed_scaling_factor": 2.5,
                   "tie_word_embeddings": False, "topk_group": 2, "use_bias": False, "use_qkv_bias": False,
                   "vocab_size": 128},
}


# sizes= keys -> the config.json keys they set (head_dim follows hidden_size / num_heads)
SIZE_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "intermediate_size": "intermediate_size"}


def build_tiny_block_model(out_dir: str | os.PathLike, family: str = "sdar", *, seed: int = 0,
                           sizes: dict[str, int] | None = None, head_std: float = 0.5) -> Path:
    """A random tiny ``family`` checkpoint (``sdar`` or ``llada2_moe``) in hub layout; returns ``out_dir``."""
    from safetensors.torch import save_file

    from dipod.lm.model import build_tiny_tokenizer
    from dipod.lm.networks.checkpoint_model import CheckpointNetwork, ModelConfig

    if family not in CONFIGS:
        raise ValueError(f"family={family!r}: tiny block models exist for {sorted(CONFIGS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = {**CONFIGS[family], "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if sizes:
        config.update(_sized(family, sizes))
    network = CheckpointNetwork(ModelConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in network.state_dict().items():
        if name.endswith("norm.weight"):  # RMSNorm weights near one
            value = 1.0 + 0.1 * torch.randn(meta.shape, generator=generator)
        else:  # projections, embeddings, router weight and expert bias; a wide head so that predictions peak
            value = (head_std if name.startswith("head") else 0.05) * torch.randn(meta.shape, generator=generator)
        tensors[network.hub_names[name]] = value.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))
    return out


def _sized(family: str, sizes: dict[str, int]) -> dict:
    """The config.json keys of ``sizes`` (module docstring), checked."""
    if family != "sdar":
        raise ValueError(f"build_tiny_block_model: sizes apply to sdar only (got family={family!r})")
    unknown = set(sizes) - set(SIZE_KEYS)
    if unknown:
        raise ValueError(f"build_tiny_block_model: unknown sizes {sorted(unknown)}; choose from {sorted(SIZE_KEYS)}")
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"build_tiny_block_model: sizes {bad} must be >= 1")
    config = {SIZE_KEYS[k]: v for k, v in sizes.items()}
    hidden = config.get("hidden_size", CONFIGS[family]["hidden_size"])
    heads = config.get("num_attention_heads", CONFIGS[family]["num_attention_heads"])
    kv_heads = CONFIGS[family]["num_key_value_heads"]
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"build_tiny_block_model: hidden_size={hidden} must be a multiple of num_heads={heads}, "
                         f"and num_heads of the {kv_heads} key/value heads")
    return {**config, "head_dim": hidden // heads}
