"""`dipod demo`: the main job in one command, on a 2-core CPU in a few minutes.

1. Load the tiny sudoku4 reference policy shipped with the package (``dipod.lm.reference``): a
   policy that can solve the puzzles but usually prefers a plausible wrong fill.
2. Post-train it online with SPG (mixed negative proxy) + DiPOD (``dipod.lm.trainer``) and, on the
   second core, the same run without DiPOD (the control that rises, then collapses).
3. Print a before/after table (held-out greedy accuracy, mean reward, the drift monitor's gap
   lower bound) and write a plot of both runs.

``--placebo`` runs the same demo with rewards shuffled across each step's rollouts: what the
policy does when the reward carries no information about the answer.

``tiny_rl_config`` is also the recipe the benchmark (benchmarks/lm_dipod.py) starts from.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from dipod.lm.train_config import ESTIMATOR_FIELDS, TrainConfig

# RL settings for the tiny reference policies (decoding as in their SFT recipe: 16 tokens, one
# block, one token per step). Everything else keeps TrainConfig's paper defaults unless named.
TINY_RL_RECIPE: dict = {
    "task": "sudoku4", "prompt_style": "compact", "dtype": "float32", "lora_r": 0,
    "prompts_per_step": 16, "num_generations": 4, "gradient_accumulation_steps": 1,
    "gen_length": 16, "block_length": 16, "diffusion_steps": 16, "temperature": 1.0, "max_prompt_length": 64,
    "num_draws": 2, "masking": "random", "num_iterations": 2,
    # `random` never scores the EOS; harmless here because every sudoku4 answer (16 digits) fills the
    # 16-token completion. Other tasks switch to unbiased_random (tiny_rl_config), which scores it.
    "dipod_unscored_eos": True,
    "estimator": "spg", "spg_negative_proxy": "mix", "spg_mix_weight": 0.5, "eubo_beta": 1.0, "dipod_beta": 0.05,
    # d1's sudoku reward ignores the clue cells; the tiny policy under RL rewrites them unless they
    # are rewarded too (docs/lm_rl_diagnosis.md): correctness + clues_kept, both weight 1.
    "reward_weights": [1.0, 1.0],
    # 3e-4 and above lower held-out accuracy within 15 steps; 1e-4 is the largest rate that did not.
    # Cosine decay to 0 at max_steps: at a constant rate the policy, once mostly right, keeps walking
    # (held-out 0.65 -> 0.44 from step 10 to 40 in one seed); the decay lets it settle (docs/lm_train.md).
    "learning_rate": 1e-4, "lr_scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_steps": 5,
    "max_steps": 60, "save_steps": 20, "eval_steps": 20, "eval_examples": 500,
    "gap_monitor_steps": 5, "gap_monitor_sequences": 4, "gap_monitor_orders": 4,
    "save_final_model": False,
}


def tiny_rl_config(model_dir: str | Path, output_dir: str | Path, **changes) -> TrainConfig:
    """The tiny recipe with ``changes``; switching ``estimator`` drops the recipe's SPG-only fields,
    switching ``task`` drops its sudoku4 reward weights and takes a masking process that scores the
    EOS (answers of other tasks end anywhere; the DiPOD term must see where)."""
    values = dict(TINY_RL_RECIPE)
    if changes.get("estimator", values["estimator"]) != "spg":
        values = {k: v for k, v in values.items() if k not in ESTIMATOR_FIELDS}
    if changes.get("task", values["task"]) != values["task"]:
        values.pop("reward_weights", None)
        values.update(masking="unbiased_random", dipod_unscored_eos=False)
    values.update(model=str(model_dir), output_dir=str(output_dir), **changes)
    return TrainConfig(**values)


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

    cfg = tiny_rl_config(job["model_dir"], job["output_dir"], **job["changes"])
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
    parser.add_argument("--max_steps", type=int, default=TINY_RL_RECIPE["max_steps"], help="RL steps (>= 1)")
    parser.add_argument("--dipod_beta", type=float, default=TINY_RL_RECIPE["dipod_beta"], help="DiPOD weight (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placebo", action="store_true",
                        help="the control: rewards shuffled across each step's rollouts, so they say nothing about "
                             "the answers; a gain here is not learning from reward")
    parser.add_argument("--no_baseline", action="store_true",
                        help="skip the plain SPG(mix) run (DiPOD off) that runs beside the main one on the other core")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max_steps {args.max_steps} must be >= 1")
    if args.dipod_beta < 0:
        parser.error(f"--dipod_beta {args.dipod_beta} must be >= 0")
    start = time.perf_counter()
    out = Path(args.output_dir)

    print("[1/3] tiny sudoku4 reference policy ...", flush=True)
    if shipped_reference("sudoku4") is None:
        print("      not shipped with this install: training it (about 10 minutes on 2 cores, then cached)", flush=True)
    model_dir = ensure_reference_policy("sudoku4", args.cache_dir)
    print(f"      {model_dir}  ({time.perf_counter() - start:.0f} s)", flush=True)

    placebo = " with PLACEBO rewards (shuffled)" if args.placebo else ""
    runs = {k: v for k, v in RUNS.items() if not (args.no_baseline and k == "plain")}
    print(f"[2/3] {' and '.join(label for label, _ in runs.values())}{placebo}, {args.max_steps} steps, "
          f"seed {args.seed}{', in parallel' if len(runs) > 1 else ''} ...", flush=True)
    # each demo replaces the previous demo's runs in OUTPUT_DIR/main and OUTPUT_DIR/plain
    common = dict(max_steps=args.max_steps, dipod_beta=args.dipod_beta, seed=args.seed, placebo_rewards=args.placebo,
                  save_steps=args.max_steps, eval_steps=max(1, args.max_steps // 3), overwrite=True)
    jobs = [{"model_dir": str(model_dir), "output_dir": str(out / name),
             # only the main run talks: the control's progress and completions would interleave with it
             "changes": {**common, **changes, **({} if name == "main" else {"progress_bar": False, "log_completions": 0})}}
            for name, (_, changes) in runs.items()]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = dict(zip(runs, pool.map(run_demo_job, jobs)))

    main_run = results["main"]
    print("[3/3] results (greedy decoding; seed %d; held-out = the %d puzzles of the test split, on grids no "
          "training puzzle uses)%s" % (args.seed, TINY_RL_RECIPE["eval_examples"], placebo), flush=True)
    print(before_after_table(main_run["before"], main_run["after"]))
    if "plain" in results:
        plain = results["plain"]
        print(f"control, {RUNS['plain'][0]}: held-out accuracy {plain['before']['eval/accuracy']:.3f} -> peak "
              f"{plain['peak_accuracy']:.3f} -> final {plain['after']['eval/accuracy']:.3f}")
    labels = [f"{label}{' (placebo)' if args.placebo else ''}" for label, _ in runs.values()]
    plot = plot_runs([out / name for name in runs], out / "demo.png",
                     keys=["reward", "eval/accuracy", "gap_lower_bound"], labels=labels)
    print(f"plot: {plot}\nmetrics: {', '.join(str(out / name / 'metrics.jsonl') for name in runs)}\n"
          f"total time: {time.perf_counter() - start:.0f} s")
    return 0
