"""`dipod demo`: the main job in one command, on a 2-core CPU in about ten minutes.

1. Train (or reuse the cached) tiny sudoku4 reference policy (``dipod.lm.reference``).
2. Post-train it online with SPG (mixed negative proxy) + DiPOD (``dipod.lm.trainer``).
3. Print a before/after table (held-out greedy accuracy, mean reward, the drift monitor's gap
   lower bound) and write a plot of the run.

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
    "estimator": "spg", "spg_negative_proxy": "mix", "spg_mix_weight": 0.5, "eubo_beta": 1.0, "dipod_beta": 0.05,
    # d1's sudoku reward ignores the clue cells; the tiny policy under RL rewrites them unless they
    # are rewarded too (docs/lm_rl_diagnosis.md): correctness + clues_kept, both weight 1.
    "reward_weights": [1.0, 1.0],
    # 3e-4 and above lower held-out accuracy within 15 steps; 1e-4 is the largest rate that did not
    "learning_rate": 1e-4, "weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_steps": 5,
    "max_steps": 60, "save_steps": 20, "eval_steps": 20, "eval_examples": 500,
    "gap_monitor_steps": 5, "gap_monitor_sequences": 4, "gap_monitor_orders": 4,
    "save_final_model": False,
}


def tiny_rl_config(model_dir: str | Path, output_dir: str | Path, **changes) -> TrainConfig:
    """The tiny recipe with ``changes``; switching ``estimator`` drops the recipe's SPG-only fields,
    switching ``task`` drops its sudoku4 reward weights."""
    values = dict(TINY_RL_RECIPE)
    if changes.get("estimator", values["estimator"]) != "spg":
        values = {k: v for k, v in values.items() if k not in ESTIMATOR_FIELDS}
    if changes.get("task", values["task"]) != values["task"]:
        values.pop("reward_weights", None)
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


def main(argv: list[str], prog: str = "dipod demo") -> int:
    import torch

    from dipod.lm.model import load_masked_lm
    from dipod.lm.reference import default_cache_dir, ensure_reference_policy
    from dipod.lm.trainer import train
    from dipod.plot import plot_runs

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo", help="run folder (metrics.jsonl, demo.png, checkpoints)")
    parser.add_argument("--cache_dir", default=None, help=f"reference-policy cache (default: {default_cache_dir()})")
    parser.add_argument("--max_steps", type=int, default=TINY_RL_RECIPE["max_steps"], help="RL steps")
    parser.add_argument("--dipod_beta", type=float, default=TINY_RL_RECIPE["dipod_beta"], help="DiPOD weight (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the tiny model's matrices gain nothing from more")
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    print("[1/3] tiny sudoku4 reference policy (trained once, then cached) ...", flush=True)
    model_dir = ensure_reference_policy("sudoku4", args.cache_dir)
    print(f"      {model_dir}  ({time.perf_counter() - start:.0f} s)", flush=True)

    print("[2/3] SPG(mix) + DiPOD post-training ...", flush=True)
    cfg = tiny_rl_config(model_dir, args.output_dir, max_steps=args.max_steps, dipod_beta=args.dipod_beta,
                         seed=args.seed, save_steps=args.max_steps, eval_steps=max(1, args.max_steps // 3))
    result = train(cfg)

    print("[3/3] results (greedy decoding; seed %d; held-out = the %d puzzles of the test split, on grids no "
          "training puzzle uses)" % (args.seed, cfg.eval_examples), flush=True)
    reference = load_masked_lm(str(model_dir))
    before = {**result.before, "spg_test/accuracy": paper_set_accuracy(reference, cfg)}
    after = {**result.after, "spg_test/accuracy": paper_set_accuracy(
        dataclasses.replace(reference, model=result.model), cfg)}
    print(before_after_table(before, after))
    plot = plot_runs([Path(args.output_dir)], Path(args.output_dir) / "demo.png",
                     keys=["reward", "eval/accuracy", "gap_lower_bound", "eval/gap_lower_bound", "elbo_per_token"], labels=["SPG(mix)+DiPOD"])
    print(f"plot: {plot}\nmetrics: {Path(args.output_dir) / 'metrics.jsonl'}\n"
          f"total time: {time.perf_counter() - start:.0f} s")
    return 0
