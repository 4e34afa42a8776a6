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


def proxy_variance(model_dir: Path, seeds: int = 16, prompts: int = 8, generations: int = 4) -> list[dict]:
    """Per-sequence Monte-Carlo std of the ELBO estimate (nats per token) over ``seeds`` mask draws, for
    each masking process and draw count, on rollouts of the policy (the demo's decoding, temperature 1),
    beside the spread of the ELBO between the rollouts of one prompt (the signal the estimators use)."""
    import torch

    from dipod.demo import tiny_rl_config
    from dipod.lm import train_engine as engine

    cfg = tiny_rl_config(model_dir, "unused")
    lm = engine.load_policy(cfg, device="cpu")
    lm.model.eval()
    task = engine.get_task("sudoku4")
    examples = [ex for ex in task.load("train", limit=prompts) for _ in range(generations)]
    ids, attn = engine.encode_prompts(lm, [task.prompt(ex, "compact") for ex in examples], 64, chat=False)
    completions = engine.generate(lm, ids, attn, cfg.sampler_settings(1.0), torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        for masking in ("random", "block_random"):
            for draws in (1, 2, 8):
                settings = engine.proxy_settings(cfg.with_changes(masking=masking, num_draws=draws))
                per_token = torch.stack([engine.compute_proxies(lm, ids, attn, completions, settings, seed).elbo_per_token_n
                                         for seed in range(seeds)])  # [S, B]
                within = per_token.mean(0).reshape(prompts, generations).std(1).mean()
                rows.append({"masking": masking, "num_draws": draws, "mc_std_per_token": float(per_token.std(0).mean()),
                             "elbo_per_token": float(per_token.mean()), "between_rollouts_std": float(within)})
    return rows


def rollout_spread(model_dir: Path, puzzles: int = 128, samples: int = 8) -> list[dict]:
    """How much room the policy's own samples leave RL on held-out puzzles, per decoding setting:
    greedy accuracy, mean sample accuracy (pass@1), pass@``samples`` (some sample correct), the
    fraction of groups of ``samples`` with identical rewards, and the mean within-group reward std."""
    import torch

    from dipod.demo import tiny_rl_config
    from dipod.lm import train_engine as engine
    from dipod.lm.monitors import group_reward_stats

    cfg = tiny_rl_config(model_dir, "unused")
    lm = engine.load_policy(cfg, device="cpu")
    task = engine.get_task("sudoku4")
    examples = task.load("test", limit=puzzles)
    rows = []
    for temperature, remasking in ((0.0, "low_confidence"), (0.3, "low_confidence"), (1.0, "low_confidence"),
                                   (2.0, "low_confidence"), (1.0, "random"), (2.0, "random")):
        repeat = 1 if temperature == 0.0 and remasking == "low_confidence" else samples
        grouped = [ex for ex in examples for _ in range(repeat)]
        ids, attn = engine.encode_prompts(lm, [task.prompt(ex, "compact") for ex in grouped], 64, chat=False)
        settings = cfg.with_changes(remasking=remasking).sampler_settings(temperature)
        completions = engine.generate(lm, ids, attn, settings, torch.Generator().manual_seed(0))
        texts = engine.decode_completions(lm, completions)
        correct = torch.tensor([float(task.is_correct(t, ex)) for t, ex in zip(texts, grouped)]).reshape(-1, repeat)
        rewards = torch.tensor([task.reward(t, ex) for t, ex in zip(texts, grouped)])
        row = {"temperature": temperature, "remasking": remasking, "pass@1": float(correct.mean()),
               f"pass@{repeat}": float(correct.max(1).values.mean()), "reward": float(rewards.mean())}
        if repeat > 1:
            row.update(group_reward_stats(rewards, repeat))
        rows.append(row)
    return rows


def gradient_agreement(model_dir: Path, batches: int = 8, prompts: int = 16, generations: int = 4) -> list[dict]:
    """How much of one step's gradient is signal: the mean cosine between the gradients of independent
    batches (``cross_batch_cos``; about |E g|^2 / E|g|^2, 0 when the batch gradient is pure noise) and,
    on the same rollouts, between two mask draws (``same_rollouts_cos``; 1 without mask noise). Rows:
    each estimator's loss on the policy's own rollouts (the demo recipe, DiPOD off, advantages
    centred per group as in training) and, for scale, the SFT loss (the negative ELBO per token through
    the same proxy code) on ground-truth demonstrations of ``prompts`` and ``prompts x generations``
    training puzzles. Nothing is updated: every gradient is taken at the policy ``model_dir``."""
    import itertools

    import torch

    from dipod.demo import tiny_rl_config
    from dipod.lm.sft import encode_demonstrations
    from dipod.lm.trainer import Trainer, _detached, rl_loss

    def cosines(vectors: list) -> float:
        pairs = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2)]
        return sum(pairs) / len(pairs)

    rows = []
    for estimator, draws in (("spg", 2), ("spg", 8), ("fpo", 2), ("fpo", 8), ("d1", 1)):
        cfg = tiny_rl_config(model_dir, "unused", estimator=estimator, num_draws=draws, dipod_beta=0.0, num_iterations=1,
                             prompts_per_step=prompts, num_generations=generations, eval_examples=1,
                             progress_bar=False, tensorboard=False)
        trainer = Trainer(cfg)

        def gradient(batch: dict, seed: int) -> torch.Tensor:
            trainer.model.zero_grad(set_to_none=True)
            new = trainer._proxies(trainer.policy, batch, slice(None), seed)
            loss, _ = rl_loss(cfg, new, _detached(new), batch["adv_n"], None)
            loss.backward()
            return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

        rollouts = []
        for step in range(1, batches + 1):
            examples = trainer.step_examples(step)
            ids, attn = trainer.encode(examples)
            completions = trainer.generate(ids, attn, cfg.temperature, seed=step)
            rewards, _ = trainer.score(trainer.engine.decode_completions(trainer.lm, completions), examples)
            adv_n, _ = trainer.advantages(rewards, step)
            rollouts.append({"prompt_ids": ids, "prompt_attn": attn, "completion_ids": completions, "adv_n": adv_n})
        same = [float(torch.nn.functional.cosine_similarity(gradient(b, 1), gradient(b, 2), dim=0)) for b in rollouts]
        rows.append({"loss": f"{estimator} K={draws}", "sequences": prompts * generations,
                     "same_rollouts_cos": sum(same) / len(same),
                     "cross_batch_cos": cosines([gradient(b, 7) for b in rollouts])})
    for size in (prompts, prompts * generations):
        demos = []
        for b in range(batches):
            examples = trainer.train_examples[b * size:(b + 1) * size]
            ids, attn, completions = encode_demonstrations(trainer.lm, trainer.task, examples, cfg.prompt_style,
                                                           cfg.max_prompt_length, cfg.gen_length)
            trainer.model.zero_grad(set_to_none=True)
            new = trainer._proxies(trainer.policy, {"prompt_ids": ids, "prompt_attn": attn, "completion_ids": completions},
                                   slice(None), b)
            (-(new.elbo_n.sum() / new.lengths_n.sum())).backward()
            demos.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
        rows.append({"loss": "sft (ground truth) K=1", "sequences": size, "cross_batch_cos": cosines(demos)})
    return rows


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv: list[str]) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", default="spg", choices=("d1", "fpo", "fpo++", "spg"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--puzzles", type=int, default=4, help="failing training puzzles (prompts per step)")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per puzzle per step")
    parser.add_argument("--reachable_in", type=int, default=0,
                        help="only puzzles one of this many temperature-1 samples solves (0: any failing puzzle)")
    parser.add_argument("--eval_every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", default=None, help="policy to start from (default: the cached sudoku4 reference)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="any TrainConfig field, e.g. learning_rate=1e-3, temperature=2.0, dipod_beta=0")
    parser.add_argument("--out", default="runs/probe")
    parser.add_argument("--proxy_variance", action="store_true",
                        help="instead of training: Monte-Carlo std of the ELBO per masking process and draw count")
    parser.add_argument("--gradient_agreement", action="store_true",
                        help="instead of training: cosine between the gradients of independent batches / mask draws")
    parser.add_argument("--spread", action="store_true",
                        help="instead of training: pass@1 / pass@8 / identical-reward groups of the policy's samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from dipod.lm.reference import ensure_reference_policy, failing_training_examples
    from dipod.lm.trainer import train

    changes = {}
    for item in args.set:
        field, _, value = item.partition("=")
        changes[field] = parse_value(value)
    model_dir = Path(args.model_dir) if args.model_dir else ensure_reference_policy("sudoku4", progress_bar=False)
    out = Path(args.out)
    instrument = next((name for name in ("proxy_variance", "spread", "gradient_agreement") if getattr(args, name)), None)
    if instrument:
        rows = {"proxy_variance": proxy_variance, "spread": rollout_spread,
                "gradient_agreement": gradient_agreement}[instrument](model_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{instrument}.json").write_text(json.dumps(rows, indent=1))
        for row in rows:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return 0
    data = write_csv(failing_training_examples(model_dir, "sudoku4", args.puzzles, args.seed,
                                                reachable_in=args.reachable_in), out / "puzzles.csv")
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
