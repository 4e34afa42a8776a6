"""Run folders: checked before any model loads, and never replaced silently.

``prepare_run_folder`` is the first thing ``lm sft`` and ``lm train`` do with ``--output_dir``:
a path that is a file, a folder that cannot be written (permissions, a read-only file system) or a
full disk is one message naming the folder and the fix; a folder that already holds a run
(``metrics.jsonl`` or a ``checkpoint-STEP``) is refused unless the run is resumed, or
``--overwrite true`` asks to remove that run's outputs first (only the files a run writes; anything
else in the folder is left alone).

One writer per folder: the main process of a run holds ``.dipod-run.lock`` (its pid and host) from
``prepare_run_folder`` until the run ends (``release_run_lock``, or its exit). A second run, or a
``--resume`` beside a run whose processes still live, is refused naming the holder; a lock whose
process is gone (a crash, kill -9) is stale and taken over. A holder on another host cannot be
checked from here: it is refused, and the message says which file to delete once that run is gone.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

# what a run writes into its folder (removed by --overwrite); checkpoint folders match _RUN_DIR_RE
RUN_FILES = ("metrics.jsonl", "config.yaml", "sft_result.json", "plot.png", "completions.jsonl")
RUN_DIRS = ("tb", "model", "final_model")
_RUN_DIR_RE = re.compile(r"^\.?checkpoint-\d+(\..*)?$")
MIN_FREE_BYTES = 1 << 20
LOCK_FILE = ".dipod-run.lock"


class RunFolderError(ValueError):
    """``--output_dir`` cannot hold this run; the message names the folder and the fix."""


def _disk_full_message(folder: Path) -> str:
    return (f"the disk holding {folder} is full (no space left on device); free some space or choose an "
            "--output_dir on another disk")


def check_writable(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and prove a file can be written in it; returns it as a Path."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output_dir {out} is a file, not a folder; choose a folder path for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dipod-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RunFolderError(_disk_full_message(out)) from None
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise RunFolderError(f"--output_dir {out}: a part of the path is a file, not a folder; choose "
                                 "another path") from None
        raise RunFolderError(f"--output_dir {out} cannot be written ({exc.strerror or exc}); check its "
                             "permissions, or choose a folder on a writable disk") from None
    if shutil.disk_usage(out).free < MIN_FREE_BYTES:
        raise RunFolderError(_disk_full_message(out))
    return out


def run_outputs(output_dir: Path) -> list[Path]:
    """The files and folders of a run already in ``output_dir`` (empty for a fresh folder)."""
    if not output_dir.is_dir():
        return []
    return sorted(child for child in output_dir.iterdir()
                  if (child.name in RUN_FILES and child.is_file()) or (child.name in RUN_DIRS and child.is_dir())
                  or (_RUN_DIR_RE.match(child.name) and child.is_dir()))


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) and {"pid", "host"} <= set(holder) else None
    except (OSError, ValueError):
        return None  # torn by a crash while it was written: nobody holds it


def _alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def hold_run_lock(out: Path) -> None:
    """Take ``out``'s lock for this process (again, if it holds it already); refuse a live holder."""
    lock, me = out / LOCK_FILE, _me()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _holder(lock)
            if holder == me:
                return
            if holder is not None and _alive(holder):
                raise RunFolderError(
                    f"{out} is in use by another run (process {holder['pid']} on {holder['host']}); wait for it to "
                    f"end or stop every one of its processes, or choose another --output_dir (if that run is gone "
                    f"for good, delete {lock})") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        atexit.register(release_run_lock, out)
        return
    raise RunFolderError(f"{out}: another run keeps taking its lock {lock}; choose another --output_dir")


def release_run_lock(output_dir: str | Path) -> None:
    """Give ``output_dir``'s lock back if this process holds it (a no-op otherwise)."""
    lock = Path(output_dir).expanduser() / LOCK_FILE
    if _holder(lock) == _me():
        lock.unlink(missing_ok=True)


def prepare_run_folder(output_dir: str | Path, *, resuming: bool, overwrite: bool, resume_flag: str,
                       remove: bool = True) -> Path:
    """Check ``output_dir`` for a new or resumed run (see the module docstring); returns it as a Path.

    ``resume_flag`` is how this command spells a resume (for the message); ``remove=False`` only
    checks (the non-main processes of a distributed run, which must not delete nor take the lock).
    """
    if resuming and overwrite:
        raise RunFolderError(f"{resume_flag} continues the run in {output_dir} and --overwrite true replaces it; "
                             "pass only one of them")
    out = check_writable(output_dir)
    if remove:
        hold_run_lock(out)
    held = run_outputs(out)
    holds_run = any(p.name == "metrics.jsonl" or p.name.startswith("checkpoint-") for p in held)
    if resuming or not holds_run:
        return out
    if not overwrite:
        names = ", ".join(p.name for p in held[:6]) + (", ..." if len(held) > 6 else "")
        raise RunFolderError(f"{out} already holds a run ({names}); pass {resume_flag} to continue it, "
                             "--overwrite true to replace it, or choose a new --output_dir")
    if remove:
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out
