"""`dipod lm sft`: masked-diffusion supervised training on a task's demonstrations.

The loss is LLaDA's SFT loss (`sft_loss`): per sequence a noise level t ~ U(0, 1) is drawn and
every completion token is masked independently with probability p = (1 - eps) t + eps (eps keeps
1/p finite); the masked completion tokens' cross-entropy, each weighted 1/p, is summed and divided
by the completion length G, then averaged over the batch. Its expectation is the negative ELBO per
token, an upper bound on -log pi(completion | prompt) / G. The prompt is never masked. Completions
are padded with EOS to G and the padding counts as completion (as in LLaDA's SFT), so the model
learns where to stop — the same EOS-padded layout the sampler returns.

Training starts from a freshly built tiny model (``--model tiny``) or any model directory / hub
id, evaluates greedily on held-out examples every ``eval_every`` steps, and can stop as soon as the
held-out accuracy reaches ``target_accuracy_min`` — this is how the tiny reference policies are
left at a mid-level accuracy with room for RL to improve. Outputs in OUTPUT_DIR: metrics.jsonl
(+ tb/, plot.png), checkpoint-STEP/ (atomic, resumable), config.yaml, sft_result.json and model/
(``save_pretrained`` format, loadable by ``load_masked_lm`` like any hub checkpoint).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dipod.checkpoint import (RESUME_HELP, RESUME_LATEST, capture_rng_state, restore_rng_state, resume_checkpoint,
                              resume_target, save_checkpoint)
from dipod.config import ConfigError, option, parse_config, require, save_config
from dipod.lm.evaluate import PROMPT_STYLES, evaluate_policy
from dipod.lm.families import FAMILIES, FAMILY_HELP
from dipod.lm.processes.registry import process_of
from dipod.lm.recipe import RECIPE_FILE, DecodingRecipe
from dipod.lm.train_config import DTYPES
from dipod.lm.sampler import DecodingOptions, SamplerSettings
from dipod.run_folder import prepare_run_folder, release_run_lock
from dipod.runlog import MetricsLogger, TrainingDiverged, atomic_write_json

LogitsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
RESULT_FILE = "sft_result.json"
MODEL_DIR = "model"
# stage codes for derive_seed: independent random streams per purpose
_BATCHES, _MASKS, _WRONG = range(3)
LR_SCHEDULES = ("constant", "cosine")
TINY_SDAR = "tiny-sdar"


# ---------------------------------------------------------------------------------------- loss

def draw_sft_masks(batch_size: int, gen_length: int, generator: torch.Generator,
                   eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask_bg, p_mask_b)``: which completion tokens to mask, and each row's mask probability."""
    t_b = torch.rand(batch_size, generator=generator, dtype=torch.float32)
    p_mask_b = (1.0 - eps) * t_b + eps
    mask_bg = torch.rand(batch_size, gen_length, generator=generator, dtype=torch.float32) < p_mask_b[:, None]
    return mask_bg, p_mask_b


def sft_loss(logits_fn: LogitsFn, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor,
             completion_ids: torch.Tensor, mask_bg: torch.Tensor, p_mask_b: torch.Tensor,
             mask_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    """LLaDA's SFT loss for one batch with the given masks; returns ``(loss, stats)``.

    ``logits_fn(ids, attn, first)`` returns float32 logits ``[B, P+G-first, V]`` (``MaskedDiffusionLM.logits``).
    """
    prompt_len, gen_length = prompt_ids.shape[1], completion_ids.shape[1]
    noisy_bg = completion_ids.masked_fill(mask_bg, mask_id)
    ids = torch.cat([prompt_ids, noisy_bg], dim=1)
    attn = torch.cat([prompt_attn, torch.ones_like(completion_ids)], dim=1)
    logits_bgv = logits_fn(ids, attn, prompt_len)
    nll_bg = F.cross_entropy(logits_bgv.transpose(1, 2), completion_ids, reduction="none")
    masked_bg = mask_bg.float()
    loss = ((nll_bg * masked_bg).sum(dim=1) / p_mask_b / gen_length).mean()
    with torch.no_grad():
        n_masked = masked_bg.sum().clamp_min(1.0)
        stats = {"masked_nll": float((nll_bg * masked_bg).sum() / n_masked),
                 "masked_token_acc": float(((logits_bgv.argmax(-1) == completion_ids).float() * masked_bg).sum()
                                           / n_masked)}
    return loss, stats


# ---------------------------------------------------------------------------------------- config

@dataclass
class SFTConfig(DecodingOptions):  # remasking, schedule, confidence_threshold, kv_cache, ...
    # --- model ---
    model: str = option(f"'tiny' builds a fresh tiny ModernBERT (full-sequence masked diffusion), '{TINY_SDAR}' a fresh "
                        "tiny SDAR (block-causal, blocks of 4); otherwise a model directory or hub id", default="tiny")
    tiny_hidden_size: int = option("tiny model: hidden size", default=128)
    tiny_layers: int = option("tiny model: transformer layers", default=4)
    tiny_heads: int = option("tiny model: attention heads", default=4)
    tiny_intermediate_size: int = option("tiny model: MLP width", default=256)
    trust_remote_code: bool = option("run the model repository's own code: the legacy path for LLaDA / Dream "
                                     "(transformers 4.56-4.57); by default they load into dipod's own network",
                                     default=False)
    mask_token_id: int | None = option(
        "mask token id for a model that defines none; must equal the model's own id otherwise", default=None)
    model_family: str | None = option(FAMILY_HELP, default=None)
    dtype: str = option(f"model weights dtype, one of {DTYPES}", default="float32")
    # --- data ---
    task: str = option("task name: sudoku4, countdown, ...", default="sudoku4")
    train_data: str | None = option("training data file (None: the task's generated train split)", default=None)
    train_examples: int | None = option("use only the first N training examples (None: the task's default size)",
                                       default=None)
    wrong_demonstration_rate: float = option(
        "probability that a row of a step shows the task's plausible wrong answer instead of the right one "
        "(drawn per row and step): teaches a policy that knows the right answer but often prefers a wrong one",
        default=0.0)
    eval_data: str | None = option("held-out data file (None: the task's eval_split)", default=None)
    eval_split: str = option("held-out split of the task used for the periodic evaluation", default="test")
    allow_eval_in_train: bool = option("train even when the training data holds held-out examples (the evaluation "
                                       "then measures memory, not generalisation)", default=False)
    eval_examples: int = option("held-out examples per evaluation (0: never evaluate)", default=200)
    prompt_style: str = option(f"prompt format, one of {PROMPT_STYLES}", default="compact")
    max_prompt_length: int = option("prompts longer than this many tokens are cut from the left", default=256)
    # --- decoding (held-out evaluation; also the settings the policy is meant to be sampled with) ---
    gen_length: int = option("completion length in tokens; demonstrations are EOS-padded to it", default=32)
    block_length: int = option("sampler block length", default=32)
    steps: int = option("sampler steps over the whole completion", default=32)
    # --- optimisation ---
    max_steps: int = option("optimizer steps at most", default=2000)
    batch_size: int = option("sequences per step", default=64)
    learning_rate: float = option("AdamW learning rate", default=1e-3)
    warmup_steps: int = option("linear warm-up steps", default=50)
    lr_schedule: str = option(f"after warm-up, one of {LR_SCHEDULES}: constant, or cosine decay to 0 at max_steps",
                             default="constant")
    weight_decay: float = option("AdamW weight decay", default=0.01)
    max_grad_norm: float = option("gradient clipping norm (0: off)", default=1.0)
    mask_eps: float = option("smallest mask probability eps in p = (1 - eps) t + eps", default=1e-3)
    seed: int = option("seed of the model init, batch order and masks (same seed => same run on CPU)", default=0)
    # --- stopping at a mid-level accuracy ---
    eval_every: int = option("greedy held-out evaluation every this many steps (0: only at the end)", default=100)
    target_accuracy_min: float | None = option(
        "stop once held-out greedy accuracy reaches this (None: train for max_steps)", default=None)
    target_accuracy_max: float = option(
        "an evaluation above this counts as an overshoot (warned about; lower learning_rate or eval_every)",
        default=1.0)
    # --- run ---
    output_dir: str = option("run folder", default="runs/lm_sft")
    save_every: int = option("checkpoint every this many steps (0: only at the end)", default=500)
    keep_checkpoints: int = option("how many checkpoints to keep", default=2)
    resume: str | None = option(RESUME_HELP, default=None, bare=RESUME_LATEST)
    overwrite: bool = option("replace the run already in output_dir (its metrics, checkpoints, model); without it "
                             "a folder holding a run is refused unless --resume", default=False)
    tensorboard: bool = option("mirror metrics to OUTPUT_DIR/tb", default=False)
    progress_bar: bool = option("show a tqdm progress bar", default=True)

    def __post_init__(self) -> None:
        self.resume = resume_target(self.resume)
        require(self.model_family is None or self.model_family in FAMILIES,
                f"model_family={self.model_family!r}; choose one of {sorted(FAMILIES)} or leave it out (detected)")
        require(self.dtype in DTYPES, f"dtype={self.dtype!r}; choose one of {DTYPES}")
        require(self.prompt_style in PROMPT_STYLES, f"prompt_style={self.prompt_style!r}; choose one of {PROMPT_STYLES}")
        for name in ("max_steps", "batch_size", "max_prompt_length", "tiny_hidden_size", "tiny_layers", "tiny_heads",
                     "tiny_intermediate_size"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "eval_every", "eval_examples", "save_every", "keep_checkpoints"):
            require(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        require(self.train_examples is None or self.train_examples >= 1, "train_examples must be >= 1 (or None)")
        require(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be a positive number")
        require(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0")
        require(0 < self.mask_eps < 1, f"mask_eps={self.mask_eps} must lie in (0, 1)")
        require(0 <= self.wrong_demonstration_rate < 1,
                f"wrong_demonstration_rate={self.wrong_demonstration_rate} must lie in [0, 1)")
        require(self.lr_schedule in LR_SCHEDULES, f"lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        lo, hi = self.target_accuracy_min, self.target_accuracy_max
        require(0 <= hi <= 1, f"target_accuracy_max={hi} must lie in [0, 1]")
        if lo is not None:
            require(0 < lo <= hi, f"target_accuracy_min={lo} must lie in (0, target_accuracy_max={hi}]")
            require(self.eval_examples > 0, "target_accuracy_min needs held-out evaluations: set eval_examples > 0")
        self.sampler_settings()  # validates gen_length / block_length / steps / remasking

    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                               temperature=0.0, **self.decoding_options())


def sft_recipe(cfg: SFTConfig) -> DecodingRecipe:
    """The decoding the SFT run evaluated with, recorded in ``model/dipod_recipe.json``."""
    return DecodingRecipe.of(cfg.sampler_settings(), prompt_style=cfg.prompt_style,
                             max_prompt_length=cfg.max_prompt_length, task=cfg.task)


# ---------------------------------------------------------------------------------------- data

def encode_demonstrations(lm, task, examples: list[dict], prompt_style: str, max_prompt_length: int,
                          gen_length: int, demonstrate: Callable[[dict], str] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt_ids [N, P], prompt_attn [N, P], completion_ids [N, G])``: left-padded prompts and
    each example's demonstration (``demonstrate``, default ``task.demonstration``) followed by EOS
    up to ``gen_length``."""
    from dipod.lm.train_engine import encode_prompts

    prompt_ids, prompt_attn = encode_prompts(lm, [task.prompt(ex, prompt_style) for ex in examples],
                                             max_prompt_length, chat=prompt_style != "compact")
    demonstrate = demonstrate or task.demonstration
    demos = [lm.tokenizer(demonstrate(ex), add_special_tokens=False)["input_ids"] for ex in examples]
    longest = max(len(d) for d in demos)
    if longest > gen_length:
        raise ConfigError(f"task {task.name}: a demonstration has {longest} tokens but gen_length={gen_length}; "
                          f"raise --gen_length (and --block_length / --steps with it)")
    completion_ids = torch.full((len(demos), gen_length), lm.eos_id, dtype=torch.long)
    for i, demo in enumerate(demos):  # once per dataset, not per step
        completion_ids[i, :len(demo)] = torch.tensor(demo, dtype=torch.long)
    return prompt_ids, prompt_attn, completion_ids


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> torch.Tensor:
    """Rows of step ``step`` (1-based): consecutive slices of a fresh seeded permutation per epoch,
    a function of (seed, step) only, so a resumed run sees the same batches."""
    from dipod.lm.trainer import derive_seed

    positions = torch.arange((step - 1) * batch_size, step * batch_size)
    epochs = positions.div(num_examples, rounding_mode="floor")
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():  # at most two epochs per step
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(derive_seed(seed, _BATCHES, epoch)))
        here = epochs == epoch
        rows[here] = perm[positions[here] % num_examples]
    return rows


# ---------------------------------------------------------------------------------------- training

def _load_start_model(cfg: SFTConfig):
    from dipod.lm.model import build_tiny_model, load_masked_lm

    from dipod.lm.networks.tiny_block import build_tiny_block_model

    if cfg.model not in ("tiny", TINY_SDAR):
        return load_masked_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                              mask_token_id=cfg.mask_token_id, model_family=cfg.model_family)
    sizes = dict(hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_layers, num_heads=cfg.tiny_heads,
                 intermediate_size=cfg.tiny_intermediate_size)
    with tempfile.TemporaryDirectory(prefix="dipod-tiny-") as tmp:
        if cfg.model == TINY_SDAR:  # a training init: the output head starts near uniform
            build_tiny_block_model(Path(tmp) / "init", "sdar", seed=cfg.seed, sizes=sizes, head_std=0.05)
        else:
            build_tiny_model(Path(tmp) / "init", seed=cfg.seed, **sizes)
        return load_masked_lm(Path(tmp) / "init", dtype=cfg.dtype)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Clones: tied embeddings share storage, which safetensors refuses to write twice.
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def lr_factor(cfg: SFTConfig) -> Callable[[int], float]:
    """Learning-rate multiplier of update ``s`` (0-based): linear warm-up, then constant or cosine to 0."""

    def factor(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (s - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_sft(cfg: SFTConfig) -> dict:
    """Run SFT; returns the content of OUTPUT_DIR/sft_result.json."""
    try:
        return _train_sft(cfg)
    finally:
        release_run_lock(cfg.output_dir)


def _train_sft(cfg: SFTConfig) -> dict:
    from tqdm.auto import tqdm

    from dipod.lm.tasks import get_task
    from dipod.lm.trainer import derive_seed

    started = time.perf_counter()
    out = prepare_run_folder(cfg.output_dir, resuming=cfg.resume is not None, overwrite=cfg.overwrite,
                             resume_flag="--resume")
    task = get_task(cfg.task)
    train_examples = task.load("train", path=cfg.train_data, limit=cfg.train_examples)
    if not train_examples:
        raise ValueError(f"task {cfg.task}: no training examples (train_data={cfg.train_data})")
    held_out = task.load(cfg.eval_split, path=cfg.eval_data, limit=cfg.eval_examples) if cfg.eval_examples else []
    _refuse_eval_in_train(train_examples, held_out, cfg)
    torch.manual_seed(cfg.seed)
    lm = _load_start_model(cfg)
    prompt_ids, prompt_attn, completion_ids = encode_demonstrations(
        lm, task, train_examples, cfg.prompt_style, cfg.max_prompt_length, cfg.gen_length)
    if cfg.wrong_demonstration_rate:
        wrong_ids = encode_demonstrations(lm, task, train_examples, cfg.prompt_style, cfg.max_prompt_length,
                                          cfg.gen_length, task.plausible_wrong_demonstration)[2]
    process = process_of(lm)
    model = lm.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))

    start_step = 0
    found = resume_checkpoint(out, cfg.resume)
    if found is not None:
        _, (weights, state, meta) = found
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_step = int(meta["step"])
    save_config(cfg, out / "config.yaml")
    settings = cfg.sampler_settings()

    def evaluate() -> dict:
        report = evaluate_policy(lm, task, held_out, settings, prompt_style=cfg.prompt_style,
                                 max_prompt_length=cfg.max_prompt_length)
        return {"eval/accuracy": report["accuracy"], "eval/reward": report["mean_reward"]}

    last_saved = start_step

    def save(step: int) -> None:
        nonlocal last_saved
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng_state()}
        save_checkpoint(out, step, _weights(model), state, {"task": cfg.task}, keep_last=cfg.keep_checkpoints)
        last_saved = step

    last_eval: dict = {}
    stopped_because = "max_steps"
    step = start_step
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_from_step=start_step + 1 if cfg.resume else None)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"lm sft {cfg.task}", dynamic_ncols=True,
               disable=not cfg.progress_bar)
    try:
        for step in range(start_step + 1, cfg.max_steps + 1):
            rows = batch_indices(step, cfg.batch_size, len(train_examples), cfg.seed)
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, _MASKS, step))
            mask_bg, p_mask_b = draw_sft_masks(len(rows), cfg.gen_length, generator, cfg.mask_eps)
            targets = completion_ids[rows]
            if cfg.wrong_demonstration_rate:
                coin = torch.Generator().manual_seed(derive_seed(cfg.seed, _WRONG, step))
                wrong_b = torch.rand(len(rows), generator=coin) < cfg.wrong_demonstration_rate
                targets = torch.where(wrong_b[:, None], wrong_ids[rows], targets)
            # the process's denoiser: a block-causal model sees the clean earlier blocks, as when it decodes
            denoiser = functools.partial(process.denoising_logits, lm, clean_completion=targets)
            loss, stats = sft_loss(denoiser, prompt_ids[rows], prompt_attn[rows], targets,
                                   mask_bg, p_mask_b, lm.mask_id)
            if not torch.isfinite(loss):
                kept = (f"checkpoint-{last_saved} in {out} is intact and --resume continues from it" if last_saved
                        else "no checkpoint was written yet, so start again")
                raise TrainingDiverged(f"non-finite SFT loss at step {step}: the weights diverged. Lower --learning_rate "
                                       f"(now {cfg.learning_rate:g}); {kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            row = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), **stats}
            optimizer.step()
            scheduler.step()
            if held_out and (step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                last_eval = evaluate()
                row.update(last_eval)
                if cfg.target_accuracy_min is not None and last_eval["eval/accuracy"] >= cfg.target_accuracy_min:
                    stopped_because = "target_accuracy"
            logger.log(step, row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "eval/accuracy") if k in row})
            if stopped_because == "target_accuracy":
                break
            if cfg.save_every and step % cfg.save_every == 0:
                save(step)
        bar.close()
        if step > last_saved:
            save(step)
    finally:
        logger.close()

    accuracy = last_eval.get("eval/accuracy")
    if accuracy is not None and accuracy > cfg.target_accuracy_max:
        warnings.warn(f"held-out accuracy {accuracy:.3f} overshot target_accuracy_max={cfg.target_accuracy_max}; "
                      "lower --learning_rate or --eval_every to stop inside the target range", stacklevel=2)
    model_dir = lm.save_pretrained(out / MODEL_DIR, extra_files={RECIPE_FILE: sft_recipe(cfg).to_json()})
    result = {
        "task": cfg.task, "model_dir": str(model_dir), "final_step": step, "stopped_because": stopped_because,
        "eval_accuracy": accuracy, "eval_reward": last_eval.get("eval/reward"),
        "eval_examples": len(held_out), "eval_split": None if cfg.eval_data else cfg.eval_split,
        "target_reached": (accuracy is not None and cfg.target_accuracy_min is not None
                           and cfg.target_accuracy_min <= accuracy <= cfg.target_accuracy_max),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "prompt_style": cfg.prompt_style,
        "sampler": {"gen_length": cfg.gen_length, "block_length": cfg.block_length, "steps": cfg.steps,
                    "remasking": cfg.remasking},
    }
    atomic_write_json(out / RESULT_FILE, result)
    _plot(out)
    return result


def _refuse_eval_in_train(train: list[dict], held_out: list[dict], cfg: SFTConfig) -> None:
    """Training on the examples the evaluation scores makes its accuracy meaningless: refused unless asked for."""
    seen = {json.dumps(ex, sort_keys=True, default=str) for ex in train}
    shared = sum(json.dumps(ex, sort_keys=True, default=str) in seen for ex in held_out)
    if shared and not cfg.allow_eval_in_train:
        where = cfg.eval_data or f"split {cfg.eval_split}"
        raise ValueError(f"{shared} of the {len(held_out)} held-out examples ({where}) are in the training data; "
                         "pass held-out data the training set does not contain (--eval_data / --eval_split), or "
                         "--allow_eval_in_train true to train on them anyway")


def _plot(out: Path) -> None:
    from dipod.plot import plot_runs

    try:
        plot_runs([out], out / "plot.png", keys=["loss", "eval/accuracy", "eval/reward"])
    except ImportError:  # matplotlib is optional; the metrics file holds the same numbers
        pass


def main(argv: list[str], prog: str = "dipod lm sft") -> int:
    cfg = parse_config(SFTConfig, argv, prog, description="Masked-diffusion supervised training (LLaDA's SFT loss).")
    try:
        result = train_sft(cfg)
    except TrainingDiverged as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    acc = result["eval_accuracy"]
    summary = "no held-out evaluation" if acc is None else f"held-out greedy accuracy {acc:.3f}, reward {result['eval_reward']:.3f}"
    print(f"{prog}: stopped after step {result['final_step']} ({result['stopped_because']}): {summary}; "
          f"model in {result['model_dir']}", file=sys.stderr)
    return 0
