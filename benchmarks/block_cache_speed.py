"""The exact prefix KV cache of block-causal models against no cache, in one run (greedy, same prompts).

Decodes the same left-padded batch with and without ``kv_cache=prefix`` on the tiny SDAR (blocks of 4)
and LLaDA2-MoE (blocks of 32) snapshots of ``../shared/models`` and reports, per model and decoding
(fixed schedule, threshold): forwards, positions run through the network (the full forward runs the
whole sequence each step; the cached one the window, plus each finished block once), wall time
(fastest of ``--repeats`` interleaved runs), the speed-up, and whether the tokens are identical.

    python benchmarks/block_cache_speed.py --md docs/results/block_cache_speed.md

Runs with one torch thread (the machine is shared); ``--threads`` changes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dipod.lm.model import load_masked_lm
from dipod.lm.sampler import SamplerSettings, decode

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
SNAPSHOTS = {"tiny-sdar": (4, 97), "tiny-llada2-moe": (32, 98)}


def counting(network):
    """Wrap ``network.hidden`` to count the positions it runs; returns the counter (a one-item list)."""
    seen, hidden = [0], network.hidden

    def counted(ids_bq, *args, **kwargs):
        seen[0] += ids_bq.shape[1]
        return hidden(ids_bq, *args, **kwargs)
    network.hidden = counted
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gen_length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| model | decoding | cache | forwards | positions run | wall s | speed-up | same tokens |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, (block, pad) in SNAPSHOTS.items():
        lm = load_masked_lm(MODELS / name)
        seen = counting(lm.model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 96, (4, 40), generator=g)
        attn = torch.ones_like(ids)
        for n, padding in enumerate((0, 7, 13, 30)):
            attn[n, :padding] = 0
        ids = ids.masked_fill(attn == 0, pad)
        for label, extra in (("fixed", {}), ("threshold 0.2", {"confidence_threshold": 0.2})):
            base = dict(gen_length=args.gen_length, block_length=block, steps=args.gen_length, fill_after_eos=False,
                        **extra)
            results = {}
            for _ in range(args.repeats):
                for cache in (None, "prefix"):
                    seen[0] = 0
                    start = time.perf_counter()
                    out = decode(lm, ids, attn, SamplerSettings(**base, kv_cache=cache))
                    wall = time.perf_counter() - start
                    best = results.get(cache)
                    results[cache] = (min(wall, best[0]) if best else wall, out, seen[0])
            plain, cached = results[None], results["prefix"]
            same = torch.equal(plain[1].completion_bg, cached[1].completion_bg)
            for cache, (wall, out, positions) in results.items():
                speed = plain[0] / wall
                rows.append(f"| {name} | {label} | {cache or 'none'} | {out.forward_passes} | {positions} | "
                            f"{wall:.3f} | {speed:.2f} | {same} |")
    table = "\n".join(rows)
    print(table)
    if args.md:
        args.md.write_text(f"Command: `python benchmarks/block_cache_speed.py --gen_length {args.gen_length} "
                           f"--repeats {args.repeats} --threads {args.threads}`\n\n{table}\n")


if __name__ == "__main__":
    main()
