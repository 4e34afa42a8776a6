"""DiPOD against d1, FPO, SPG and JustGRPO on the tiny reference policies (sudoku4, countdown), same budget each.

    python benchmarks/lm_dipod.py --quick                  # sudoku4, 7 methods x 3 seeds, 20 RL steps
    python benchmarks/lm_dipod.py                          # sudoku4 + countdown, 7 methods x 5 seeds, 60 steps
    python benchmarks/lm_dipod.py --sweep [--quick]        # learning rate x DiPOD beta: learns / collapses / freezes
    python benchmarks/lm_dipod.py --recipe sudoku4_block   # the same on the block-causal reference (tiny SDAR)

Every (task, method, seed) is one `dipod lm train` run in its own process (one torch thread each,
``--workers`` at a time) from the `dipod demo` recipe (``dipod.demo.TINY_RL_RECIPE``); finished
runs are reused, so an interrupted benchmark continues. Every run evaluates greedily on the whole
test split before and after training (and every ``eval_steps``); the final checkpoints are also
scored on the paper's own evaluation sets. Writes ``OUT/NAME.md`` (means with 95% confidence
intervals over seeds), ``OUT/NAME.png`` (reward, held-out accuracy, gap monitor and collapsed-group
curves, mean over seeds) and ``OUT/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

from lm_dipod_report import method_table, plot, summarize

METHODS: dict[str, dict] = {
    "d1": {"estimator": "d1", "dipod_beta": 0.0, "num_draws": 1},
    "fpo": {"estimator": "fpo", "dipod_beta": 0.0},
    "fpo+dipod": {"estimator": "fpo"},
    "spg_mix": {"estimator": "spg", "dipod_beta": 0.0},
    "spg_mix+dipod": {"estimator": "spg"},
    # JustGRPO as released: left-to-right rollouts, exact left-to-right likelihood, one update per batch,
    # (r - mean) / (std + 1e-4) advantages (docs/lm_justgrpo.md)
    "justgrpo": {"estimator": "justgrpo", "dipod_beta": 0.0, "num_iterations": 1, "scale_rewards": True},
    # the control: SPG(mix)+DiPOD with the step's rewards shuffled across its rollouts (no information)
    "placebo": {"estimator": "spg", "placebo_rewards": True},
    # not in the default set: JustGRPO with the DiPOD term on the any-order ELBO of its rollouts
    "justgrpo+dipod": {"estimator": "justgrpo", "num_iterations": 1, "scale_rewards": True},
}
DEFAULT_METHODS = ("d1", "fpo", "fpo+dipod", "spg_mix", "spg_mix+dipod", "justgrpo", "placebo")
# Test-split sizes are the tasks' full test splits (500 each); eval_examples=None means all of them.
PRESETS = {
    "quick": {"max_steps": 20, "eval_steps": 10, "gap_monitor_steps": 5, "seeds": "0,1,2", "tasks": "sudoku4"},
    # 60 steps: the 35 sudoku4 runs took about 2.5 hours on one worker of a loaded 2-core machine (docs/results/lm_table1.md)
    "full": {"max_steps": 60, "eval_steps": 25, "gap_monitor_steps": 5, "seeds": "0,1,2,3,4", "tasks": "sudoku4,countdown"},
}
SWEEP = {"learning_rates": (1e-4, 3e-4, 1e-3, 3e-3), "betas": (0.0, 0.05, 0.5), "estimators": ("fpo", "spg")}
PAPER_SETS = {"sudoku4": ("spg_test", "d1_test"), "countdown": ("d1_test",)}


def finished(job: dict) -> bool:
    """Whether the job's run reached its last step and evaluated there."""
    from dipod.runlog import read_metrics

    metrics = Path(job["output_dir"]) / "metrics.jsonl"
    rows = read_metrics(metrics) if metrics.is_file() else []
    return bool(rows) and rows[-1].get("step") == job["changes"]["max_steps"] and "eval/accuracy" in rows[-1]


def run_one(job: dict) -> tuple[str, bool, float]:
    """Worker: one training run; returns its folder, whether it had already finished, and its wall time."""
    import torch

    torch.set_num_threads(1)
    from dipod.demo import tiny_rl_config
    from dipod.lm.trainer import train

    out = Path(job["output_dir"])
    if finished(job):
        return str(out), True, float("nan")
    start = time.perf_counter()
    train(tiny_rl_config(job["model_dir"], out, job["recipe"], progress_bar=False, tensorboard=False, log_completions=0,
                         overwrite=True, **job["changes"]))  # an unfinished run starts again
    wall = time.perf_counter() - start
    (out / "wall_time.json").write_text(json.dumps({"wall_s": wall}))
    return str(out), False, wall


def paper_set_eval(job: dict) -> dict:
    """Worker: greedy accuracy on the paper's evaluation sets of a run's final checkpoint (or of the
    reference policy itself when ``run_dir`` is None)."""
    import torch

    torch.set_num_threads(1)
    from dipod.checkpoint import latest_checkpoint, load_checkpoint
    from dipod.demo import tiny_rl_config
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.model import load_masked_lm
    from dipod.lm.tasks import get_task

    cached = Path(job["run_dir"]) / "paper_sets.json" if job["run_dir"] is not None else None
    if cached is not None and cached.is_file():  # a finished run is scored once (a rebuilt page reuses it)
        return json.loads(cached.read_text())
    lm = load_masked_lm(job["model_dir"])
    if job["run_dir"] is not None:
        checkpoint = latest_checkpoint(Path(job["run_dir"]))
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {job['run_dir']}; rerun the benchmark to finish that run")
        weights, _, _ = load_checkpoint(checkpoint)
        unexpected = lm.model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{checkpoint}: weights {unexpected[:3]} do not belong to {job['model_dir']}")
    settings = tiny_rl_config(job["model_dir"], "unused", job["recipe"], task=job["task"]).sampler_settings(0.0)
    task = get_task(job["task"])
    scores = {split: evaluate_policy(lm, task, task.load(split), settings, batch_size=128)["accuracy"]
              for split in PAPER_SETS[job["task"]]}
    if cached is not None:
        cached.write_text(json.dumps(scores))
    return scores


def measure_overhead(model_dir: Path, work: Path, repeats: int, recipe: str) -> dict:
    """Update time with DiPOD (beta = 0.05) against without (beta = 0) on the same rollout batch,
    interleaved so that load on a shared machine hits both alike."""
    import torch

    torch.set_num_threads(1)
    from dipod.demo import tiny_rl_config
    from dipod.lm.trainer import Trainer

    out = {}
    for estimator in ("spg", "fpo"):
        cfg = tiny_rl_config(model_dir, work / f"overhead_{estimator}", recipe, estimator=estimator, progress_bar=False,
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short preset (sudoku4, 20 steps, 3 seeds)")
    parser.add_argument("--sweep", action="store_true", help="learning rate x DiPOD beta for FPO and SPG(mix)")
    parser.add_argument("--sweep_estimators", default=",".join(SWEEP["estimators"]), help="--sweep: estimators")
    parser.add_argument("--sweep_lrs", default=",".join(f"{x:g}" for x in SWEEP["learning_rates"]), help="--sweep: rates")
    parser.add_argument("--sweep_betas", default=",".join(f"{x:g}" for x in SWEEP["betas"]), help="--sweep: DiPOD betas")
    parser.add_argument("--tasks", default=None, help="comma list (default: the preset's)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {list(METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma list (default: the preset's, 0-4)")
    parser.add_argument("--beta", type=float, default=None, help="DiPOD beta of the +dipod methods (default: the recipe's)")
    parser.add_argument("--max_steps", type=int, default=None, help="override the preset's RL steps")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field for every run, e.g. masking=block_random (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--overhead_repeats", type=int, default=10, help="timed updates per beta (0: skip)")
    parser.add_argument("--work", default="runs/bench_lm_dipod", help="folder of the individual runs")
    parser.add_argument("--out", default="docs/results", help="where NAME.md / .png / .json go")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: lm_dipod_PRESET[_sweep])")
    parser.add_argument("--cache_dir", default=None, help="reference-policy cache (default: dipod's)")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: rebuild the page from the runs already finished (others are left out)")
    parser.add_argument("--model_dirs", default=None, help="TASK=DIR,... : start from these policies instead of the recipe's")
    parser.add_argument("--recipe", default=None,
                        help="one tiny recipe for every run: its reference policy (reference:NAME) and RL recipe "
                             "(configs/lm/tiny_NAME.yaml), on its task; e.g. sudoku4_block (default: each task's own)")
    args = parser.parse_args(argv)

    from dipod.demo import tiny_recipe
    from dipod.lm.reference import ensure_reference_policy

    preset_name = "quick" if args.quick else "full"
    preset = dict(PRESETS[preset_name])
    seeds = [int(s) for s in (args.seeds or preset.pop("seeds")).split(",") if s]
    tasks = [t for t in (args.tasks or preset.pop("tasks")).split(",") if t]
    if args.recipe:
        tasks = [tiny_recipe(args.recipe)["task"]]
    recipes = {t: args.recipe or t for t in tasks}  # tiny recipe (and reference policy) name of each task
    preset.pop("seeds", None), preset.pop("tasks", None)
    if args.max_steps:
        preset["max_steps"] = args.max_steps
    preset["eval_examples"] = 500  # the whole test split of sudoku4 and countdown
    beta = tiny_recipe(recipes[tasks[0]])["dipod_beta"] if args.beta is None else args.beta
    from lm_rl_probe import parse_value

    overrides = {field: parse_value(value) for field, _, value in (item.partition("=") for item in args.set)}
    methods: dict[str, dict] = {}
    if args.sweep:
        for est in args.sweep_estimators.split(","):
            for lr in [float(x) for x in args.sweep_lrs.split(",")]:
                for b in [float(x) for x in args.sweep_betas.split(",")]:
                    methods[f"{est} lr={lr:g} beta={b:g}"] = {"estimator": est, "learning_rate": lr, "dipod_beta": b}
    else:
        for name in args.methods.split(","):
            if name not in METHODS:
                raise SystemExit(f"unknown method {name!r}; choose from {list(METHODS)}")
            methods[name] = {"dipod_beta": beta, **METHODS[name]}
    name = args.name or f"lm_dipod_{preset_name}{'_sweep' if args.sweep else ''}{f'_{args.recipe}' if args.recipe else ''}"

    started = time.time()
    work = Path(args.work) / preset_name
    pinned = dict(item.split("=", 1) for item in args.model_dirs.split(",")) if args.model_dirs else {}
    models = {t: Path(pinned[t]) if t in pinned else ensure_reference_policy(recipes[t], args.cache_dir,
                                                                             progress_bar=False)
              for t in tasks}
    jobs = []
    for task in tasks:
        for method, spec in methods.items():
            for seed in seeds:
                changes = {**preset, **spec, **overrides, "task": task, "seed": seed}
                if task != "sudoku4" and changes.get("estimator") == "spg":
                    changes["eubo_beta"] = 1.5  # the paper's value off sudoku
                folder = method.replace("+", "_").replace(" ", "_").replace("=", "")
                jobs.append({"output_dir": str(work / recipes[task] / folder / f"seed{seed}"),
                             "model_dir": str(models[task]), "recipe": recipes[task], "changes": changes,
                             "key": (task, method)})
    missing = [job for job in jobs if not finished(job)]
    if args.report_only:
        jobs = [job for job in jobs if job not in missing]
        if not jobs:
            raise SystemExit(f"no finished run under {work}; run without --report_only first")
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for done, (out, was_done, wall) in enumerate(pool.imap_unordered(run_one, [] if args.report_only else jobs), 1):
            print(f"[{done}/{len(jobs)}] {out}{' (reused)' if was_done else f' {wall:.0f} s'}  "
                  f"({time.time() - started:.0f} s)", flush=True)
    paper_jobs = [{"task": t, "model_dir": str(models[t]), "recipe": recipes[t], "run_dir": None} for t in tasks]
    paper_jobs += [{"task": job["key"][0], "model_dir": job["model_dir"], "recipe": job["recipe"],
                    "run_dir": job["output_dir"]} for job in jobs]
    with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        paper_results = pool.map(paper_set_eval, paper_jobs)
    paper_reference = {j["task"]: r for j, r in zip(paper_jobs, paper_results) if j["run_dir"] is None}
    paper_by_run = {j["run_dir"]: r for j, r in zip(paper_jobs, paper_results) if j["run_dir"] is not None}
    overhead = (measure_overhead(models[tasks[0]], work, args.overhead_repeats, recipes[tasks[0]])
                if args.overhead_repeats else {})

    from dipod.runlog import read_metrics

    methods = {m: spec for m, spec in methods.items() if any(job["key"][1] == m for job in jobs)}
    results = {t: {m: [] for m in methods} for t in tasks}
    summary = {t: {m: [] for m in methods} for t in tasks}
    paper = {t: {m: [] for m in methods} for t in tasks}
    for job in jobs:
        task, method = job["key"]
        rows = read_metrics(Path(job["output_dir"]) / "metrics.jsonl")
        wall_file = Path(job["output_dir"]) / "wall_time.json"
        wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else math.nan
        results[task][method].append(rows)
        summary[task][method].append({**summarize(rows), "wall_s": wall})
        paper[task][method].append(paper_by_run[job["output_dir"]])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / f"{name}.png")
    command = "python benchmarks/lm_dipod.py " + " ".join(argv)
    recipe = {**tiny_recipe(recipes[tasks[0]]), **preset, **overrides}
    on = f"the {args.recipe} reference policy" if args.recipe else "the tiny reference policies"
    lines = [f"# DiPOD on {on} ({preset_name} preset{', lr x beta sweep' if args.sweep else ''})",
             "", f"Command: `{command.strip()}`  ",
             *([f"(this page was rebuilt from the finished runs; the same command without `--report_only` trains "
                f"them, reusing the finished ones)  "] if args.report_only else []),
             f"Machine: shared 2-core CPU (other jobs running), {args.workers} runs in parallel, one torch thread "
             f"each; {'page rebuilt in' if args.report_only else 'benchmark wall time'} "
             f"{time.time() - started:.0f} s; s/step varies with the machine's load while each run trained.  ",
             f"Budget per run: {recipe['max_steps']} RL steps x {recipe['prompts_per_step']} prompts x "
             f"{recipe['num_generations']} completions, lr {recipe['learning_rate']:g} unless named "
             f"({recipe['lr_scheduler']} after {recipe['warmup_steps']} warm-up steps){''.join(f', {item}' for item in args.set)}, DiPOD beta {beta:g} for +dipod; seeds {seeds}; held-out = "
             f"greedy accuracy on the whole test split (500 examples) before and after; 95% t-intervals over seeds.", ""]
    if args.report_only and missing:
        lines += [f"**Partial:** {len(missing)} of {len(jobs) + len(missing)} runs had not finished when this page was "
                  "built and are left out (the seed counts per method say which remain).", ""]
    lines += method_table(tasks, list(methods), summary, paper, paper_reference)
    lines += ["", "Outcome per run: learns (held-out accuracy +0.05 or more), collapses (held-out accuracy -0.10 "
              "or training reward down 0.15 from the first to the last quarter), freezes (>= 90% of groups with "
              "identical rewards over the last quarter, no gain), flat (none of these). Gap = IW_K - ELBO (K = 4 "
              "decoding orders) on training rollouts, first and last third of the run; 'held-out gap' on the final "
              "greedy completions. 'worst reward drop' = largest fall of the rollout reward below its running "
              "maximum.", ""]
    if overhead:
        lines += ["DiPOD step-time overhead: median time of one update (num_iterations inner steps) on the same "
                  f"rollout batch, beta = 0.05 vs 0, {args.overhead_repeats} interleaved repeats each; CPU time of "
                  "the (single-threaded) process is the robust number on a shared machine:", ""]
        for est, o in overhead.items():
            lines.append(f"- {est}: CPU {o['cpu_s_beta0'] * 1e3:.0f} ms -> {o['cpu_s_beta005'] * 1e3:.0f} ms "
                         f"({o['cpu_overhead_pct']:+.1f}%); wall {o['wall_s_beta0'] * 1e3:.0f} ms -> "
                         f"{o['wall_s_beta005'] * 1e3:.0f} ms ({o['wall_overhead_pct']:+.1f}%)")
        lines.append("")
    lines.append(f"![curves]({name}.png)")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"command": command, "summary": summary, "paper_sets": paper,
                                                  "paper_reference": paper_reference, "overhead": overhead}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
