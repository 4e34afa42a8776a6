"""What ``stop_at_eos`` saves, in one run: row-forwards and wall time with and without it.

On the shipped countdown reference policy (``dipod.lm.reference``: it answers in about 8 tokens and
EOS-pads the rest of its 16) and the paper's countdown test set (d1's 256 items), greedy, 16 tokens in blocks of
``--block_length`` (16 / 4 = 4 blocks by default: a row that has ended skips the blocks after it),
batched, rows compacted (the default), for the fixed schedule and threshold decoding:

- forward calls and row-forwards (rows summed over calls: the compute paid) without and with
  ``stop_at_eos``, and the ratio of row-forwards;
- wall seconds, fastest of ``--repeats`` interleaved runs;
- accuracy, and whether the completions (EOS-filled, as graded) equal those without stopping.

    python benchmarks/lm_stop_at_eos.py --json docs/results/lm_stop_at_eos.json --md docs/results/lm_stop_at_eos.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from bench_report import report
from lm_row_cost import decode_all

from dipod.lm.sampler import SamplerSettings


def decoding_part(args) -> dict:
    from dipod.lm.model import load_masked_lm
    from dipod.lm.reference import SHIPPED_DIR
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import decode_completions, encode_prompts

    lm = load_masked_lm(SHIPPED_DIR / "countdown")
    task = get_task("countdown")
    examples = task.load("d1_test", limit=args.limit)
    prompts = [task.prompt(ex, "compact") for ex in examples]
    batches = [encode_prompts(lm, prompts[i:i + args.batch_size], 256, chat=False)
               for i in range(0, len(prompts), args.batch_size)]
    fixed = SamplerSettings(gen_length=16, block_length=args.block_length, steps=16)
    schedules = {"fixed schedule": fixed,
                 f"threshold {args.threshold}": dataclasses.replace(fixed, confidence_threshold=args.threshold)}
    configs = {(name, stop): dataclasses.replace(settings, stop_at_eos=stop)
               for name, settings in schedules.items() for stop in (False, True)}
    runs, seconds = {}, {key: [] for key in configs}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every config alike
        for key, settings in configs.items():
            runs[key] = decode_all(lm, batches, settings)
            seconds[key].append(runs[key]["seconds"])
    rows = []
    for name in schedules:
        on, stopped = runs[(name, False)], runs[(name, True)]
        texts = {stop: decode_completions(lm, runs[(name, stop)]["completions"]) for stop in (False, True)}
        rows.append({"decoding": name, "forward_passes": on["forward_passes"],
                     "forward_passes_stopped": stopped["forward_passes"], "row_forwards": on["row_forwards"],
                     "row_forwards_stopped": stopped["row_forwards"],
                     "row_forward_reduction": round(on["row_forwards"] / stopped["row_forwards"], 3),
                     "seconds": round(min(seconds[(name, False)]), 3),
                     "seconds_stopped": round(min(seconds[(name, True)]), 3),
                     "accuracy": sum(map(task.is_correct, texts[False], examples)) / len(examples),
                     "accuracy_stopped": sum(map(task.is_correct, texts[True], examples)) / len(examples),
                     "same_completions": bool(torch.equal(on["completions"], stopped["completions"]))})
    return {"examples": len(examples), "batch_size": args.batch_size, "block_length": args.block_length,
            "repeats": args.repeats, "runs": rows}


def markdown(result: dict) -> str:
    d = result["decoding"]
    lines = ["# What `stop_at_eos` saves (countdown reference policy)", "",
             f"Command: `{result['command']}`, {result['machine']}, {result['started']}. Paper countdown test set (d1_test, "
             f"{d['examples']} items), batch {d['batch_size']}, greedy, 16 tokens in blocks of {d['block_length']}, "
             f"rows compacted. Wall s: fastest of {d['repeats']} interleaved runs.", "",
             "| decoding | forward calls (off / on) | row-forwards (off / on) | fewer row-forwards | wall s (off / on) | "
             "accuracy (off / on) | same completions |", "|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(f"| {r['decoding']} | {r['forward_passes']} / {r['forward_passes_stopped']} | {r['row_forwards']} / "
                     f"{r['row_forwards_stopped']} | {r['row_forward_reduction']}x | {r['seconds']} / "
                     f"{r['seconds_stopped']} | {r['accuracy']:.3f} / {r['accuracy_stopped']:.3f} | "
                     f"{r['same_completions']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--block_length", type=int, default=4, help="a divisor of the 16 completion tokens")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="first LIMIT items of the test set")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default="shared 2-core CPU, loaded", help="stated on the results page")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"command": "python " + " ".join(sys.argv), "machine": args.machine, "torch_threads": args.threads,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "decoding": decoding_part(args)}
    report(result, args.json, args.md, markdown)


if __name__ == "__main__":
    main()
