"""The tables and plot of benchmarks/lm_dipod.py, computed from the runs' metrics.jsonl files.

Separate from the runner so that a page can be rebuilt from finished runs (``--report_only``) and so
that each file keeps one job."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

# 97.5% quantiles of Student's t for 1..10 degrees of freedom (95% two-sided intervals)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (nan half-width for one value)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    df = len(values) - 1
    return statistics.mean(values), (T975[df - 1] if df <= len(T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], digits: int = 3) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" if not math.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def outcome(rows: list[dict]) -> str:
    """learns / collapses / freezes / flat, from the held-out accuracy and the training rollouts.

    collapses: final held-out accuracy 0.10 below the start, or the last quarter's training reward
    0.15 below the first quarter's; freezes: at least 90% of the prompt groups had identical rewards
    over the last quarter without a gain; learns: final held-out accuracy 0.05 above the start."""
    accuracy = series(rows, "eval/accuracy")
    reward = series(rows, "reward")
    quarter = max(1, len(reward) // 4)
    gain = accuracy[-1] - accuracy[0]
    if gain <= -0.10 or statistics.mean(reward[-quarter:]) < statistics.mean(reward[:quarter]) - 0.15:
        return "collapses"
    if gain >= 0.05:
        return "learns"
    if late_mean(series(rows, "frac_reward_zero_std"), quarter) >= 0.9:
        return "freezes"
    return "flat"


def late_mean(values: list[float], quarter: int) -> float:
    """Mean of the last ``quarter`` values (nan when the run did not log the metric, e.g. d1's ELBO)."""
    return statistics.mean(values[-quarter:]) if values else math.nan


def summarize(rows: list[dict]) -> dict:
    gaps = series(rows, "gap_lower_bound")
    reward = series(rows, "reward")
    quarter = max(1, len(reward) // 4)
    accuracy = series(rows, "eval/accuracy")
    return {"accuracy": rows[-1]["eval/accuracy"], "initial_accuracy": rows[0]["eval/accuracy"],
            "peak_accuracy": max(accuracy), "step_s": statistics.mean(series(rows, "step_time")),
            "reward": rows[-1]["eval/reward"], "gain": rows[-1]["eval/accuracy"] - rows[0]["eval/accuracy"],
            "eval_gap": rows[-1]["eval/gap_lower_bound"], "initial_gap": rows[0]["eval/gap_lower_bound"],
            "early_gap": statistics.mean(gaps[:max(1, len(gaps) // 3)]) if gaps else math.nan,
            "late_gap": statistics.mean(gaps[-max(1, len(gaps) // 3):]) if gaps else math.nan,
            "train_reward_late": statistics.mean(reward[-quarter:]),
            "worst_reward_drop": max((max(reward[:i + 1]) - reward[i] for i in range(len(reward))), default=0.0),
            "collapsed_groups_late": late_mean(series(rows, "frac_reward_zero_std"), quarter),
            "elbo_per_token_late": late_mean(series(rows, "elbo_per_token"), quarter),
            "outcome": outcome(rows)}


CURVES = (("reward", "rollout reward"), ("eval/accuracy", "held-out accuracy (greedy)"),
          ("gap_lower_bound", "gap lower bound IW_K - ELBO"), ("frac_reward_zero_std", "groups with identical rewards"))


def plot(results: dict, path: Path) -> None:
    """One row per task, one panel per curve, one line per method (mean over seeds, +- one std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(results)
    fig, axes = plt.subplots(len(tasks), len(CURVES), figsize=(4.5 * len(CURVES), 3.6 * len(tasks)), squeeze=False)
    for r, task in enumerate(tasks):
        for c, (key, title) in enumerate(CURVES):
            ax = axes[r][c]
            for method, runs in results[task].items():
                if not runs:  # a rebuilt page: none of this method's runs on this task has finished
                    continue
                points = [[(row["step"], row[key]) for row in rows if isinstance(row.get(key), float)] for rows in runs]
                length = min(len(p) for p in points)
                if length == 0:
                    continue
                ys = np.array([[y for _, y in p[:length]] for p in points])
                xs = [x for x, _ in points[0][:length]]
                ax.plot(xs, ys.mean(0), label=method)
                if len(points) > 1:
                    ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.12)
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[r][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_table(tasks: list[str], methods: list[str], summary: dict, paper: dict, paper_reference: dict) -> list[str]:
    lines = ["| task | method | seeds | held-out accuracy (before -> after) | peak | gain | " + " | ".join(
             f"{s} accuracy" for s in ("spg_test", "d1_test")) + " | worst reward drop | collapsed groups (late) "
             "| gap early -> late | held-out gap | s/step | outcomes |", "|" + "---|" * 14]
    for task in tasks:
        ref = paper_reference[task]
        first = next((runs[0] for runs in summary[task].values() if runs), None)
        if first is None:
            lines.append(f"| {task} | every method | 0 | not finished yet | | | | | | | | | | |")
            continue
        lines.append(f"| {task} | reference policy | | {first['initial_accuracy']:.3f} | | | "
                     + " | ".join(f"{ref[s]:.3f}" if s in ref else "" for s in ("spg_test", "d1_test"))
                     + f" | | | | {first['initial_gap']:.3f} | | |")
        for m in methods:
            s = summary[task][m]
            ps = paper[task][m]
            if not s:
                lines.append(f"| {task} | {m} | 0 | not finished yet | | | | | | | | | | |")
                continue
            counts = {o: sum(x["outcome"] == o for x in s) for o in ("learns", "flat", "freezes", "collapses")}
            lines.append(
                f"| {task} | {m} | {len(s)} | {s[0]['initial_accuracy']:.3f} -> {fmt([x['accuracy'] for x in s])} | "
                f"{fmt([x['peak_accuracy'] for x in s])} | {fmt([x['gain'] for x in s])} | "
                + " | ".join(fmt([p[sp] for p in ps]) if sp in ps[0] else "" for sp in ("spg_test", "d1_test"))
                + f" | {fmt([x['worst_reward_drop'] for x in s])} | {fmt([x['collapsed_groups_late'] for x in s])} | "
                f"{fmt([x['early_gap'] for x in s])} -> {fmt([x['late_gap'] for x in s])} | "
                f"{fmt([x['eval_gap'] for x in s])} | {fmt([x['step_s'] for x in s], 2)} | "
                + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + " |")
    return lines
