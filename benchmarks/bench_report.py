"""What the control benchmarks share: seed statistics, curve bands, figure and results files.

benchmarks/control_dipod.py and benchmarks/control_mjlab.py import this module (it sits beside
them, so running either script puts it on the path).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

from dipod.runlog import atomic_write_json, atomic_write_text

# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal 1.96 is within 8%).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t confidence interval over seeds (NaN half-width for one seed)."""
    arr = np.asarray(values, float)
    if arr.size < 2:
        return float(arr.mean()), float("nan")
    quantile = T975[arr.size - 2] if arr.size - 1 <= len(T975) else 1.96
    half = quantile * arr.std(ddof=1) / np.sqrt(arr.size)
    return float(arr.mean()), float(half)


def band(ax, x: np.ndarray, curves_sx: np.ndarray, label: str, spread: str = "ci95") -> None:
    """Plot the mean over seeds (rows of ``curves_sx``, NaN = no value) with a band of ``spread``: the 95% Student-t
    interval (``ci95``, where at least two seeds have a value) or one standard deviation (``std``)."""
    finite_sx = ~np.isnan(curves_sx)
    counts_x = finite_sx.sum(axis=0)
    mean_x = np.where(counts_x > 0, np.where(finite_sx, curves_sx, 0.0).sum(axis=0) / np.maximum(counts_x, 1), np.nan)
    if spread == "std":
        half_x = np.array([np.std(col[~np.isnan(col)]) if (~np.isnan(col)).any() else np.nan for col in curves_sx.T])
    else:
        half_x = np.array([ci95(col[~np.isnan(col)])[1] if (~np.isnan(col)).sum() > 1 else np.nan
                           for col in curves_sx.T])
    ax.plot(x, mean_x, label=label)
    ax.fill_between(x, mean_x - half_x, mean_x + half_x, alpha=0.12)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)


def command_line(script: str) -> str:
    """The invocation as it will be quoted on a results page."""
    return f"Command: `python benchmarks/{script} " + shlex.join(sys.argv[1:]) + "`"


def write_results(results_dir: Path, name: str, text_lines: list[str], payload: dict) -> None:
    """``<name>_table.md`` (the lines) and ``<name>.json`` (the payload and the command), written atomically; the
    lines are printed too."""
    atomic_write_text(results_dir / f"{name}_table.md", "\n".join(text_lines) + "\n")
    atomic_write_json(results_dir / f"{name}.json", {"command": sys.argv, **payload})
    print("\n".join(text_lines))


def report(result: dict, json_path: str | None, md_path: str | None, markdown) -> None:
    """Print ``result`` as JSON and write it (``json_path``) and its ``markdown(result)`` page (``md_path``),
    each atomically, where asked."""
    import json

    print(json.dumps(result, indent=2))
    if json_path:
        atomic_write_json(Path(json_path), result)
    if md_path:
        atomic_write_text(Path(md_path), markdown(result))
