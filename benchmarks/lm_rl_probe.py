"""The overfit probe: can RL teach the tiny sudoku4 reference policy a handful of puzzles it gets wrong?

    python benchmarks/lm_rl_probe.py --estimator fpo --set learning_rate=1e-3 --out /tmp/probe/fpo_lr1e-3
    python benchmarks/lm_rl_probe.py --estimator spg --set temperature=2.0 --set remasking=random --steps 40

The policy trains on P training puzzles that its greedy decoding gets wrong (P prompts x G rollouts
per step) and is evaluated greedily on the same P puzzles, so a working RL loop must drive the
greedy reward to 1.0 within tens of steps. This is the fast instrument of docs/lm_rl_diagnosis.md:
one torch thread, seconds per step. Prints one line per step and writes OUT/probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COLUMNS = ("reward", "frac_reward_zero_std", "reward_std_in_group", "rollout_entropy", "elbo_per_token",
           "gap_lower_bound", "eval/reward", "eval/accuracy")


def failing_puzzles(model_dir: Path, count: int, seed: int = 0, scan: int = 256) -> list[dict]:
    """The first ``count`` training puzzles (in a seeded order) whose greedy completion is not correct."""
    import torch

    from dipod.demo import tiny_rl_config
    from dipod.lm.evaluate import evaluate_policy
    from dipod.lm.model import load_masked_lm
    from dipod.lm.tasks import get_task

    task = get_task("sudoku4")
    examples = task.load("train", limit=scan)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = [examples[i] for i in order]
    lm = load_masked_lm(str(model_dir))
    settings = tiny_rl_config(model_dir, "unused").sampler_settings(0.0)
    result = evaluate_policy(lm, task, examples, settings, batch_size=128)
    wrong = [ex for ex, row in zip(examples, result["results"]) if not row["correct"]]
    if len(wrong) < count:
        raise ValueError(f"only {len(wrong)} of {scan} training puzzles are failed by {model_dir}; lower --puzzles")
    return wrong[:count]


def write_csv(examples: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("Puzzle,Solution\n" + "".join(f"{ex['puzzle']},{ex['solution']}\n" for ex in examples))
    return path


def probe_config(model_dir: Path, data: Path, out: Path, estimator: str, steps: int, prompts: int, generations: int,
                 eval_every: int, seed: int, changes: dict):
    """The demo recipe pointed at the probe puzzles (training and evaluation on the same file)."""
    from dipod.demo import tiny_rl_config

    base = {"estimator": estimator, "train_data": str(data), "eval_data": str(data), "prompts_per_step": prompts,
            "num_generations": generations, "eval_examples": prompts, "eval_steps": eval_every, "max_steps": steps,
            "save_steps": 0, "gap_monitor_steps": 5, "gap_monitor_sequences": 4, "seed": seed, "progress_bar": False,
            "tensorboard": False, "log_completions": 0}
    if estimator == "d1":
        base["num_draws"] = 1
    return tiny_rl_config(model_dir, out, **{**base, **changes})


def first_step_solved(history: list[dict]) -> int | None:
    """First evaluated step at which the greedy reward on the probe puzzles is 1.0 (all solved)."""
    for row in history:
        if row.get("eval/reward", 0.0) >= 1.0 - 1e-9:
            return int(row["step"])
    return None


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", default="spg", choices=("d1", "fpo", "fpo++", "spg"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--puzzles", type=int, default=4, help="failing training puzzles (prompts per step)")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per puzzle per step")
    parser.add_argument("--eval_every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", default=None, help="policy to start from (default: the cached sudoku4 reference)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any TrainConfig field, e.g. learning_rate=1e-3, temperature=2.0, dipod_beta=0")
    parser.add_argument("--out", default="runs/probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from dipod.lm.reference import ensure_reference_policy
    from dipod.lm.trainer import train

    changes = {}
    for item in args.set:
        field, _, value = item.partition("=")
        changes[field] = parse_value(value)
    model_dir = Path(args.model_dir) if args.model_dir else ensure_reference_policy("sudoku4", progress_bar=False)
    out = Path(args.out)
    data = write_csv(failing_puzzles(model_dir, args.puzzles, args.seed), out / "puzzles.csv")
    cfg = probe_config(model_dir, data, out, args.estimator, args.steps, args.puzzles, args.generations,
                       args.eval_every, args.seed, changes)
    start = time.perf_counter()
    history = train(cfg).history
    wall = time.perf_counter() - start
    print("step " + " ".join(f"{c:>12}" for c in COLUMNS))
    for row in history:
        print(f"{row['step']:4d} " + " ".join(f"{row[c]:12.3f}" if c in row else f"{'':>12}" for c in COLUMNS))
    solved = first_step_solved(history)
    summary = {"estimator": args.estimator, "changes": changes, "seed": args.seed, "steps": args.steps,
               "first_step_greedy_reward_1": solved, "final_eval_reward": history[-1].get("eval/reward"),
               "wall_s": wall, "history": history}
    (out / "probe.json").write_text(json.dumps(summary, indent=1))
    print(f"greedy reward 1.0 first at step {solved}; final greedy reward {summary['final_eval_reward']:.3f}; "
          f"{wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
