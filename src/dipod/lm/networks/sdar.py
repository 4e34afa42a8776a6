"""SDAR / TraDo (dense; a Qwen3 network with block-causal attention): our network's spec and weight names.

Qwen3 adds an RMSNorm over head_dim on queries and keys before RoPE (``q_norm`` / ``k_norm``), has no
biases, and SDAR attends block-causally with ``block_size`` from ``config.json`` (4 when absent, as
the inference-only variant of the code ships it). Logits are NOT shifted: position i scores token i.
RoPE scaling and sliding-window attention are refused by name.
"""

from __future__ import annotations

from dipod.lm.networks import dream
from dipod.lm.networks.transformer import NetworkSpec

DEFAULT_BLOCK_SIZE = 4  # SDAR's released block size, for configs that do not record one


def spec(config) -> NetworkSpec:
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    for field, ok, want in (("rope_scaling", get("rope_scaling") is None, "null"),
                            ("use_sliding_window", not get("use_sliding_window"), "false"),
                            ("attention_bias", not get("attention_bias"), "false"),
                            ("hidden_act", get("hidden_act", "silu") == "silu", "'silu'")):
        if not ok:
            raise ValueError(f"SDAR config {field}={get(field)!r} is not supported by dipod.lm.networks "
                             f"(needs {want}); its hub code may: --trust_remote_code true (transformers 4.52-4.53)")
    hidden, n_heads = get("hidden_size"), get("num_attention_heads")
    return NetworkSpec(
        family="sdar", n_layers=get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads, head_dim=get("head_dim") or hidden // n_heads,
        norm_eps=get("rms_norm_eps", 1e-6), rope_theta=get("rope_theta", 10000.0), rope_in_float32=False,
        shifted=False, tied_head=bool(get("tie_word_embeddings", False)), qk_norm=True,
        block_size=int(get("block_size") or DEFAULT_BLOCK_SIZE))


def sizes(config) -> dict:
    """Shapes of the weights (no biases)."""
    return dict(vocab=config.vocab_size, d_model=config.hidden_size, mlp_hidden=config.intermediate_size,
                qkv_bias=False, other_bias=False)


def paths(spec: NetworkSpec, size: dict) -> dict:
    """Qwen2's names (Dream's) plus the query/key norms."""
    out = dream.paths(spec, size)
    for i, layer in enumerate(out["layers"]):
        layer.update(q_norm=f"model.layers.{i}.self_attn.q_norm", k_norm=f"model.layers.{i}.self_attn.k_norm")
    return out
