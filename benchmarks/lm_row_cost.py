"""Per-row cost of threshold decoding, in one run: row-forwards and wall time, batched vs one at a time.

On the shipped sudoku4 reference policy (``dipod.lm.reference``) and the paper's 256-puzzle SPG test
set, with the recipe's decoding (16 tokens, one block, 16 steps, compact prompt), greedy:

- the fixed schedule, batched;
- threshold decoding, batched with finished rows compacted out of the forwards (the default),
  batched without compaction (``compact_rows=False``: every row in every forward of a block), and
  one puzzle at a time;

reporting forward calls, row-forwards (rows summed over calls: the compute paid), wall seconds
(fastest of ``--repeats`` interleaved runs), accuracy, and whether the completions equal the
compacted batch's. Then a few steps of ``dipod.demo``'s tiny RL recipe with fixed vs threshold
rollouts (same seed, alternating) and the ratio of their mean step times.

    python benchmarks/lm_row_cost.py --json docs/results/lm_row_cost.json --md docs/results/lm_row_cost.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_report import report

from dipod.lm.sampler import SamplerSettings, decode


def decode_all(lm, batches, settings: SamplerSettings) -> dict:
    completions, forwards, row_forwards = [], 0, 0
    start = time.perf_counter()
    for ids, attn in batches:
        out = decode(lm, ids, attn, settings)
        completions.append(out.completion_bg)
        forwards += out.forward_passes
        row_forwards += out.row_forwards
    return {"completions": torch.cat(completions), "forward_passes": forwards, "row_forwards": row_forwards,
            "seconds": time.perf_counter() - start}


def decoding_part(args) -> dict:
    from dipod.lm.model import load_masked_lm
    from dipod.lm.reference import SHIPPED_DIR, reference_config
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import decode_completions, encode_prompts

    lm = load_masked_lm(SHIPPED_DIR / "sudoku4")
    recipe = reference_config("sudoku4")
    task = get_task("sudoku4")
    examples = task.load("spg_test", limit=args.limit)
    prompts = [task.prompt(ex, "compact") for ex in examples]
    batched = [encode_prompts(lm, prompts[i:i + args.batch_size], 256, chat=False)
               for i in range(0, len(prompts), args.batch_size)]
    single = [encode_prompts(lm, [p], 256, chat=False) for p in prompts]
    fixed = SamplerSettings(gen_length=recipe.gen_length, block_length=recipe.block_length, steps=recipe.steps)
    threshold = dataclasses.replace(fixed, confidence_threshold=args.threshold)
    configs = {"fixed schedule, batched": (fixed, batched),
               f"threshold {args.threshold}, batched, compacted": (threshold, batched),
               f"threshold {args.threshold}, batched, not compacted": (dataclasses.replace(threshold, compact_rows=False),
                                                                      batched),
               f"threshold {args.threshold}, one at a time": (threshold, single)}
    runs, seconds = {}, {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every config alike
        for name, (settings, batches) in configs.items():
            runs[name] = decode_all(lm, batches, settings)
            seconds[name].append(runs[name]["seconds"])
    compacted = runs[f"threshold {args.threshold}, batched, compacted"]["completions"]
    rows = {}
    for name, run in runs.items():
        texts = decode_completions(lm, run["completions"])
        rows[name] = {"forward_passes": run["forward_passes"], "row_forwards": run["row_forwards"],
                      "seconds": round(min(seconds[name]), 3),
                      "accuracy": sum(task.is_correct(t, ex) for t, ex in zip(texts, examples)) / len(examples),
                      "same_completions_as_compacted": bool(torch.equal(run["completions"], compacted))}
    base = rows["fixed schedule, batched"]
    for row in rows.values():
        row["row_forward_reduction_vs_fixed"] = round(base["row_forwards"] / row["row_forwards"], 3)
        row["wall_ratio_vs_fixed"] = round(row["seconds"] / base["seconds"], 3)
    return {"examples": len(examples), "batch_size": args.batch_size, "decoding": dataclasses.asdict(fixed),
            "repeats": args.repeats, "seconds_of_each_repeat": seconds, "runs": rows}


def rl_part(args) -> dict:
    from dipod.demo import tiny_rl_config
    from dipod.lm.reference import SHIPPED_DIR
    from dipod.lm.trainer import train

    variants = {"fixed rollouts": {}, f"threshold {args.threshold} rollouts": {"confidence_threshold": args.threshold}}
    step_s = {name: [] for name in variants}
    rollout_s = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.rl_repeats):
            for i, (name, changes) in enumerate(variants.items()):
                cfg = tiny_rl_config(SHIPPED_DIR / "sudoku4", Path(tmp) / f"{repeat}-{i}", seed=0,
                                     max_steps=args.rl_steps, eval_steps=0, save_steps=0, eval_examples=8,
                                     gap_monitor_steps=0, progress_bar=False, tensorboard=False, log_completions=0,
                                     **changes)
                start = time.perf_counter()
                result = train(cfg)
                step_s[name].append((time.perf_counter() - start) / args.rl_steps)
                rollout = [r["generation_time"] for r in result.history if "generation_time" in r]
                rollout_s[name].append(sum(rollout) / max(1, len(rollout)))
    fixed, fast = variants
    best_step = {name: round(min(v), 3) for name, v in step_s.items()}
    best_rollout = {name: round(min(v), 3) for name, v in rollout_s.items()}
    return {"steps": args.rl_steps, "repeats": args.rl_repeats, "seconds_per_step": best_step,
            "rollout_seconds_per_step": best_rollout,
            "step_time_ratio_fixed_over_threshold": round(best_step[fixed] / best_step[fast], 3),
            "rollout_time_ratio_fixed_over_threshold": round(best_rollout[fixed] / best_rollout[fast], 3)}


def markdown(result: dict) -> str:
    d = result["decoding"]
    lines = ["# Per-row cost of threshold decoding (sudoku4 reference policy)", "",
             f"Command: `{result['command']}`, {result['machine']}, {result['started']}. "
             f"Paper SPG test set ({d['examples']} puzzles), batch {d['batch_size']}, greedy, 16 tokens, one block, "
             f"16 steps. Wall s: fastest of {d['repeats']} interleaved runs.", "",
             "| decoding | forward calls | row-forwards | fewer row-forwards than fixed | wall s | wall / fixed | "
             "accuracy | completions = compacted |", "|---|---|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        lines.append(f"| {name} | {r['forward_passes']} | {r['row_forwards']} | {r['row_forward_reduction_vs_fixed']}x | "
                     f"{r['seconds']} | {r['wall_ratio_vs_fixed']} | {r['accuracy']:.3f} | "
                     f"{r['same_completions_as_compacted']} |")
    if "rl" in result:
        rl = result["rl"]
        lines += ["", f"## RL step time: dipod.demo's tiny recipe, {rl['steps']} steps, best of {rl['repeats']}", "",
                  "| rollouts | s / step | rollout s / step |", "|---|---|---|"]
        lines += [f"| {name} | {s} | {rl['rollout_seconds_per_step'][name]} |" for name, s in rl["seconds_per_step"].items()]
        lines += ["", f"Step time ratio fixed / threshold: {rl['step_time_ratio_fixed_over_threshold']}x "
                  f"(rollouts alone: {rl['rollout_time_ratio_fixed_over_threshold']}x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="first LIMIT puzzles of the 256")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rl_steps", type=int, default=3, help="RL steps per variant (0: skip the RL part)")
    parser.add_argument("--rl_repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default="shared 2-core CPU, loaded", help="stated on the results page")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"command": "python " + " ".join(sys.argv), "machine": args.machine, "torch_threads": args.threads,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "decoding": decoding_part(args)}
    if args.rl_steps:
        result["rl"] = rl_part(args)
    report(result, args.json, args.md, markdown)


if __name__ == "__main__":
    main()
