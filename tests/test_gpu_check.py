"""benchmarks/gpu_check.py (the scale path's one-GPU check) at the tiny snapshot's shape on the CPU:
the same code path the 8B run takes, its FLOP count against the closed form, a real update. It starts
from the suite's own tiny LLaDA checkpoint (``hub_models``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_gpu_check_runs_at_the_tiny_shape_on_cpu(hub_models, tmp_path):
    torch.set_num_threads(1)
    assert gpu_check.main(["--shape", "tiny", "--device", "cpu", "--results_dir", str(tmp_path),
                           "--snapshot", str(hub_models["llada"])]) == 0
    result = json.loads((tmp_path / "gpu_check_tiny.json").read_text())
    config = json.loads((hub_models["llada"] / "config.json").read_text())
    d, f, layers, vocab = config["d_model"], config["mlp_hidden_size"], config["n_layers"], config["embedding_size"]
    # q, k, v, o (d x d each) + gate, up, down (d x f each) per layer, and the untied head
    assert result["matmul_params"] == layers * (4 * d * d + 3 * d * f) + vocab * d
    rows, draws, prompt, gen = result["rows"], result["num_draws"], result["prompt_length"], result["gen_length"]
    assert (rows, draws, prompt, gen) == (6, 4, 24, 16)  # one FPO gsm8k prompt group, the tiny lengths
    tokens = rows * draws * (prompt + gen)
    assert result["update"]["tokens"] == tokens
    expected_tflop = 4 * (layers * (4 * d * d + 3 * d * f) * tokens + vocab * d * rows * draws * gen) / 1e12
    assert result["update"]["tflop"] == pytest.approx(expected_tflop, rel=1e-12)
    rollout = result["rollout"]
    for name in ("none", "dual", "threshold_every_row", "threshold_compacted", "threshold_compacted_dual"):
        assert rollout[name]["tokens_per_s"] > 0 and rollout[name]["bound_tokens_per_s"] is None  # no GPU peak
    steps = result["diffusion_steps"]
    assert rollout["none"]["row_forwards"] == rows * rollout["none"]["forward_passes"] == rows * steps
    # full forwards: 2 FLOPs per linear-map parameter and token, the whole sequence per row-forward
    assert rollout["none"]["tflop"] == pytest.approx(2 * result["matmul_params"] * rows * steps * (prompt + gen) / 1e12,
                                                     rel=1e-12)
    every, compacted = rollout["threshold_every_row"], rollout["threshold_compacted"]
    assert every["forward_passes"] == compacted["forward_passes"]  # same decoding, fewer rows per forward
    assert every["row_forwards"] == rows * every["forward_passes"] >= compacted["row_forwards"]
    update = result["update"]
    assert update["adapter_dtype"] == "torch.float32" and result["dtype"] == "bfloat16"
    assert update["largest_adapter_change"] > 0 and update["loss"] > 0  # a real step on a finite ELBO loss
    assert update["peak_gib"] is None and update["mfu"] is None  # GPU-only figures are left out on a CPU
    assert result["planned_update_gib"] > 0
    page = (tmp_path / "gpu_check_tiny.md").read_text()
    assert "not measured (CPU)" in page and "dual KV cache" in page


def test_the_8b_shape_is_refused_on_a_cpu_before_any_weight_is_made(capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--shape", "8b", "--device", "cpu"])
    assert stop.value.code == 2 and "--shape tiny" in capsys.readouterr().err


def test_a_missing_snapshot_is_named_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--shape", "tiny", "--device", "cpu", "--snapshot", str(tmp_path)])
    assert stop.value.code == 2 and f"no LLaDA config.json (the config this check starts from) in {tmp_path}" in \
        capsys.readouterr().err
