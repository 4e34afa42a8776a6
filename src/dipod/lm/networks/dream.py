"""Dream (v0 Instruct / Base, a Qwen2 network): our network's spec and weight names from ``DreamConfig``.

Qwen2 puts biases on q/k/v (the shared ``nn.Linear`` modules carry them), uses grouped-query
attention, and Dream reads the prediction for position i from the logits at position i - 1
(``shifted``). RoPE scaling and sliding-window attention are refused by name.
"""

from __future__ import annotations

from dipod.lm.networks.transformer import NetworkSpec


def spec(config) -> NetworkSpec:
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    for field, ok, want in (("rope_scaling", get("rope_scaling") is None, "null"),
                            ("use_sliding_window", not get("use_sliding_window"), "false"),
                            ("hidden_act", get("hidden_act", "silu") == "silu", "'silu'")):
        if not ok:
            raise ValueError(f"Dream config {field}={get(field)!r} is not supported by dipod.lm.networks "
                             f"(needs {want}); its hub code may: --trust_remote_code true (transformers 4.56-4.57)")
    hidden, n_heads = get("hidden_size"), get("num_attention_heads")
    return NetworkSpec(
        family="dream", n_layers=get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads, head_dim=hidden // n_heads,
        norm_eps=get("rms_norm_eps", 1e-6), rope_theta=get("rope_theta", 10000.0), rope_in_float32=False,
        shifted=True, tied_head=bool(get("tie_word_embeddings", False)))


def sizes(config) -> dict:
    """Shapes of the weights (Qwen2: biases on q/k/v only)."""
    return dict(vocab=config.vocab_size, d_model=config.hidden_size, mlp_hidden=config.intermediate_size,
                qkv_bias=True, other_bias=False)


def paths(spec: NetworkSpec, size: dict) -> dict:
    names = dict(attn_norm="input_layernorm", q_proj="self_attn.q_proj", k_proj="self_attn.k_proj",
                 v_proj="self_attn.v_proj", o_proj="self_attn.o_proj", mlp_norm="post_attention_layernorm",
                 gate_proj="mlp.gate_proj", up_proj="mlp.up_proj", down_proj="mlp.down_proj")
    return {"embed": "model.embed_tokens", "final_norm": "model.norm", "head": None if spec.tied_head else "lm_head",
            "layers": [{part: f"model.layers.{i}.{name}" for part, name in names.items()}
                       for i in range(spec.n_layers)]}
