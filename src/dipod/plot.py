"""`dipod plot RUN_DIR [RUN_DIR ...]`: overlay the metrics of several runs in one PNG.

Works on any run folder holding a ``metrics.jsonl`` (language-model or control runs alike): by
default it plots the preferred keys that exist (reward, accuracy, gap), or else the first few
numeric keys it finds; ``--keys`` picks them explicitly.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dipod.runlog import read_metrics

PREFERRED_KEYS = ("reward", "eval/accuracy", "accuracy", "gap_lower_bound", "eval/gap_lower_bound",
                  "episode_return", "return", "elbo_per_token")
MAX_AUTO_PANELS = 4


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, skipping rows without it and non-finite values (stored as strings)."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        xs.append(float(row.get("step", len(xs))))
        ys.append(float(value))
    return xs, ys


def numeric_keys(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                seen.setdefault(key, None)
    return list(seen)


def choose_keys(runs: dict[str, list[dict]]) -> list[str]:
    available: dict[str, None] = {}
    for rows in runs.values():
        for key in numeric_keys(rows):
            available.setdefault(key, None)
    preferred = [k for k in PREFERRED_KEYS if k in available]
    return preferred or list(available)[:MAX_AUTO_PANELS]


def plot_runs(run_dirs: list[Path], out: Path, keys: list[str] | None = None, labels: list[str] | None = None,
              smooth: int = 1) -> Path:
    """Draw one panel per key, one line per run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("give at least one run folder")
    labels = labels or [Path(d).name or str(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    runs = {label: read_metrics(Path(d) / "metrics.jsonl") for label, d in zip(labels, run_dirs)}
    known = {key for rows in runs.values() for key in numeric_keys(rows)}
    if keys and not known.intersection(keys):  # a panel per missing key says "not logged"; all missing: an empty PNG
        raise ValueError(f"--keys {', '.join(keys)}: not a numeric metric of these runs; choose from "
                         f"{', '.join(sorted(known)) or 'none (no numeric metrics)'}")
    keys = keys or choose_keys(runs)
    if not keys:
        raise ValueError(f"no numeric metrics in {[str(d) for d in run_dirs]}; nothing to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        drawn = False
        for label, rows in runs.items():
            xs, ys = _series(rows, key)
            if not xs:
                continue
            if smooth > 1 and len(ys) >= smooth:
                ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=label)
            drawn = True
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str], prog: str = "dipod plot") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Overlay the metrics.jsonl of one or more runs in one PNG.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: FIRST_RUN/plot.png)")
    parser.add_argument("--keys", default=None, help="comma-separated metric names (default: reward, accuracy, gap)")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in logged points")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise ValueError(f"--smooth {args.smooth} must be >= 1")
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    labels = [k.strip() for k in args.labels.split(",")] if args.labels else None
    out = plot_runs(args.run_dirs, args.out or args.run_dirs[0] / "plot.png", keys, labels, args.smooth)
    print(out)
    return 0
