"""Mixture-of-experts MLPs as LLaDA2.x and SDAR-MoE route them; the output is the weighted sum of the chosen
experts (plus the shared expert where the model has one).

``Router`` (LLaDA2.x, DeepSeek-V3-style group-limited routing), per token: router logits ``x W^T`` in
float32, scores ``sigmoid(logits)``; the choice uses the scores plus ``expert_bias`` (a buffer, read
from the checkpoint, never trained here): each of ``n_group`` groups is scored by the sum of its two
best biased scores, the best ``topk_group`` groups are kept, and the ``top_k`` best experts inside
them are chosen. Their weights are the chosen experts' UNBIASED scores divided by their sum (when
``top_k > 1``), times ``routed_scaling_factor``. A shared expert is added. No auxiliary
load-balancing loss (LLaDA2's code returns none; its training sets ``output_router_logits=False``).

``SoftmaxRouter`` (SDAR-MoE, Qwen3-MoE's routing): router logits ``x W^T`` in the model dtype,
``softmax`` over all experts in float32, the ``top_k`` largest probabilities, divided by their sum
when ``norm_topk_prob``. No shared expert, no expert bias.

Module names follow the hub (``gate.weight``, ``gate.expert_bias``, ``experts.E.{gate,up,down}_proj``,
``shared_experts.{gate,up,down}_proj``), so LoRA can target the expert projections by suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    score: str = "sigmoid"  # "sigmoid": LLaDA2's group-limited Router; "softmax": SDAR-MoE's SoftmaxRouter
    norm_topk_prob: bool = True  # softmax: divide the chosen probabilities by their sum
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


class GatedMLP(nn.Module):
    """``Down(SiLU(Gate(x)) * Up(x))``: one expert (and the shared expert, and a dense layer's MLP)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, weight: Tensor, expert_bias: Tensor, spec: MoESpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(weight)
        self.register_buffer("expert_bias", expert_bias)

    def forward(self, x_nd: Tensor) -> tuple[Tensor, Tensor]:
        """``(experts_nk, weights_nk)`` of ``N`` tokens: the chosen experts and their float32 weights."""
        spec = self.spec
        scores_ne = torch.sigmoid(F.linear(x_nd.float(), self.weight.float()))
        biased_ne = scores_ne + self.expert_bias
        groups_ng = biased_ne.view(len(x_nd), spec.n_group, -1).topk(2, dim=-1).values.sum(-1)
        kept_ng = torch.zeros_like(groups_ng, dtype=torch.bool).scatter_(
            1, groups_ng.topk(spec.topk_group, dim=-1, sorted=False).indices, True)
        kept_ne = kept_ng.repeat_interleave(spec.num_experts // spec.n_group, dim=1)
        experts_nk = biased_ne.masked_fill(~kept_ne, float("-inf")).topk(spec.top_k, dim=-1).indices
        weights_nk = scores_ne.gather(1, experts_nk)
        if spec.top_k > 1:
            weights_nk = weights_nk / (weights_nk.sum(-1, keepdim=True) + 1e-20)
        return experts_nk, weights_nk * spec.routed_scaling_factor


class SoftmaxRouter(nn.Module):
    def __init__(self, weight: Tensor, spec: MoESpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(weight)

    def forward(self, x_nd: Tensor) -> tuple[Tensor, Tensor]:
        """``(experts_nk, weights_nk)`` of ``N`` tokens: the chosen experts and their float32 weights."""
        probs_ne = torch.softmax(F.linear(x_nd, self.weight).float(), dim=-1)
        weights_nk, experts_nk = probs_ne.topk(self.spec.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights_nk = weights_nk / weights_nk.sum(-1, keepdim=True)
        return experts_nk, weights_nk


def make_router(spec: MoESpec, d_model: int) -> nn.Module:
    """The router ``spec`` names, its weights uninitialised (built on the meta device, then assigned)."""
    weight = torch.empty(spec.num_experts, d_model)
    if spec.score == "softmax":
        return SoftmaxRouter(weight, spec)
    return Router(weight, torch.empty(spec.num_experts), spec)


def expert_paths(root: str, spec: MoESpec, shared: bool) -> dict:
    """{our part: hub module path} of a mixture-of-experts MLP at hub path ``root`` (``model.layers.N.mlp``)."""
    mlp = ("gate_proj", "up_proj", "down_proj")
    out = {"moe.gate": f"{root}.gate"}
    for e in range(spec.num_experts):
        out.update({f"moe.experts.{e}.{part}": f"{root}.experts.{e}.{part}" for part in mlp})
    if shared:
        out.update({f"moe.shared_experts.{part}": f"{root}.shared_experts.{part}" for part in mlp})
    return out


class MoE(nn.Module):
    """Routed experts plus the shared expert (if any); input and output ``[..., d]``."""

    def __init__(self, gate: Router, experts: list[GatedMLP], shared_experts: GatedMLP | None):
        super().__init__()
        self.gate, self.experts, self.shared_experts = gate, nn.ModuleList(experts), shared_experts

    def forward(self, x: Tensor) -> Tensor:
        x_nd = x.reshape(-1, x.shape[-1])
        experts_nk, weights_nk = self.gate(x_nd)
        out_nkd = x_nd.new_zeros(*experts_nk.shape, x_nd.shape[-1])
        for e in experts_nk.unique().tolist():  # only the experts some token chose run
            token_n, slot_n = (experts_nk == e).nonzero(as_tuple=True)
            out_nkd = out_nkd.index_put((token_n, slot_n), self.experts[e](x_nd[token_n]))
        y_nd = (out_nkd.float() * weights_nk[..., None]).sum(1).to(x.dtype)
        if self.shared_experts is not None:
            y_nd = y_nd + self.shared_experts(x_nd)
        return y_nd.view(x.shape)
