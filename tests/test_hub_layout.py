"""The suite's own hub-layout checkpoints (tests/hub_layout.py): hub-faithful, codeless, reproducible.

Beside ../shared/models, the built LLaDA and Dream folders are compared with the hub-shaped snapshots
there (tensor names and shapes, config.json, tokenizer ids, special tokens, chat format): the tests that
run on the built folders then run on what a user's download holds.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hub_layout import build_hub_layout  # noqa: E402
from hub_snapshots import SNAPSHOTS, needs_snapshots  # noqa: E402

from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.networks.checkpoint_model import CheckpointNetwork  # noqa: E402

FAMILIES = ("llada", "dream")
NOT_LAYOUT = ("auto_map", "transformers_version")  # the hub code's entry points, the writer's version
CONVERSATION = [{"role": "user", "content": " 3+4? "}, {"role": "assistant", "content": "7"},
                {"role": "user", "content": "and 5+6?"}]


def tensor_shapes(folder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def config_without_code(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in NOT_LAYOUT}


@needs_snapshots
@pytest.mark.parametrize("family", FAMILIES)
def test_the_built_checkpoints_have_the_hub_snapshots_layout(hub_models, family):
    from transformers import PreTrainedTokenizerFast

    built, hub = hub_models[family], SNAPSHOTS[family]
    assert tensor_shapes(built) == tensor_shapes(hub)
    assert config_without_code(built) == config_without_code(hub)
    ours, theirs = (PreTrainedTokenizerFast.from_pretrained(str(f), local_files_only=True) for f in (built, hub))
    assert ours.get_vocab() == theirs.get_vocab() and len(ours.get_vocab()) == 128
    for role in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
        assert getattr(ours, role) == getattr(theirs, role), role
    assert ours.padding_side == theirs.padding_side == "left"
    prompt = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert prompt == theirs.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert ours(prompt, add_special_tokens=False)["input_ids"] == theirs(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_built_checkpoints_carry_no_code_and_load_into_our_network(hub_models, family):
    folder = hub_models[family]
    assert not list(folder.glob("*.py")) and "auto_map" not in json.loads((folder / "config.json").read_text())
    lm = load_masked_lm(folder)
    assert isinstance(lm.model, CheckpointNetwork) and lm.family.name == family
    # LLaDA's tokenizer names no mask token: its id is config.json's; Dream's tokenizer names <|mask|>
    assert lm.tokenizer.mask_token == {"llada": None, "dream": "<|mask|>"}[family]
    assert lm.tokenizer.convert_ids_to_tokens(lm.mask_id) == {"llada": "<|mdm_mask|>", "dream": "<|mask|>"}[family]
    assert lm.pad_id == lm.eos_id and lm.tokenizer.decode([lm.eos_id]) == "<|endoftext|>"


def test_building_is_reproducible_from_the_seed(hub_models, tmp_path):
    from safetensors.torch import load_file

    again, other = (load_file(str(build_hub_layout("dream", tmp_path / f"s{seed}", seed=seed) / "model.safetensors"))
                    for seed in (0, 1))
    first = load_file(str(hub_models["dream"] / "model.safetensors"))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
