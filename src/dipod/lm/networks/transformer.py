"""The pre-norm RoPE transformer that LLaDA and Dream both are, written once with a block KV cache.

A layer is ``x + Attn(RMSNorm(x))`` then ``x + Down(SiLU(Gate(h)) * Up(h))`` with ``h =
RMSNorm(x)``; attention is bidirectional (no causal mask), rotary positions rotate the two halves
of each head, and grouped-query attention repeats each key/value head over its query heads. The
families differ only in what ``NetworkSpec`` records (sizes, epsilon, RoPE base and precision,
whether logits are shifted) and in their weight names (``llada.py``, ``dream.py``).

Numerics follow the hub code so that float32 logits agree to rounding and bfloat16 ones to
bfloat16 rounding: RMSNorm statistics in float32, cast back, then scaled by the weight; RoPE
tables in float32, applied in float32 (LLaDA's ``rope_full_precision``) or in the model dtype
(Dream); softmax attention through ``F.scaled_dot_product_attention``.

Padding: keys where ``attn == 0`` are masked out. Positions stay absolute (padding included);
because RoPE scores depend only on position differences, this equals running the prompt without
its padding (tests/test_lm_networks.py checks it). LLaDA's hub code attends to padding; ours does
not, so padded batches decode as the prompts would one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class NetworkSpec:
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_in_float32: bool  # LLaDA rotates q/k in float32 then casts; Dream rotates in the model dtype
    shifted: bool  # the logits at position i predict position i + 1 (Dream)
    tied_head: bool = False  # the output head is the input embedding matrix
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3: SDAR)
    # Block-causal attention (SDAR): query i sees key j iff block(j) <= block(i), blocks of this many
    # positions counted from each row's first real token. None: bidirectional (LLaDA, Dream).
    block_size: int | None = None
    rotary_dim: int | None = None  # RoPE rotates only the first this many dims of a head (LLaDA2: half); None: all


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class NormWeight(nn.Module):
    """An RMSNorm weight of our own network; calling it applies ``rms_norm``."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor, eps: float) -> Tensor:
        return rms_norm(x, self.weight, eps)


def apply_norm(norm: nn.Module, x: Tensor, eps: float) -> Tensor:
    """``rms_norm`` with ``norm``'s weight. Ours is called as a module, so that hooks on it run (FSDP2
    gathers a sharded weight in the module's pre-forward hook: reading ``.weight`` directly would see
    the shard); a hub model's own norm module (the legacy shared path) lends its weight only."""
    if isinstance(norm, NormWeight):
        return norm(x, eps)
    return rms_norm(x, norm.weight, eps)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """float32 ``(cos, sin)`` of shape ``[Q, head_dim]`` for integer ``positions [Q]``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x_bhqd: Tensor, cos: Tensor, sin: Tensor, in_float32: bool) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head (all of them but for partial RoPE); the rest pass."""
    rotary = cos.shape[-1]
    if rotary < x_bhqd.shape[-1]:
        return torch.cat([apply_rope(x_bhqd[..., :rotary], cos, sin, in_float32), x_bhqd[..., rotary:]], dim=-1)
    if in_float32:
        xf = x_bhqd.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x_bhqd.dtype)
    cos, sin = cos.to(x_bhqd.dtype), sin.to(x_bhqd.dtype)
    return x_bhqd * cos + _rotate_half(x_bhqd) * sin


class LayerKV:
    """Keys (after RoPE) and values of one layer over the whole sequence, ``[B, H_kv, T, D]``.

    The first update (a full pass from position 0) keeps its tensors; later ones overwrite the
    positions they recompute and leave the rest as cached.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            if start != 0:
                raise RuntimeError("the KV cache must be filled by a full pass from position 0 first")
            self.k, self.v = k, v
        else:
            self.k[:, :, start:start + k.shape[2]] = k
            self.v[:, :, start:start + v.shape[2]] = v
        return self.k, self.v

    def keep_rows(self, keep_b: Tensor) -> None:
        """Keep only the batch rows marked in the boolean ``keep_b`` (the sampler's finished rows leave)."""
        if self.k is not None:
            self.k, self.v = self.k[keep_b], self.v[keep_b]


class Layer(nn.Module):
    """One transformer layer. Its submodules may be the hub model's own (shared, not copied).

    Attention projections are ``q_proj`` / ``k_proj`` / ``v_proj``, or one fused ``qkv_proj`` whose
    output rows are the query heads, then the key heads, then the value heads (LLaDA2); the MLP is
    ``gate_proj`` / ``up_proj`` / ``down_proj``, or a mixture of experts ``moe`` (``moe.MoE``).
    """

    def __init__(self, spec: NetworkSpec, attn_norm: nn.Module, o_proj: nn.Module, mlp_norm: nn.Module,
                 q_proj: nn.Module | None = None, k_proj: nn.Module | None = None, v_proj: nn.Module | None = None,
                 qkv_proj: nn.Module | None = None, gate_proj: nn.Module | None = None,
                 up_proj: nn.Module | None = None, down_proj: nn.Module | None = None, moe: nn.Module | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.attn_norm, self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn_norm, q_proj, k_proj, v_proj, o_proj
        self.qkv_proj = qkv_proj
        self.mlp_norm, self.gate_proj, self.up_proj, self.down_proj = mlp_norm, gate_proj, up_proj, down_proj
        self.moe = moe
        self.q_norm, self.k_norm = q_norm, k_norm

    def _qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        batch, length, _ = h.shape
        if self.qkv_proj is not None:
            heads = self.qkv_proj(h).view(batch, length, spec.n_heads + 2 * spec.n_kv_heads, spec.head_dim)
            q, k, v = heads.split([spec.n_heads, spec.n_kv_heads, spec.n_kv_heads], dim=2)
        else:
            q = self.q_proj(h).view(batch, length, spec.n_heads, spec.head_dim)
            k = self.k_proj(h).view(batch, length, spec.n_kv_heads, spec.head_dim)
            v = self.v_proj(h).view(batch, length, spec.n_kv_heads, spec.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, start: int,
                kv: LayerKV | None) -> Tensor:
        spec = self.spec
        batch, length, _ = x.shape
        h = apply_norm(self.attn_norm, x, spec.norm_eps)
        q, k, v = self._qkv(h)
        if spec.qk_norm:
            q, k = apply_norm(self.q_norm, q, spec.norm_eps), apply_norm(self.k_norm, k, spec.norm_eps)
        q = apply_rope(q, cos, sin, spec.rope_in_float32)
        k = apply_rope(k, cos, sin, spec.rope_in_float32)
        if kv is not None:
            k, v = kv.update(start, k, v)
        if spec.n_kv_heads != spec.n_heads:
            groups = spec.n_heads // spec.n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.o_proj(att.transpose(1, 2).reshape(batch, length, spec.n_heads * spec.head_dim))
        h = apply_norm(self.mlp_norm, x, spec.norm_eps)
        if self.moe is not None:
            return x + self.moe(h)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def row_positions(attn_bt: Tensor) -> Tensor:
    """Each token's position counted from its row's first real token (padding at 0): ``[B, T]``."""
    return (attn_bt.long().cumsum(-1) - 1).clamp_min(0)


def block_causal_mask(attn_bt: Tensor, block_size: int, q_lo: int = 0, q_hi: int | None = None) -> Tensor:
    """Boolean ``[B, 1, Q, T]`` (True = attend) for queries ``q_lo .. q_hi - 1``: real keys in the same or an
    earlier block, blocks of ``block_size`` counted from each row's first real token (so a left-padded
    row attends as it would alone). A padding query sits in block 0: it sees the row's first block."""
    block_bt = row_positions(attn_bt) // block_size
    block_bq = block_bt[:, q_lo:q_hi]
    return ((block_bt[:, None, :] <= block_bq[:, :, None]) & (attn_bt != 0)[:, None, :])[:, None]


def key_padding_mask(attn_bt: Tensor | None) -> Tensor | None:
    """Boolean ``[B, 1, 1, T]`` (True = attend), or None when nothing is padding (the hub's kernel)."""
    if attn_bt is None or bool((attn_bt != 0).all()):
        return None
    return (attn_bt != 0)[:, None, None, :]


class Network(nn.Module):
    """A LLaDA/Dream network. ``forward`` gives the hub model's float32 logits ``[B, T, V]`` (unshifted)."""

    def __init__(self, spec: NetworkSpec, embed: nn.Module, layers: list[Layer], final_norm: nn.Module,
                 head: nn.Module | None):
        super().__init__()
        if spec.n_heads % spec.n_kv_heads:
            raise ValueError(f"{spec.family}: n_heads={spec.n_heads} is not a multiple of n_kv_heads={spec.n_kv_heads}")
        self.spec = spec
        self.embed, self.layers, self.final_norm, self.head = embed, nn.ModuleList(layers), final_norm, head
        self.activation_checkpointing = False

    def hidden(self, ids_bq: Tensor, start: int = 0, key_mask: Tensor | None = None,
               cache: list[LayerKV] | None = None, positions_bq: Tensor | None = None) -> Tensor:
        """Final-norm hidden states ``[B, Q, d]`` of the tokens at positions ``start .. start + Q - 1``.

        With ``cache`` the keys/values of these positions are written into it and attention runs
        over every cached position; without it, over the ``Q`` tokens alone. ``positions_bq``
        replaces the positions per row (Dream's own convention restarts them after left padding;
        only padding queries see a difference, since RoPE scores depend on differences alone).
        """
        x = self.embed(ids_bq)
        if self.spec.embed_scale != 1.0:
            x = x * self.spec.embed_scale
        if positions_bq is None:
            positions = torch.arange(start, start + ids_bq.shape[1], device=ids_bq.device)
            cos, sin = rope_tables(positions, self.rotary_dim, self.spec.rope_theta)
        else:
            cos, sin = rope_tables(positions_bq.reshape(-1), self.rotary_dim, self.spec.rope_theta)
            cos, sin = (t.view(*positions_bq.shape, -1)[:, None] for t in (cos, sin))  # [B, 1, Q, D]
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache[i]
            if recompute:  # keep only each layer's input; recompute its activations in backward
                x = checkpoint(layer, x, cos, sin, key_mask, start, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, key_mask, start, kv)
        return apply_norm(self.final_norm, x, self.spec.norm_eps)

    @property
    def rotary_dim(self) -> int:
        return self.spec.rotary_dim or self.spec.head_dim

    def head_logits(self, hidden: Tensor) -> Tensor:
        """float32 logits of final hidden states (computed in the model dtype, as the hub does)."""
        logits = F.linear(hidden, self.embed.weight) if self.spec.tied_head else self.head(hidden)
        if self.spec.logit_scale != 1.0:
            logits = logits * self.spec.logit_scale
        return logits.float()

    def new_cache(self) -> list[LayerKV]:
        return [LayerKV() for _ in self.layers]

    def attention_mask(self, attn_bt: Tensor | None, length: int) -> Tensor | None:
        """The mask of a full pass: key padding (bidirectional), or block-causal (``spec.block_size``)."""
        if self.spec.block_size is None:
            return key_padding_mask(attn_bt)
        if attn_bt is None:
            attn_bt = torch.ones(1, length, dtype=torch.long, device=self.embed.weight.device)
        return block_causal_mask(attn_bt, self.spec.block_size)

    def forward(self, ids_bt: Tensor, attn_bt: Tensor | None = None, positions_bt: Tensor | None = None,
                first: int = 0, mask: Tensor | None = None) -> Tensor:
        """Logits at positions ``first ..`` only: the head (vocabulary-wide) runs where they are read. ``mask``
        (boolean ``[B, 1, T, T]``, True = attend) replaces the one ``attn_bt`` implies (the block-causal
        ELBO's clean + noisy copies)."""
        mask = self.attention_mask(attn_bt, ids_bt.shape[1]) if mask is None else mask
        hidden = self.hidden(ids_bt, 0, mask, positions_bq=positions_bt)
        return self.head_logits(hidden[:, first:])
