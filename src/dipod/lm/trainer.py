"""`dipod lm train`: online RL post-training of masked-diffusion LMs (GRPO-style loop + DiPOD).

One step, read top to bottom in ``Trainer.step``:
  prompts (the same on every process) x num_generations -> this process's slice of the group
  -> rollouts (sampler, no grad) -> rewards (several functions, weighted)
  -> gather rewards from all processes -> group-centred advantages -> take the local slice back
  -> "old" proxies once, with a fixed seed per micro-batch, or per (iteration, micro-batch) when the
     masks are redrawn every iteration (reseed_masks; skipped when the estimator reads none)
  -> num_iterations x gradient_accumulation_steps: proxies under the current weights (same seed, so
     the same masks) -> estimator loss + DiPOD term on the ELBO of that same forward -> backward
  -> clip, AdamW, schedule -> metrics (+ drift monitor, held-out greedy eval, checkpoint)

Everything distributed goes through ``accelerate`` (one CPU process, DDP, DeepSpeed or FSDP from an
accelerate config); nothing here talks to torch.distributed directly. Every random draw comes from
a seed derived from (seed, step, process, micro-batch), so a resumed run repeats an uninterrupted
one exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dipod.advantages import group_relative_advantages
from dipod.checkpoint import latest_checkpoint
from dipod.config import ConfigError, config_to_dict, parse_config, save_config
from dipod.lm import train_checkpoints
from dipod.lm.monitors import CollapseWatch, group_reward_stats, log_completions, rollout_confidence
from dipod.lm.proxies import completion_mask
from dipod.lm.train_config import TrainConfig, completions_per_process
from dipod.lm.estimators import get_estimator
from dipod.objectives import dipod_term
from dipod.run_folder import prepare_run_folder, release_run_lock
from dipod.runlog import COMPLETIONS, MetricsLogger, TrainingDiverged

# metric keys that measure wall-clock time; they differ between otherwise identical runs
TIMING_KEYS = ("step_time", "generation_time", "update_time", "tokens_per_s")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (seed, stage, step, process, ...): independent streams per stage."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


# stage codes for derive_seed
_PROMPTS, _GENERATE, _PROXY, _MONITOR, _GLOBAL_RNG, _SHOTS, _PLACEBO, _INIT = range(8)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over ``warmup_steps`` updates, then constant, linear or cosine decay to 0."""
    total = cfg.max_steps * cfg.num_iterations

    def factor(update: int) -> float:
        if update < cfg.warmup_steps:
            return (update + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (update - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 1.0 - progress if cfg.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def estimator_loss(cfg: TrainConfig, new, old, adv_n: Tensor, ref: Tensor | None) -> tuple[Tensor, dict]:
    """The configured estimator's loss (its registry record, dipod.lm.estimators) on proxies under the
    current weights (``new``), the rollout weights (``old``; on-policy estimators ignore it) and the
    reference model (``ref``: the record's ``reference_proxy``, when its KL term is on)."""
    return get_estimator(cfg.estimator).loss(new, old, adv_n, ref, cfg.estimator_options())


def rl_loss(cfg: TrainConfig, new, old, adv_n: Tensor, ref: Tensor | None) -> tuple[Tensor, dict]:
    """Estimator loss + the DiPOD term on the ELBO of the SAME forward pass (no second forward).

    The DiPOD term's normalisation is the estimator's option ``dipod_normalisation``: ``per_token``
    (length-weighted like SPG's loss, as SPG's release) or ``per_sequence`` (FPO's release).
    """
    loss, info = estimator_loss(cfg, new, old, adv_n, ref)
    if cfg.dipod_beta > 0:
        per_token = cfg.option_value("dipod_normalisation") == "per_token"
        tighten = dipod_term(new.elbo_n, cfg.dipod_beta, lengths_n=new.lengths_n if per_token else None)
        info["dipod_loss"] = float(tighten.detach())
        loss = loss + tighten
    return loss, info


def proxy_fields(cfg: TrainConfig) -> tuple[str, ...]:
    """The Proxies fields this configuration's loss reads: the estimator's, plus the ELBO for DiPOD."""
    fields = get_estimator(cfg.estimator).reads(cfg.estimator_options())
    if cfg.dipod_beta > 0 and not {"elbo_n", "elbo_nk"} & set(fields):
        fields = (*fields, "elbo_n")
    return fields


def needs_bounds(cfg: TrainConfig) -> bool:
    """Whether the loss reads any bound (ELBO, EUBO, mean-field: the masked copies of dipod.lm.proxies)."""
    return any(name != "left_to_right_logp_nl" for name in proxy_fields(cfg))


def proxies_used(cfg: TrainConfig, proxies) -> list[Tensor]:
    """The proxy tensors this configuration's loss reads (checked for NaN/inf before backward)."""
    return [getattr(proxies, name) for name in proxy_fields(cfg)]


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    final_step: int
    before: dict[str, float]  # held-out evaluation before training (empty when resumed)
    after: dict[str, float]  # held-out evaluation after the last step
    history: list[dict[str, Any]]  # the metrics rows this process logged (main process only)
    model: torch.nn.Module  # the trained policy, unwrapped


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from dipod.lm import train_engine as engine
        from dipod.lm.engines import Engine

        self.cfg = cfg
        # DDP / DeepSpeed / FSDP differences (micro-batch size, clipping, checkpoints): dipod.lm.engines
        self.runtime = Engine(cfg)
        self.accelerator = acc = self.runtime.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.n_local = completions_per_process(cfg, self.world)
        self.micro = self.n_local // cfg.gradient_accumulation_steps
        self.runtime.set_micro_batch(self.micro)
        self._warn_if_over_memory()
        self.engine = engine
        self.task = engine.get_task(cfg.task)
        # The main process of each machine downloads / prepares a hub dataset first; the others then read
        # its cache (a shared filesystem, or one cache per machine: docs/lm_scale.md).
        with acc.local_main_process_first():
            self.train_examples = self.task.load(cfg.train_split, path=cfg.train_data)
            self.eval_examples = self.task.load(cfg.eval_split, path=cfg.eval_data, limit=cfg.eval_examples)
        if not self.train_examples:
            raise ValueError(f"task {cfg.task}: the training split is empty (train_data={cfg.train_data})")
        self.reward_names, self.reward_fns, self.reward_weights = engine.reward_table(self.task, cfg.reward_weights)
        # every reward function scores in [0, 1], so a completion perfect on all of them earns this
        self.max_reward = float(self.reward_weights.clamp_min(0).sum())
        self.shots_prefix = self._few_shot_prefix()
        # every process checks the folder before the model loads; only the main one removes an overwritten run
        prepare_run_folder(cfg.output_dir, resuming=cfg.resume is not None, overwrite=cfg.overwrite,
                           resume_flag="--resume", remove=acc.is_main_process)
        acc.wait_for_everyone()

        torch.manual_seed(derive_seed(cfg.seed, _INIT))  # peft draws the LoRA adapters' initial values here
        self.lm = engine.load_policy(cfg.with_changes(dtype=self.runtime.weights_dtype), device=acc.device)
        if cfg.prompt_style != "compact":
            engine.check_chat_template(self.lm)  # before any rollout, in one line
        # The KL reference is the initial policy: under LoRA that is the policy with its adapters
        # disabled (no second copy of the weights); full fine-tuning needs a frozen copy.
        self.ref_lm = None
        if cfg.kl_beta_value() > 0 and cfg.lora_r == 0:
            with self.runtime.whole_model_loading():
                self.ref_lm = engine.load_reference(cfg, device=acc.device)
        params = [p for p in self.lm.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        # The scheduler is stepped by hand once per update (not prepared: accelerate would step it
        # num_processes times per update).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.model, self.optimizer = self.runtime.prepare(self.lm.model, optimizer)
        self.policy = dataclasses.replace(self.lm, model=self.model)  # forwards through DDP (gradient sync)
        self.frozen_view = dataclasses.replace(self.lm, model=acc.unwrap_model(self.model))  # no-grad calls
        self.proxy_settings = engine.proxy_settings(cfg)
        self.nonfinite_streak = 0
        self.start_step = 0
        self.collapse_watch = CollapseWatch(cfg.collapse_warn_fraction)

    def say(self, text: str) -> None:
        """A line from the main process, printed above the progress bar rather than into it."""
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(text)

    def _warn_if_over_memory(self) -> None:
        """Before any model is loaded: the memory plan against the GPU (--gpu_memory_gib, else the device's)."""
        from dipod.lm.memory import memory_warning

        budget = self.cfg.gpu_memory_gib
        if budget is None and torch.cuda.is_available():
            budget = torch.cuda.get_device_properties(self.accelerator.device).total_memory / 2 ** 30
        warning = memory_warning(self.cfg, self.world, self.runtime.planner_engine, budget) if budget else None
        if warning:
            self.say(f"WARNING {warning}")

    # ------------------------------------------------------------------ data
    def _few_shot_prefix(self) -> str:
        if self.cfg.few_shot == 0:
            return ""
        order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(
            derive_seed(self.cfg.seed, _SHOTS)))[: self.cfg.few_shot]
        shots = [self.train_examples[int(i)] for i in order]
        return "".join(self.task.prompt(ex, "compact") + self.task.demonstration(ex) + "\n\n" for ex in shots)

    def step_examples(self, step: int) -> list[dict]:
        """This process's slice of the step's P x G rollouts (consecutive groups of G per prompt).

        Prompts walk through a fresh seeded permutation of the training set each epoch, so the
        choice depends only on (seed, step) and is the same on every process.
        """
        cfg, n = self.cfg, len(self.train_examples)
        positions = torch.arange((step - 1) * cfg.prompts_per_step, step * cfg.prompts_per_step)
        chosen = []
        for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, _PROMPTS, epoch)))
            in_epoch = positions[positions.div(n, rounding_mode="floor") == epoch]
            chosen.extend(perm[in_epoch % n].tolist())
        grouped = [self.train_examples[i] for i in chosen for _ in range(cfg.num_generations)]
        return grouped[self.rank * self.n_local:(self.rank + 1) * self.n_local]

    def encode(self, examples: list[dict]) -> tuple[Tensor, Tensor]:
        texts = [self.shots_prefix + self.task.prompt(ex, self.cfg.prompt_style) for ex in examples]
        ids, attn = self.engine.encode_prompts(self.lm, texts, self.cfg.max_prompt_length, chat=self.cfg.prompt_style != "compact")
        return ids.to(self.accelerator.device), attn.to(self.accelerator.device)

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_attn: Tensor, temperature: float, seed: int,
                 settings=None) -> Tensor:
        """Completions decoded with ``settings`` (None: the config's decoder at ``temperature``)."""
        cfg = self.cfg
        settings = settings or cfg.sampler_settings(temperature)
        generator = torch.Generator(device=prompt_ids.device).manual_seed(seed)
        chunk = cfg.generation_batch_size or prompt_ids.shape[0]
        try:
            outs = [self.engine.generate(self.frozen_view, prompt_ids[i:i + chunk], prompt_attn[i:i + chunk], settings,
                                         generator=generator) for i in range(0, prompt_ids.shape[0], chunk)]
        except torch.OutOfMemoryError:
            raise RuntimeError(
                f"out of memory while generating {chunk} completions at once; set --generation_batch_size "
                f"{max(1, chunk // 2)} (or lower)") from None
        return torch.cat(outs, dim=0)

    def rollout_mismatch(self, prompt_ids: Tensor, prompt_attn: Tensor, examples: list[dict], step: int) -> dict:
        """``mismatch/*``: this step's prompts decoded by the rollout sampler and by the reference one. For a
        left-to-right estimator (JustGRPO) the reference is its left-to-right rollout sampler and the fast one
        the parallel decoder it is evaluated with (at the rollout temperature)."""
        from dipod.lm.rollout_mismatch import reference_settings, rollout_mismatch

        def total_reward(completion_ids: Tensor) -> Tensor:
            return self.score(self.engine.decode_completions(self.lm, completion_ids), examples)[0] @ self.reward_weights
        fast = self.cfg.sampler_settings(self.cfg.temperature)
        reference = self.cfg.rollout_settings() if self.cfg.left_to_right() else reference_settings(fast)
        found = rollout_mismatch(self.frozen_view, prompt_ids, prompt_attn, fast, reference, total_reward,
                                 self.proxy_settings, derive_seed(self.cfg.seed, _MONITOR, step, self.rank, 2))
        return {f"mismatch/{key}": value for key, value in found.items()}

    def score(self, texts: list[str], examples: list[dict]) -> tuple[Tensor, Tensor]:
        """Rewards ``[n, F]`` (one column per reward function) and correctness ``[n]``."""
        rewards_nf = torch.tensor([[float(fn(t, ex)) for fn in self.reward_fns] for t, ex in zip(texts, examples)],
                                  dtype=torch.float32).reshape(len(texts), len(self.reward_fns))
        correct_n = torch.tensor([float(self.task.is_correct(t, ex)) for t, ex in zip(texts, examples)])
        return rewards_nf, correct_n

    def advantages(self, rewards_nf: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Gather every process's rewards, centre them per prompt group, return (local adv, all rewards).

        A prompt's group may span processes, so the centring must see the whole batch. With
        ``placebo_rewards`` the advantages come from the step's rewards shuffled across all its
        rollouts (the same permutation on every process): same reward distribution, no information.
        """
        acc = self.accelerator
        all_rewards_nf = acc.gather(rewards_nf.to(acc.device)).cpu()
        total_n = all_rewards_nf @ self.reward_weights
        if self.cfg.placebo_rewards:
            shuffle = torch.Generator().manual_seed(derive_seed(self.cfg.seed, _PLACEBO, step))
            total_n = total_n[torch.randperm(total_n.numel(), generator=shuffle)]
        adv_all = group_relative_advantages(total_n, self.cfg.num_generations, scale_by_std=self.cfg.scale_rewards)
        return adv_all[self.rank * self.n_local:(self.rank + 1) * self.n_local], all_rewards_nf

    # ------------------------------------------------------------------ update
    def _proxies(self, view, batch: dict, rows: slice, seed: int):
        cfg = self.cfg
        return self.engine.compute_proxies(view, batch["prompt_ids"][rows], batch["prompt_attn"][rows],
                                           batch["completion_ids"][rows], self.proxy_settings, seed,
                                           meanfield=get_estimator(cfg.estimator).needs_meanfield,
                                           bounds=needs_bounds(cfg),
                                           left_to_right_temperature=cfg.temperature if cfg.left_to_right() else None)

    def _reference_proxies(self, batch: dict, rows: slice, seed: int):
        if self.ref_lm is not None:
            return self._proxies(self.ref_lm, batch, rows, seed)
        from dipod.lm.model import eval_mode

        with self.frozen_view.model.disable_adapter(), eval_mode(self.frozen_view.model):
            return self._proxies(self.frozen_view, batch, rows, seed)

    def _all_finite(self, tensors: list[Tensor]) -> bool:
        """True when every tensor is finite on EVERY process (all skip together, or none does)."""
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(t).all()) for t in tensors) else 1.0],
                           device=self.accelerator.device)
        return float(self.accelerator.reduce(bad, reduction="sum")) == 0.0

    def update(self, batch: dict, step: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        micro_rows = [slice(m * self.micro, (m + 1) * self.micro) for m in range(cfg.gradient_accumulation_steps)]
        # Masks: one seed per (inner iteration, micro-batch) when redrawn every iteration (SPG's
        # release), else one per micro-batch shared by all iterations (the d1 fork's FPO).
        rounds = cfg.num_iterations if cfg.reseed_masks_value() else 1
        seeds = [[derive_seed(cfg.seed, _PROXY, step, self.rank, m, *([r] if rounds > 1 else []))
                  for m in range(len(micro_rows))] for r in range(rounds)]
        estimator = get_estimator(cfg.estimator)
        need_old = estimator.needs_old and cfg.num_iterations > 1
        old = [[None] * len(micro_rows) for _ in range(rounds)]
        ref = [[None] * len(micro_rows) for _ in range(rounds)]
        with torch.no_grad():
            for r in range(rounds):
                for m, rows in enumerate(micro_rows):
                    if need_old:
                        old[r][m] = self._proxies(self.frozen_view, batch, rows, seeds[r][m])
                    if cfg.kl_beta_value() > 0:
                        ref[r][m] = getattr(self._reference_proxies(batch, rows, seeds[r][m]),
                                            estimator.reference_proxy)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        first_pass: list = []
        skipped = 0
        for iteration in range(cfg.num_iterations):
            finite, backwards = True, 0
            r = iteration if rounds > 1 else 0
            for m, rows in enumerate(micro_rows):
                with acc.accumulate(self.model):
                    if not finite:
                        continue  # keep accelerate's micro-batch count aligned, skip the compute
                    new = self._proxies(self.policy, batch, rows, seeds[r][m])
                    # With one iteration the "old" proxies are these very values, detached (same masks).
                    reference = old[r][m] if old[r][m] is not None else _detached(new)
                    loss, info = rl_loss(cfg, new, reference, batch["adv_n"][rows], ref[r][m])
                    finite = self._all_finite([loss.detach(), *proxies_used(cfg, new)])
                    if not finite:
                        continue
                    acc.backward(loss)
                    backwards += 1
                    if iteration == 0:
                        first_pass.append(_detached(new))
                    for key, value in {"loss": float(loss.detach()), **info}.items():
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
            grad_norm = math.nan
            if finite:
                norm = self.runtime.clip_grad_norm(self.model, cfg.max_grad_norm)
                grad_norm = norm if norm is not None else math.nan
                finite = norm is None or math.isfinite(grad_norm)
            if self.runtime.steps_in_backward and not finite and backwards:
                # DeepSpeed already holds (or has applied) this update's earlier micro-batch gradients:
                # it cannot be skipped cleanly, so stop before anything non-finite is saved.
                raise TrainingDiverged(
                    f"step {step}: non-finite loss or gradient in update {iteration + 1} under DeepSpeed after "
                    f"earlier micro-batches were accumulated; the last checkpoint is untouched. Lower "
                    f"--learning_rate or --max_grad_norm, then --resume")
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                self.nonfinite_streak = 0
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                counts["grad_norm"] = counts.get("grad_norm", 0) + 1
            else:
                skipped += 1
                self.nonfinite_streak += 1
                self.say(f"step {step}: non-finite loss, proxy or gradient in update {iteration + 1}; "
                         f"update skipped ({self.nonfinite_streak} in a row)")
            self.optimizer.zero_grad(set_to_none=True)
            if self.nonfinite_streak >= cfg.max_nonfinite_updates:
                break
        stats = {k: sums[k] / counts[k] for k in sums}
        stats["skipped_updates"] = float(skipped)
        stats.update(self._proxy_stats(first_pass))
        return stats

    def _proxy_stats(self, proxies: list) -> dict[str, float]:
        """Means of the on-policy proxies of the first pass (pre-update weights)."""
        if not proxies:
            return {}
        lengths = torch.cat([p.lengths_n.detach().float() for p in proxies])
        stats = {"completion_length": float(lengths.mean())}
        if {"elbo_n", "elbo_nk"} & set(proxy_fields(self.cfg)):
            elbo = torch.cat([p.elbo_n.detach().float() for p in proxies])
            stats["elbo"] = float(elbo.mean())
            stats["elbo_per_token"] = float(elbo.sum() / lengths.sum().clamp_min(1.0))
        if self.cfg.needs_eubo():
            stats["eubo"] = float(torch.cat([p.eubo_n.detach().float() for p in proxies]).mean())
        return stats

    # ------------------------------------------------------------------ monitors
    @torch.no_grad()
    def gap_lower_bound(self, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, seed: int) -> list[float]:
        """Drift monitor IW_K - ELBO on the given sequences (a lower bound on log pi - ELBO)."""
        self.frozen_view.model.eval()
        try:
            gap_n = self.engine.gap_lower_bound(self.frozen_view, prompt_ids, prompt_attn, completion_ids,
                                                self.proxy_settings, self.cfg.gap_monitor_orders, seed)
        finally:
            self.frozen_view.model.train()
        return gap_n.float().cpu().tolist()

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy held-out accuracy and reward (each process takes every world-th example), plus the
        drift monitor on the first few greedy completions."""
        from accelerate.utils import gather_object

        cfg = self.cfg
        shard = self.eval_examples[self.rank::self.world]
        rows: list[tuple[float, float]] = []
        gaps: list[float] = []
        if shard:
            ids, attn = self.encode(shard)
            completion = self.generate(ids, attn, temperature=0.0, seed=0)
            texts = self.engine.decode_completions(self.lm, completion)
            rows = [(float(self.task.reward(t, ex)), float(self.task.is_correct(t, ex))) for t, ex in zip(texts, shard)]
            if cfg.log_completions and self.accelerator.is_main_process:
                prompts = [self.task.prompt(ex, cfg.prompt_style) for ex in shard]
                shown = log_completions(Path(cfg.output_dir) / COMPLETIONS, step, prompts, texts,
                                        [r for r, _ in rows], cfg.log_completions)
                self.say(f"step {step}: held-out completions [reward] prompt -> completion\n" + "\n".join(shown))
            k = min(cfg.gap_monitor_sequences, len(shard))
            gaps = self.gap_lower_bound(ids[:k], attn[:k], completion[:k], derive_seed(cfg.seed, _MONITOR, step, self.rank, 1))
        rows, gaps = gather_object(rows), gather_object(gaps)
        return {"eval/reward": float(np.mean([r for r, _ in rows])), "eval/accuracy": float(np.mean([c for _, c in rows])),
                "eval/gap_lower_bound": float(np.mean(gaps))}

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(derive_seed(cfg.seed, _GLOBAL_RNG, step, self.rank))  # dropout etc.
        start = time.perf_counter()
        examples = self.step_examples(step)
        prompt_ids, prompt_attn = self.encode(examples)
        completion_ids = self.generate(prompt_ids, prompt_attn, cfg.temperature,
                                       derive_seed(cfg.seed, _GENERATE, step, self.rank), cfg.rollout_settings())
        texts = self.engine.decode_completions(self.lm, completion_ids)
        rewards_nf, correct_n = self.score(texts, examples)
        adv_n, all_rewards_nf = self.advantages(rewards_nf, step)
        # the policy the rollouts came from, before this step's updates
        sharpness = rollout_confidence(self.frozen_view, prompt_ids, prompt_attn,
                                       completion_mask(completion_ids, self.lm.eos_id), cfg.generation_batch_size)
        generated = time.perf_counter()
        batch = {"prompt_ids": prompt_ids, "prompt_attn": prompt_attn, "completion_ids": completion_ids,
                 "adv_n": adv_n.to(acc.device)}
        stats = self.update(batch, step)
        done = time.perf_counter()

        total_reward_n = all_rewards_nf @ self.reward_weights
        metrics: dict[str, float] = {"reward": float(total_reward_n.mean()), "reward_std": float(total_reward_n.std())}
        for name, column in zip(self.reward_names, all_rewards_nf.T):
            metrics[f"reward/{name}"] = float(column.mean())
        metrics.update(group_reward_stats(total_reward_n, cfg.num_generations, self.max_reward))
        warning = self.collapse_watch.check(step, metrics["frac_reward_zero_std"], metrics["frac_groups_all_zero"],
                                            metrics["frac_groups_all_max"])
        if warning:
            self.say(f"WARNING {warning}")
        stats.update(sharpness)
        if cfg.rollout_mismatch_steps and step % cfg.rollout_mismatch_steps == 0:
            stats.update(self.rollout_mismatch(prompt_ids, prompt_attn, examples, step))
        local = {k: v for k, v in stats.items() if k != "skipped_updates"}
        keys = sorted(local)
        # every process has the same number of rollouts, so the mean of local means is the global mean
        local_t = torch.tensor([local[k] for k in keys] + [float(correct_n.mean())], dtype=torch.float64, device=acc.device)
        reduced = acc.reduce(local_t, reduction="mean").cpu().tolist()
        metrics.update(dict(zip(keys, reduced[:-1])))
        metrics["accuracy"] = reduced[-1]
        metrics["skipped_updates"] = stats["skipped_updates"]
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        metrics["generation_time"] = generated - start
        metrics["update_time"] = done - generated
        metrics["step_time"] = done - start
        metrics["tokens_per_s"] = self.n_local * self.world * cfg.gen_length / max(done - start, 1e-9)
        if cfg.gap_monitor_steps and step % cfg.gap_monitor_steps == 0:
            from accelerate.utils import gather_object

            k = min(cfg.gap_monitor_sequences, self.n_local)
            gaps = self.gap_lower_bound(prompt_ids[:k], prompt_attn[:k], completion_ids[:k],
                                        derive_seed(cfg.seed, _MONITOR, step, self.rank))
            metrics["gap_lower_bound"] = float(np.mean(gather_object(gaps)))
        return metrics

    def _diverged_message(self, step: int) -> str:
        """What happened and advice that fits this run's settings."""
        cfg = self.cfg
        advice = [f"lower --learning_rate (now {cfg.learning_rate:g})"]
        advice.append(f"clip harder with a smaller --max_grad_norm (now {cfg.max_grad_norm:g})" if cfg.max_grad_norm > 0
                      else "turn gradient clipping on (--max_grad_norm 0.2)")
        if cfg.dtype != "float32":
            advice.append(f"train in --dtype float32 (now {cfg.dtype})")
        saved = latest_checkpoint(Path(cfg.output_dir))
        where = (f"then continue from {saved.name} (intact) with --resume" if saved is not None
                 else "then start again (no checkpoint was written before this)")
        return (f"stopped at step {step}: {self.nonfinite_streak} non-finite updates in a row (NaN/inf in the loss, "
                f"a proxy or the gradient); none of them was applied or checkpointed. To fix: "
                f"{'; '.join(advice)}; {where}")

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        if cfg.resume:
            train_checkpoints.restore(self)
        resumed = self.start_step > 0  # (--resume with no checkpoint yet starts afresh)
        logger = None
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            logger = MetricsLogger(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                   resume_from_step=(self.start_step + 1) if resumed else None,
                                   run_config=config_to_dict(cfg))
        history: list[dict] = []

        def log(step: int, row: dict) -> None:
            if logger is not None:
                logger.log(step, row)
                history.append({"step": step, **row})

        before: dict[str, float] = {}
        after: dict[str, float] = {}
        try:
            if self.start_step == 0:
                before = self.evaluate(0)
                log(0, before)
            bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc="lm train", dynamic_ncols=True,
                       disable=not (cfg.progress_bar and acc.is_main_process))
            for step in range(self.start_step + 1, cfg.max_steps + 1):
                metrics = self.step(step)
                last = step == cfg.max_steps
                if last or (cfg.eval_steps and step % cfg.eval_steps == 0):
                    after = self.evaluate(step)
                    metrics.update(after)
                log(step, metrics)
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward", "accuracy", "gap_lower_bound")
                                 if k in metrics})
                if self.nonfinite_streak >= cfg.max_nonfinite_updates:
                    raise TrainingDiverged(self._diverged_message(step))
                if last or (cfg.save_steps and step % cfg.save_steps == 0):
                    train_checkpoints.save(self, step)
            bar.close()
            if cfg.save_final_model:
                train_checkpoints.save_final_model(self, out / "final_model")
            acc.wait_for_everyone()
        finally:
            if logger is not None:
                logger.close()
        return TrainResult(out, cfg.max_steps, before, after, history, acc.unwrap_model(self.model))


def _detached(proxies):
    return dataclasses.replace(proxies, **{f.name: getattr(proxies, f.name).detach()
                                           for f in dataclasses.fields(proxies)
                                           if isinstance(getattr(proxies, f.name), Tensor)})


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training job in this process (under ``accelerate launch``: one process of it)."""
    try:
        return Trainer(cfg).run()
    finally:
        release_run_lock(cfg.output_dir)


def main(argv: list[str], prog: str = "dipod lm train") -> int:
    cfg = parse_config(TrainConfig, argv, prog,
                       description="Online RL post-training of a masked-diffusion LM (d1 / FPO / FPO++ / SPG / JustGRPO + DiPOD).")
    try:
        result = train(cfg)
    except TrainingDiverged as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if result.after:
        print(f"{prog}: done after step {result.final_step}: held-out accuracy {result.after['eval/accuracy']:.3f}, "
              f"reward {result.after['eval/reward']:.3f}; outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":  # `accelerate launch -m dipod.lm.trainer --config FILE ...`
    sys.exit(main(sys.argv[1:]))
