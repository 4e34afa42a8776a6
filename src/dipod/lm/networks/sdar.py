"""SDAR / TraDo (a Qwen3 network with block-causal attention), dense and mixture-of-experts: our network's spec and
weight names.

Qwen3 adds an RMSNorm over head_dim on queries and keys before RoPE (``q_norm`` / ``k_norm``), has no
biases, and SDAR attends block-causally with ``block_size`` from ``config.json`` (4 when absent, as
the inference-only variant of the code ships it). Logits are NOT shifted: position i scores token i.
RoPE scaling and sliding-window attention are refused by name.

SDAR-MoE (``SDARMoeForCausalLM``, ``model_type`` ``sdar_moe``: SDAR-30B-A3B, trained from Qwen3-30B-A3B)
is the same network with Qwen3-MoE's feed-forward: layer i is a mixture of experts when
``num_experts > 0``, i is not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``, else a
dense MLP of ``intermediate_size``; routing is ``moe.SoftmaxRouter`` (softmax over the experts, top
``num_experts_per_tok``, renormalised when ``norm_topk_prob``; absent from ``config.json`` it takes
the Qwen3-MoE configuration's default, false), experts of ``moe_intermediate_size``, no shared expert.
"""

from __future__ import annotations

from dipod.lm.networks import dream
from dipod.lm.networks.moe import MoESpec, expert_paths
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
        family=str(get("model_type", "sdar")).lower(), n_layers=get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads, head_dim=get("head_dim") or hidden // n_heads,
        norm_eps=get("rms_norm_eps", 1e-6), rope_theta=get("rope_theta", 10000.0), rope_in_float32=False,
        shifted=False, tied_head=bool(get("tie_word_embeddings", False)), qk_norm=True,
        block_size=int(get("block_size") or DEFAULT_BLOCK_SIZE))


def sizes(config) -> dict:
    """Shapes of the weights (no biases); for SDAR-MoE the experts and which layers have them."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    out = dict(vocab=config.vocab_size, d_model=config.hidden_size, mlp_hidden=config.intermediate_size,
               qkv_bias=False, other_bias=False)
    if not get("num_experts"):
        return out
    moe = MoESpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok, score="softmax",
                  norm_topk_prob=bool(get("norm_topk_prob", False)))
    moe_layers = moe_layer_indices(config.num_hidden_layers, get("mlp_only_layers"), get("decoder_sparse_step", 1))
    return {**out, "moe": moe, "moe_layers": moe_layers, "moe_hidden": config.moe_intermediate_size}


def moe_layer_indices(num_layers: int, mlp_only_layers, decoder_sparse_step: int) -> tuple[int, ...]:
    """The layers of an SDAR-MoE (Qwen3-MoE) config that hold experts (module docstring); the rest stay dense."""
    skipped = set(mlp_only_layers or ())
    return tuple(i for i in range(num_layers) if i not in skipped and (i + 1) % decoder_sparse_step == 0)


def paths(spec: NetworkSpec, size: dict) -> dict:
    """Qwen2's names (Dream's) plus the query/key norms; an MoE layer's router and experts under ``mlp``."""
    out = dream.paths(spec, size)
    for i, layer in enumerate(out["layers"]):
        layer.update(q_norm=f"model.layers.{i}.self_attn.q_norm", k_norm=f"model.layers.{i}.self_attn.k_norm")
        if i in size.get("moe_layers", ()):
            for part in ("gate_proj", "up_proj", "down_proj"):
                del layer[part]
            layer.update(expert_paths(f"model.layers.{i}.mlp", size["moe"], shared=False))
    return out
