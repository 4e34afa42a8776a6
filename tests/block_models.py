"""Shared by the block-diffusion tests: the tiny SDAR / LLaDA2 snapshots (``../shared/models``' with their hub
code when present, else dipod's own ``build_tiny_block_model`` at the same sizes), whether the installed
transformers runs a snapshot's hub code, and padded prompt batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from hub_snapshots import MODELS

HUB = {"sdar": MODELS / "tiny-sdar", "llada2_moe": MODELS / "tiny-llada2-moe"}


def has_hub(family: str) -> bool:
    return (HUB[family] / "model.safetensors").is_file()


def tiny_snapshot(family: str, tmp_path_factory) -> Path:
    """The shared snapshot of ``family`` when present, else a tiny one built here (same sizes, random weights)."""
    from dipod.lm.networks.tiny_block import build_tiny_block_model

    return HUB[family] if has_hub(family) else build_tiny_block_model(tmp_path_factory.mktemp(family), family)


@pytest.fixture(scope="session")
def sdar_snapshot(tmp_path_factory) -> Path:
    return tiny_snapshot("sdar", tmp_path_factory)


@pytest.fixture(scope="session")
def llada2_snapshot(tmp_path_factory) -> Path:
    return tiny_snapshot("llada2_moe", tmp_path_factory)


def transformers_in(low: tuple[int, int], high: tuple[int, int]) -> bool:
    """Whether the installed transformers lies in ``[low, high)`` (major, minor)."""
    return low <= tuple(int(p) for p in transformers.__version__.split(".")[:2]) < high


def padded_batch(seed: int, width: int, pads: tuple[int, ...], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts ``[len(pads), width]`` of plain characters (ids 4..95 in both tokenizers: no special token),
    row n left-padded by ``pads[n]``."""
    ids = torch.randint(4, 96, (len(pads), width), generator=torch.Generator().manual_seed(seed))
    attn = torch.ones_like(ids)
    for n, pad in enumerate(pads):
        attn[n, :pad] = 0
    return ids.masked_fill(attn == 0, pad_id), attn
