"""`dipod.run_folder` at its edges, called directly (the end-to-end refusals of `lm sft`, `lm train` and
`control train` are in test_run_guards.py): each refusal's message in full (it names the folder, the
flag as the command line spells it and the fix), what `--overwrite true` removes, and the lock that
keeps one writer per folder — a live holder is refused and never signalled, a malformed or vanishing
lock never ends in a traceback, the lock is given back at exit and gets the user's umask."""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dipod import run_folder
from dipod.run_folder import (LOCK_FILE, MIN_FREE_BYTES, RunFolderError, check_writable, hold_run_lock,
                              prepare_run_folder, release_run_lock)


def prepare(out: Path, *, resuming: bool = False, overwrite: bool = False) -> Path:
    return prepare_run_folder(out, resuming=resuming, overwrite=overwrite, resume_flag="--resume latest")


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(RunFolderError) as error:
        call(*args, **kwargs)
    return str(error.value)


def full_disk_message(out: Path) -> str:
    return (f"the disk holding {out} is full (no space left on device); free some space or choose an "
            "--output_dir on another disk")


@pytest.fixture
def live_process():
    """A process of this user that is alive and is not this one (a run's rank, for the lock)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


# ------------------------------------------------------------------ the folder

def test_a_new_nested_output_dir_is_created_and_one_mib_free_is_enough(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "exp1" / "seed0"  # parents created, as `mkdir -p`
    assert prepare(out) == out and out.is_dir()
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # the write probe is gone
    usage = type("Usage", (), {"total": 1 << 30, "used": 0, "free": MIN_FREE_BYTES})
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage)
    assert check_writable(tmp_path / "edge") == tmp_path / "edge"  # exactly the minimum: accepted
    usage.free = MIN_FREE_BYTES - 1
    assert refusal(check_writable, tmp_path / "edge") == full_disk_message(tmp_path / "edge")


def test_a_disk_that_is_full_when_probed_is_named_in_full(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", no_space)
    assert refusal(prepare, tmp_path / "run") == full_disk_message(tmp_path / "run")


def test_a_path_through_a_file_is_named_in_full(tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    assert refusal(check_writable, out) == (f"--output_dir {out}: a part of the path is a file, not a folder; "
                                            "choose another path")


def test_an_existing_folder_that_cannot_be_written_is_refused_with_the_reason(tmp_path):
    """The write probe goes into the folder itself (a writable temp dir elsewhere proves nothing)."""
    if os.geteuid() != 0:
        out = tmp_path / "locked"
        out.mkdir()
        out.chmod(0o555)
    else:
        out = Path("/sys")  # root ignores permissions; sysfs refuses new files even to root
    try:
        os.close(tempfile.mkstemp(dir=out)[0])
        pytest.skip(f"{out} is writable here")
    except OSError as exc:
        reason = exc.strerror
    assert refusal(check_writable, out) == (f"--output_dir {out} cannot be written ({reason}); check its "
                                            "permissions, or choose a folder on a writable disk")


def test_resume_and_overwrite_together_are_refused_in_full(tmp_path):
    assert refusal(prepare, tmp_path / "run", resuming=True, overwrite=True) == (
        f"--resume latest continues the run in {tmp_path / 'run'} and --overwrite true replaces it; pass only one "
        "of them")


@pytest.mark.parametrize("count,listed", [
    (6, "checkpoint-1, checkpoint-2, checkpoint-3, checkpoint-4, checkpoint-5, checkpoint-6"),
    (7, "checkpoint-1, checkpoint-2, checkpoint-3, checkpoint-4, checkpoint-5, checkpoint-6, ..."),
])
def test_a_folder_holding_a_run_names_at_most_six_of_its_outputs(tmp_path, count, listed):
    out = tmp_path / "run"
    for step in range(1, count + 1):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    assert refusal(prepare, out) == (f"{out} already holds a run ({listed}); pass --resume latest to continue it, "
                                     "--overwrite true to replace it, or choose a new --output_dir")


def test_overwrite_removes_the_runs_outputs_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    for folder in ("checkpoint-2", ".checkpoint-3.tmp", "tb", "model", "final_model", "notes", "data"):
        (out / folder).mkdir(parents=True)
    for name in ("metrics.jsonl", "config.yaml", "completions.jsonl", "notes.txt"):
        (out / name).write_text("x")
    (out / "checkpoint-9").write_text("a file of the user's, not a checkpoint folder")
    prepare(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "checkpoint-9", "data", "notes", "notes.txt"]


# ------------------------------------------------------------------ the lock

def test_refusing_a_second_run_never_signals_the_live_one(tmp_path, live_process, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": live_process.pid, "host": socket.gethostname()}))
    sent, kill = [], os.kill
    monkeypatch.setattr(run_folder.os, "kill", lambda pid, signal: (sent.append((pid, signal)), kill(pid, signal))[1])
    assert "in use by another run" in refusal(prepare, out, resuming=True)
    assert sent == [(live_process.pid, 0)]  # signal 0 checks that the process exists and delivers nothing


def test_a_holder_owned_by_another_user_counts_as_alive(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": socket.gethostname()}))

    def not_yours(pid, signal):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(run_folder.os, "kill", not_yours)
    assert "in use by another run (process 4242 on" in refusal(prepare, out, resuming=True)


@pytest.mark.parametrize("content", ['{"pid": 4242}', '{"host": "x"}', "[]", '["pid", "host"]', '"pid host"'])
def test_a_malformed_lock_is_nobodys_and_taken_over(tmp_path, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(content)
    prepare(out, resuming=True)
    assert json.loads((out / LOCK_FILE).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    release_run_lock(out)


def test_a_lock_that_vanishes_as_it_is_read_ends_in_one_message(tmp_path, monkeypatch):
    """Other starters race for the lock: each try finds it taken, then gone when read (never a
    FileNotFoundError), and after the last try the run is refused naming the lock."""
    out = tmp_path / "run"
    out.mkdir()

    def taken(*args, **kwargs):
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(run_folder.os, "open", taken)
    assert refusal(hold_run_lock, out) == (f"{out}: another run keeps taking its lock {out / LOCK_FILE}; choose "
                                           "another --output_dir")


def test_the_lock_is_given_back_at_exit_and_quietly_if_already_gone(tmp_path, monkeypatch):
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda function, *args: at_exit.append((function, args)))
    out = tmp_path / "run"
    prepare(out)
    assert (out / LOCK_FILE).exists() and len(at_exit) == 1
    function, args = at_exit[0]
    function(*args)  # what the interpreter runs at exit
    assert not (out / LOCK_FILE).exists()
    # deleted between the read and the unlink (by a user following the "delete the lock" advice, say)
    monkeypatch.setattr(run_folder, "_holder", lambda lock: run_folder._me())
    release_run_lock(out)


def test_the_lock_gets_the_users_umask(tmp_path):
    before = os.umask(0o022)
    try:
        prepare(tmp_path / "run")
    finally:
        os.umask(before)
    assert (tmp_path / "run" / LOCK_FILE).stat().st_mode & 0o777 == 0o644
    release_run_lock(tmp_path / "run")
