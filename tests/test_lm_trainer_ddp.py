"""CI smoke test: `dipod lm train`'s loop under a real 2-process CPU `accelerate launch` (gloo DDP)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dipod.advantages import group_relative_advantages
from dipod.runlog import read_metrics

WORKER = Path(__file__).with_name("lm_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate's launcher is not installed")
@pytest.mark.parametrize("changes", [
    {},
    # JustGRPO + DiPOD: checkpointed left-to-right chunks recomputed in backward under DDP, bounds beside them
    pytest.param({"estimator": "justgrpo", "temperature": 1.0, "num_iterations": 1, "gen_length": 8, "block_length": 8,
                  "max_tokens_per_forward": 200}, marks=pytest.mark.slow, id="justgrpo"),
], ids=lambda c: c.get("estimator", "fpo"))
def test_two_cpu_processes_end_with_identical_parameters(tmp_path, changes):
    from dipod.lm.model import build_tiny_model, load_masked_lm

    model = build_tiny_model(tmp_path / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_positions=128)
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # accelerate's --cpu flag starts one process without mpirun; ACCELERATE_USE_CPU with the
    # torchrun launcher gives gloo DDP over CPU processes.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(WORKER), str(tmp_path / "run"),
           str(model), json.dumps(changes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = load_file(str(tmp_path / "run" / "rank0.safetensors")), load_file(str(tmp_path / "run" / "rank1.safetensors"))
    params = [k for k in rank0 if k.startswith("param/")]
    assert params and all(torch.equal(rank0[k], rank1[k]) for k in params)
    initial = dict(load_masked_lm(model).model.named_parameters())
    assert any(not torch.equal(rank0[k], initial[k.removeprefix("param/")]) for k in params)  # it trained

    for step in range(2):
        all0, all1 = rank0[f"all_rewards_{step}"], rank1[f"all_rewards_{step}"]
        assert torch.equal(all0, all1) and all0.shape == (12, 1) and all0.std() > 0
        assert torch.equal(torch.cat([rank0[f"local_rewards_{step}"], rank1[f"local_rewards_{step}"]]), all0)
        expected = group_relative_advantages(all0[:, 0], group_size=4)
        assert torch.equal(torch.cat([rank0[f"adv_{step}"], rank1[f"adv_{step}"]]), expected)

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and "gap_lower_bound" in rows[2]
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
