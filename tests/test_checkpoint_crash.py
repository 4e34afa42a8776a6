"""Checkpoints under crashes: a save interrupted mid-write (an exception, or a real ``kill -9``)
leaves the previous checkpoint intact and loadable, and no half-written folder or temp dir behind;
a corrupt newest checkpoint is named and the newest intact one is used."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import dipod.checkpoint as ckpt
from dipod.checkpoint import (CorruptCheckpointError, latest_checkpoint, latest_intact_checkpoint, list_checkpoints,
                              load_checkpoint, save_checkpoint)

WEIGHTS_1 = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([0.5])}


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _half_write_then(exc: BaseException):
    """A ``save_file`` that writes half of a real safetensors file and then fails with ``exc``."""
    real = ckpt.save_file

    def crashing(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise exc
    return crashing


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")])
@pytest.mark.parametrize("step", [2, 1])  # a new step, and overwriting the existing one
def test_a_save_interrupted_mid_write_keeps_the_previous_checkpoint_and_leaves_nothing(tmp_path, monkeypatch, exc, step):
    save_checkpoint(tmp_path, 1, WEIGHTS_1, {"opt": 1}, {"config": {}})
    monkeypatch.setattr(ckpt, "save_file", _half_write_then(exc))
    with pytest.raises(type(exc)):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(2, 3), "b": torch.zeros(1)}, {"opt": 2}, {"config": {}})
    assert _entries(tmp_path) == ["checkpoint-1"]  # no checkpoint-2, no temp dir, no .old
    weights, state, meta = load_checkpoint(tmp_path / "checkpoint-1")
    assert torch.equal(weights["w"], WEIGHTS_1["w"]) and state == {"opt": 1} and meta["step"] == 1


def test_a_save_killed_by_sigkill_keeps_the_previous_checkpoint_and_the_next_save_clears_the_debris(tmp_path):
    save_checkpoint(tmp_path, 1, WEIGHTS_1, {"opt": 1}, {"config": {}})
    marker = tmp_path.parent / f"{tmp_path.name}.writing"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import torch
        import dipod.checkpoint as ckpt
        real = ckpt.save_file
        def stalled(tensors, filename, *a, **k):
            real(tensors, filename, *a, **k)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            Path({str(marker)!r}).touch()
            time.sleep(600)
        ckpt.save_file = stalled
        ckpt.save_checkpoint(Path({str(tmp_path)!r}), 2, {{"w": torch.zeros(2, 3)}}, {{}}, {{}})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the saving process never reached the write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"  # the half-written one is invisible
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))[0]["w"], WEIGHTS_1["w"])
    save_checkpoint(tmp_path, 3, WEIGHTS_1, {}, {"config": {}})
    assert _entries(tmp_path) == ["checkpoint-1", "checkpoint-3"]  # the killed save's temp dir is gone


def test_a_save_moves_in_its_own_staged_shards_and_clears_only_other_debris(tmp_path):
    """Engines that shard their state (DeepSpeed, FSDP) stage every rank's shards in a hidden
    ``.checkpoint-STEP.engine`` folder; the debris sweep must not delete the folder being moved in."""
    staged = tmp_path / ".checkpoint-2.engine"
    (staged / "pytorch_model").mkdir(parents=True)
    (staged / "pytorch_model" / "shard_rank0.pt").write_bytes(b"rank 0")
    stale = tmp_path / ".checkpoint-1.engine"  # a killed save's shards
    stale.mkdir()
    final = save_checkpoint(tmp_path, 2, {}, {"opt": 2}, {"config": {}}, extra_dirs={"engine": staged})
    assert (final / "engine" / "pytorch_model" / "shard_rank0.pt").read_bytes() == b"rank 0"
    assert _entries(tmp_path) == ["checkpoint-2"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_state", "bad_meta"])
def test_a_corrupt_newest_checkpoint_is_named_and_the_newest_intact_one_is_used(tmp_path, caplog, damage):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))}, {"step": step}, {"config": {}},
                        keep_last=3)
    newest = tmp_path / "checkpoint-3"
    if damage == "truncate_weights":
        _truncate(newest / ckpt.WEIGHTS)
    elif damage == "garbage_state":
        (newest / ckpt.STATE).write_bytes(b"not a torch file")
    else:
        (newest / ckpt.META).write_text("{ step: ")
    with pytest.raises(CorruptCheckpointError, match=str(newest)):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="dipod.checkpoint"):
        path, (weights, state, meta) = latest_intact_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint-2" and meta["step"] == 2 and torch.equal(weights["w"], torch.full((3,), 2.0))
    assert "checkpoint-3" in caplog.text and "checkpoint-2" in caplog.text
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # kept


def test_no_intact_checkpoint_names_every_corrupt_one(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {"config": {}})
    _truncate(tmp_path / "checkpoint-1" / ckpt.WEIGHTS)
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint.*checkpoint-1"):
        latest_intact_checkpoint(tmp_path)
    assert latest_intact_checkpoint(tmp_path / "empty") is None
