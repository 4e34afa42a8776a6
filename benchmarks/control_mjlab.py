"""Benchmark in mjlab on the CPU: FPO++, + Algorithm 3, + DiPOD term, + interleaved self-distillation, and PPO.

One velocity task of mjlab (default: Go1 on flat ground), the same number of runner iterations
for every method (self-distillation steps are extra, as in the released code; their cost is in
the wall time). FPO++ uses configs/control/rsl_rl_locomotion.yaml with the released quadruped
values (16 epochs, 16 draws) unless --fpo_set changes them; PPO is the task's own registered
rsl-rl config. ``--workers`` processes (one torch thread each) share the runs; each builds one
environment and re-seeds and resets it before every run (some simulator state still carries from
one run to the next: docs/results/control_mjlab.md). Each (method, seed) writes
``<output_dir>/<method>/seed<k>.json`` as it finishes; re-running the command skips finished runs.

    nice -n 10 python benchmarks/control_mjlab.py                  # the preset of docs/results/control_mjlab.md
    python benchmarks/control_mjlab.py --iterations 3 --seeds 0 --workers 1 --name control_mjlab_smoke

Reported per method (mean and 95% Student-t interval over seeds): per-iteration curves of the
mean reward per step, the mean episode return and length (rsl-rl's ``Train/mean_reward`` and
``Train/mean_episode_length``: last 100 finished episodes) and the on-policy CFM loss before
each update (``cfm_loss_before``, the bound-tightness monitor: lower = tighter ELBO), against
runner iterations, against environment steps simulated (RL + self-distillation) and against wall
seconds (collection + update, self-distillation included). The table has first- and last-quarter
means and the cost, with self-distillation also counted in RL iterations of the same run (a ratio
that a changing machine load moves less than seconds). Needs ``pip install -e ".[mjlab]"``; runs on the CPU (``CUDA_VISIBLE_DEVICES=`` is set
here) unless ``--device cuda:0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from bench_report import band, ci95, command_line, save_figure, slug, write_results
from dipod.runlog import atomic_write_json

CPU_FPO = {"num_learning_epochs": 16, "num_draws": 16}  # the released quadruped values (locomotion YAML: humanoid 32)
CURVES = ("step_reward", "episode_return", "episode_length", "cfm_loss_before")
METHOD_NAMES = ("FPO++", "FPO++ + Alg. 3", "FPO++ + DiPOD term", "FPO++ + interleaved", "PPO")


def method_overrides(args: argparse.Namespace) -> dict[str, dict | None]:
    """Each method's overrides of the FPO++ algorithm config (None: the task's stock rsl-rl PPO)."""
    return {"FPO++": {}, "FPO++ + Alg. 3": {"distill_initial_iterations": args.distill_initial_iterations},
            "FPO++ + DiPOD term": {"dipod_beta": args.dipod_beta},
            "FPO++ + interleaved": {"distill_every": args.distill_every, "distill_iterations": args.distill_iterations},
            "PPO": None}


_ENV: dict = {}  # per worker process: the one environment it reuses


def run_one(job: tuple) -> tuple[str, int, float]:
    """One (method, seed) run in this worker's environment; returns (method, seed, build seconds of this call)."""
    task, method, overrides, seed, num_envs, iterations, fpo_set, out, device = job
    import torch

    from dipod.control.mjlab_train import (REPO_CONFIGS, learn_recorded, make_env, make_runner,
                                           released_fpo_agent_cfg, task_agent_cfg)

    torch.set_num_threads(1)
    build_s = 0.0
    if "env" not in _ENV:
        started = time.perf_counter()
        _ENV["env"] = make_env(task, num_envs, seed, device)
        build_s = time.perf_counter() - started
    env = _ENV["env"]
    env.unwrapped.common_step_counter = 0  # curricula start over
    env.unwrapped.reset(seed=seed)
    cfg = task_agent_cfg(task)
    if overrides is not None:
        cfg = released_fpo_agent_cfg(cfg, REPO_CONFIGS / "rsl_rl_locomotion.yaml", **{**fpo_set, **overrides})
    run_start = time.perf_counter()
    runner = make_runner(env, task, cfg, seed, Path(out).parent / f"log_seed{seed}", device)
    records = learn_recorded(runner, iterations)
    atomic_write_json(Path(out), {"task": task, "method": method, "seed": seed, "num_envs": num_envs,
                                  "num_steps_per_env": cfg["num_steps_per_env"],
                                  "wall_s": time.perf_counter() - run_start, "algorithm": cfg["algorithm"],
                                  "records": [dataclasses.asdict(r) for r in records]})
    return method, seed, build_s


def run_all(args: argparse.Namespace, methods: list[str], seeds: list[int], fpo_set: dict, root: Path) -> float:
    """Every unfinished (seed, method), seed-major (an interrupted sweep still has every method on the first seeds),
    on ``args.workers`` processes. Returns the longest environment build of a worker, in seconds."""
    overrides = method_overrides(args)
    jobs = [(args.task, m, overrides[m], s, args.num_envs, args.iterations, fpo_set,
             str(root / slug(m) / f"seed{s}.json"), args.device)
            for s in seeds for m in methods if not (root / slug(m) / f"seed{s}.json").is_file()]
    start, build_s = time.perf_counter(), 0.0
    if not jobs:
        return build_s
    with multiprocessing.get_context("spawn").Pool(max(1, min(args.workers, len(jobs)))) as pool:
        for method, seed, built in pool.imap_unordered(run_one, jobs):
            build_s = max(build_s, built)
            print(f"[{time.perf_counter() - start:6.0f}s] {method} seed {seed} done", flush=True)
    return build_s


def curve(run: dict, key: str) -> np.ndarray:
    """Per-iteration values of a record field or of a loss (NaN where an iteration has none); ``wall_s``: seconds
    since the run started (collection + update of every iteration so far, self-distillation included);
    ``sim_steps``: environment steps simulated so far (RL rollouts + self-distillation stages)."""
    if key == "wall_s":
        return np.cumsum([r["collect_s"] + r["learn_s"] for r in run["records"]])
    if key == "sim_steps":
        rl = run["num_envs"] * run["num_steps_per_env"]
        return np.cumsum([rl + r["losses"].get("distill_env_steps", 0.0) for r in run["records"]])
    return np.asarray([r[key] if key in r else r["losses"].get(key, np.nan) for r in run["records"]], float)


def against(run: dict, key: str, axis: str, grid: np.ndarray) -> np.ndarray:
    """``key`` against ``axis`` (``wall_s`` or ``sim_steps``), linearly interpolated on ``grid`` (NaN outside the
    run's finite values)."""
    x, values = curve(run, axis), curve(run, key)
    finite = ~np.isnan(values)
    if not finite.any():
        return np.full(grid.shape, np.nan)
    out = np.interp(grid, x[finite], values[finite])
    return np.where((grid < x[finite][0]) | (grid > x[-1]), np.nan, out)


def rl_seconds_per_iteration(run: dict) -> float:
    return (curve(run, "wall_s")[-1] - np.nansum(curve(run, "distill_time_s"))) / len(run["records"])


def cell(values: list[float], digits: int) -> tuple[dict, str]:
    mean, half = ci95(values)
    text = "-" if np.isnan(mean) else f"{mean:.{digits}f} ± {half:.{digits}f}" if not np.isnan(half) else f"{mean:.{digits}f}"
    return {"mean": mean, "ci95": half, "per_seed": list(values)}, text


def summary_table(runs: dict[str, list[dict]], iterations: int) -> tuple[list[str], dict]:
    quarter = max(iterations // 4, 1)
    first, last = slice(0, quarter), slice(iterations - quarter, iterations)
    columns = [  # (name, header, digits, per-run value)
        ("episode_return_first", "episode return, first quarter", 2, lambda r: np.nanmean(curve(r, "episode_return")[first])),
        ("episode_return", "episode return, last quarter", 2, lambda r: np.nanmean(curve(r, "episode_return")[last])),
        ("episode_length_first", "episode length, first quarter", 0, lambda r: np.nanmean(curve(r, "episode_length")[first])),
        ("episode_length", "episode length, last quarter", 0, lambda r: np.nanmean(curve(r, "episode_length")[last])),
        ("step_reward_first", "reward / step, first quarter", 4, lambda r: np.nanmean(curve(r, "step_reward")[first])),
        ("step_reward", "reward / step, last quarter", 4, lambda r: np.nanmean(curve(r, "step_reward")[last])),
        ("cfm_loss_first", "CFM loss, iteration 0", 3, lambda r: curve(r, "cfm_loss_before")[0]),
        ("cfm_loss_before", "CFM loss, last quarter", 3, lambda r: np.nanmean(curve(r, "cfm_loss_before")[last])),
        ("rl_s_per_iteration", "s / iteration (RL only)", 1, rl_seconds_per_iteration),
        ("wall_s", "wall s / run", 0, lambda r: r["wall_s"]),
        ("distill_s", "of which distillation s", 0, lambda r: np.nansum(curve(r, "distill_time_s"))),
        ("distill_in_iterations", "distillation in RL iterations of the same run", 1,
         lambda r: np.nansum(curve(r, "distill_time_s")) / rl_seconds_per_iteration(r)),
    ]
    lines = ["| method | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table: dict = {}
    for method, seed_runs in runs.items():
        table[method], texts = {"seeds": [r["seed"] for r in seed_runs]}, []
        for name, _, digits, value in columns:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice: no episode ended yet
                table[method][name], text = cell([float(value(r)) for r in seed_runs], digits)
            texts.append(text)
        lines.append(f"| {method} | " + " | ".join(texts) + " |")
    return lines, table


def plot(runs: dict[str, list[dict]], task: str, overrides: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 8))
    grids = {axis: np.linspace(0.0, max(float(curve(r, axis)[-1]) for rs in runs.values() for r in rs), 200)
             for axis in ("sim_steps", "wall_s")}
    labels = {None: "runner iteration", "sim_steps": "environment steps simulated (RL + self-distillation)",
              "wall_s": "wall seconds (self-distillation included; the machine's load varied)"}
    panels = [(axes[0, 0], "episode_return", "episode return (last 100 episodes)", None),
              (axes[0, 1], "episode_length", "episode length (last 100 episodes)", None),
              (axes[0, 2], "cfm_loss_before", "on-policy CFM loss before the update (lower = tighter)", None),
              (axes[1, 0], "episode_return", "episode return", "sim_steps"),
              (axes[1, 1], "step_reward", "mean reward per step", "sim_steps"),
              (axes[1, 2], "episode_return", "episode return", "wall_s")]
    for ax, key, title, axis in panels:
        for method, seed_runs in runs.items():
            if key == "cfm_loss_before" and overrides.get(method) is None:
                continue
            if axis is None:
                stack = np.stack([curve(r, key) for r in seed_runs])
                band(ax, np.arange(stack.shape[1]), stack, method)
            else:
                band(ax, grids[axis], np.stack([against(r, key, axis, grids[axis]) for r in seed_runs]), method)
        ax.set_title(f"{task}: {title}", fontsize=8)
        ax.set_xlabel(labels[axis], fontsize=8)
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="Mjlab-Velocity-Flat-Unitree-Go1")
    parser.add_argument("--num_envs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=30, help="runner iterations per run (same for every method)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated subset of: " + ", ".join(METHOD_NAMES))
    parser.add_argument("--fpo_set", default=json.dumps(CPU_FPO), help="JSON algorithm overrides for every FPO++ run")
    parser.add_argument("--distill_initial_iterations", type=int, default=100, help="Algorithm 3 iterations (published: 100)")
    parser.add_argument("--dipod_beta", type=float, default=0.1, help="the DiPOD term's weight")
    parser.add_argument("--distill_every", type=int, default=10, help="interleaved: a stage after every n updates")
    parser.add_argument("--distill_iterations", type=int, default=10, help="interleaved: iterations per stage")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one process and torch thread each")
    parser.add_argument("--output_dir", default="runs/bench_mjlab")
    parser.add_argument("--results_dir", default="docs/results")
    parser.add_argument("--name", default="control_mjlab")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda:0 on a GPU machine")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # MuJoCo Warp's CPU device (inherited by the worker processes)
    root, fpo_set = Path(args.output_dir), json.loads(args.fpo_set)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHOD_NAMES)}")
    build_s = run_all(args, methods, seeds, fpo_set, root)
    runs = {m: [json.loads((root / slug(m) / f"seed{s}.json").read_text()) for s in seeds] for m in methods}
    overrides = method_overrides(args)
    lines, table = summary_table(runs, args.iterations)
    header = [f"{args.task}, {args.num_envs} environments, {args.iterations} runner iterations per run, seeds "
              f"{args.seeds}; {args.device} (MuJoCo Warp), {args.workers} runs at a time, one torch thread each; "
              f"the runs took {sum(r['wall_s'] for rs in runs.values() for r in rs) / 60:.0f} min in total"
              + (f" (building an environment: {build_s:.0f} s). " if build_s else ". ") +
              "Quarter means over iterations, mean ± 95% CI half-width (Student t over seeds).", "",
              command_line("control_mjlab.py"), ""]
    keys = (*CURVES, "wall_s", "sim_steps", "collect_s", "learn_s", "distill_time_s")
    write_results(Path(args.results_dir), args.name, header + lines,
                  {"fpo_set": fpo_set, "methods": {m: overrides[m] for m in methods},
                   "table": table, "curves": {m: {k: [curve(r, k).tolist() for r in rs] for k in keys}
                                              for m, rs in runs.items()}})
    plot(runs, args.task, overrides, Path(args.results_dir) / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
