"""ModernBERT (our tiny CPU model's architecture) with the block KV cache.

Only attention is ours (so that keys/values can be cached); everything around it is the loaded
model's own modules, called as they are: embeddings + LayerNorm, pre-norm layers whose first has
no attention norm, the GeGLU MLP, the final norm, the prediction head and the tied decoder.
Attention follows transformers' SDPA path on unpadded-position inputs: rotary positions (global
layers at ``global_rope_theta``, local ones at ``local_rope_theta``), padding keys masked, and
layers with ``layer_id % global_attn_every_n_layers != 0`` restricted to the band
``|i - j| <= local_attention // 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dipod.lm.networks.transformer import LayerKV, NetworkSpec, apply_rope, key_padding_mask, rope_tables


def _layer_kinds(config) -> list[tuple[int | None, float]]:
    """(half window or None for global attention, RoPE base) per layer, as ModernBertAttention sets them.

    transformers 5 names a type per layer (``layer_types``, ``rope_parameters`` per type,
    ``sliding_window`` = half the local window); 4.x makes every n-th layer global.
    """
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        sliding = rope.get("sliding_attention", rope["full_attention"])
        kinds = {"full_attention": (None, rope["full_attention"]["rope_theta"]),
                 "sliding_attention": (config.sliding_window, sliding["rope_theta"])}
        return [kinds[kind] for kind in config.layer_types]
    every = config.global_attn_every_n_layers
    local_theta = config.local_rope_theta if config.local_rope_theta is not None else config.global_rope_theta
    return [(None, config.global_rope_theta) if i % every == 0 else (config.local_attention // 2, local_theta)
            for i in range(config.num_hidden_layers)]


class ModernBertNetwork(nn.Module):
    def __init__(self, hub: nn.Module):
        super().__init__()
        config = hub.config
        if getattr(config, "_attn_implementation", "sdpa") == "flash_attention_2":
            raise ValueError("ModernBERT with flash_attention_2 unpads its inputs; load it with sdpa for kv_cache")
        n_heads = config.num_attention_heads
        self.layer_kinds = _layer_kinds(config)
        self.spec = NetworkSpec(
            family="modernbert", n_layers=config.num_hidden_layers, n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=config.hidden_size // n_heads, norm_eps=config.norm_eps, rope_theta=self.layer_kinds[0][1],
            rope_in_float32=False, shifted=False)
        self.hub = hub

    def _attention(self, layer: nn.Module, x: Tensor, positions: Tensor, key_mask: Tensor | None, start: int,
                   kv: LayerKV | None, half_window: int | None, theta: float) -> Tensor:
        spec = self.spec
        batch, length, _ = x.shape
        qkv = layer.attn.Wqkv(layer.attn_norm(x)).view(batch, length, 3, spec.n_heads, spec.head_dim)
        q, k, v = qkv.transpose(1, 3).unbind(dim=2)  # each [B, H, Q, D]
        cos, sin = rope_tables(positions, spec.head_dim, theta)
        q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        if kv is not None:
            k, v = kv.update(start, k, v)
        mask = key_mask
        if half_window is not None:
            key_positions = torch.arange(k.shape[2], device=x.device)
            band = (positions[:, None] - key_positions[None, :]).abs() <= half_window  # [Q, K]
            mask = band[None, None] if mask is None else mask & band[None, None]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return layer.attn.Wo(att.transpose(1, 2).reshape(batch, length, spec.n_heads * spec.head_dim))

    def hidden(self, ids_bq: Tensor, start: int = 0, key_mask: Tensor | None = None,
               cache: list[LayerKV] | None = None) -> Tensor:
        model = self.hub.model
        x = model.embeddings.norm(model.embeddings.tok_embeddings(ids_bq))
        positions = torch.arange(start, start + ids_bq.shape[1], device=ids_bq.device)
        for i, (layer, (half_window, theta)) in enumerate(zip(model.layers, self.layer_kinds)):
            x = x + self._attention(layer, x, positions, key_mask, start, None if cache is None else cache[i],
                                    half_window, theta)
            x = x + layer.mlp(layer.mlp_norm(x))
        return model.final_norm(x)

    def head_logits(self, hidden: Tensor) -> Tensor:
        return self.hub.decoder(self.hub.head(hidden)).float()

    def new_cache(self) -> list[LayerKV]:
        return [LayerKV() for _ in self.hub.model.layers]

    def forward(self, ids_bt: Tensor, attn_bt: Tensor | None = None) -> Tensor:
        return self.head_logits(self.hidden(ids_bt, 0, key_padding_mask(attn_bt)))
