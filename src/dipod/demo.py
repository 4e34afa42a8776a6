"""`dipod demo`: the main job in one command, on a 2-core CPU in a few minutes.

1. Load the tiny sudoku4 reference policy shipped with the package (``dipod.lm.reference``): a
   policy that can solve the puzzles but usually prefers a plausible wrong fill.
2. Post-train it online with SPG (mixed negative proxy) + DiPOD (``dipod.lm.trainer``) and, on the
   second core, the same run without DiPOD (the control that rises, then collapses).
3. Print a before/after table (held-out greedy accuracy, mean reward, the drift monitor's gap
   lower bound) and write a plot of both runs.

``--placebo`` runs the same demo with rewards shuffled across each step's rollouts: what the
policy does when the reward carries no information about the answer. ``--family block`` runs it on
the block-causal reference (a tiny SDAR, ``reference:sudoku4_block``) instead of the full-sequence one.

The RL recipe is ``configs/lm/tiny_sudoku4.yaml`` (``tiny_sudoku4_block.yaml`` for ``--family block``;
packaged as ``dipod/lm/configs/``; ``tiny_rl_config`` reads it), also what the benchmark
(benchmarks/lm_dipod.py) and `dipod lm train --config` start from.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from dipod.config import config_from_dict, load_yaml_mapping
from dipod.lm.train_config import ESTIMATOR_FIELDS, TrainConfig

TINY_CONFIGS = Path(__file__).parent / "lm" / "configs"  # also configs/lm/tiny_TASK.yaml (links to these)


def tiny_recipe(task: str = "sudoku4") -> dict:
    """The RL recipe of ``task``'s tiny reference policy: ``configs/lm/tiny_TASK.yaml``, the one source
    of `dipod demo`, the benchmarks and `dipod lm train --config configs/lm/tiny_TASK.yaml`."""
    path = TINY_CONFIGS / f"tiny_{task}.yaml"
    if not path.is_file():
        tasks = sorted(p.stem.removeprefix("tiny_") for p in TINY_CONFIGS.glob("tiny_*.yaml"))
        raise ValueError(f"no tiny RL recipe for task {task!r}; recipes exist for {tasks}")
    return load_yaml_mapping(path)


# The demo's recipe (sudoku4), as a mapping of TrainConfig fields.
TINY_RL_RECIPE: dict = tiny_recipe("sudoku4")


def tiny_rl_config(model_dir: str | Path, output_dir: str | Path, recipe: str | None = None, **changes) -> TrainConfig:
    """The tiny recipe ``recipe`` (default: that of ``changes.get("task", "sudoku4")``) with ``changes``;
    switching ``estimator`` drops the recipe's SPG-only fields."""
    values = tiny_recipe(recipe or changes.get("task", TINY_RL_RECIPE["task"]))
    if changes.get("estimator", values["estimator"]) != "spg":
        values = {k: v for k, v in values.items() if k not in ESTIMATOR_FIELDS}
    values.update(model=str(model_dir), output_dir=str(output_dir), **changes)
    return config_from_dict(TrainConfig, values, source="the tiny RL recipe")


def before_after_table(before: dict, after: dict) -> str:
    """Rows for the keys present in both: our test split, the paper's spg_test set, reward and gap."""
    rows = [("held-out accuracy (greedy)", "eval/accuracy"), ("paper spg_test accuracy (greedy)", "spg_test/accuracy"),
            ("held-out mean reward", "eval/reward"), ("gap lower bound IW_K - ELBO (nats)", "eval/gap_lower_bound")]
    lines = [f"{'':36} {'before':>10} {'after':>10}"]
    for label, key in rows:
        if key in before and key in after:
            lines.append(f"{label:36} {before[key]:>10.3f} {after[key]:>10.3f}")
    return "\n".join(lines)


def paper_set_accuracy(lm, cfg: TrainConfig) -> float:
    """Greedy accuracy on the paper's 256-puzzle sudoku set (``spg_test``), decoded as the held-out eval."""
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.tasks import get_task

    task = get_task(cfg.task)
    return evaluate_policy(lm, task, task.load("spg_test"), cfg.sampler_settings(0.0), batch_size=128)["accuracy"]


# --family: the reference policy and tiny RL recipe (configs/lm/tiny_NAME.yaml) of each kind of diffusion
DEMO_FAMILIES = {"masked": "sudoku4", "block": "sudoku4_block"}
FAMILY_WORDS = {"masked": "tiny sudoku4 reference policy (full-sequence masked diffusion, ModernBERT)",
                "block": "tiny sudoku4 reference policy (block-causal, SDAR with blocks of 4)"}
# The demo's runs: the method it shows and the control beside it (same reference, seed and budget).
RUNS = {"main": ("SPG(mix)+DiPOD", {}), "plain": ("plain SPG(mix), DiPOD off", {"dipod_beta": 0.0})}


def run_demo_job(job: dict) -> dict:
    """Worker (own process, one torch thread): one RL run; its before / after evaluations."""
    import torch

    from dipod.quiet import silence_third_party_noise

    silence_third_party_noise(language_models=True)  # a spawned process starts with the libraries' defaults
    torch.set_num_threads(1)
    from dipod.lm.model import load_masked_lm
    from dipod.lm.trainer import train

    cfg = tiny_rl_config(job["model_dir"], job["output_dir"], job["recipe"], **job["changes"])
    result = train(cfg)
    reference = load_masked_lm(str(job["model_dir"]))
    before = {**result.before, "spg_test/accuracy": paper_set_accuracy(reference, cfg)}
    after = {**result.after, "spg_test/accuracy": paper_set_accuracy(
        dataclasses.replace(reference, model=result.model), cfg)}
    accuracy = [row["eval/accuracy"] for row in result.history if "eval/accuracy" in row]
    return {"before": before, "after": after, "peak_accuracy": max(accuracy, default=before["eval/accuracy"])}


def main(argv: list[str], prog: str = "dipod demo") -> int:
    import multiprocessing as mp

    from dipod.lm.reference import default_cache_dir, ensure_reference_policy, shipped_reference
    from dipod.plot import plot_runs

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo", help="run folder (demo.png, one sub-folder per run)")
    parser.add_argument("--cache_dir", default=None, help=f"reference-policy cache (default: {default_cache_dir()})")
    parser.add_argument("--family", choices=sorted(DEMO_FAMILIES), default="masked",
                        help="which kind of diffusion model: masked (the full-sequence ModernBERT reference) or block "
                             "(the block-causal tiny SDAR reference, reference:sudoku4_block)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help=f"RL steps (>= 1; default: the recipe's, {TINY_RL_RECIPE['max_steps']})")
    parser.add_argument("--dipod_beta", type=float, default=None,
                        help=f"DiPOD weight (0: off; default: the recipe's, {TINY_RL_RECIPE['dipod_beta']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placebo", action="store_true",
                        help="the control: rewards shuffled across each step's rollouts, so they say nothing about "
                             "the answers; a gain here is not learning from reward")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the plain SPG(mix) run (DiPOD off) that runs beside the main one on the other core")
    args = parser.parse_args(argv)
    name = DEMO_FAMILIES[args.family]
    recipe = tiny_recipe(name)
    args.max_steps = recipe["max_steps"] if args.max_steps is None else args.max_steps
    args.dipod_beta = recipe["dipod_beta"] if args.dipod_beta is None else args.dipod_beta
    if args.max_steps < 1:
        parser.error(f"--max_steps {args.max_steps} must be >= 1")
    if args.dipod_beta < 0:
        parser.error(f"--dipod_beta {args.dipod_beta} must be >= 0")
    start = time.perf_counter()
    out = Path(args.output_dir)

    print(f"[1/3] {FAMILY_WORDS[args.family]} ...", flush=True)
    if shipped_reference(name) is None:
        print("      not shipped with this install: training it (about 10-20 minutes on 2 cores, then cached)",
              flush=True)
    model_dir = ensure_reference_policy(name, args.cache_dir)
    print(f"      {model_dir}  ({time.perf_counter() - start:.0f} s)", flush=True)

    placebo = " with PLACEBO rewards (shuffled)" if args.placebo else ""
    runs = {k: v for k, v in RUNS.items() if not (args.no_baseline and k == "plain")}
    print(f"[2/3] {' and '.join(label for label, _ in runs.values())}{placebo}, {args.max_steps} steps, "
          f"seed {args.seed}{', in parallel' if len(runs) > 1 else ''} ...", flush=True)
    # each demo replaces the previous demo's runs in OUTPUT_DIR/main and OUTPUT_DIR/plain
    common = dict(max_steps=args.max_steps, dipod_beta=args.dipod_beta, seed=args.seed, placebo_rewards=args.placebo,
                  save_steps=args.max_steps, eval_steps=max(1, args.max_steps // 3), overwrite=True,
                  save_final_model=False)
    jobs = [{"model_dir": str(model_dir), "output_dir": str(out / run), "recipe": name,
             # only the main run talks: the control's progress and completions would interleave with it
             "changes": {**common, **changes, **({} if run == "main" else {"progress_bar": False, "log_completions": 0})}}
            for run, (_, changes) in runs.items()]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = dict(zip(runs, pool.map(run_demo_job, jobs)))

    main_run = results["main"]
    print("[3/3] results (greedy decoding; seed %d; held-out = the %d puzzles of the test split, on grids no "
          "training puzzle uses)%s" % (args.seed, recipe["eval_examples"], placebo), flush=True)
    print(before_after_table(main_run["before"], main_run["after"]))
    if "plain" in results:
        plain = results["plain"]
        print(f"control, {RUNS['plain'][0]}: held-out accuracy {plain['before']['eval/accuracy']:.3f} -> peak "
              f"{plain['peak_accuracy']:.3f} -> final {plain['after']['eval/accuracy']:.3f}")
    labels = [f"{label}{' (placebo)' if args.placebo else ''}" for label, _ in runs.values()]
    plot = plot_runs([out / run for run in runs], out / "demo.png",
                     keys=["reward", "eval/accuracy", "gap_lower_bound"], labels=labels)
    print(f"plot: {plot}\nmetrics: {', '.join(str(out / run / 'metrics.jsonl') for run in runs)}\n"
          f"total time: {time.perf_counter() - start:.0f} s")
    return 0
