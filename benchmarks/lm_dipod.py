"""DiPOD against d1, FPO and SPG on the tiny reference policies (sudoku4, countdown), same budget each.

    python benchmarks/lm_dipod.py --quick          # about 15 minutes on 2 cores
    python benchmarks/lm_dipod.py                  # the full run (about 2 hours on 2 cores)
    python benchmarks/lm_dipod.py --betas 0.01,0.05,0.2 --methods spg_mix,spg_mix+dipod   # beta sweep

Every (task, method, seed) is one `dipod lm train` run in its own process (one torch thread each,
``--workers`` at a time); finished runs are reused, so an interrupted benchmark continues. Writes
``OUT/lm_dipod.md`` (final held-out accuracy, reward and gap, mean +- std over seeds, plus the
DiPOD step-time overhead measured in the same session) and ``OUT/lm_dipod.png`` (reward and
gap-monitor curves, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

METHODS: dict[str, dict] = {
    "d1": {"estimator": "d1", "dipod_beta": 0.0, "num_draws": 1},
    "fpo": {"estimator": "fpo", "dipod_beta": 0.0},
    "fpo+dipod": {"estimator": "fpo"},
    "spg_mix": {"estimator": "spg", "dipod_beta": 0.0},
    "spg_mix+dipod": {"estimator": "spg"},
}
PRESETS = {
    "quick": {"max_steps": 20, "eval_steps": 0, "eval_examples": 100, "gap_monitor_steps": 4},
    "full": {"max_steps": 100, "eval_steps": 25, "eval_examples": 200, "gap_monitor_steps": 5},
}
TAIL = 1 / 3  # the "late" gap is the mean of the monitor over the last third of the run


def run_one(job: dict) -> tuple[str, bool]:
    """Worker: one training run; returns its folder and whether it had already finished (reused)."""
    import torch

    torch.set_num_threads(1)
    from dipod.demo import tiny_rl_config
    from dipod.lm.trainer import train
    from dipod.runlog import read_metrics

    out = Path(job["output_dir"])
    if (out / "metrics.jsonl").is_file():
        rows = read_metrics(out / "metrics.jsonl")
        if rows and rows[-1].get("step") == job["changes"]["max_steps"] and "eval/accuracy" in rows[-1]:
            return str(out), True
    cfg = tiny_rl_config(job["model_dir"], out, progress_bar=False, tensorboard=False, **job["changes"])
    train(cfg)
    return str(out), False


def paper_set_eval(job: dict) -> dict:
    """Worker: greedy accuracy and reward on the paper's own test set (`d1_test`) of a run's final
    checkpoint, or of the reference policy itself when ``run_dir`` is None."""
    import torch

    torch.set_num_threads(1)
    from dipod.checkpoint import latest_checkpoint, load_checkpoint
    from dipod.demo import tiny_rl_config
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.model import load_masked_lm
    from dipod.lm.tasks import get_task

    lm = load_masked_lm(job["model_dir"])
    if job["run_dir"] is not None:
        checkpoint = latest_checkpoint(Path(job["run_dir"]))
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {job['run_dir']}; rerun the benchmark to finish that run")
        weights, _, _ = load_checkpoint(checkpoint)
        unexpected = lm.model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{checkpoint}: weights {unexpected[:3]} do not belong to {job['model_dir']}")
    cfg = tiny_rl_config(job["model_dir"], job["run_dir"] or "unused", task=job["task"])
    task = get_task(job["task"])
    result = evaluate_policy(lm, task, task.load("d1_test"), cfg.sampler_settings(0.0), batch_size=128)
    return {"paper_accuracy": result["accuracy"], "paper_reward": result["mean_reward"]}


def measure_overhead(model_dir: Path, work: Path, repeats: int) -> dict:
    """Update time with DiPOD (beta = 0.05) against without (beta = 0) on the same rollout batch,
    interleaved so that load on a shared machine hits both alike."""
    import torch

    torch.set_num_threads(1)
    from dipod.demo import tiny_rl_config
    from dipod.lm.trainer import Trainer

    out = {}
    for estimator in ("spg", "fpo"):
        cfg = tiny_rl_config(model_dir, work / f"overhead_{estimator}", estimator=estimator, progress_bar=False,
                             tensorboard=False, eval_examples=1)
        trainer = Trainer(cfg)
        examples = trainer.step_examples(1)
        prompt_ids, prompt_attn = trainer.encode(examples)
        completion_ids = trainer.generate(prompt_ids, prompt_attn, cfg.temperature, seed=1)
        adv_n = torch.linspace(-1, 1, completion_ids.shape[0])
        batch = {"prompt_ids": prompt_ids, "prompt_attn": prompt_attn, "completion_ids": completion_ids, "adv_n": adv_n}
        wall: dict[float, list[float]] = {0.0: [], 0.05: []}
        cpu: dict[float, list[float]] = {0.0: [], 0.05: []}
        for r in range(repeats + 1):
            for beta in ((0.0, 0.05) if r % 2 else (0.05, 0.0)):
                trainer.cfg = cfg.with_changes(dipod_beta=beta)
                start, start_cpu = time.perf_counter(), time.process_time()
                trainer.update(batch, step=1)
                if r > 0:  # the first round warms up
                    wall[beta].append(time.perf_counter() - start)
                    cpu[beta].append(time.process_time() - start_cpu)
        row = {"repeats": repeats}
        for label, times in (("wall", wall), ("cpu", cpu)):
            base, with_dipod = statistics.median(times[0.0]), statistics.median(times[0.05])
            row.update({f"{label}_s_beta0": base, f"{label}_s_beta005": with_dipod,
                        f"{label}_overhead_pct": 100.0 * (with_dipod / base - 1.0)})
        out[estimator] = row
    return out


def summarize(rows: list[dict]) -> dict:
    final = rows[-1]
    gaps = [r["gap_lower_bound"] for r in rows if isinstance(r.get("gap_lower_bound"), float)]
    late = gaps[int(len(gaps) * (1 - TAIL)):] or gaps
    return {"accuracy": final["eval/accuracy"], "reward": final["eval/reward"],
            "eval_gap": final["eval/gap_lower_bound"], "late_gap": statistics.mean(late) if late else float("nan"),
            "initial_accuracy": rows[0]["eval/accuracy"], "initial_gap": rows[0]["eval/gap_lower_bound"],
            "train_reward_last": statistics.mean(r["reward"] for r in rows[-max(1, len(rows) // 4):] if "reward" in r)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def curves(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
    return [p[0] for p in points], [p[1] for p in points]


def plot(results: dict, tasks: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        for method in methods:
            runs = results[task][method]
            for row, key in enumerate(("reward", "gap_lower_bound")):
                series = [curves(r, key) for r in runs]
                length = min(len(s[1]) for s in series)
                if length == 0:
                    continue
                ys = np.array([s[1][:length] for s in series])
                xs = series[0][0][:length]
                ax = axes[row][col]
                ax.plot(xs, ys.mean(0), label=method)
                if len(series) > 1:
                    ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.15)
        axes[0][col].set_title(f"{task}: rollout reward")
        axes[1][col].set_title(f"{task}: gap lower bound IW_K - ELBO")
        for row in range(2):
            axes[row][col].set_xlabel("step")
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 15-minute preset")
    parser.add_argument("--tasks", default="sudoku4,countdown")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--beta", type=float, default=0.05, help="DiPOD beta of the +dipod methods")
    parser.add_argument("--betas", default=None, help="sweep: extra spg_mix+dipod runs with these betas")
    parser.add_argument("--max_steps", type=int, default=None, help="override the preset's RL steps")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--overhead_repeats", type=int, default=10, help="timed updates per beta (0: skip)")
    parser.add_argument("--work", default="runs/bench_lm_dipod", help="folder of the individual runs")
    parser.add_argument("--out", default="docs/results", help="where lm_dipod.md / .png go")
    parser.add_argument("--name", default="lm_dipod", help="file stem of the outputs")
    parser.add_argument("--cache_dir", default=None, help="reference-policy cache (default: dipod's)")
    parser.add_argument("--model_dirs", default=None,
                        help="TASK=DIR,... : start from these reference policies instead of the cached recipe ones")
    args = parser.parse_args(argv)

    from dipod.lm.reference import ensure_reference_policy

    preset = dict(PRESETS["quick" if args.quick else "full"])
    if args.max_steps:
        preset["max_steps"] = args.max_steps
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = {}
    for name in args.methods.split(","):
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {list(METHODS)}")
        spec = dict(METHODS[name])
        spec.setdefault("dipod_beta", args.beta)
        methods[name] = spec
    for beta in [float(b) for b in args.betas.split(",")] if args.betas else []:
        methods[f"spg_mix+dipod(beta={beta:g})"] = {"estimator": "spg", "dipod_beta": beta}

    started = time.time()
    work = Path(args.work) / ("quick" if args.quick else "full")
    pinned = dict(item.split("=", 1) for item in args.model_dirs.split(",")) if args.model_dirs else {}
    models = {task: Path(pinned[task]) if task in pinned else ensure_reference_policy(task, args.cache_dir, progress_bar=False)
              for task in tasks}
    jobs = []
    for task in tasks:
        for name, spec in methods.items():
            for seed in seeds:
                changes = {**preset, **spec, "task": task, "seed": seed}
                if task != "sudoku4" and changes.get("estimator") == "spg":
                    changes["eubo_beta"] = 1.5  # the paper's value off sudoku
                jobs.append({"output_dir": str(work / task / name.replace("+", "_") / f"seed{seed}"),
                             "model_dir": str(models[task]), "changes": changes, "key": (task, name)})
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        reused = 0
        for done, (out, was_done) in enumerate(pool.imap_unordered(run_one, jobs), 1):
            reused += was_done
            print(f"[{done}/{len(jobs)}] {out}{' (reused)' if was_done else ''}  ({time.time() - started:.0f} s)", flush=True)
    # The paper's own evaluation sets (500 sudoku puzzles, 256 countdown items), beside our test splits.
    paper_jobs = [{"task": t, "model_dir": str(models[t]), "run_dir": None} for t in tasks]
    paper_jobs += [{"task": job["key"][0], "model_dir": job["model_dir"], "run_dir": job["output_dir"]} for job in jobs]
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        paper = pool.map(paper_set_eval, paper_jobs)
    paper_reference = {job["task"]: res for job, res in zip(paper_jobs, paper) if job["run_dir"] is None}
    paper_by_run = {job["run_dir"]: res for job, res in zip(paper_jobs, paper) if job["run_dir"] is not None}
    overhead = measure_overhead(models[tasks[0]], work, args.overhead_repeats) if args.overhead_repeats else {}

    from dipod.runlog import read_metrics

    results = {t: {m: [] for m in methods} for t in tasks}
    summary = {t: {m: [] for m in methods} for t in tasks}
    for job in jobs:
        task, name = job["key"]
        rows = read_metrics(Path(job["output_dir"]) / "metrics.jsonl")
        results[task][name].append(rows)
        summary[task][name].append({**summarize(rows), **paper_by_run[job["output_dir"]]})

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, tasks, list(methods), out / f"{args.name}.png")
    command = "python benchmarks/lm_dipod.py " + " ".join(argv)
    lines = [f"# DiPOD on the tiny reference policies ({'quick' if args.quick else 'full'} preset)", "",
             f"Command: `{command.strip()}`  ", f"Machine: shared 2-core CPU (other jobs running), "
             f"{args.workers} runs in parallel, one torch thread each; wall time {time.time() - started:.0f} s"
             f"{f' ({reused} of {len(jobs)} training runs reused from an earlier invocation)' if reused else ''}.  ",
             f"Budget per run: {preset['max_steps']} RL steps x {8} prompts x 4 completions; seeds {seeds}; "
             f"held-out greedy eval on {preset['eval_examples']} test examples.", "",
             "| task | method | held-out accuracy | held-out reward | paper test set accuracy | gap (late rollouts) "
             "| gap (held-out) |",
             "|---|---|---|---|---|---|---|"]
    for task in tasks:
        first = summary[task][next(iter(methods))][0]
        lines.append(f"| {task} | reference policy (before RL) | {first['initial_accuracy']:.3f} | | "
                     f"{paper_reference[task]['paper_accuracy']:.3f} | | {first['initial_gap']:.3f} |")
        for name in methods:
            s = summary[task][name]
            lines.append(f"| {task} | {name} | {mean_std([x['accuracy'] for x in s])} | "
                         f"{mean_std([x['reward'] for x in s])} | {mean_std([x['paper_accuracy'] for x in s])} | "
                         f"{mean_std([x['late_gap'] for x in s])} | "
                         f"{mean_std([x['eval_gap'] for x in s])} |")
    lines += ["", "Gap = IW_K - ELBO (K = 4 decoding orders), a lower bound on log pi - ELBO; 'late rollouts' is its "
              "mean over the last third of the run on training rollouts, 'held-out' on the greedy held-out completions "
              "of the final policy. 'Paper test set': greedy accuracy of the final checkpoint on the paper's own "
              "evaluation set (`d1_test`: sudoku4_d1_test.csv, 500 puzzles; countdown_cd3_test.jsonl, 256 items).", ""]
    if overhead:
        lines += ["DiPOD step-time overhead: median time of one update (num_iterations inner steps) on the same "
                  f"rollout batch, beta = 0.05 vs 0, {args.overhead_repeats} interleaved repeats each; CPU time of "
                  "the (single-threaded) process is the robust number on a shared machine:", ""]
        for est, o in overhead.items():
            lines.append(f"- {est}: CPU {o['cpu_s_beta0'] * 1e3:.0f} ms -> {o['cpu_s_beta005'] * 1e3:.0f} ms "
                         f"({o['cpu_overhead_pct']:+.1f}%); wall {o['wall_s_beta0'] * 1e3:.0f} ms -> "
                         f"{o['wall_s_beta005'] * 1e3:.0f} ms ({o['wall_overhead_pct']:+.1f}%)")
        lines.append("")
    lines.append(f"![curves]({args.name}.png)")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "summary": summary, "overhead": overhead},
                                                      indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
