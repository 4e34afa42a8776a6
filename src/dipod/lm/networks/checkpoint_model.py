"""LLaDA, Dream and SDAR checkpoints as OUR network with its own parameters: no hub code, any transformers version.

``load_checkpoint_model(model_dir, dtype)`` reads a hub snapshot's ``config.json`` and safetensors
(one file or a sharded index) into a ``CheckpointNetwork``. The family's ``spec`` and ``sizes``
(``llada.py``, ``dream.py``) give the name (the hub's) and shape of every tensor the network needs;
the safetensors headers are checked against that list before any weight is read, so a missing,
unexpected or mis-shaped tensor is an error naming it, and only then are the tensors assigned.

``save_pretrained(dir)`` writes the same format back: ``config.json`` as read, the weights under the
hub's names and, when the source snapshot had them, its own code files, so a saved model loads
again here and, for users of the hub code, with ``trust_remote_code=True`` on transformers 4.56-4.57.

Module names are ours and the same for every family (LoRA targets name them): ``embed``,
``layers.N.{attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, gate_proj, up_proj, down_proj}`` (and
``q_norm``, ``k_norm`` for SDAR),
``final_norm`` and ``head`` (absent when the head is tied to ``embed``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from dipod.lm.networks import dream, llada, llada2, sdar
from dipod.lm.networks.moe import GatedMLP, MoE, make_router
from dipod.lm.networks.transformer import Layer, Network, NormWeight

# config.json model_type (lower case) -> spec / sizes / paths (SDAR's module reads dense and MoE configs)
FAMILIES = {"llada": llada, "dream": dream, "sdar": sdar, "sdar_moe": sdar, "llada2_moe": llada2}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters write; recomputed, never read
CODE_FILES = ("*.py", "generation_config.json")  # the hub code, copied on save for trust_remote_code users


class ModelConfig(SimpleNamespace):
    """``config.json`` as attributes; ``to_dict`` gives it back unchanged (peft reads ``model.config`` so)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


def family_of(config: ModelConfig) -> str:
    model_type = str(getattr(config, "model_type", "")).lower()
    if model_type not in FAMILIES:
        raise ValueError(f"config.json model_type={model_type or None!r} has no network in dipod; supported "
                         f"families: {sorted(FAMILIES)} (and Hugging Face masked LMs through transformers)")
    return model_type


class CheckpointNetwork(Network):
    """A LLaDA / Dream / SDAR network whose parameters are its own; built on the meta device, then assigned."""

    supports_gradient_checkpointing = True
    _no_split_modules = ["Layer"]  # FSDP's transformer-based auto wrap shards per decoder layer

    def __init__(self, config: ModelConfig, source: Path | None = None):
        family = FAMILIES[family_of(config)]
        spec, size = family.spec(config), family.sizes(config)
        d, hd, mlp = size["d_model"], spec.head_dim, size["mlp_hidden"]

        def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=bias)

        def mlp(width: int) -> dict:
            return dict(gate_proj=linear(d, width, size["other_bias"]), up_proj=linear(d, width, size["other_bias"]),
                        down_proj=linear(width, d, size["other_bias"]))

        def attention() -> dict:
            if size.get("fused_qkv"):
                return dict(qkv_proj=linear(d, (spec.n_heads + 2 * spec.n_kv_heads) * hd, size["qkv_bias"]))
            return dict(q_proj=linear(d, spec.n_heads * hd, size["qkv_bias"]),
                        k_proj=linear(d, spec.n_kv_heads * hd, size["qkv_bias"]),
                        v_proj=linear(d, spec.n_kv_heads * hd, size["qkv_bias"]))

        def feed_forward(i: int) -> dict:
            moe = size.get("moe")
            if i not in size.get("moe_layers", ()):
                return mlp(size["mlp_hidden"])
            router = make_router(moe, d)
            shared = GatedMLP(**mlp(size["shared_hidden"])) if size.get("shared_hidden") else None
            return dict(moe=MoE(router, [GatedMLP(**mlp(size["moe_hidden"])) for _ in range(moe.num_experts)], shared))

        with torch.device("meta"):
            layers = [Layer(spec, attn_norm=NormWeight(torch.empty(d)), **attention(),
                            o_proj=linear(spec.n_heads * hd, d, size["other_bias"]),
                            mlp_norm=NormWeight(torch.empty(d)), **feed_forward(i),
                            q_norm=NormWeight(torch.empty(hd)) if spec.qk_norm else None,
                            k_norm=NormWeight(torch.empty(hd)) if spec.qk_norm else None)
                      for i in range(spec.n_layers)]
            head = None if spec.tied_head else linear(d, size["vocab"], False)
            super().__init__(spec, nn.Embedding(size["vocab"], d), layers, NormWeight(torch.empty(d)), head)
        self.config, self.source = config, source
        self.hub_names = _hub_names(family.paths(spec, size), self)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module | None:
        return self.head  # None when tied: the embedding matrix is then the head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer in backward (torch.utils.checkpoint, non-reentrant)."""
        self.activation_checkpointing = True

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """config.json, model.safetensors (hub names) and the source snapshot's code files."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {self.hub_names[name]: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        if self.source is not None:
            for pattern in CODE_FILES:
                for file in self.source.glob(pattern):
                    shutil.copy2(file, out / file.name)


def _hub_names(paths: dict, network: Network) -> dict[str, str]:
    """{our tensor name: the hub checkpoint's tensor name} for every tensor of ``network``'s state."""
    prefixes = {"embed": paths["embed"], "final_norm": paths["final_norm"]}
    if paths["head"] is not None:
        prefixes["head"] = paths["head"]
    for i, layer in enumerate(paths["layers"]):
        prefixes.update({f"layers.{i}.{part}": path for part, path in layer.items()})
    names = {}
    for name in network.state_dict():  # parameters and persistent buffers (a router's expert_bias)
        module, leaf = name.rsplit(".", 1)
        names[name] = f"{prefixes[module]}.{leaf}"
    return names


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    for file in files:
        if not (model_dir / file).is_file():
            raise FileNotFoundError(f"{model_dir / file} is missing; the model is read from the snapshot's "
                                    "safetensors (download the whole repository again)")
    return [model_dir / f for f in files]


def check_tensor_shapes(expected: dict[str, tuple], found: dict[str, tuple], where: str) -> None:
    """Every expected tensor present with its shape, nothing else: or a ValueError naming the tensors."""
    found = {n: s for n, s in found.items() if not n.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{n} has shape {list(found[n])}, config.json implies {list(expected[n])}"
             for n in sorted(set(expected) & set(found)) if tuple(found[n]) != tuple(expected[n])]
    problems = ([f"missing tensor {n}" for n in missing[:5]] + [f"unexpected tensor {n}" for n in extra[:5]]
                + wrong[:5])
    if problems:
        counts = f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} mis-shaped)"
        raise ValueError(f"{where}: the weights do not fit the network its config.json describes {counts}: "
                         + "; ".join(problems) + ". Check that config.json and the safetensors belong together")


def load_checkpoint_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> CheckpointNetwork:
    """Our network with the snapshot's weights (checked by name and shape before any is read)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = ModelConfig(**json.loads((model_dir / "config.json").read_text()))
    model = CheckpointNetwork(config, source=model_dir)
    files = checkpoint_files(model_dir)
    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    expected = {model.hub_names[name]: tuple(p.shape) for name, p in model.state_dict().items()}
    check_tensor_shapes(expected, found, str(model_dir))
    ours = {hub: name for name, hub in model.hub_names.items()}
    state = {}
    for file in files:
        state.update({ours[n]: t.to(dtype) for n, t in load_file(str(file)).items() if n in ours})
    model.load_state_dict(state, strict=True, assign=True)
    return model
