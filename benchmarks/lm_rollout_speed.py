"""Fast rollouts, side by side in one run: today's sampler vs threshold decoding vs threshold + KV cache.

Two parts, each decoding the same prompts with every configuration (greedy):

1. **Tiny reference policies** (``dipod.lm.reference``, trained once and cached) on the paper's
   own test sets (``d1_test``: 500 sudoku4 puzzles, 256 countdown items) with their recipe's
   decoding (16 tokens, one block, 16 steps): model forwards, wall time and greedy accuracy of the
   fixed schedule vs ``confidence_threshold`` decoding, with and without the dual KV cache (the
   policies are the tiny ModernBERT; with one block the cache holds the prompt, so prefix = dual).
2. **Long completions** on a randomly initialised LLaDA-architecture model of a few M parameters
   (LLaDA's own hub code from ``../shared/models/tiny-llada``, resized; 256 tokens in blocks of 32,
   d1's 128 steps), so that the cache matters on a CPU. Accuracy means nothing there; the output
   head's scale (``--long_head_std``) sets how peaked the random model's predictions are, and so
   how many proposals pass the threshold. Reported: forwards, wall time, tokens/s, speed-ups
   against today's sampler (fastest of ``--repeats`` interleaved runs), and how many tokens each
   cached run shares with the same decoding without the cache.

    python benchmarks/lm_rollout_speed.py --json docs/results/lm_rollout_speed.json \
        --md docs/results/lm_rollout_speed.md

Runs with one torch thread (the machine is shared); ``--threads`` changes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dipod.lm.sampler import SamplerSettings, decode

SNAPSHOT = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "tiny-llada"


def run_decoding(lm, batches, settings: SamplerSettings) -> dict:
    """Decode every ``(prompt_ids, prompt_attn)`` batch: completions, forward passes, wall seconds."""
    completions, orders, forwards = [], [], 0
    start = time.perf_counter()
    for ids, attn in batches:
        out = decode(lm, ids, attn, settings)
        completions.append(out.completion_bg)
        orders.append(out.order_bg)
        forwards += out.forward_passes
    seconds = time.perf_counter() - start
    # A batch runs until its slowest row is done; the step of a row's last reveal (+1) is what that
    # row alone would need (with one block: its own forward count).
    row_forwards = torch.cat(orders).max(dim=1).values.float() + 1
    return {"completions": torch.cat(completions), "forward_passes": forwards, "seconds": seconds,
            "mean_row_forwards": round(row_forwards.mean().item(), 2)}


def reference_part(task_name: str, thresholds: list[float], batch_size: int, limit: int | None,
                   cache_dir: str | None, repeats: int, extra_blocks: list[int]) -> dict:
    from dipod.lm.model import load_masked_lm
    from dipod.lm.reference import ensure_reference_policy, reference_config
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import decode_completions, encode_prompts

    model_dir = ensure_reference_policy(task_name, cache_dir=cache_dir, progress_bar=False)
    recipe = reference_config(task_name)
    lm = load_masked_lm(model_dir)
    task = get_task(task_name)
    examples = task.load("d1_test", limit=limit)
    prompts = [task.prompt(ex, "compact") for ex in examples]
    batches = [encode_prompts(lm, prompts[i:i + batch_size], 256, chat=False)
               for i in range(0, len(prompts), batch_size)]
    base = dict(gen_length=recipe.gen_length, block_length=recipe.block_length, steps=recipe.steps)
    configs = {"fixed schedule (today)": SamplerSettings(**base),
               "fixed schedule + dual cache": SamplerSettings(**base, kv_cache="dual")}
    configs.update({f"threshold {t}": SamplerSettings(**base, confidence_threshold=t) for t in thresholds})
    configs[f"threshold {thresholds[0]} + dual cache"] = SamplerSettings(**base, confidence_threshold=thresholds[0],
                                                                          kv_cache="dual")
    for block in extra_blocks:  # shorter blocks refresh the cache more often
        smaller = {**base, "block_length": block}
        configs[f"fixed schedule, blocks of {block}"] = SamplerSettings(**smaller)
        configs[f"fixed schedule, blocks of {block} + dual cache"] = SamplerSettings(**smaller, kv_cache="dual")
    runs, seconds = {}, {name: [] for name in configs}
    for _ in range(repeats):  # interleaved, so that load from other processes hits every config alike
        for name, settings in configs.items():
            runs[name] = run_decoding(lm, batches, settings)
            seconds[name].append(runs[name]["seconds"])
    rows = {}
    for name, run in runs.items():
        texts = decode_completions(lm, run["completions"])
        rows[name] = {"forward_passes": run["forward_passes"], "mean_row_forwards": run["mean_row_forwards"],
                      "seconds": round(min(seconds[name]), 3),
                      "accuracy": sum(task.is_correct(t, ex) for t, ex in zip(texts, examples)) / len(examples),
                      "mean_reward": sum(float(task.reward(t, ex)) for t, ex in zip(texts, examples)) / len(examples)}
    today = rows["fixed schedule (today)"]
    for row in rows.values():
        row["forward_reduction"] = round(today["forward_passes"] / row["forward_passes"], 3)
        row["speedup"] = round(today["seconds"] / row["seconds"], 3)
    return {"task": task_name, "model_dir": str(model_dir), "examples": len(examples), "batch_size": batch_size,
            "decoding": base, "repeats": repeats, "seconds_of_each_repeat": seconds, "runs": rows}


def build_random_llada(out_dir: Path, *, d_model: int, n_layers: int, n_heads: int, mlp_hidden: int,
                       head_std: float, seed: int) -> Path:
    """A LLaDA snapshot (hub code, tokenizer, config of tiny-llada) resized, with random weights."""
    from safetensors.torch import save_file

    shutil.copytree(SNAPSHOT, out_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((out_dir / "config.json").read_text())
    config.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                  mlp_hidden_size=mlp_hidden, max_sequence_length=4096)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    vocab = config["embedding_size"] or config["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    # Layer weights at 1/sqrt(fan_in), so that attention moves the residual stream and masked positions
    # get context-dependent predictions (at std 0.02 every mask would predict alike).
    normal = lambda rows, cols, std=None: torch.randn(rows, cols, generator=g) * (std or cols ** -0.5)  # noqa: E731
    root = "model.transformer"
    tensors = {f"{root}.wte.weight": normal(vocab, d_model, std=1.0), f"{root}.ln_f.weight": torch.ones(d_model),
               f"{root}.ff_out.weight": normal(vocab, d_model, std=head_std)}
    for i in range(n_layers):
        block = f"{root}.blocks.{i}"
        tensors.update({f"{block}.attn_norm.weight": torch.ones(d_model), f"{block}.ff_norm.weight": torch.ones(d_model),
                        f"{block}.ff_proj.weight": normal(mlp_hidden, d_model), f"{block}.up_proj.weight":
                        normal(mlp_hidden, d_model), f"{block}.ff_out.weight": normal(d_model, mlp_hidden)})
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            tensors[f"{block}.{name}.weight"] = normal(d_model, d_model)
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def long_part(args) -> dict:
    from dipod.lm.model import load_masked_lm

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_llada(Path(tmp) / "llada", d_model=args.long_d_model, n_layers=args.long_layers,
                                       n_heads=args.long_heads, mlp_hidden=args.long_mlp, head_std=args.long_head_std,
                                       seed=args.seed)
        lm = load_masked_lm(model_dir)
    g = torch.Generator().manual_seed(args.seed)
    ordinary = torch.tensor([t for t in range(90) if t not in (lm.mask_id, lm.pad_id, lm.eos_id)])
    prompts = ordinary[torch.randint(len(ordinary), (args.long_batch, args.long_prompt), generator=g)]
    batches = [(prompts, torch.ones_like(prompts))]
    base = dict(gen_length=args.long_gen, block_length=args.long_block, steps=args.long_steps)
    t = args.long_threshold
    configs = {
        "fixed schedule (today)": SamplerSettings(**base),
        "fixed schedule + dual cache": SamplerSettings(**base, kv_cache="dual"),
        f"threshold {t}": SamplerSettings(**base, confidence_threshold=t),
        f"threshold {t} + prefix cache": SamplerSettings(**base, confidence_threshold=t, kv_cache="prefix"),
        f"threshold {t} + dual cache": SamplerSettings(**base, confidence_threshold=t, kv_cache="dual"),
    }
    uncached = {"fixed schedule + dual cache": "fixed schedule (today)",
                f"threshold {t} + prefix cache": f"threshold {t}", f"threshold {t} + dual cache": f"threshold {t}"}
    run_decoding(lm, batches, SamplerSettings(**base, confidence_threshold=t, kv_cache="dual"))  # warm-up
    runs, seconds = {}, {name: [] for name in configs}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every config alike
        for name, settings in configs.items():
            runs[name] = run_decoding(lm, batches, settings)
            seconds[name].append(runs[name]["seconds"])
    rows, tokens = {}, args.long_batch * args.long_gen
    for name in configs:
        runs[name]["seconds"] = min(seconds[name])  # the least disturbed run
        rows[name] = {"forward_passes": runs[name]["forward_passes"], "seconds": round(runs[name]["seconds"], 3),
                      "tokens_per_s": round(tokens / runs[name]["seconds"], 1),
                      "tokens_per_forward": round(tokens / args.long_batch / runs[name]["forward_passes"], 2)}
        if name in uncached:
            same = runs[name]["completions"] == runs[uncached[name]]["completions"]
            rows[name]["same_tokens_as_uncached"] = round(same.float().mean().item(), 4)
    today = rows["fixed schedule (today)"]
    for row in rows.values():
        row["forward_reduction"] = round(today["forward_passes"] / row["forward_passes"], 3)
        row["speedup"] = round(today["seconds"] / row["seconds"], 3)
    return {"model": {"architecture": "LLaDA (hub code), random weights", "d_model": args.long_d_model,
                      "n_layers": args.long_layers, "n_heads": args.long_heads, "mlp_hidden": args.long_mlp,
                      "head_std": args.long_head_std,
                      "parameters": sum(p.numel() for p in lm.model.parameters())},
            "batch": args.long_batch, "prompt_length": args.long_prompt, "decoding": base, "repeats": args.repeats,
            "seconds_of_each_repeat": seconds, "runs": rows}


def rl_part(args) -> dict:
    """Tiny RL runs (``dipod.demo``'s recipe) with reference vs threshold rollouts, same seeds; the
    fast runs log ``mismatch/*`` every ``--rl_mismatch_steps``. Final policies are scored on the
    paper test set with the reference sampler (greedy, fixed schedule), so both are judged alike."""
    from dipod.demo import tiny_rl_config
    from dipod.lm.model import load_masked_lm
    from dipod.lm.reference import ensure_reference_policy
    from dipod.lm.tasks import get_task
    from dipod.lm.train_engine import decode_completions, encode_prompts
    from dipod.lm.trainer import train

    model_dir = ensure_reference_policy(args.rl_task, cache_dir=args.cache_dir, progress_bar=False)
    task = get_task(args.rl_task)
    examples = task.load("d1_test", limit=args.limit)
    lm = load_masked_lm(model_dir)
    batches = [encode_prompts(lm, [task.prompt(ex, "compact") for ex in examples[i:i + args.batch_size]], 256,
                              chat=False) for i in range(0, len(examples), args.batch_size)]
    fast = {"confidence_threshold": args.rl_threshold, "rollout_mismatch_steps": args.rl_mismatch_steps}
    variants = {"reference rollouts": {}, f"threshold {args.rl_threshold} rollouts": fast,
                f"threshold {args.rl_threshold} + dual cache rollouts": {**fast, "kv_cache": "dual"}}
    runs = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.rl_seeds.split(",")]:
            for name, changes in variants.items():
                # The trainer's own evaluations (before/after) are kept small: the policies are scored below.
                cfg = tiny_rl_config(model_dir, Path(tmp) / f"{seed}-{list(variants).index(name)}", seed=seed,
                                     max_steps=args.rl_steps, eval_steps=0, save_steps=0, eval_examples=8,
                                     gap_monitor_steps=0, progress_bar=False,
                                     tensorboard=False, log_completions=0, **changes)
                start = time.perf_counter()
                result = train(cfg)
                seconds = time.perf_counter() - start
                lm.model.load_state_dict(result.model.state_dict())
                reference = SamplerSettings(gen_length=cfg.gen_length, block_length=cfg.block_length,
                                            steps=cfg.diffusion_steps)
                texts = decode_completions(lm, run_decoding(lm, batches, reference)["completions"])
                steps = [r for r in result.history if "generation_time" in r]
                mismatch = {k: round(sum(r[k] for r in steps if k in r) / max(1, sum(k in r for r in steps)), 4)
                            for k in sorted({k for r in steps for k in r if k.startswith("mismatch/")})}
                runs[name].append({
                    "seed": seed, "wall_s": round(seconds, 1),
                    "rollout_s": round(sum(r["generation_time"] for r in steps), 2),
                    "paper_accuracy": sum(task.is_correct(t, ex) for t, ex in zip(texts, examples)) / len(examples),
                    "train_reward": round(sum(r["reward"] for r in steps) / len(steps), 4), **mismatch})
    return {"task": args.rl_task, "steps": args.rl_steps, "examples": len(examples), "runs": runs}


def markdown(result: dict) -> str:
    lines = ["# Fast rollouts: forwards, wall time, accuracy", "",
             f"Command: `{result['command']}` ({result['torch_threads']} torch thread(s), CPU, "
             f"{result['started']}). Speed-ups are against today's sampler in the same run.", ""]
    for part in result.get("reference", []):
        lines += [f"## Tiny reference policy: {part['task']} (paper test set, {part['examples']} items, "
                  f"batch {part['batch_size']}, decoding {part['decoding']})", "",
                  "| decoding | forwards | fewer forwards | mean forwards per row | wall s | speed-up | "
                  "greedy accuracy | mean reward |", "|---|---|---|---|---|---|---|---|"]
        for name, r in part["runs"].items():
            lines.append(f"| {name} | {r['forward_passes']} | {r['forward_reduction']}x | {r['mean_row_forwards']} | "
                         f"{r['seconds']} | "
                         f"{r['speedup']}x | {r['accuracy']:.3f} | {r['mean_reward']:.3f} |")
        lines.append("")
    if "long" in result:
        long = result["long"]
        lines += [f"## Long completions: random LLaDA-architecture model ({long['model']['parameters'] / 1e6:.1f} M "
                  f"parameters), batch {long['batch']}, prompt {long['prompt_length']}, decoding {long['decoding']}",
                  "", "| decoding | forwards | tokens / forward | wall s | tokens/s | speed-up | same tokens as uncached |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in long["runs"].items():
            lines.append(f"| {name} | {r['forward_passes']} | {r['tokens_per_forward']} | {r['seconds']} | "
                         f"{r['tokens_per_s']} | {r['speedup']}x | {r.get('same_tokens_as_uncached', '')} |")
        lines.append("")
    if "rl" in result:
        rl = result["rl"]
        lines += [f"## Tiny RL: {rl['task']}, {rl['steps']} steps of dipod.demo's recipe, reference vs fast rollouts", "",
                  f"Accuracy: final policy, greedy with the reference sampler, paper test set ({rl['examples']} items). "
                  "Rollout s: the runs' summed generation time. Mismatch columns: the fast run's logged "
                  "mismatch/* averaged over its steps (fast / reference sampler on the same prompts).", "",
                  "| rollouts | seed | wall s | rollout s | accuracy | train reward | mismatch reward | "
                  "mismatch ELBO/token | mismatch confidence | mismatch forwards | same tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        pair = lambda r, k: (f"{r[f'mismatch/{k}_fast']:.3g} / {r[f'mismatch/{k}_reference']:.3g}"  # noqa: E731
                             if f"mismatch/{k}_fast" in r else "")
        for name, runs in rl["runs"].items():
            for r in runs:
                lines.append(f"| {name} | {r['seed']} | {r['wall_s']} | {r['rollout_s']} | {r['paper_accuracy']:.3f} | "
                             f"{r['train_reward']:.3f} | {pair(r, 'reward')} | {pair(r, 'elbo_per_token')} | "
                             f"{pair(r, 'confidence')} | {pair(r, 'forwards')} | {r.get('mismatch/same_tokens', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sudoku4,countdown", help="reference policies to run ('' for none)")
    parser.add_argument("--thresholds", default="0.95,0.9,0.8,0.7,0.5", help="confidence thresholds on the reference policies")
    parser.add_argument("--limit", type=int, default=None, help="first LIMIT items of each paper test set")
    parser.add_argument("--extra_block_lengths", default="",
                        help="reference policies: also decode with these shorter blocks, with and without the cache")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--cache_dir", default=None, help="reference-policy cache (default: $DIPOD_CACHE or ~/.cache/dipod)")
    parser.add_argument("--skip_long", action="store_true", help="leave out the long-completion part")
    parser.add_argument("--long_d_model", type=int, default=256)
    parser.add_argument("--long_layers", type=int, default=4)
    parser.add_argument("--long_heads", type=int, default=4)
    parser.add_argument("--long_mlp", type=int, default=512)
    parser.add_argument("--long_head_std", type=float, default=0.45,
                        help="std of the random output head's weights: larger = more peaked predictions")
    parser.add_argument("--long_batch", type=int, default=4)
    parser.add_argument("--long_prompt", type=int, default=64)
    parser.add_argument("--long_gen", type=int, default=256)
    parser.add_argument("--long_block", type=int, default=32)
    parser.add_argument("--long_steps", type=int, default=128)
    parser.add_argument("--long_threshold", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each decoding configuration (reference "
                        "policies and long part, interleaved); the fastest counts")
    parser.add_argument("--rl_task", default="sudoku4", help="task of the tiny RL comparison ('' to skip it)")
    parser.add_argument("--rl_steps", type=int, default=30)
    parser.add_argument("--rl_seeds", default="0,1")
    parser.add_argument("--rl_threshold", type=float, default=0.9)
    parser.add_argument("--rl_mismatch_steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()

    import sys

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result = {"command": "python " + " ".join(sys.argv), "torch_threads": args.threads,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    extra_blocks = [int(b) for b in args.extra_block_lengths.split(",") if b]
    result["reference"] = [reference_part(task, thresholds, args.batch_size, args.limit, args.cache_dir, args.repeats,
                                          extra_blocks)
                           for task in args.tasks.split(",") if task]
    if not args.skip_long:
        result["long"] = long_part(args)
    if args.rl_task:
        result["rl"] = rl_part(args)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(result) + "\n")


if __name__ == "__main__":
    main()
