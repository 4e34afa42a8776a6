"""The scale path's GPU check (issue 18, deliverable 5): an 8B-shaped LLaDA on one GPU, in under 8 minutes.

    python benchmarks/gpu_check.py                      # H200 / any CUDA GPU: LLaDA-8B shape, random bf16 weights
    python benchmarks/gpu_check.py --shape tiny --device cpu   # the same code path at the tiny snapshot's shape

Both start from a tiny LLaDA snapshot's config.json (``--snapshot``, default ../shared/models/tiny-llada;
any LLaDA folder in the hub's layout will do, e.g. the test suite's own, tests/hub_layout.py): the 8B
shape overrides its sizes and token ids with LLaDA-8B-Instruct's.

What it measures, with the settings of a paper config (default: FPO gsm8k + DiPOD, LoRA r 128 on q/k/v/up,
whole-layer checkpointing, 4 masked draws), on one prompt group (num_generations rows of a random prompt):

1. rollouts of gen_length tokens (the config's blocks and steps, its temperature) with full forwards and
   with the dual block KV cache, and with threshold decoding (0.9) with every row in every forward, with
   finished rows compacted out of the forwards, and compacted + the dual cache: completion tokens per
   second, and beside each the FLOP-count bound (linear-map FLOPs of the row-forwards actually run, at
   the GPU's peak; attention scores left out), an estimate of what the GPU could reach. On random
   weights few proposals pass a threshold, so the threshold rows are a worst case (about one token
   per forward), not what a trained policy decodes;
2. LoRA updates with checkpointing: the ELBO of every masked draw (dipod.lm.proxies, the trainer's
   code), backward, AdamW step; the second of two is measured: seconds, peak memory against
   `dipod lm memory`'s plan for the same micro-batch on one GPU, and model FLOPs utilisation
   (forward + input-gradient backward of the frozen base, 4 x matmul parameters x tokens plus the
   vocabulary head over the completion; recomputation is not counted, as MFU conventions do; peak:
   the GPU's dense bf16 figure, --peak_tflops).

The weights are random (normal, std 0.02): speed and memory do not depend on their values. Results:
``--results_dir``/gpu_check.json and .md, with the machine named. On a CPU nothing is compared with a
GPU's figures (peak memory and MFU are left out); that run is the test of the script (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT.parent / "shared" / "models" / "tiny-llada"
# LLaDA-8B-Instruct's config.json values (its model card); the rest of the config is the snapshot's.
LLADA_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, embedding_size=126464,
                vocab_size=126464, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, rope_theta=500000.0,
                max_sequence_length=4096, weight_tying=False)
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}  # dense bf16, vendor datasheets
GIB = 2 ** 30


def build_lm(shape: str, device: str, dtype: torch.dtype, snapshot: Path):
    """A MaskedDiffusionLM of our LLaDA network at ``shape`` with random weights (no checkpoint read)."""
    from dipod.lm.families import FAMILIES
    from dipod.lm.model import MaskedDiffusionLM
    from dipod.lm.networks.checkpoint_model import CheckpointNetwork, ModelConfig

    config = json.loads((snapshot / "config.json").read_text())
    if shape == "8b":
        config.update(LLADA_8B)
    # dtype first, on the meta device: at 8B, allocating float32 and then casting would hold 32 GB + 16 GB
    model = CheckpointNetwork(ModelConfig(**config)).to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    pad, eos = int(config["pad_token_id"]), int(config["eos_token_id"])
    return MaskedDiffusionLM(model=model, tokenizer=None, mask_id=int(config["mask_token_id"]), pad_id=pad, eos_id=eos,
                             family=FAMILIES["llada"], source=f"random {shape}")


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the decoder layers' linear maps, parameters of the vocabulary head)."""
    head = model.get_output_embeddings() or model.get_input_embeddings()
    layers = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{name}")
    return layers, head.weight.numel()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# name: the rollout's settings beside the config's (threshold decoding: the paper-scale rule of thumb 0.9)
ROLLOUTS = {"none": {}, "dual": {"kv_cache": "dual"},
            "threshold_every_row": {"confidence_threshold": 0.9, "compact_rows": False},
            "threshold_compacted": {"confidence_threshold": 0.9},
            "threshold_compacted_dual": {"confidence_threshold": 0.9, "kv_cache": "dual"}}


def time_rollout(lm, prompt_ids, prompt_attn, settings, device: str) -> dict:
    from dipod.lm.sampler import decode

    synchronize(device)
    start = time.perf_counter()
    out = decode(lm, prompt_ids, prompt_attn, settings, generator=torch.Generator(device=device).manual_seed(1))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": out.completion_bg.numel() / seconds, "completion": out.completion_bg,
            "forward_passes": out.forward_passes, "row_forwards": out.row_forwards}


def rollout_tflop(matmul: int, rollout: dict, rows: int, prompt_len: int, settings) -> float:
    """Linear-map FLOPs (2 per parameter and token) of the row-forwards a rollout ran: full forwards see
    the whole sequence; with the dual cache a block's first forward does, its later ones the block only."""
    full_tokens = prompt_len + settings.gen_length
    if settings.kv_cache is None:
        tokens = rollout["row_forwards"] * full_tokens
    else:
        first = rows * len(settings.blocks())
        tokens = first * full_tokens + (rollout["row_forwards"] - first) * settings.block_length
    return 2 * matmul * tokens / 1e12


def lora_update(lm, cfg, prompt_ids, prompt_attn, completion, device: str) -> dict:
    """Updates of the trainer's shape (ELBO over num_draws masked copies of every row, backward, AdamW),
    twice: the first pays one-off costs (backward kernels' first launch, AdamW's state); the second is
    timed and its peak memory (AdamW state resident, as in a run) is the one compared with the plan."""
    from dipod.lm.model import LoraSettings, apply_lora
    from dipod.lm.train_engine import compute_proxies, proxy_settings

    lm.model = apply_lora(lm.model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                                 target_modules=tuple(cfg.lora_target_modules)))
    lm.family.enable_activation_checkpointing(lm.model)
    lm.model.train()
    adapters = [p for p in lm.model.parameters() if p.requires_grad]  # float32 beside the bf16 base (peft)
    optimizer = torch.optim.AdamW(adapters, lr=cfg.learning_rate)
    before = [p.detach().clone() for p in adapters]
    seconds = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        start = time.perf_counter()
        proxies = compute_proxies(lm, prompt_ids, prompt_attn, completion, proxy_settings(cfg), seed=0)
        loss = -proxies.elbo_n.mean()
        loss.backward()
        optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(adapters, before))
    return {"seconds": seconds[-1], "first_update_seconds": seconds[0], "loss": float(loss.detach()),
            "adapter_dtype": str(adapters[0].dtype), "peak_gib": peak, "largest_adapter_change": moved,
            "adapter_params": sum(p.numel() for p in adapters)}


def check_config(config_path: Path, shape: str, gen_length: int | None, steps: int | None, snapshot: Path):
    """The paper config with the micro-batch = one prompt group on one process (the planner's micro too)."""
    from dipod.config import parse_config
    from dipod.lm.train_config import TrainConfig

    cfg = parse_config(TrainConfig, ["--config", str(config_path)], "gpu_check")
    changes = dict(prompts_per_step=1, gradient_accumulation_steps=1, generation_batch_size=cfg.num_generations,
                   kl_beta=0.0)
    if shape == "tiny":
        changes.update(model=str(snapshot), lora_r=4, lora_alpha=8.0, max_prompt_length=24, gen_length=16,
                       block_length=8, diffusion_steps=4)
    if gen_length:
        changes.update(gen_length=gen_length, block_length=min(cfg.block_length, gen_length))
    if steps:
        changes.update(diffusion_steps=steps)
    return cfg.with_changes(**changes)


def planned_update_gib(cfg) -> float:
    """`dipod lm memory`'s update-phase peak for this micro-batch on one GPU (LoRA: optimizer state is the adapters')."""
    from dipod.lm.memory import plan

    return plan(cfg, num_gpus=1, engine="ddp")["update_peak_gib"]


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GIB:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def run(args) -> dict:
    from dipod.lm.sampler import SamplerSettings

    device = args.device
    cfg = check_config(args.config, args.shape, args.gen_length, args.steps, args.snapshot)
    torch.manual_seed(0)
    lm = build_lm(args.shape, device, getattr(torch, args.dtype), args.snapshot)
    rows, prompt_len = cfg.num_generations, cfg.max_prompt_length
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, min(vocab, lm.mask_id), (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt_ids, prompt_attn = prompt.expand(rows, -1).to(device), torch.ones(rows, prompt_len, dtype=torch.long, device=device)
    layer_params, head_params = matmul_params(lm.model)
    peak = peak_tflops(device, args.peak_tflops)
    rollouts = {}
    for name, changes in ROLLOUTS.items():
        settings = SamplerSettings(gen_length=cfg.gen_length, block_length=cfg.block_length, steps=cfg.diffusion_steps,
                                   temperature=cfg.temperature, remasking=cfg.remasking, **changes)
        rollouts[name] = time_rollout(lm, prompt_ids, prompt_attn, settings, device)
        tflop = rollout_tflop(layer_params + head_params, rollouts[name], rows, prompt_len, settings)
        rollouts[name].update(tflop=tflop, bound_tokens_per_s=None if peak is None else
                              rollouts[name]["completion"].numel() / (tflop / peak))
    completion = rollouts["dual"]["completion"]
    for rollout in rollouts.values():
        rollout.pop("completion")
    update = lora_update(lm, cfg, prompt_ids, prompt_attn, completion, device)
    draws = cfg.num_draws_value()
    tokens = rows * draws * (prompt_len + cfg.gen_length)
    flops = 4 * (layer_params * tokens + head_params * rows * draws * cfg.gen_length)
    planned = planned_update_gib(cfg.with_changes(model="GSAI-ML/LLaDA-8B-Instruct") if args.shape == "8b" else cfg)
    return {
        "machine": machine(device), "shape": args.shape, "config": str(args.config), "rows": rows,
        "prompt_length": prompt_len, "gen_length": cfg.gen_length, "block_length": cfg.block_length,
        "diffusion_steps": cfg.diffusion_steps, "num_draws": draws, "lora_r": cfg.lora_r, "dtype": args.dtype,
        "matmul_params": layer_params + head_params,
        "rollout": rollouts, "dual_cache_speedup": rollouts["dual"]["tokens_per_s"] / rollouts["none"]["tokens_per_s"],
        "update": {**update, "tokens": tokens, "tflop": flops / 1e12,
                   "mfu": None if peak is None else flops / update["seconds"] / (peak * 1e12)},
        "planned_update_gib": planned,
        "measured_over_planned": None if update["peak_gib"] is None else update["peak_gib"] / planned,
    }


def markdown(result: dict, command: str) -> str:
    r, u = result["rollout"], result["update"]
    peak = "not measured (CPU)" if u["peak_gib"] is None else f"{u['peak_gib']:.1f} GiB"
    ratio = "" if result["measured_over_planned"] is None else f" ({result['measured_over_planned']:.2f} x the plan)"
    mfu = "not computed (no GPU peak)" if u["mfu"] is None else f"{100 * u['mfu']:.1f} %"
    return "\n".join([
        f"# GPU check: LLaDA ({result['shape']} shape, random weights) on {result['machine']}", "",
        f"Command: `{command}`", "",
        f"One prompt group: {result['rows']} rows, prompt {result['prompt_length']} + completion {result['gen_length']} "
        f"tokens (blocks of {result['block_length']}, {result['diffusion_steps']} steps), {result['num_draws']} masked "
        f"draws per row in the update, LoRA r {result['lora_r']}, whole-layer checkpointing; config {result['config']}.", "",
        "| measurement | value |", "|---|---|",
        *[f"| rollout, {ROLLOUT_LABELS[name]} | {x['tokens_per_s']:.1f} completion tokens/s ({x['seconds']:.2f} s; "
          f"{x['forward_passes']} forwards, {x['row_forwards']} row-forwards, {x['tflop']:.3g} TFLOP); "
          + ("FLOP-count bound not computed (no GPU peak)" if x["bound_tokens_per_s"] is None else
             f"FLOP-count bound {x['bound_tokens_per_s']:.0f} tokens/s (estimate)") + " |" for name, x in r.items()],
        f"| dual KV cache speed-up | {result['dual_cache_speedup']:.2f} x |",
        f"| LoRA update ({u['tokens']} tokens) | {u['seconds']:.2f} s, {u['tflop']:.1f} TFLOP, MFU {mfu} |",
        f"| update peak memory | {peak}{ratio}; `dipod lm memory` plans {result['planned_update_gib']:.1f} GiB |", "",
    ])


ROLLOUT_LABELS = {"none": "full forwards", "dual": "dual KV cache",
                  "threshold_every_row": "threshold 0.9, every row in every forward",
                  "threshold_compacted": "threshold 0.9, finished rows compacted",
                  "threshold_compacted_dual": "threshold 0.9, compacted + dual KV cache"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "lm" / "paper" / "fpo_gsm8k_dipod.yaml")
    parser.add_argument("--gen_length", type=int, default=None, help="override the config's completion length")
    parser.add_argument("--steps", type=int, default=None, help="override the config's diffusion steps")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the base weights' dtype (the paper configs': bfloat16)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    parser.add_argument("--results_dir", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--snapshot", type=Path, default=SNAPSHOT,
                        help="a tiny LLaDA folder in the hub's layout whose config.json the check starts from")
    args = parser.parse_args(argv)
    if args.shape == "8b" and not args.device.startswith("cuda"):
        parser.error("--shape 8b needs a CUDA device (16 GB of bf16 weights); on a CPU use --shape tiny")
    if not (args.snapshot / "config.json").is_file():
        parser.error(f"no LLaDA config.json (the config this check starts from) in {args.snapshot}; pass --snapshot "
                     "DIR, a LLaDA folder in the hub's layout")
    result = run(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check" if args.shape == "8b" else "gpu_check_tiny"
    (args.results_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    page = markdown(result, command.strip())
    (args.results_dir / f"{stem}.md").write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
