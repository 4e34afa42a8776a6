"""``ControlConfig``: the settings of ``dipod control train`` (one flag per field).

Defaults are CPU-sized for gymnasium tasks and are FPO++'s released values wherever a CPU run
does not need otherwise; each difference says why in its help text (docs/control.md has the
table, configs/control/ holds the released task families). Update and distillation settings are
validated by their core dataclasses (``UpdateSettings``, ``DistillSettings``), which this config
builds in ``__post_init__`` so a bad value fails before any environment starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dipod.checkpoint import RESUME_HELP, RESUME_LATEST, resume_target
from dipod.config import ConfigError, option, require
from dipod.control.distill import DistillSettings
from dipod.control.flow import ACTIVATIONS, CFM_REDUCTIONS
from dipod.control.update import UpdateSettings

POLICIES = ("flow", "gaussian")


@dataclass
class ControlConfig:
    env: str = option("gymnasium task id (1-D Box actions)", default="InvertedPendulum-v5")
    policy: str = option("'flow' (FPO++) or 'gaussian' (PPO baseline)", default="flow")
    output_dir: str = option("run folder: metrics.jsonl, tb/, checkpoint-STEP/", default="runs/control")
    total_steps: int = option("RL environment steps (all envs; self-distillation steps are not counted)", default=100_000)
    seed: int = option("seed of torch, the generators and the environments", default=0)
    resume: str | None = option(RESUME_HELP, default=None, bare=RESUME_LATEST)
    overwrite: bool = option("replace the run already in output_dir (its metrics, checkpoints); without it a folder "
                             "holding a run is refused unless --resume", default=False)
    num_envs: int = option("parallel environments", default=8)
    rollout_steps: int = option("vector steps per iteration (batch = num_envs * rollout_steps; FPO++: 24, tracking 48)",
                                default=128)
    gamma: float = option("discount", default=0.99)
    gae_lambda: float = option("GAE lambda", default=0.95)
    normalize_rewards: bool = option("divide rewards by the running std of the return", default=True)
    # Networks. FPO++ tracking: [1024, 512, 256] ELU; on one CPU thread that is ~10x slower per update.
    actor_hidden: list[int] = option("actor MLP widths (FPO++ tracking: 1024,512,256)", default_factory=lambda: [256, 256])
    critic_hidden: list[int] = option("critic MLP widths (FPO++ tracking: 1024,512,256)", default_factory=lambda: [256, 256])
    activation: str = option(f"hidden activation, one of {sorted(ACTIVATIONS)} (FPO++: elu)", default="elu")
    time_embed_dim: int = option("flow-time features [cos(2^j t), sin(2^j t)] (FPO++: 8)", default=8)
    cfm_reduction: str = option(f"CFM loss over action dims, {CFM_REDUCTIONS} (FPO++ locomotion: sqrt)", default="mean")
    sampling_steps: int = option("Euler steps of the flow sampler (FPO++: 64; 10 keeps CPU rollouts short)", default=10)
    num_draws: int = option("Monte-Carlo (eps, t) draws per action (FPO++: 16, locomotion 32)", default=8)
    time_skew_b: float = option("b in t = 0.005 + 0.99 (1 - (1 - u)^(1/b)); 1 = uniform", default=1.0)
    action_noise_std: float = option("Gaussian noise added to sampled flow actions, stored and executed (FPO++: 0.02)",
                                     default=0.02)
    init_log_std: float = option("Gaussian policy: initial log std (normalised actions)", default=0.0)
    # Optimiser (FPO++: AdamW, betas 0.9/0.95 for tracking, eps 1e-8, weight decay 1e-4).
    learning_rate: float = option("initial AdamW learning rate (FPO++: 1e-4)", default=3e-4)
    adam_betas: list[float] = option("AdamW betas (FPO++ tracking: 0.9,0.95; locomotion 0.9,0.999)",
                                     default_factory=lambda: [0.9, 0.95])
    adam_eps: float = option("AdamW eps (FPO++: 1e-8)", default=1e-8)
    weight_decay: float = option("AdamW weight decay of the RL optimizer (FPO++: 1e-4)", default=1e-4)
    epochs: int = option("passes over each rollout (FPO++: 16; 5 keeps the CPU update short)", default=5)
    minibatches: int = option("minibatches per epoch (FPO++ tracking: 6, locomotion 4)", default=6)
    reshuffle_each_epoch: bool = option("new minibatch permutation per epoch (FPO++: one for all epochs)", default=False)
    # FPO++ published 0.05 for ~100k-sample GPU batches; with 2048-sample CPU batches it held flows back
    # (docs/results/control_dipod.md).
    clip_eps: float = option("per-draw trust region (FPO++: 0.05, tracking 0.01; PPO: 0.2)", default=0.2)
    log_ratio_max: float = option("per-draw log-ratio clamp from above, straight-through (FPO++: 10, tracking 3)",
                                  default=10.0)
    cfm_clamp: float = option("clamp old and new CFM losses at this (FPO++ locomotion: 20; 0 = off)", default=0.0)
    cfm_clamp_negative: float = option("clamp the NEW CFM loss of negative-advantage draws (FPO++: 20)", default=20.0)
    knn_entropy_coef: float = option("k-NN entropy bonus on predicted actions (FPO++ tracking: 1e-5; 0 = off)",
                                     default=1e-5)
    knn_entropy_k: int = option("k of the k-NN entropy estimate (FPO++ tracking: 5); needs num_draws > k", default=5)
    value_coef: float = option("weight of mean (V - R)^2 (FPO++: 1)", default=1.0)
    value_clip: float = option("PPO value clipping range (FPO++: 0 = unclipped)", default=0.0)
    max_grad_norm: float = option("global gradient-norm clip (FPO++: 1)", default=1.0)
    normalize_advantages: bool = option("normalise advantages over the batch", default=True)
    advantage_clip: float = option("clamp (normalised) advantages to +-this (FPO++: 100; 0 = off)", default=100.0)
    lr_schedule: str = option("'fixed', 'kl' (FPO++: per minibatch on the KL proxy) or 'clip_fraction' (per epoch)",
                              default="fixed")
    desired_kl: float = option("'kl' schedule target (FPO++ tracking: 1e-4)", default=1e-4)
    target_clip_fraction: float = option("'clip_fraction' schedule target", default=0.2)
    lr_min: float = option("learning-rate floor of the adaptive schedules (FPO++: 1e-5)", default=1e-5)
    lr_max: float = option("learning-rate ceiling of the adaptive schedules (FPO++: 1e-2)", default=1e-2)
    ema_decay: float = option("EMA of the actor for checkpoints/eval (FPO++: 0.95; 0 = off)", default=0.95)
    ema_warmup_updates: int = option("RL updates before the EMA starts (FPO++: 500; a CPU run has ~100)", default=20)
    dipod_beta: float = option("DiPOD per-update ELBO term weight (Algorithm 2); 0 = off", default=0.0)
    distill_initial_iterations: int = option("initial self-distillation (Algorithm 3): iterations before RL "
                                             "(published: 100); 0 = off", default=0)
    distill_every: int = option("interleaved self-distillation (Algorithm 1) every n RL iterations; 0 = off", default=0)
    distill_iterations: int = option("iterations of each interleaved distillation stage", default=20)
    distill_rollout_steps: int = option("teacher rollout vector steps per distillation iteration (published: 8)",
                                        default=8)
    distill_updates: int = option("student AdamW steps per distillation iteration (published: 1)", default=1)
    distill_minibatch_size: int = option("pairs per student step, min(this, buffer), without replacement (published: "
                                         "16384)", default=16384)
    distill_lr: float = option("distillation AdamW learning rate (published: 3e-4)", default=3e-4)
    distill_weight_decay: float = option("distillation AdamW weight decay (published: 1e-4)", default=1e-4)
    distill_max_grad_norm: float = option("distillation gradient-norm clip (published: 1)", default=1.0)
    save_every: int = option("checkpoint every n iterations (and at the end)", default=10)
    keep_checkpoints: int = option("checkpoints kept on disk", default=2)
    tensorboard: bool = option("mirror metrics to TensorBoard (output_dir/tb)", default=True)
    progress_bar: bool = option("show a tqdm progress bar", default=True, aliases=("progress",))
    num_threads: int = option(
        "torch CPU threads; small MLPs run fastest on one (more threads oversubscribe a shared CPU)",
        default=1,
    )

    def __post_init__(self) -> None:
        self.resume = resume_target(self.resume)
        require(self.policy in POLICIES, f"policy={self.policy!r}; choose one of {POLICIES}")
        require(self.activation in ACTIVATIONS, f"activation={self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        require(self.cfm_reduction in CFM_REDUCTIONS, f"cfm_reduction={self.cfm_reduction!r}; choose one of {CFM_REDUCTIONS}")
        for name in ("total_steps", "num_envs", "rollout_steps", "sampling_steps", "num_draws", "save_every",
                     "num_threads", "keep_checkpoints"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("learning_rate", "time_skew_b", "adam_eps"):
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), f"{name}={value} must be a finite number > 0")
        for name in ("weight_decay", "action_noise_std", "ema_decay", "ema_warmup_updates", "distill_initial_iterations",
                     "distill_every"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), f"{name}={value} must be >= 0 (0 turns it off)")
        require(self.ema_decay < 1, f"ema_decay={self.ema_decay} must lie in [0, 1) (FPO++: 0.95)")
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                f"adam_betas={self.adam_betas} must be two numbers in [0, 1), e.g. --adam_betas 0.9,0.95")
        require(self.time_embed_dim >= 2 and self.time_embed_dim % 2 == 0,
                f"time_embed_dim={self.time_embed_dim} must be an even number >= 2 (FPO++: 8)")
        require(0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1,
                f"gamma={self.gamma} and gae_lambda={self.gae_lambda} must lie in [0, 1]")
        require(bool(self.actor_hidden) and bool(self.critic_hidden) and min(self.actor_hidden + self.critic_hidden) >= 1,
                "actor_hidden / critic_hidden need at least one positive layer width, e.g. --actor_hidden 256,256")
        require(self.num_envs * self.rollout_steps >= self.minibatches,
                f"num_envs * rollout_steps = {self.num_envs * self.rollout_steps} samples cannot fill "
                f"minibatches={self.minibatches}; lower minibatches or collect more steps")
        require(self.total_steps >= self.num_envs * self.rollout_steps,
                f"total_steps={self.total_steps} is less than one iteration "
                f"(num_envs * rollout_steps = {self.num_envs * self.rollout_steps})")
        if self.policy == "gaussian":
            require(self.dipod_beta == 0 and self.distill_initial_iterations == 0 and self.distill_every == 0,
                    "dipod_beta and self-distillation act on the ELBO of a flow policy; with policy=gaussian set "
                    "dipod_beta=0, distill_initial_iterations=0 and distill_every=0 (or use policy=flow)")
        elif self.knn_entropy_coef > 0:
            require(self.knn_entropy_k < self.num_draws, f"knn_entropy_k={self.knn_entropy_k} needs num_draws > k "
                    f"(num_draws={self.num_draws}); raise num_draws or set knn_entropy_coef=0")
        self.update_settings()  # the core settings validate the update and distillation values
        self.distill_settings(max(self.distill_initial_iterations, 1))

    def update_settings(self) -> UpdateSettings:
        names = [f.name for f in dataclasses.fields(UpdateSettings)]
        return UpdateSettings(**{name: getattr(self, name) for name in names})

    def distill_settings(self, iterations: int) -> DistillSettings:
        return DistillSettings.from_front_end(self, iterations)


def config_from_checkpoint(meta: dict[str, Any]) -> ControlConfig:
    """Rebuild the training config saved in a checkpoint (unknown keys and nulls fall back to defaults)."""
    names = {f.name for f in dataclasses.fields(ControlConfig)}
    try:
        return ControlConfig(**{k: v for k, v in meta["config"].items() if k in names and v is not None})
    except ConfigError as err:
        raise ConfigError(f"the checkpoint's saved config is not valid any more: {err}") from None
