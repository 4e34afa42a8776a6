"""Shared by the block-diffusion tests (test_lm_sdar.py, test_lm_llada2.py): the snapshots, a skip marker when
one is absent, whether the installed transformers runs a snapshot's hub code, and padded prompt batches."""

from __future__ import annotations

import pytest
import torch
import transformers

from hub_snapshots import MODELS

SDAR = MODELS / "tiny-sdar"
LLADA2 = MODELS / "tiny-llada2-moe"


def needs(snapshot) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (snapshot / "model.safetensors").is_file(), reason=f"{snapshot} is absent")


def transformers_in(low: tuple[int, int], high: tuple[int, int]) -> bool:
    """Whether the installed transformers lies in ``[low, high)`` (major, minor)."""
    return low <= tuple(int(p) for p in transformers.__version__.split(".")[:2]) < high


def padded_batch(seed: int, width: int, pads: tuple[int, ...], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts ``[len(pads), width]`` (ids below 96: plain characters), row n left-padded by ``pads[n]``."""
    ids = torch.randint(0, 96, (len(pads), width), generator=torch.Generator().manual_seed(seed))
    attn = torch.ones_like(ids)
    for n, pad in enumerate(pads):
        attn[n, :pad] = 0
    return ids.masked_fill(attn == 0, pad_id), attn
