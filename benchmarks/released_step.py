"""One RL step of ours beside the paper's released trainer: same weights, same prompts, one process, the two
alternating.

    python benchmarks/released_step.py --release /path/to/DiPOD-release [--trainer spg|fpo] [--repeats 3] \
        [--json OUT] [--md OUT]

``--release`` is a checkout (or ``git archive`` export) of Astro-Eric/DiPOD-release; the trainer class is
imported from it as it is (trl / wandb, which the timed methods never use, replaced by empty stand-ins
when missing: ``released_parity.install_stand_ins``). Nothing of it is copied into dipod.

- ``--trainer spg``: SPG(mix)+DiPOD, ``language/SPG/spg/spg_trainer.py``'s ``SPGTrainer``, with the
  settings of configs/lm/paper/spg_mix_sudoku4_dipod.yaml (mixed negative proxy 0.5, EUBO beta 1.0,
  block_random masks, 2 draws, prompt masking 0.15, mask seeds new every iteration, 4 iterations);
- ``--trainer fpo``: FPO+DiPOD, the d1 fork's ``DiffuGRPOTrainer`` (``language/d1/diffu-grpo``) with
  ``fpo=True`` and the settings of fpo_sudoku4_dipod.yaml (4 random masks stored with the rollouts, clip
  0.5, KL 0.04 to a frozen copy of the initial policy, 8 iterations).

Both: AdamW (lr 3e-6, betas 0.9 / 0.99, weight decay 0.1, clipping 0.2), DiPOD beta 0.05, temperature
0.3, full fine-tuning of the shipped sudoku4 reference policy, loaded afresh for every side and repeat;
the same ``--prompts`` x ``--generations`` rollouts of the same paper-train puzzles; decoding in the
paper's proportions (256 tokens, blocks of 32, 128 steps) shrunk to 32 tokens in blocks of 8 and 16
steps by default (the released block_random needs as many blocks as draws).

- ours: ``dipod.lm.trainer.Trainer.step`` (rollouts, rewards, advantages, the sharpness monitor, the
  old / reference proxies the estimator needs, the updates);
- released: its own ``generate`` (LLaDA-style sampler), the same rewards and its advantages (reward
  minus the group mean), what its ``_generate_and_score_completions`` computes for the loss (FPO: the
  old and reference ELBOs), then per iteration its ``compute_loss``, backward, clipping and the
  optimizer step, on an instance holding only the attributes these read (its ``__init__`` needs a
  whole TRL setup, which is not what is timed).

Reported: the fastest repeat's CPU time (process time: load from other processes disturbs it less)
and wall time of each side, their ratios released / ours, each side's rollout / update split, and each
side's mean reward (the two draw different samples, so these agree only in law).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_report import report
from released_parity import bare_instance, install_stand_ins, load_file

# configs/lm/paper/*_sudoku4_dipod.yaml, less what a step on one CPU process does not read
COMMON = dict(temperature=0.3, learning_rate=3e-6, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99,
              max_grad_norm=0.2, lr_scheduler="constant", remasking="low_confidence", dipod_beta=0.05)
TRAINERS = {
    # SPG with the mixed negative proxy: language/SPG's SPGTrainer
    "spg": dict(file="language/SPG/spg/spg_trainer.py", cls="SPGTrainer", paper="spg_mix_sudoku4_dipod.yaml",
                settings=dict(COMMON, estimator="spg", spg_negative_proxy="mix", spg_mix_weight=0.5, eubo_beta=1.0,
                              masking="block_random", num_draws=2, min_t=0.0, max_t=1.0, p_mask_prompt=0.15,
                              reseed_masks=True, num_iterations=4, warmup_steps=2, dipod_unscored_eos=False)),
    # FPO: the d1 fork's DiffuGRPOTrainer with fpo=True (its KL reference: a frozen copy, as ours without LoRA)
    "fpo": dict(file="language/d1/diffu-grpo/diffu_grpo_trainer.py", cls="DiffuGRPOTrainer",
                paper="fpo_sudoku4_dipod.yaml",
                settings=dict(COMMON, estimator="fpo", clip_eps=0.5, kl_beta=0.04, masking="random", num_draws=4,
                              p_mask_prompt=0.0, reseed_masks=False, num_iterations=8, warmup_steps=1,
                              dipod_unscored_eos=True, dipod_normalisation="per_sequence")),
}


def our_trainer(args, output_dir: Path):
    from dipod.demo import tiny_rl_config
    from dipod.lm.reference import SHIPPED_DIR
    from dipod.lm.trainer import Trainer

    cfg = tiny_rl_config(SHIPPED_DIR / "sudoku4", output_dir, **TRAINERS[args.trainer]["settings"],
                         prompts_per_step=args.prompts, num_generations=args.generations,
                         gradient_accumulation_steps=1, generation_batch_size=args.prompts * args.generations,
                         gen_length=args.gen_length, block_length=args.block_length, diffusion_steps=args.steps,
                         eval_steps=0, save_steps=0, gap_monitor_steps=0, progress_bar=False, tensorboard=False,
                         log_completions=0)
    return Trainer(cfg)


def released_instance(trainer_cls, cfg, mask_id: int):
    """The released trainer with only the attributes its timed methods read (its __init__ needs a whole TRL
    setup); their names are its GRPOConfig's and its own."""
    args = SimpleNamespace(mask_id=mask_id, forward_type=cfg.masking, num_t=cfg.num_draws, min_t=cfg.min_t,
                           max_t=cfg.max_t, block_length=cfg.block_length, use_mask_prompt=cfg.p_mask_prompt > 0,
                           p_mask_prompt=cfg.p_mask_prompt, cfg_scale=cfg.cfg_scale, logp_estimation="mix",
                           eubo_beta=cfg.eubo_beta, mix_weight=cfg.spg_mix_weight, num_iterations=cfg.num_iterations,
                           dipod_beta=cfg.dipod_beta, fp16=False)
    stub = bare_instance(trainer_cls, args)
    stub.control, stub.beta = SimpleNamespace(should_evaluate=False), cfg.kl_beta_value()
    if cfg.estimator == "fpo":
        stub.fpo, stub.elbo_num_samples, stub.epsilon = True, cfg.num_draws, cfg.option_value("clip_eps")
        stub._metrics = defaultdict(lambda: defaultdict(list))
        stub.accelerator = SimpleNamespace(gather_for_metrics=lambda value: value)
    return stub


def released_rollouts(stub, cfg, lm, prompt_ids, prompt_attn):
    """The released trainer's own sampler, in batches of ``generation_batch_size``; the completions ``[N, G]``."""
    batches = []
    for i in range(0, prompt_ids.shape[0], cfg.generation_batch_size):
        rows = slice(i, i + cfg.generation_batch_size)
        # the d1 fork's sampler takes no attention mask (its prompts are of equal length)
        attention = {"prompt_mask": prompt_attn[rows]} if cfg.estimator == "spg" else {}
        batches.append(stub.generate(lm.model, prompt_ids[rows], steps=cfg.diffusion_steps, gen_length=cfg.gen_length,
                                     block_length=cfg.block_length, temperature=cfg.temperature,
                                     cfg_scale=cfg.cfg_scale, remasking=cfg.remasking, mask_id=lm.mask_id,
                                     **attention))
    return torch.cat(batches)[:, prompt_ids.shape[1]:]


def released_inputs(stub, trainer, prompt_ids, prompt_attn, completion_ids, advantages) -> dict:
    """What the released ``_generate_and_score_completions`` hands its ``compute_loss`` (the FPO ELBOs included)."""
    from dipod.lm.processes.masked_likelihood import completion_mask

    cfg, eos_id = trainer.cfg, trainer.lm.eos_id
    if cfg.estimator == "spg":
        # mask seeds as ints: its set_seed hands them to random.seed, which refuses a tensor since Python 3.11
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_attn, "completion_ids": completion_ids,
                "completion_mask": completion_mask(completion_ids, eos_id).int(), "advantages": advantages,
                "reward_mask": advantages > 0, "mask_seeds": torch.randint(0, 2 ** 12, (cfg.num_iterations,)).tolist()}
    mask_ng = completion_mask(completion_ids, eos_id, include_eos=False).int()  # the d1 fork never scores the EOS
    sequences = torch.cat([prompt_ids, completion_ids], 1)
    with torch.no_grad():
        old, randomness = stub._get_sequence_elbo(trainer.lm.model, sequences, mask_ng, num_samples=cfg.num_draws)
        ref, _ = stub._get_sequence_elbo(trainer.ref_lm.model, sequences, mask_ng, num_samples=cfg.num_draws,
                                         stored_randomness=randomness)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "completion_mask": mask_ng,
            "elbo_randomness": randomness, "old_elbos": old, "ref_elbos": ref, "advantages": advantages}


def released_step(trainer_cls, trainer, examples: list[dict], prompt_ids, prompt_attn) -> dict:
    """One step of the released trainer on ``trainer``'s freshly loaded model (ours is not stepped)."""
    cfg, lm = trainer.cfg, trainer.lm
    stub = released_instance(trainer_cls, cfg, lm.mask_id)
    model = lm.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        completion_ids = released_rollouts(stub, cfg, lm, prompt_ids, prompt_attn)
    rewards_nf, _ = trainer.score(trainer.engine.decode_completions(lm, completion_ids), examples)
    reward_n = rewards_nf @ trainer.reward_weights
    advantages = reward_n - reward_n.view(-1, cfg.num_generations).mean(1).repeat_interleave(cfg.num_generations)
    inputs = released_inputs(stub, trainer, prompt_ids, prompt_attn, completion_ids, advantages)
    generated = time.perf_counter()
    model.train()
    for iteration in range(cfg.num_iterations):
        stub._step = iteration
        stub.compute_loss(model, inputs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    done = time.perf_counter()
    return {"generation_time": generated - start, "update_time": done - generated, "reward": float(reward_n.mean())}


def timed(fn) -> tuple[dict, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def compare(args, trainer_cls) -> dict:
    """``args.repeats`` rounds, ours then the released step, each on a fresh trainer; fastest of each side."""
    sides = {"ours": [], "released": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in sides:
                trainer = our_trainer(args, Path(tmp) / f"{repeat}-{name}")
                if name == "ours":
                    step = trainer.step
                    out, cpu, wall = timed(lambda: step(1))
                else:
                    examples = trainer.step_examples(1)
                    ids, attn = trainer.encode(examples)
                    out, cpu, wall = timed(lambda: released_step(trainer_cls, trainer, examples, ids, attn))
                sides[name].append({"cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                                    "generation_s": round(out["generation_time"], 3),
                                    "update_s": round(out["update_time"], 3), "reward": round(out["reward"], 4)})
    best = {name: min(runs, key=lambda r: r["cpu_s"]) for name, runs in sides.items()}
    return {"repeats": sides, "best": best,
            "cpu_ratio_released_over_ours": round(best["released"]["cpu_s"] / best["ours"]["cpu_s"], 3),
            "wall_ratio_released_over_ours": round(min(r["wall_s"] for r in sides["released"])
                                                   / min(r["wall_s"] for r in sides["ours"]), 3)}


def markdown(result: dict) -> str:
    c = result["comparison"]
    lines = ["# One RL step: ours beside the released trainer", "",
             f"Command: `{result['command']}`, {result['machine']}, {result['started']}. {result['trainer']}. "
             f"{result['shape']}. "
             f"Fastest of {len(c['repeats']['ours'])} alternating repeats (by CPU time).", "",
             "| side | CPU s | wall s | rollout s | update s | mean reward |", "|---|---|---|---|---|---|"]
    for name, r in c["best"].items():
        lines.append(f"| {name} | {r['cpu_s']} | {r['wall_s']} | {r['generation_s']} | {r['update_s']} | {r['reward']} |")
    lines += ["", f"CPU ratio released / ours: **{c['cpu_ratio_released_over_ours']}x**; wall ratio "
              f"{c['wall_ratio_released_over_ours']}x (> 1: the released step takes longer)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, type=Path, help="checkout or export of Astro-Eric/DiPOD-release")
    parser.add_argument("--trainer", choices=tuple(TRAINERS), default="spg",
                        help="spg: SPG(mix)+DiPOD (SPGTrainer); fpo: FPO+DiPOD (the d1 fork's DiffuGRPOTrainer)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--gen_length", type=int, default=32)
    parser.add_argument("--block_length", type=int, default=8,
                        help="the released block_random needs at least 2 blocks (its num_t) in the completion")
    parser.add_argument("--steps", type=int, default=16, help="diffusion steps over the completion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default="shared 2-core CPU, loaded", help="stated on the results page")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    args = parser.parse_args()
    released = TRAINERS[args.trainer]
    if not (args.release / released["file"]).is_file():
        parser.error(f"{args.release / released['file']} not found: --release must be a checkout of DiPOD-release")
    torch.set_num_threads(args.threads)
    stood_in = install_stand_ins()
    trainer_cls = getattr(load_file(args.release / released["file"], f"released_{args.trainer}_trainer"),
                          released["cls"])
    result = {"command": "python " + " ".join(sys.argv), "machine": args.machine, "torch_threads": args.threads,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stand_ins": stood_in,
              "trainer": f"{released['cls']} ({released['file']}), settings of configs/lm/paper/{released['paper']}",
              "shape": (f"Shipped sudoku4 reference policy, {args.prompts} prompts x {args.generations} completions, "
                        f"{args.gen_length} tokens in blocks of {args.block_length}, {args.steps} steps"),
              "comparison": compare(args, trainer_cls)}
    report(result, args.json, args.md, markdown)


if __name__ == "__main__":
    main()
