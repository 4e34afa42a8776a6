"""dipod.checkpoint's promises beyond crashes (tests/test_checkpoint_crash.py): every spelling of
``--resume`` has one meaning; pruning keeps the newest ``keep_last``; a save is written under a temp
name in the output folder and replaces an earlier save of its step whole; a full disk is told apart
from other failures; every refusal and warning is one message naming the folder and the fix."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import dipod.checkpoint as ckpt
from dipod.checkpoint import (CorruptCheckpointError, NonFiniteCheckpointError, copy_weights, latest_checkpoint,
                              latest_intact_checkpoint, list_checkpoints, load_checkpoint, resume_checkpoint,
                              resume_target, save_checkpoint)

W = {"w": torch.ones(1000)}  # 4000 bytes of float32


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("value, meaning", [
    (None, None), (False, None), ("", None), ("  ", None), ("false", None), ("False", None), (" none ", None),
    ("NULL", None), ("no", None),
    (True, "latest"), ("latest", "latest"), ("Auto", "latest"), (" TRUE ", "latest"),
    (" runs/a b/checkpoint-4 ", "runs/a b/checkpoint-4"), ("runs/Latest", "runs/Latest"),
])
def test_every_resume_spelling_means_no_resume_the_newest_checkpoint_or_a_path(value, meaning):
    assert resume_target(value) == meaning


@pytest.mark.parametrize("keep_last, kept", [(None, [3, 4]), (0, [1, 2, 3, 4]), (1, [4]), (3, [2, 3, 4])])
def test_pruning_keeps_the_newest_keep_last_checkpoints_and_zero_keeps_all(tmp_path, keep_last, kept):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, W, {}, {}, **({} if keep_last is None else {"keep_last": keep_last}))
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in kept]


def test_a_save_writes_under_a_temp_name_in_the_output_folder_creating_it_with_its_parents(tmp_path, monkeypatch):
    """The temp folder sits beside the checkpoint (one filesystem), so sealing it is one atomic rename."""
    written, real = [], ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda tensors, filename: written.append(Path(filename)) or
                        real(tensors, filename))
    out = tmp_path / "new" / "run"
    save_checkpoint(out, 1, W, {}, {})
    assert written[0].parent.parent == out and written[0].parent.name.startswith(".checkpoint-1.")
    assert _names(out) == ["checkpoint-1"]


def test_saving_a_step_again_replaces_it_whole_even_after_a_killed_replacement(tmp_path):
    save_checkpoint(tmp_path, 1, W, {"v": 1}, {})
    (tmp_path / ".checkpoint-1.old").mkdir()  # a replacement of checkpoint-1 killed after moving it aside
    (tmp_path / ".checkpoint-1.old" / ckpt.META).write_text("{}")
    (tmp_path / ".checkpoint-7.tmp").write_text("")  # a stray file named like a temp folder
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1000)}, {"v": 2}, {})
    assert _names(tmp_path) == [".checkpoint-7.tmp", "checkpoint-1"]
    weights, state, meta = load_checkpoint(tmp_path / "checkpoint-1")
    assert torch.equal(weights["w"], torch.zeros(1000)) and state == {"v": 2} and meta == {"step": 1}


def test_ctrl_c_while_the_save_clears_up_ends_as_ctrl_c_with_the_new_checkpoint_in_place(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, W, {"v": 1}, {})
    real = shutil.rmtree

    def interrupted(path, ignore_errors=False):
        if str(path).endswith(".checkpoint-1.old") and os.path.exists(str(path)):  # the old copy, moved aside
            raise KeyboardInterrupt
        return real(path, ignore_errors=ignore_errors)
    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, W, {"v": 2}, {})
    assert load_checkpoint(tmp_path / "checkpoint-1")[1] == {"v": 2}


def test_non_finite_weights_are_refused_naming_the_first_five(tmp_path):
    bad = {name: torch.tensor([float("nan")]) for name in "abcdef"}
    with pytest.raises(NonFiniteCheckpointError) as refused:
        save_checkpoint(tmp_path, 4, {"ok": torch.ones(1), **bad}, {}, {})
    assert str(refused.value) == "refusing to write a checkpoint at step 4: non-finite weights in ['a', 'b', 'c', 'd', 'e']"


def _failing_save(monkeypatch, exc, free=None):
    """save_file fails with ``exc``; the output folder's disk has ``free`` bytes (None: the check fails)."""
    def save_file(tensors, filename):
        raise exc

    def disk_usage(path):
        if free is None:
            raise OSError("statvfs failed")
        return type("Usage", (), {"free": free if Path(path).name == "run" else 10**15})()
    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", disk_usage)


@pytest.mark.parametrize("exc, free", [(RuntimeError("write failed"), 3999), (OSError(errno.ENOSPC, "disk"), 10**15)])
def test_a_save_that_runs_out_of_space_says_so_in_one_message(tmp_path, monkeypatch, exc, free):
    """safetensors reports a full disk as a bare RuntimeError: the free space (below the weights'
    4000 bytes) tells; an ENOSPC error tells by itself."""
    out = tmp_path / "run"
    save_checkpoint(out, 1, W, {}, {})
    _failing_save(monkeypatch, exc, free)
    with pytest.raises(OSError) as refused:
        save_checkpoint(out, 2, W, {}, {})
    assert refused.value.errno == errno.ENOSPC and str(refused.value) == (
        f"[Errno 28] no space left on the disk holding {out} while writing checkpoint-2 ({type(exc).__name__}: {exc}); "
        "nothing was replaced and the earlier checkpoints are intact: free some space, then resume")
    assert _names(out) == ["checkpoint-1"]


@pytest.mark.parametrize("free", [4000, None])  # room for the weights exactly; the free space cannot be read
def test_a_save_failing_for_another_reason_raises_that_reason(tmp_path, monkeypatch, free):
    _failing_save(monkeypatch, RuntimeError("write failed"), free)
    with pytest.raises(RuntimeError, match="^write failed$"):
        save_checkpoint(tmp_path / "run", 1, W, {}, {})


def test_only_sealed_checkpoint_folders_are_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 2, W, {}, {})
    for name in (".checkpoint-3.x1", "checkpoint-best", "checkpoint-4"):  # a killed save's temp dir holds meta.json
        (tmp_path / name).mkdir()
    for name in (".checkpoint-3.x1", "checkpoint-best"):
        (tmp_path / name / ckpt.META).write_text('{"step": 3}')
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"] and latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_an_incomplete_or_unreadable_checkpoint_is_one_message_naming_the_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 1, W, {}, {})
    (path / ckpt.STATE).unlink()
    with pytest.raises(FileNotFoundError) as incomplete:
        load_checkpoint(path)
    assert str(incomplete.value) == (f"checkpoint {path} is incomplete (missing ['trainer_state.pt']); point --resume "
                                     "at a checkpoint-STEP folder")
    path = save_checkpoint(tmp_path, 2, W, {}, {})
    monkeypatch.setattr(ckpt, "load_file", lambda f: (_ for _ in ()).throw(ValueError("header " + "x" * 300)))
    with pytest.raises(CorruptCheckpointError) as corrupt:
        load_checkpoint(path)
    assert str(corrupt.value) == (f"checkpoint file {path / ckpt.WEIGHTS} cannot be read (ValueError: header "
                                  f"{'x' * 193}); it is truncated or damaged: resume from an earlier checkpoint-STEP "
                                  "folder, or delete this one")


def test_skipped_corrupt_checkpoints_are_named_in_the_log_and_in_the_refusal(tmp_path, caplog):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, W, {}, {}, keep_last=3)
    for step in (2, 3):
        (tmp_path / f"checkpoint-{step}" / ckpt.META).write_text("{")
    with caplog.at_level(logging.WARNING, logger="dipod.checkpoint"):
        assert latest_intact_checkpoint(tmp_path)[0] == tmp_path / "checkpoint-1"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].endswith("or delete this one; trying the one before it")
    assert messages[-1] == f"resuming from {tmp_path / 'checkpoint-1'}: the newer checkpoint-3, checkpoint-2 could not be read"
    (tmp_path / "checkpoint-1" / ckpt.META).write_text("{")
    with pytest.raises(CorruptCheckpointError) as none_left:
        latest_intact_checkpoint(tmp_path)
    assert str(none_left.value) == (f"{tmp_path}: no intact checkpoint (checkpoint-3, checkpoint-2, checkpoint-1 cannot "
                                    "be read); start a new run in a new --output_dir")


def test_resume_of_an_empty_folder_or_a_wrong_path_says_what_it_does(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dipod.checkpoint"):
        assert resume_checkpoint(tmp_path, "latest") is None
    assert caplog.records[-1].getMessage() == f"--resume: no checkpoint in {tmp_path} yet; starting from step 0"
    with pytest.raises(FileNotFoundError) as refused:
        resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))
    assert str(refused.value) == (f"--resume {tmp_path / 'checkpoint-9'}: not a checkpoint folder (expected "
                                  "OUTPUT_DIR/checkpoint-STEP, or --resume alone for the newest one)")


def test_weights_that_do_not_fit_the_model_are_refused_naming_three_of_each(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1, bias=False) for _ in range(4)])
    with pytest.raises(ValueError) as unexpected:  # only unexpected names
        copy_weights(model, {"0.weight": torch.ones(1, 1), "x.weight": torch.ones(1)}, tmp_path, "fix it")
    assert str(unexpected.value) == f"checkpoint {tmp_path} does not fit this model (missing [], unexpected ['x.weight']); fix it"
    required = {f"{i}.weight" for i in range(4)}
    with pytest.raises(ValueError) as missing:  # only missing names
        copy_weights(model, {}, tmp_path, "fix it", required=required)
    assert str(missing.value) == (f"checkpoint {tmp_path} does not fit this model (missing ['0.weight', '1.weight', "
                                  "'2.weight'], unexpected []); fix it")
    many = {f"x{i}": torch.ones(1) for i in range(4)}
    with pytest.raises(ValueError, match=r"unexpected \['x0', 'x1', 'x2'\]\); fix it$"):
        copy_weights(model, many, tmp_path, "fix it")


def test_a_folder_the_save_cannot_remove_leaves_the_new_checkpoint_sealed(tmp_path, monkeypatch):
    """On a shared disk an earlier checkpoint may hold a file of another user: removing it (pruning, or
    the replaced copy of a step saved again) fails, and the run goes on with the new checkpoint in place."""
    save_checkpoint(tmp_path, 1, W, {"v": 1}, {})
    save_checkpoint(tmp_path, 2, W, {"v": 2}, {})
    real = shutil.rmtree

    def not_ours(path, ignore_errors=False):
        if os.path.basename(str(path)) in ("checkpoint-1", ".checkpoint-2.old") and os.path.exists(str(path)):
            if not ignore_errors:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return None
        return real(path, ignore_errors=ignore_errors)
    monkeypatch.setattr(ckpt.shutil, "rmtree", not_ours)
    save_checkpoint(tmp_path, 2, W, {"v": 3}, {})  # saved again: the replaced copy stays as .old
    save_checkpoint(tmp_path, 3, W, {"v": 4}, {}, keep_last=1)  # pruning checkpoint-1 and 2: 1 stays
    assert _names(tmp_path) == [".checkpoint-2.old", "checkpoint-1", "checkpoint-3"]
    assert load_checkpoint(tmp_path / "checkpoint-3")[1] == {"v": 4}
