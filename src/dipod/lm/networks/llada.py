"""LLaDA (8B-Instruct, 1.5): our network's spec and weight names from the hub's ``LLaDAConfig``.

Only the variant LLaDA ships is supported ("llama" blocks: RMSNorm, RoPE, SiLU-gated MLP with
``ff_proj`` as the gate and ``up_proj``, no q/k norm, one block group); anything else is refused
by name rather than silently computed differently.
"""

from __future__ import annotations

import math

from dipod.lm.networks.transformer import NetworkSpec


def _need(config, field: str, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"LLaDA config {field}={getattr(config, field, None)!r} is not supported by "
                         f"dipod.lm.networks (needs {want}); its hub code may: --trust_remote_code true (transformers "
                         "4.56-4.57)")


def spec(config) -> NetworkSpec:
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    _need(config, "block_type", get("block_type") == "llama", "'llama'")
    _need(config, "layer_norm_type", get("layer_norm_type") == "rms", "'rms'")
    _need(config, "activation_type", get("activation_type") == "silu", "'silu' with up_proj")
    _need(config, "rope", bool(get("rope")) and not get("alibi"), "rope true, alibi false")
    _need(config, "attention_layer_norm", not get("attention_layer_norm"), "false")
    _need(config, "block_group_size", get("block_group_size", 1) == 1, "1")
    norm_bias = get("bias_for_layer_norm")
    _need(config, "bias_for_layer_norm", not (get("include_bias") if norm_bias is None else norm_bias), "no norm bias")
    d_model, n_heads = get("d_model"), get("n_heads")
    n_kv = 1 if get("multi_query_attention") else (get("n_kv_heads") or n_heads)
    return NetworkSpec(
        family="llada", n_layers=get("n_layers"), n_heads=n_heads, n_kv_heads=n_kv, head_dim=d_model // n_heads,
        norm_eps=get("rms_norm_eps", 1e-5), rope_theta=get("rope_theta", 10000.0),
        rope_in_float32=bool(get("rope_full_precision", True)), shifted=False, tied_head=bool(get("weight_tying")),
        embed_scale=math.sqrt(d_model) if get("input_emb_norm") else 1.0,
        logit_scale=1.0 / math.sqrt(d_model) if get("scale_logits") else 1.0)


def sizes(config) -> dict:
    """Shapes of the weights: vocabulary rows, model width, MLP width, whether q/k/v carry biases."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    d_model = get("d_model")
    return dict(vocab=get("embedding_size") or get("vocab_size"), d_model=d_model,
                mlp_hidden=get("mlp_hidden_size") or get("mlp_ratio", 4) * d_model,
                qkv_bias=bool(get("include_qkv_bias") or get("include_bias")), other_bias=bool(get("include_bias")))


def paths(spec: NetworkSpec, size: dict) -> dict:
    root = "model.transformer"
    names = dict(attn_norm="attn_norm", q_proj="q_proj", k_proj="k_proj", v_proj="v_proj", o_proj="attn_out",
                 mlp_norm="ff_norm", gate_proj="ff_proj", up_proj="up_proj", down_proj="ff_out")
    return {"embed": f"{root}.wte", "final_norm": f"{root}.ln_f",
            "head": None if spec.tied_head else f"{root}.ff_out",
            "layers": [{part: f"{root}.blocks.{i}.{name}" for part, name in names.items()}
                       for i in range(spec.n_layers)]}
