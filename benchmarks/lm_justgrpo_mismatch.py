"""What JustGRPO trains against what it is evaluated with, measured on the tiny shipped references.

JustGRPO's likelihood is exact for the left-to-right policy (one token per step) that draws its
rollouts; the held-out score is read from the parallel decoder (the recipe's 16 tokens in one block
of 16 confidence-ordered steps). For each shipped reference (``dipod/lm/reference_policies/TASK``)
on ``--limit`` held-out items:

1. greedy accuracy of both decoders (the number RL must raise vs the number it is read from);
2. ``dipod.lm.rollout_mismatch`` at temperature 1 with the parallel decoder as ``fast`` and the
   left-to-right sampler as ``reference``, one seed: reward, ELBO per token, reveal confidence,
   share of identical tokens;
3. the exact left-to-right log-likelihood per token (``dipod.lm.left_to_right``) of both decoders'
   samples: how likely the completions the evaluation decoder writes are under the policy trained.

    OMP_NUM_THREADS=1 python benchmarks/lm_justgrpo_mismatch.py --limit 256 \
        --json docs/results/lm_justgrpo_mismatch.json --md docs/results/lm_justgrpo_mismatch.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def measure(task_name: str, limit: int, seed: int) -> dict:
    from dipod.lm.left_to_right import left_to_right_log_probs, left_to_right_settings
    from dipod.lm.model import load_masked_lm
    from dipod.lm.proxies import ProxySettings
    from dipod.lm.reference import ensure_reference_policy, reference_config
    from dipod.lm.rollout_mismatch import rollout_mismatch
    from dipod.lm.sampler import SamplerSettings, generate
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import decode_completions, encode_prompts

    recipe = reference_config(task_name)
    lm = load_masked_lm(str(ensure_reference_policy(task_name)))
    lm.model.eval()
    task = get_task(task_name)
    examples = task.load("test", limit=limit)
    ids, attn = encode_prompts(lm, [task.prompt(ex, "compact") for ex in examples], 512, chat=False)
    parallel = SamplerSettings(gen_length=recipe.gen_length, block_length=recipe.block_length, steps=recipe.steps)

    def accuracy(completion_ids) -> float:
        texts = decode_completions(lm, completion_ids)
        return sum(task.is_correct(t, ex) for t, ex in zip(texts, examples)) / len(examples)

    def rewards(completion_ids):
        return torch.tensor([task.reward(t, ex) for t, ex in zip(decode_completions(lm, completion_ids), examples)])

    start = time.perf_counter()
    with torch.no_grad():
        greedy_parallel = accuracy(generate(lm, ids, attn, parallel))
        left_to_right = left_to_right_settings(recipe.gen_length, 0.0)
        greedy_left_to_right = accuracy(generate(lm, ids, attn, left_to_right))
        sampled_parallel = dataclasses.replace(parallel, temperature=1.0, fill_after_eos=False)
        sampled_left_to_right = left_to_right_settings(recipe.gen_length, 1.0)
        mismatch = rollout_mismatch(lm, ids, attn, sampled_parallel, sampled_left_to_right, rewards,
                                    ProxySettings(block_length=recipe.gen_length), seed)
        loglik = {}
        for name, settings in (("parallel", sampled_parallel), ("left_to_right", sampled_left_to_right)):
            completion = generate(lm, ids, attn, settings, generator=torch.Generator().manual_seed(seed))
            loglik[name] = float(left_to_right_log_probs(lm, ids, attn, completion, 1.0).mean())
    return {"task": task_name, "examples": len(examples), "seed": seed,
            "greedy_accuracy": {"parallel": greedy_parallel, "left_to_right": greedy_left_to_right},
            "sampled_t1": mismatch, "left_to_right_logp_per_token_t1": loglik,
            "seconds": round(time.perf_counter() - start, 1)}


def table(results: list[dict]) -> list[str]:
    lines = ["| task | greedy acc. parallel | greedy acc. left-to-right | T=1 reward parallel | T=1 reward "
             "left-to-right | same tokens (T=1) | ELBO/token parallel | ELBO/token left-to-right | exact L2R "
             "log p/token of parallel samples | of L2R samples |", "|" + "---|" * 10]
    for r in results:
        m, ll = r["sampled_t1"], r["left_to_right_logp_per_token_t1"]
        lines.append(f"| {r['task']} | {r['greedy_accuracy']['parallel']:.3f} | {r['greedy_accuracy']['left_to_right']:.3f}"
                     f" | {m['reward_fast']:.3f} | {m['reward_reference']:.3f} | {m['same_tokens']:.3f} | "
                     f"{m['elbo_per_token_fast']:.3f} | {m['elbo_per_token_reference']:.3f} | {ll['parallel']:.3f} | "
                     f"{ll['left_to_right']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sudoku4", "countdown"])
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [measure(task, args.limit, args.seed) for task in args.tasks]
    lines = table(results)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
