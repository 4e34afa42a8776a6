"""Benchmark in mjlab on the CPU: FPO++, + Algorithm 3, + DiPOD term, + interleaved self-distillation, and PPO.

One velocity task of mjlab (default: Go1 on flat ground), few environments, the same number of
runner iterations for every method (self-distillation steps are extra, as in the released code,
and their cost is in the wall time). FPO++ uses configs/control/rsl_rl_locomotion.yaml with the
released quadruped values (16 epochs, 16 draws) unless --fpo_set changes them; PPO is the task's
own registered rsl-rl config. All runs share one environment, re-seeded and reset before each;
each (method, seed) writes ``<output_dir>/<method>/seed<k>.json`` as it finishes, and re-running
the command skips finished runs.

    nice -n 10 python benchmarks/control_mjlab.py                       # the preset of docs/results/control_mjlab.md
    python benchmarks/control_mjlab.py --iterations 3 --seeds 0 --name control_mjlab_smoke

Reported per method (mean and 95% Student-t interval over seeds): per-iteration curves of the
mean reward per step, the mean episode return and length (rsl-rl's ``Train/mean_reward`` and
``Train/mean_episode_length``: last 100 finished episodes) and the on-policy CFM loss before
each update (``cfm_loss_before``, the bound-tightness monitor: lower = tighter ELBO); the table
has their means over the last quarter of the iterations and the wall time per run.
Needs ``pip install -e ".[mjlab]"``; runs on the CPU (``CUDA_VISIBLE_DEVICES=`` is set here) unless
``--device cuda:0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from control_dipod import ci95, slug
from dipod.runlog import atomic_write_json, atomic_write_text

# FPO++ variants: overrides of the algorithm config (None: the task's stock rsl-rl PPO).
METHODS: dict[str, dict | None] = {
    "FPO++": {},
    "FPO++ + Alg. 3": {"distill_initial_iterations": 10},
    "FPO++ + DiPOD term": {"dipod_beta": 0.1},
    "FPO++ + interleaved": {"distill_every": 2, "distill_iterations": 2},
    "PPO": None,
}
CPU_FPO = {"num_learning_epochs": 16, "num_draws": 16}  # the released quadruped values (locomotion YAML: humanoid 32)
CURVES = ("step_reward", "episode_return", "episode_length", "cfm_loss_before")


def run_all(task: str, methods: list[str], seeds: list[int], num_envs: int, iterations: int, fpo_set: dict,
            root: Path, device: str) -> float:
    """Every (seed, method) on one environment, built once (building took minutes on the loaded CPU): before each
    run it is re-seeded and reset, and the runner is built under the same seed. Returns the build time in s."""
    import torch

    from dipod.control.mjlab_train import (REPO_CONFIGS, learn_recorded, make_env, make_runner, released_fpo_agent_cfg,
                                           task_agent_cfg)

    torch.set_num_threads(1)
    env, build_s, start = None, 0.0, time.perf_counter()
    for seed in seeds:  # seed-major: an interrupted sweep still has every method on the first seeds
        for method in methods:
            out = root / slug(method) / f"seed{seed}.json"
            if out.is_file():
                continue
            if env is None:
                built = time.perf_counter()
                env = make_env(task, num_envs, seed, device)
                build_s = time.perf_counter() - built
            env.unwrapped.common_step_counter = 0  # curricula start over
            env.unwrapped.reset(seed=seed)
            cfg = task_agent_cfg(task)
            if METHODS[method] is not None:
                cfg = released_fpo_agent_cfg(cfg, REPO_CONFIGS / "rsl_rl_locomotion.yaml", **{**fpo_set, **METHODS[method]})
            run_start = time.perf_counter()
            runner = make_runner(env, task, cfg, seed, out.parent / f"log_seed{seed}", device)
            records = learn_recorded(runner, iterations)
            atomic_write_json(out, {"task": task, "method": method, "seed": seed, "num_envs": num_envs,
                                    "wall_s": time.perf_counter() - run_start, "algorithm": cfg["algorithm"],
                                    "records": [dataclasses.asdict(r) for r in records]})
            print(f"[{time.perf_counter() - start:6.0f}s] {method} seed {seed} done", flush=True)
    return build_s


def curve(run: dict, key: str) -> np.ndarray:
    """Per-iteration values of a record field or of a loss (NaN where an iteration has none)."""
    return np.asarray([r[key] if key in r else r["losses"].get(key, np.nan) for r in run["records"]], float)


def summary_table(runs: dict[str, list[dict]], iterations: int) -> tuple[list[str], dict]:
    tail = slice(iterations - max(iterations // 4, 1), iterations)
    lines = ["| method | reward / step | episode return | episode length | CFM loss (before update) | "
             "wall s / run | of which distillation s |", "|---|---|---|---|---|---|---|"]
    table: dict = {}
    for method, seed_runs in runs.items():
        cells, table[method] = [], {"seeds": [r["seed"] for r in seed_runs]}
        for key, digits in zip(CURVES, (4, 2, 1, 3)):
            mean, half = ci95([float(np.nanmean(curve(r, key)[tail])) for r in seed_runs])
            table[method][key] = {"mean": mean, "ci95": half}
            cells.append("-" if np.isnan(mean) else f"{mean:.{digits}f} ± {half:.{digits}f}")
        distill = [float(np.nansum(curve(r, "distill_time_s"))) for r in seed_runs]
        for key, values in (("wall_s", [r["wall_s"] for r in seed_runs]), ("distill_s", distill)):
            mean, half = ci95(values)
            table[method][key] = {"mean": mean, "ci95": half}
            cells.append(f"{mean:.0f} ± {half:.0f}" if not np.isnan(half) else f"{mean:.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines, table


def plot(runs: dict[str, list[dict]], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ("mean reward per step", "episode return (last 100 episodes)", "episode length (last 100 episodes)",
              "on-policy CFM loss before the update (lower = tighter)")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for method, seed_runs in runs.items():
        for key, ax in zip(CURVES, axes):
            if key == "cfm_loss_before" and METHODS.get(method) is None:
                continue
            stack = np.stack([curve(r, key) for r in seed_runs])
            counts = np.sum(~np.isnan(stack), axis=0)
            mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
            half = np.array([ci95(list(col[~np.isnan(col)]))[1] if (~np.isnan(col)).sum() > 1 else np.nan
                             for col in stack.T])
            x = np.arange(stack.shape[1])
            ax.plot(x, mean, label=method)
            ax.fill_between(x, mean - half, mean + half, alpha=0.12)
    for ax, title in zip(axes, titles):
        ax.set_title(f"{task}: {title}", fontsize=8)
        ax.set_xlabel("runner iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="Mjlab-Velocity-Flat-Unitree-Go1")
    parser.add_argument("--num_envs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3, help="runner iterations per run (same for every method)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--fpo_set", default=json.dumps(CPU_FPO), help="JSON algorithm overrides for every FPO++ run")
    parser.add_argument("--output_dir", default="runs/bench_mjlab")
    parser.add_argument("--results_dir", default="docs/results")
    parser.add_argument("--name", default="control_mjlab")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:0 on a GPU machine")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # MuJoCo Warp's CPU device
    root, fpo_set = Path(args.output_dir), json.loads(args.fpo_set)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    start = time.time()
    build_s = run_all(args.task, methods, seeds, args.num_envs, args.iterations, fpo_set, root, args.device)
    runs = {m: [json.loads((root / slug(m) / f"seed{s}.json").read_text()) for s in seeds] for m in methods}
    lines, table = summary_table(runs, args.iterations)
    header = [f"{args.task}, {args.num_envs} environments, {args.iterations} runner iterations per run, seeds "
              f"{args.seeds}; {args.device} (MuJoCo Warp), one torch thread, one run at a time; "
              f"this invocation {(time.time() - start) / 60:.0f} min (building the environment once: {build_s:.0f} s). "
              "Last-quarter means, mean ± 95% CI half-width (Student t over seeds).", "", "Command: `python benchmarks/control_mjlab.py "
              + shlex.join(sys.argv[1:]) + "`", ""]
    results = Path(args.results_dir)
    atomic_write_text(results / f"{args.name}_table.md", "\n".join(header + lines) + "\n")
    atomic_write_json(results / f"{args.name}.json", {"command": sys.argv, "fpo_set": fpo_set, "table": table,
                                                      "curves": {m: {k: [curve(r, k).tolist() for r in rs]
                                                                     for k in CURVES} for m, rs in runs.items()}})
    plot(runs, args.task, results / f"{args.name}.png")
    print("\n".join(header + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
