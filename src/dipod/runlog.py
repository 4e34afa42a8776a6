"""Run outputs that must never be lost: atomic file writes and the per-step metrics log.

``metrics.jsonl`` gets one JSON object per step, flushed and fsynced line by line, so a killed run
keeps every finished step. TensorBoard (and wandb, when asked) mirror the same scalars; on resume
TensorBoard purges the killed run's events from the resumed step on, so each step shows once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


COMPLETIONS = "completions.jsonl"  # held-out completions per evaluation step (dipod.lm.monitors)


class TrainingDiverged(FloatingPointError):
    """A run stopped because its weights or losses went non-finite; the message says what happened,
    which checkpoint (if any) is intact, and what to change."""


def user_mode(path: Path, full: int = 0o666) -> Path:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would (``full`` less the user's umask):
    mkstemp / mkdtemp create 0600 / 0700, which a team sharing a cluster folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)
    return Path(path)


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """A fresh staging folder in ``parent`` with the user's normal folder permissions."""
    return user_mode(Path(tempfile.mkdtemp(prefix=prefix, dir=parent)), 0o777)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        user_mode(Path(tmp))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible instead of corrupting the file
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl, skipping a torn last line (a run killed mid-write)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (is this a run directory?)")
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Append-only ``metrics.jsonl`` plus optional TensorBoard / wandb mirrors.

    On resume pass ``resume_from_step``: rows at or after that step (written by the killed run
    after its last checkpoint) are dropped so the file matches an uninterrupted run.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True, wandb_project: str | None = None,
                 resume_from_step: int | None = None, run_config: dict | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        if wandb_project:  # before any file is touched: a refused run leaves nothing that blocks its rerun
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("--wandb_project needs wandb, which is not installed: pip install wandb (or "
                                 "leave --wandb_project out)") from None
        for log in (self.path, self.output_dir / COMPLETIONS):  # the run's step-keyed logs
            if resume_from_step is not None and log.exists():
                kept = [r for r in read_metrics(log) if int(r.get("step", -1)) < resume_from_step]
                atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in kept))
        if resume_from_step is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the killed run's events at or after the resumed step (else shown twice)
                self._tb = SummaryWriter(str(self.output_dir / "tb"), purge_step=resume_from_step)
            except ImportError:
                self._tb = None
        self._wandb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, config=run_config or {}, dir=str(self.output_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
