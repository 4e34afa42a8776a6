"""Tiny hub-layout LLaDA, Dream and SDAR-MoE checkpoints, built by the test suite itself (nothing from ../shared).

``build_hub_layout(family, out_dir)`` writes what a user's download of GSAI-ML/LLaDA-8B-Instruct,
Dream-org/Dream-v0-Instruct-7B or JetLM/SDAR-30B-A3B-Chat holds, minus the model code, shrunk to vocab 128,
width 64, 2 layers (SDAR-MoE: 3, the middle one dense):

- ``config.json`` with the hub's keys (``model_type``, ``architectures``, sizes, ``mask_token_id``, token
  ids) and no ``auto_map``: it loads through dipod's default path, our own network;
- ``model.safetensors`` under the hub's tensor names, written out here from the hub's module layout (not
  from dipod's name mapping, so a wrong mapping fails to load), seeded random weights of the scale a
  fresh initialisation has (norm weights and q/k/v biases off their defaults, so reading them matters);
- ``generation_config.json`` and a tokenizer (``tokenizer.json``, ``tokenizer_config.json``, chat
  template) built with ``tokenizers``: ``<unk>``, one token per character, then the special tokens.

Facts of the real models kept here (and the ids of ../shared/models' snapshots, so a test reads the same
numbers on either; tests/test_hub_layout.py compares the two layouts where ../shared is present):

- LLaDA: the tokenizer declares NO mask token (``<|mdm_mask|>`` is a token, 120, named only by
  config.json's ``mask_token_id``); EOS = pad = ``<|endoftext|>`` (98); a turn ends with ``<|eot_id|>``
  (101); Llama-3 style headers; the output head ``model.transformer.ff_out`` is not tied;
- Dream: the tokenizer declares ``<|mask|>`` (120), config.json agrees; EOS = pad = ``<|endoftext|>``
  (97); ChatML (``<|im_start|>``, ``<|im_end|>`` 99); Qwen2 layers with q/k/v biases and grouped-query
  attention (4 heads, 2 key/value heads). Its shifted logits are the family's convention (dipod.lm.families),
  not something the files say.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

VOCAB, WIDTH, MLP, LAYERS, HEADS = 128, 64, 128, 2, 4
FIRST_SPECIAL = 97  # ids 1..96: one per character of dipod's tiny alphabet; 97..127: special tokens
MASK_ID = 120

SPECIALS = {
    "llada": {97: "<|startoftext|>", 98: "<|endoftext|>", 99: "<|start_header_id|>", 100: "<|end_header_id|>",
              101: "<|eot_id|>", MASK_ID: "<|mdm_mask|>"},
    "dream": {97: "<|endoftext|>", 98: "<|im_start|>", 99: "<|im_end|>", 100: "<|beginoftext|>", MASK_ID: "<|mask|>"},
    "sdar_moe": {97: "<|endoftext|>", 98: "<|im_start|>", 99: "<|im_end|>", MASK_ID: "<|MASK|>"},
}
# The tokenizer's named tokens (LLaDA names no mask token: its id lives in config.json only).
TOKEN_ROLES = {
    "llada": dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
    "dream": dict(bos_token="<|beginoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  mask_token="<|mask|>"),
    "sdar_moe": dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="<|MASK|>"),
}
CHAT_TEMPLATES = {
    "llada": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "dream": ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
              "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "sdar_moe": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}

CONFIGS = {
    "llada": {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": WIDTH, "n_heads": HEADS,
        "n_kv_heads": HEADS, "n_layers": LAYERS, "mlp_hidden_size": MLP, "mlp_ratio": 4, "embedding_size": VOCAB,
        "vocab_size": VOCAB, "max_sequence_length": 1024, "block_type": "llama", "block_group_size": 1,
        "activation_type": "silu", "layer_norm_type": "rms", "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
        "bias_for_layer_norm": False, "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True, "multi_query_attention": None, "rope": True, "rope_theta": 500000.0,
        "rope_full_precision": True, "alibi": False, "alibi_bias_max": 8.0, "flash_attention": False,
        "input_emb_norm": False, "scale_logits": False, "weight_tying": False, "attention_dropout": 0.0,
        "embedding_dropout": 0.0, "residual_dropout": 0.0, "init_device": "meta", "init_fn": "mitchell",
        "init_std": 0.02, "init_cutoff_factor": None, "precision": "amp_bf16", "dtype": "float32",
        "mask_token_id": MASK_ID, "eos_token_id": 98, "pad_token_id": 98,
    },
    "dream": {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": WIDTH, "intermediate_size": MLP,
        "num_attention_heads": HEADS, "num_key_value_heads": 2, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
        "max_position_embeddings": 1024, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": None, "use_sliding_window": False, "sliding_window": None, "max_window_layers": LAYERS,
        "tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
        "dtype": "float32", "mask_token_id": MASK_ID, "bos_token_id": 100, "eos_token_id": 97, "pad_token_id": 97,
    },
    # SDAR-30B-A3B's keys (Qwen3-MoE's plus SDAR's block_size and mask id): 3 layers, the middle one dense
    # (mlp_only_layers), 4 experts of 32, top-2, renormalised; 4 query / 2 KV heads of 16
    "sdar_moe": {
        "architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe", "hidden_size": WIDTH,
        "intermediate_size": MLP, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1], "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "num_attention_heads": HEADS, "num_key_value_heads": 2, "head_dim": 16,
        "num_hidden_layers": 3, "vocab_size": VOCAB, "max_position_embeddings": 1024, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": False, "block_size": 4,
        "dtype": "float32", "mask_token_id": MASK_ID, "bos_token_id": 97, "eos_token_id": 97, "pad_token_id": 97,
    },
}
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def llada_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """LLaDA's (OLMo-derived) module layout: ``model.transformer.{wte, blocks.N.*, ln_f, ff_out}``."""
    d, f, vocab, head_dim = c["d_model"], c["mlp_hidden_size"], c["embedding_size"], c["d_model"] // c["n_heads"]
    kv = c["n_kv_heads"] * head_dim
    shapes = {"model.transformer.wte.weight": (vocab, d), "model.transformer.ln_f.weight": (d,),
              "model.transformer.ff_out.weight": (vocab, d)}
    for i in range(c["n_layers"]):
        block = f"model.transformer.blocks.{i}"
        shapes.update({f"{block}.attn_norm.weight": (d,), f"{block}.q_proj.weight": (d, d),
                       f"{block}.k_proj.weight": (kv, d), f"{block}.v_proj.weight": (kv, d),
                       f"{block}.attn_out.weight": (d, d), f"{block}.ff_norm.weight": (d,),
                       f"{block}.ff_proj.weight": (f, d), f"{block}.up_proj.weight": (f, d),
                       f"{block}.ff_out.weight": (d, f)})
    return shapes


def dream_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """Dream's Qwen2 layout: ``model.{embed_tokens, layers.N.*, norm}``, ``lm_head``; biases on q/k/v only."""
    d, f, vocab, head_dim = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hidden_size"] // c[
        "num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update({f"{layer}.input_layernorm.weight": (d,), f"{layer}.post_attention_layernorm.weight": (d,),
                       f"{layer}.self_attn.q_proj.weight": (d, d), f"{layer}.self_attn.q_proj.bias": (d,),
                       f"{layer}.self_attn.k_proj.weight": (kv, d), f"{layer}.self_attn.k_proj.bias": (kv,),
                       f"{layer}.self_attn.v_proj.weight": (kv, d), f"{layer}.self_attn.v_proj.bias": (kv,),
                       f"{layer}.self_attn.o_proj.weight": (d, d), f"{layer}.mlp.gate_proj.weight": (f, d),
                       f"{layer}.mlp.up_proj.weight": (f, d), f"{layer}.mlp.down_proj.weight": (d, f)})
    return shapes


def sdar_moe_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """Qwen3-MoE's layout: Dream's names without biases, ``self_attn.{q,k}_norm``; a mixture-of-experts layer has
    ``mlp.gate`` (the router) and ``mlp.experts.E.{gate,up,down}_proj``, a layer in ``mlp_only_layers`` a dense MLP."""
    d, vocab, head_dim = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes.update({f"{layer}.input_layernorm.weight": (d,), f"{layer}.post_attention_layernorm.weight": (d,),
                       f"{layer}.self_attn.q_proj.weight": (q, d), f"{layer}.self_attn.k_proj.weight": (kv, d),
                       f"{layer}.self_attn.v_proj.weight": (kv, d), f"{layer}.self_attn.o_proj.weight": (d, q),
                       f"{layer}.self_attn.q_norm.weight": (head_dim,),
                       f"{layer}.self_attn.k_norm.weight": (head_dim,)})
        dense = i in c["mlp_only_layers"] or (i + 1) % c["decoder_sparse_step"] or not c["num_experts"]
        f, prefixes = ((c["intermediate_size"], [f"{layer}.mlp"]) if dense else
                       (c["moe_intermediate_size"], [f"{layer}.mlp.experts.{e}" for e in range(c["num_experts"])]))
        if not dense:
            shapes[f"{layer}.mlp.gate.weight"] = (c["num_experts"], d)
        for prefix in prefixes:
            shapes.update({f"{prefix}.gate_proj.weight": (f, d), f"{prefix}.up_proj.weight": (f, d),
                           f"{prefix}.down_proj.weight": (d, f)})
    return shapes


TENSORS = {"llada": llada_tensors, "dream": dream_tensors, "sdar_moe": sdar_moe_tensors}
EMBEDDINGS = ("wte.weight", "embed_tokens.weight")
HEADS_OUT = ("transformer.ff_out.weight", "lm_head.weight")


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights of an initialisation's scale: embeddings N(0, 1), matrices N(0, 1 / fan_in), the output head
    N(0, 4 / width) (peaked enough that greedy and sampled decoding differ), norm weights 1 + N(0, 0.1^2),
    biases N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in sorted(shapes.items()):
        draw = torch.randn(shape, generator=generator)
        if name.endswith(EMBEDDINGS):
            weights[name] = draw
        elif name.endswith(HEADS_OUT):
            weights[name] = draw * 2.0 / math.sqrt(shape[1])
        elif len(shape) == 2:
            weights[name] = draw / math.sqrt(shape[1])
        elif name.endswith(".bias"):
            weights[name] = 0.1 * draw
        else:  # the RMS norms' weights
            weights[name] = 1.0 + 0.1 * draw
    return weights


def build_tokenizer(family: str):
    """``<unk>`` (0), dipod's tiny alphabet one character per id (1..96), then the family's special tokens
    (97..127, unused ids as ``<|reserved_N|>``); characters are split one by one, decoding joins them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dipod.lm.model import TINY_ALPHABET, UNK_TOKEN

    specials = [SPECIALS[family].get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, VOCAB)]
    tokens = [UNK_TOKEN, *TINY_ALPHABET, *specials]
    assert len(tokens) == VOCAB, len(tokens)
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([UNK_TOKEN, *specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK_TOKEN, **TOKEN_ROLES[family],
                                   chat_template=CHAT_TEMPLATES[family], model_max_length=4096, padding_side="left",
                                   clean_up_tokenization_spaces=False)


def build_hub_layout(family: str, out_dir: str | Path, seed: int = 0, **config_changes) -> Path:
    """Write the tiny ``family`` ("llada", "dream" or "sdar_moe") checkpoint to ``out_dir``, ``config_changes``
    applied to its config.json; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**CONFIGS[family], **config_changes}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in GENERATION_KEYS if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(random_weights(TENSORS[family](config), seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(family).save_pretrained(out)
    # transformers 5 records its own backend class; the hub's files name this one, which 4.x reads too
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"},
                               indent=2) + "\n")
    return out
