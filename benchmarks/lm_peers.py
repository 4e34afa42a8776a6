"""Our sampler beside the peers' public decoders: same weights, one process, alternating runs.

    python benchmarks/lm_peers.py --llada_repo /path/to/LLaDA [--fast_dllm_repo /path/to/Fast-dLLM] \
        [--model ../shared/models/tiny-llada] [--json OUT] [--md OUT]

The peers' code is NOT part of dipod: pass checkouts of the public repositories (ML-GSAI/LLaDA, whose
``generate.py`` holds ``generate()``; NVlabs/Fast-dLLM, whose ``llada/generate.py`` holds
``generate_with_dual_cache`` and ``llada/model`` its cache-aware LLaDA). A peer whose path is not
given is left out. The model is a LLaDA hub snapshot (default: the tiny one in ../shared/models),
run by its hub code (transformers 4.56-4.57) for ``generate()``, by Fast-dLLM's own model class for
Fast-dLLM; ours decodes the same prompts through ``dipod.lm.sampler.decode``.

Comparisons (greedy, ``low_confidence``), each repeated ``--repeats`` times with the two
implementations alternating; reported: the ratio of the peer's to our CPU time (process time, which
load from other processes disturbs less than wall time) and of wall times (fastest repeats), and the
fraction of completion tokens and rows that agree:

1. LLaDA ``generate()`` (fixed schedule, blocks) on an equal-length batch (its model attends to
   padding, so it batches only equal-length prompts) vs ours with the defaults;
2. Fast-dLLM's dual cache + threshold, one prompt at a time (as it decodes) vs ours with
   ``kv_cache="dual"`` and the same threshold, batched and one at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from bench_report import report

from dipod.lm.sampler import SamplerSettings, decode

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "tiny-llada"


def load_module(path: Path, name: str):
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass a checkout of the peer's public repository")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn) -> tuple[object, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def compare(ours_fn, peer_fn, repeats: int) -> dict:
    """Alternate the two; fastest repeat of each; token and row agreement of the last outputs."""
    times, outputs = {"ours": [], "peer": []}, {}
    for _ in range(repeats):
        for name, fn in (("ours", ours_fn), ("peer", peer_fn)):
            outputs[name], cpu, wall = timed(fn)
            times[name].append((cpu, wall))
    ours, peer = outputs["ours"], outputs["peer"]
    best = {name: (min(c for c, _ in t), min(w for _, w in t)) for name, t in times.items()}
    return {"cpu_ratio_peer_over_ours": round(best["peer"][0] / best["ours"][0], 3),
            "wall_ratio_peer_over_ours": round(best["peer"][1] / best["ours"][1], 3),
            "ours_cpu_s": round(best["ours"][0], 3), "peer_cpu_s": round(best["peer"][0], 3),
            "same_tokens": round((ours == peer).float().mean().item(), 4),
            "same_rows": f"{int((ours == peer).all(dim=1).sum())} of {ours.shape[0]}"}


def llada_part(args, prompts: torch.Tensor) -> dict:
    from dipod.lm.model import load_masked_lm

    peer = load_module(Path(args.llada_repo) / "generate.py", "llada_generate_peer")
    lm = load_masked_lm(args.model, trust_remote_code=True)
    lm.model.eval()
    return llada_comparison(lm, peer.generate, lm.model, prompts, args)


def llada_comparison(lm, peer_generate, peer_model, prompts: torch.Tensor, args) -> dict:
    """``peer_generate`` (LLaDA's ``generate()``: the prompts and completions ``[B, P + G]``) on ``peer_model``
    against ``decode`` on ``lm`` with the defaults, for equal-length ``prompts``."""
    settings = SamplerSettings(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                               fill_after_eos=False)
    width = prompts.shape[1]

    def ours():
        return decode(lm, prompts, torch.ones_like(prompts), settings).completion_bg

    def theirs():
        with torch.no_grad():
            return peer_generate(peer_model, prompts, steps=args.steps, gen_length=args.gen_length,
                                 block_length=args.block_length, mask_id=lm.mask_id)[:, width:]

    return {"peer": "ML-GSAI/LLaDA generate()", "rows": prompts.shape[0], **compare(ours, theirs, args.repeats)}


def fast_dllm_part(args, prompts: torch.Tensor) -> dict:
    from dipod.lm.model import load_masked_lm

    root = Path(args.fast_dllm_repo) / "llada"
    sys.path.insert(0, str(root))  # its generate.py imports model.modeling_llada
    peer = load_module(root / "generate.py", "fast_dllm_generate_peer")
    from model.modeling_llada import LLaDAModelLM

    peer_model = LLaDAModelLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    return fast_dllm_comparison(load_masked_lm(args.model), peer.generate_with_dual_cache, peer_model, prompts, args)


def fast_dllm_comparison(lm, peer_generate, peer_model, prompts: torch.Tensor, args) -> dict:
    """``peer_generate`` (Fast-dLLM's ``generate_with_dual_cache``: ``(prompt and completion [1, P + G], forwards)``
    for one prompt) on ``peer_model``, one prompt at a time, against ``decode`` on ``lm`` with the dual cache and
    the same threshold, one at a time and batched."""
    settings = SamplerSettings(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
                               confidence_threshold=args.threshold, kv_cache="dual", fill_after_eos=False)
    width = prompts.shape[1]

    def ours_one_at_a_time():
        return torch.cat([decode(lm, p[None], torch.ones_like(p[None]), settings).completion_bg for p in prompts])

    def ours_batched():
        return decode(lm, prompts, torch.ones_like(prompts), settings).completion_bg

    def theirs():
        with torch.no_grad():
            return torch.cat([peer_generate(
                peer_model, p[None], steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                mask_id=lm.mask_id, threshold=args.threshold)[0][:, width:] for p in prompts])

    return {"peer": f"NVlabs/Fast-dLLM generate_with_dual_cache, threshold {args.threshold}",
            "rows": prompts.shape[0],
            "one_at_a_time": compare(ours_one_at_a_time, theirs, args.repeats),
            "ours_batched": compare(ours_batched, theirs, args.repeats)}


def markdown(result: dict) -> str:
    lines = ["# Our sampler beside the peers' decoders", "",
             f"Command: `{result['command']}`, {result['machine']}, {result['started']}; model {result['model']}, "
             f"decoding {result['decoding']}. Ratios > 1: the peer takes longer.", "",
             "| comparison | CPU ratio peer / ours | wall ratio | same tokens | same rows |", "|---|---|---|---|---|"]
    for part in result["parts"]:
        cases = {k: v for k, v in part.items() if isinstance(v, dict)} or {"": part}
        for case, r in cases.items():
            lines.append(f"| {part['peer']} {case.replace('_', ' ')} ({part['rows']} prompts) | "
                         f"{r['cpu_ratio_peer_over_ours']} | {r['wall_ratio_peer_over_ours']} | {r['same_tokens']} | "
                         f"{r['same_rows']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llada_repo", default=None, help="checkout of ML-GSAI/LLaDA (holds generate.py)")
    parser.add_argument("--fast_dllm_repo", default=None, help="checkout of NVlabs/Fast-dLLM (holds llada/)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a LLaDA hub snapshot")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=16)
    parser.add_argument("--gen_length", type=int, default=64)
    parser.add_argument("--block_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default="shared 2-core CPU, loaded", help="stated on the results page")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    if not (args.llada_repo or args.fast_dllm_repo):
        parser.error("pass --llada_repo and/or --fast_dllm_repo (checkouts of the peers' public code)")
    torch.set_num_threads(args.threads)
    prompts = torch.randint(0, 90, (args.prompts, args.prompt_length), generator=torch.Generator().manual_seed(0))
    parts = []
    if args.llada_repo:
        parts.append(llada_part(args, prompts))
    if args.fast_dllm_repo:
        parts.append(fast_dllm_part(args, prompts))
    result = {"command": "python " + " ".join(sys.argv), "machine": args.machine, "model": args.model,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "decoding": dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps),
              "parts": parts}
    report(result, args.json, args.md, markdown)


if __name__ == "__main__":
    main()
