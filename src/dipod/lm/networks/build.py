"""Assemble a ``Network`` from a family's weight names: sharing a loaded hub model's modules, or from tensors.

A family module (``llada.py``, ``dream.py``) gives a ``NetworkSpec`` read from the model config
and ``paths``: for each part of our network, the module path of the same part in the hub model
(``model.transformer.blocks.0.q_proj``); the weight names are those paths plus ``.weight`` /
``.bias``, as in the hub's ``model.safetensors``.

Sharing (``from_hub_module``) copies nothing: the network calls the hub's own ``nn.Linear`` /
LoRA / embedding modules and reads its norm weights, so training updates and adapters apply to
both at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import Tensor, nn

from dipod.lm.networks.transformer import Layer, Network, NetworkSpec

LAYER_PARTS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")


class NormWeight(nn.Module):
    """Holds an RMSNorm weight read from a checkpoint (the network applies the norm itself)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def assemble(spec: NetworkSpec, paths: dict, module_at: Callable[[str, str], nn.Module]) -> Network:
    """``paths``: {"embed", "final_norm", "head" (None when tied), "layers": [{part: path}]}."""
    layers = [Layer(spec, **{part: module_at(layer[part], part) for part in LAYER_PARTS})
              for layer in paths["layers"]]
    head = None if paths["head"] is None else module_at(paths["head"], "head")
    return Network(spec, module_at(paths["embed"], "embed"), layers, module_at(paths["final_norm"], "final_norm"),
                   head)


def shared_modules(root: nn.Module) -> Callable[[str, str], nn.Module]:
    def module_at(path: str, part: str) -> nn.Module:
        return root.get_submodule(path)
    return module_at


def modules_from_tensors(tensors: dict[str, Tensor]) -> Callable[[str, str], nn.Module]:
    def module_at(path: str, part: str) -> nn.Module:
        name = f"{path}.weight"
        if name not in tensors:
            raise KeyError(f"checkpoint has no tensor {name!r} (needed for the network's {part!r})")
        weight, bias = tensors[name], tensors.get(f"{path}.bias")
        if part.endswith("norm"):
            return NormWeight(weight)
        if part == "embed":
            return nn.Embedding.from_pretrained(weight, freeze=True)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return linear
    return module_at


def read_checkpoint(model_dir: str | Path, dtype: torch.dtype) -> tuple[SimpleNamespace, dict[str, Tensor]]:
    """``(config, tensors)`` of a hub snapshot: ``config.json`` and its (possibly sharded) safetensors."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    tensors: dict[str, Tensor] = {}
    for file in files:
        if not (model_dir / file).is_file():
            raise FileNotFoundError(f"{model_dir / file} is missing; the network reads the snapshot's safetensors")
        tensors.update({k: t.to(dtype) for k, t in load_file(str(model_dir / file)).items()})
    return config, tensors
