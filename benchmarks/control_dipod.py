"""Benchmark: FPO++ with and without DiPOD / self-distillation, and Gaussian PPO, on MuJoCo tasks.

Every (task, variant, seed) is one ``dipod control train`` run with the same environment-step
budget (distillation steps included), started as a subprocess in a small worker pool and resumable
(re-running the command continues unfinished runs and skips finished ones). Afterwards the final
checkpoint of each run is evaluated with ``dipod control eval`` (deterministic actions), and a
markdown table and a plot of the training returns go to ``--results_dir``.

    python benchmarks/control_dipod.py --total_steps 50000 --seeds 0,1,2 --workers 2

Columns: final training return (mean of episodes that ended in the last 20% of the budget),
evaluation return of the final checkpoint, area under the training-return curve (mean return
over the budget, trapezoid rule), environment steps per second of the whole loop, and the wall
time spent in self-distillation. Mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dipod.checkpoint import latest_checkpoint
from dipod.runlog import atomic_write_text, read_metrics

# The FPO++ variants use FPO++'s published per-draw trust region 0.05; "FPO++ clip 0.2" is the CPU default.
VARIANTS: dict[str, list[str]] = {
    "FPO++": ["--clip_eps", "0.05"],
    "FPO++ + initial distill": ["--clip_eps", "0.05", "--distill_initial_iterations", "10"],
    "FPO++ + DiPOD term": ["--clip_eps", "0.05", "--dipod_beta", "0.1"],
    "FPO++ + interleaved distill": ["--clip_eps", "0.05", "--distill_every", "5"],
    "Gaussian PPO": ["--policy", "gaussian"],
    "FPO++ clip 0.2": ["--clip_eps", "0.2"],
}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def run_dir(root: Path, env: str, variant: str, seed: int) -> Path:
    return root / env / slug(variant) / f"seed{seed}"


def train_one(root: Path, env: str, variant: str, seed: int, total_steps: int, extra: list[str]) -> Path:
    out = run_dir(root, env, variant, seed)
    latest = latest_checkpoint(out)
    if latest is not None and int(latest.name.split("-")[1]) >= total_steps:
        return out
    cmd = [sys.executable, "-m", "dipod.cli", "control", "train", "--env", env, "--seed", str(seed),
           "--total_steps", str(total_steps), "--output_dir", str(out), "--resume", "auto", "--progress", "false",
           *VARIANTS[variant], *extra]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if code != 0:
        raise RuntimeError(f"run failed ({code}): {' '.join(cmd)}; see {out / 'train.log'}")
    subprocess.check_call([sys.executable, "-m", "dipod.cli", "control", "eval", "--checkpoint", str(out),
                           "--episodes", "5", "--num_envs", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def summarise(out: Path, total_steps: int) -> dict[str, float]:
    rows = read_metrics(out / "metrics.jsonl")
    curve = [(r["step"], r["episode_return"]) for r in rows if "episode_return" in r]
    steps, returns = np.array([c[0] for c in curve], float), np.array([c[1] for c in curve], float)
    last = returns[steps > 0.8 * total_steps]
    loop_s = sum(r.get("rollout_s", 0.0) + r.get("update_s", 0.0) + r.get("distill_s", 0.0) for r in rows)
    loop_s += sum(r["distill/time_s"] for r in rows if r.get("distill/kind") == "initial")
    distill_s = sum(r["distill/time_s"] for r in rows if "distill/time_s" in r)
    grid = np.concatenate([[0.0], steps, [total_steps]])
    values = np.concatenate([[returns[0]], returns, [returns[-1]]])
    evaluation = json.loads((latest_checkpoint(out) / "eval.json").read_text())
    return {
        "final": float(last.mean()) if last.size else float(returns[-1]),
        "eval": evaluation["return_mean"],
        "auc": float(np.trapezoid(values, grid) / total_steps),
        "steps_per_s": rows[-1]["step"] / loop_s,
        "distill_s": distill_s,
        "distill_frac": distill_s / loop_s,
        "loop_s": loop_s,
    }


def fmt(values: list[float], digits: int = 0) -> str:
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def curve_on_grid(out: Path, grid: np.ndarray) -> np.ndarray:
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "episode_return" in r]
    return np.interp(grid, [r["step"] for r in rows], [r["episode_return"] for r in rows])


def plot(root: Path, envs: list[str], variants: list[str], seeds: list[int], total_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0, total_steps, 100)
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for variant in variants:
            curves = np.stack([curve_on_grid(run_dir(root, env, variant, s), grid) for s in seeds])
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(grid, mean, label=variant)
            ax.fill_between(grid, mean - std, mean + std, alpha=0.15)
        ax.set_title(f"{env} ({len(seeds)} seeds, mean ± std)")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="HalfCheetah-v5,Hopper-v5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--total_steps", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (each on one torch thread)")
    parser.add_argument("--output_dir", default="runs/bench_control")
    parser.add_argument("--results_dir", default="docs/results")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--extra", default="", help="extra flags for every run, e.g. '--num_envs 4'")
    args = parser.parse_args()
    envs, seeds = args.envs.split(","), [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    root, extra = Path(args.output_dir), args.extra.split()
    jobs = [(env, variant, seed) for seed in seeds for env in envs for variant in variants]
    start = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(train_one, root, env, variant, seed, args.total_steps, extra) for env, variant, seed in jobs]
        for done, future in enumerate(futures, 1):
            future.result()
            print(f"[{time.time() - start:7.0f}s] {done}/{len(jobs)} runs done", flush=True)
    lines: list[str] = []
    loop_total = 0.0
    for env in envs:
        lines += [f"## {env}", "",
                  "| variant | final train return | eval return (final ckpt) | AUC (mean return) | env steps/s | distill wall s (share) |",
                  "|---|---|---|---|---|---|"]
        for variant in variants:
            stats = [summarise(run_dir(root, env, variant, s), args.total_steps) for s in seeds]
            loop_total += sum(s["loop_s"] for s in stats)
            col = lambda key, d=0: fmt([s[key] for s in stats], d)  # noqa: E731
            share = fmt([100 * s["distill_frac"] for s in stats], 1)
            lines.append(f"| {variant} | {col('final')} | {col('eval')} | {col('auc')} | {col('steps_per_s')} | "
                         f"{col('distill_s')} ({share}%) |")
        lines.append("")
    header = ["# Control benchmark: FPO++ with DiPOD and self-distillation vs Gaussian PPO", "",
              f"{args.total_steps} environment steps per run (distillation steps included; a run stops at the first "
              f"iteration boundary past the budget), seeds {args.seeds}, runs {args.workers} at a time on a shared "
              f"2-core CPU, one torch thread each; training loops took {loop_total / 60:.0f} min in total "
              f"(this invocation: {(time.time() - start) / 60:.0f} min).", "",
              "Command: `python benchmarks/control_dipod.py " + shlex.join(sys.argv[1:]) + "`", ""]
    lines = header + lines
    results = Path(args.results_dir)
    atomic_write_text(results / "control_dipod.md", "\n".join(lines) + "\n")
    plot(root, envs, variants, seeds, args.total_steps, results / "control_dipod.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
