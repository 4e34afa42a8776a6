"""benchmarks/lm_stop_at_eos.py on a few items: its counts follow from the decodes it reports."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lm_stop_at_eos  # noqa: E402


def test_stop_at_eos_benchmark_counts_and_agreement_on_a_few_items():
    torch.set_num_threads(1)
    args = SimpleNamespace(threshold=0.7, block_length=4, batch_size=3, limit=6, repeats=1)
    part = lm_stop_at_eos.decoding_part(args)
    fixed, threshold = part["runs"]
    assert fixed["forward_passes"] == 2 * 16 and fixed["row_forwards"] == 6 * 16  # 2 batches of 3, 16 steps
    for run in (fixed, threshold):
        # greedy: the graded completions and so the accuracy are the same; the rows stop after their answer
        assert run["same_completions"] and run["accuracy"] == run["accuracy_stopped"]
        assert run["row_forwards_stopped"] < run["row_forwards"]
        assert run["forward_passes_stopped"] <= run["forward_passes"]
        assert run["row_forward_reduction"] == round(run["row_forwards"] / run["row_forwards_stopped"], 3)
    page = lm_stop_at_eos.markdown({"command": "c", "machine": "m", "started": "s", "decoding": part})
    assert f"| fixed schedule | 32 / {fixed['forward_passes_stopped']} | 96 / {fixed['row_forwards_stopped']} |" in page
