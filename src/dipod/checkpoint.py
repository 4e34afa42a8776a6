"""Atomic, resumable checkpoints: safetensors weights + a torch file of trainer state + JSON meta.

A checkpoint is a folder ``OUTPUT_DIR/checkpoint-STEP``. It is first written completely under a
temp name and then renamed into place, so a crash leaves either the old or the new checkpoint,
never a half-written one (a ``kill -9`` can leave a hidden ``.checkpoint-*`` temp dir; the next save
removes it). Non-finite weights are refused: no NaN checkpoint is ever written. A checkpoint whose
files cannot be read raises ``CorruptCheckpointError`` naming the file; ``latest_intact_checkpoint``
then falls back to the newest one that loads, and logs which it skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dipod.runlog import atomic_write_json, make_temp_dir, user_mode

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
META = "meta.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger(__name__)


class NonFiniteCheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, overwritten, wrong format)."""


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for key, gen in (generators or {}).items():
        if key in state["generators"]:
            gen.set_state(state["generators"][key])


def save_checkpoint(output_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int = 2, extra_dirs: dict[str, Path] | None = None) -> Path:
    """Write ``checkpoint-STEP`` atomically and prune all but the newest ``keep_last``.

    ``extra_dirs`` (name -> folder already written, e.g. every rank's engine shards) are moved into the
    checkpoint before it is sealed, so they appear together with it or not at all."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteCheckpointError(f"refusing to write a checkpoint at step {step}: non-finite weights in {bad[:5]}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    moving_in = {Path(folder).resolve() for folder in (extra_dirs or {}).values()}
    for debris in output_dir.glob(".checkpoint-*"):  # temp dirs of a save that was killed (not this save's own)
        if debris.resolve() not in moving_in:
            shutil.rmtree(debris, ignore_errors=True)
    tmp = make_temp_dir(f".checkpoint-{step}.", output_dir)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        user_mode(tmp / WEIGHTS)  # safetensors writes its file 0600
        torch.save(state, tmp / STATE)
        for name, folder in (extra_dirs or {}).items():
            Path(folder).rename(tmp / name)
        atomic_write_json(tmp / META, {"step": step, **meta})
        if final.exists():
            old = output_dir / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and _out_of_space(output_dir, exc, weights):
            raise OSError(errno.ENOSPC, f"no space left on the disk holding {output_dir} while writing checkpoint-{step} "
                          f"({type(exc).__name__}: {exc}); nothing was replaced and the earlier checkpoints are intact: "
                          "free some space, then resume") from exc
        raise
    for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _out_of_space(output_dir: Path, exc: Exception, weights: dict[str, torch.Tensor]) -> bool:
    """Whether a failed save failed for lack of space (safetensors reports a full disk as a bare
    RuntimeError, so the free space is checked as well)."""
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    needed = sum(v.numel() * v.element_size() for v in weights.values())
    try:
        return shutil.disk_usage(output_dir).free < needed
    except OSError:
        return False


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for child in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        match = _CKPT_RE.match(child.name)
        if match and (child / META).is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    path = Path(path)
    missing = [name for name in (WEIGHTS, STATE, META) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {missing}); point --resume at a checkpoint-STEP folder")
    # Our own trainer state holds numpy RNG states and python tuples, hence weights_only=False;
    # only load checkpoints you wrote yourself.
    readers = ((WEIGHTS, lambda f: load_file(str(f))), (STATE, lambda f: torch.load(f, weights_only=False)),
               (META, lambda f: json.loads(f.read_text())))
    loaded = []
    for name, read in readers:
        try:
            loaded.append(read(path / name))
        except Exception as exc:  # safetensors, pickle and json each raise their own kinds
            raise CorruptCheckpointError(f"checkpoint file {path / name} cannot be read ({type(exc).__name__}: "
                                         f"{str(exc)[:200]}); it is truncated or damaged: resume from an earlier "
                                         "checkpoint-STEP folder, or delete this one") from None
    weights, state, meta = loaded
    return weights, state, meta


def latest_intact_checkpoint(output_dir: Path) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest checkpoint of ``output_dir`` that loads, with its contents; ``None`` when there is none.

    A newer one that cannot be read is skipped with a warning naming it (and left on disk); if none
    can be read, ``CorruptCheckpointError`` names them all.
    """
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            contents = load_checkpoint(path)
        except CorruptCheckpointError as exc:
            log.warning("%s; trying the one before it", exc)
            skipped.append(path.name)
            continue
        if skipped:
            log.warning("resuming from %s: the newer %s could not be read", path, ", ".join(skipped))
        return path, contents
    if skipped:
        raise CorruptCheckpointError(f"{output_dir}: no intact checkpoint ({', '.join(skipped)} cannot be read); "
                                     "start a new run in a new --output_dir")
    return None


def copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, fix: str,
                 required: set[str] | frozenset[str] = frozenset()) -> None:
    """Copy checkpoint ``weights`` (a subset of ``model``'s parameters, e.g. only LoRA adapters) into
    ``model`` in place; a name the model lacks, or a ``required`` name the checkpoint lacks, is a
    ``ValueError`` that ends with ``fix``."""
    params = dict(model.named_parameters())
    missing, unknown = sorted(set(required) - set(weights)), sorted(set(weights) - set(params))
    if missing or unknown:
        raise ValueError(f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected "
                         f"{unknown[:3]}); {fix}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# --resume, one meaning in `lm sft`, `lm train` and `control train`
RESUME_LATEST = "latest"
_LATEST_SPELLINGS = ("latest", "auto", "true")  # auto (control) and true (sft) are the old spellings
_NO_RESUME = ("", "false", "none", "null", "no")
RESUME_HELP = ("--resume alone (or latest; old spellings auto, true): continue from the newest intact checkpoint in "
               "output_dir (a fresh start when there is none); --resume PATH: from that checkpoint-STEP folder")


def resume_target(value: Any) -> str | None:
    """A ``--resume`` value in its one spelling: None (no resume), ``"latest"`` or a checkpoint path."""
    if value is None or value is False:
        return None
    if value is True:
        return RESUME_LATEST
    text = str(value).strip()
    if text.lower() in _NO_RESUME:
        return None
    return RESUME_LATEST if text.lower() in _LATEST_SPELLINGS else text


def resume_checkpoint(output_dir: Path, resume: str | None) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The checkpoint a run continues from, with its contents: the newest intact one of ``output_dir`` for
    ``latest`` (None when there is none yet), the named folder for a path; None without ``--resume``."""
    if resume is None:
        return None
    if resume == RESUME_LATEST:
        found = latest_intact_checkpoint(output_dir)  # a corrupt newest one is named and skipped
        if found is None:
            log.warning("--resume: no checkpoint in %s yet; starting from step 0", output_dir)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint folder (expected OUTPUT_DIR/checkpoint-STEP, or "
                                "--resume alone for the newest one)")
    return path, load_checkpoint(path)
