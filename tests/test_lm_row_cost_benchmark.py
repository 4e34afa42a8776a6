"""benchmarks/lm_row_cost.py on a few puzzles: its counts follow from the decodes it reports."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm_row_cost  # noqa: E402


def test_row_cost_counts_and_agreement_on_a_few_puzzles():
    torch.set_num_threads(1)
    args = SimpleNamespace(threshold=0.7, batch_size=3, limit=6, repeats=1)
    part = lm_row_cost.decoding_part(args)
    runs = part["runs"]
    fixed, compacted = runs["fixed schedule, batched"], runs["threshold 0.7, batched, compacted"]
    every_row, alone = runs["threshold 0.7, batched, not compacted"], runs["threshold 0.7, one at a time"]
    assert fixed["forward_passes"] == 2 * 16 and fixed["row_forwards"] == 6 * 16  # 2 batches of 3, 16 steps
    # one at a time: one row per forward; the compacted batch pays exactly that, the uncompacted more
    assert alone["row_forwards"] == alone["forward_passes"] == compacted["row_forwards"]
    assert every_row["row_forwards"] == 3 * every_row["forward_passes"] > compacted["row_forwards"]
    assert all(r["same_completions_as_compacted"] for r in (every_row, alone))
    assert compacted["row_forward_reduction_vs_fixed"] == round(fixed["row_forwards"] / compacted["row_forwards"], 3)
    page = lm_row_cost.markdown({"command": "c", "machine": "m", "started": "s", "decoding": part})
    assert "| threshold 0.7, one at a time |" in page
