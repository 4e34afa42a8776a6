"""LLaDA2.x (``LLaDA2MoeModelLM``, ``model_type`` ``llada2_moe``): our network's spec and weight names.

A mixture-of-experts network with block-causal attention: fused ``query_key_value`` projection
(query heads, then key heads, then value heads), RMSNorm on queries and keys over head_dim before
RoPE (the config class turns it on by default: ``use_qk_norm`` absent from ``config.json`` means
true), RoPE over the first ``head_dim * partial_rotary_factor`` dims only, in the model dtype; the
first ``first_k_dense_replace`` layers have a dense MLP, the others ``moe.MoE`` (group-limited
sigmoid routing, shared expert). Blocks of 32 (the model card's block length; nothing about blocks
in ``config.json``). Logits are NOT shifted. Variants the code hard-codes otherwise (score function,
normalisation, router dtype) and biases, sliding windows and RoPE scaling are refused by name.
"""

from __future__ import annotations

from dipod.lm.networks.moe import MoESpec, expert_paths
from dipod.lm.networks.transformer import NetworkSpec

BLOCK_SIZE = 32  # LLaDA2.0 / 2.1 decode and train in blocks of 32 (model card, dFactory)


def _check(config) -> None:
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    for field, ok, want in (("rope_scaling", get("rope_scaling") is None, "null"),
                            ("use_sliding_window", not get("use_sliding_window"), "false"),
                            ("use_qkv_bias", not get("use_qkv_bias"), "false"),
                            ("use_bias", not get("use_bias"), "false"),
                            ("use_qk_norm", get("use_qk_norm", True), "true"),
                            ("score_function", get("score_function", "sigmoid") == "sigmoid", "'sigmoid'"),
                            ("norm_topk_prob", get("norm_topk_prob", True), "true"),
                            ("hidden_act", get("hidden_act", "silu") == "silu", "'silu'")):
        if not ok:
            raise ValueError(f"LLaDA2 config {field}={get(field)!r} is not supported by dipod.lm.networks "
                             f"(needs {want}); its hub code may: --trust_remote_code true (transformers 4.54-4.57)")


def spec(config) -> NetworkSpec:
    _check(config)
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    head_dim = get("head_dim") or config.hidden_size // config.num_attention_heads
    return NetworkSpec(
        family="llada2_moe", n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
        n_kv_heads=get("num_key_value_heads") or config.num_attention_heads, head_dim=head_dim,
        norm_eps=get("rms_norm_eps", 1e-6), rope_theta=get("rope_theta", 10000.0), rope_in_float32=False,
        shifted=False, tied_head=bool(get("tie_word_embeddings", False)), qk_norm=True, block_size=BLOCK_SIZE,
        rotary_dim=int(head_dim * get("partial_rotary_factor", 1.0)))


def sizes(config) -> dict:
    """Shapes: fused q/k/v, dense MLP width, the MoE (experts, routing, shared expert width)."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    moe = None if get("num_experts") is None else MoESpec(
        num_experts=config.num_experts, top_k=config.num_experts_per_tok, n_group=get("n_group", 1),
        topk_group=get("topk_group", 1), routed_scaling_factor=get("routed_scaling_factor", 1.0))
    shared = get("num_shared_experts")
    moe_layers = () if moe is None else tuple(range(get("first_k_dense_replace", 0), config.num_hidden_layers))
    return dict(vocab=config.vocab_size, d_model=config.hidden_size, mlp_hidden=config.intermediate_size,
                qkv_bias=False, other_bias=False, fused_qkv=True, moe=moe, moe_layers=moe_layers,
                moe_hidden=get("moe_intermediate_size"),
                shared_hidden=get("moe_intermediate_size") * shared if shared else None)


def paths(spec: NetworkSpec, size: dict) -> dict:
    def layer(i: int) -> dict:
        root = f"model.layers.{i}"
        out = dict(attn_norm=f"{root}.input_layernorm", qkv_proj=f"{root}.attention.query_key_value",
                   q_norm=f"{root}.attention.query_layernorm", k_norm=f"{root}.attention.key_layernorm",
                   o_proj=f"{root}.attention.dense", mlp_norm=f"{root}.post_attention_layernorm")
        if i not in size["moe_layers"]:
            return {**out, **{part: f"{root}.mlp.{part}" for part in ("gate_proj", "up_proj", "down_proj")}}
        return {**out, **expert_paths(f"{root}.mlp", size["moe"], bool(size["shared_hidden"]))}

    return {"embed": "model.word_embeddings", "final_norm": "model.norm",
            "head": None if spec.tied_head else "lm_head", "layers": [layer(i) for i in range(spec.n_layers)]}
