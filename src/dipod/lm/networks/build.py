"""Assemble a ``Network`` from a family's weight names, sharing a loaded hub model's modules (legacy path).

A family module (``llada.py``, ``dream.py``) gives a ``NetworkSpec`` read from the model config
and ``paths``: for each part of our network, the module path of the same part in the hub model
(``model.transformer.blocks.0.q_proj``); the weight names are those paths plus ``.weight`` /
``.bias``, as in the hub's ``model.safetensors``.

Sharing (``shared_modules``) copies nothing: the network calls the hub's own ``nn.Linear`` / LoRA /
embedding modules and reads its norm weights, so training updates and adapters apply to both at
once. The default path reads checkpoints into a network of its own (``checkpoint_model.py``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from dipod.lm.networks.transformer import Layer, Network, NetworkSpec

LAYER_PARTS = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm", "gate_proj", "up_proj", "down_proj")
QK_NORM_PARTS = ("q_norm", "k_norm")  # only where ``spec.qk_norm`` (Qwen3: SDAR)


def assemble(spec: NetworkSpec, paths: dict, module_at: Callable[[str, str], nn.Module]) -> Network:
    """``paths``: {"embed", "final_norm", "head" (None when tied), "layers": [{part: path}]} with the parts
    ``LAYER_PARTS`` (and ``QK_NORM_PARTS`` where the spec has them)."""
    layers = [Layer(spec, **{part: module_at(path, part) for part, path in layer.items()})
              for layer in paths["layers"]]
    head = None if paths["head"] is None else module_at(paths["head"], "head")
    return Network(spec, module_at(paths["embed"], "embed"), layers, module_at(paths["final_norm"], "final_norm"),
                   head)


def shared_modules(root: nn.Module) -> Callable[[str, str], nn.Module]:
    def module_at(path: str, part: str) -> nn.Module:
        return root.get_submodule(path)
    return module_at
