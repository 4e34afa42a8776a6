"""``cfg["algorithm"]`` of ``dipod.control.rsl_rl:FPOPlusPlus`` and the model-config checks.

Kept apart from the algorithm class so configs can be read and checked without rsl-rl-lib
installed. Defaults are the released FPO++ base values (``isaaclab_fpo/rl_cfg.py``);
configs/control/rsl_rl_*.yaml hold the G1-tracking and locomotion families.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from dipod.config import ConfigError, config_from_dict, option
from dipod.control.distill import DistillSettings
from dipod.control.flow import ACTIVATIONS, CFM_REDUCTIONS
from dipod.control.update import UpdateSettings

CLASS_NAME = "dipod.control.rsl_rl:FPOPlusPlus"
SCHEDULES = {"fixed": "fixed", "adaptive": "kl", "clip_fraction": "clip_fraction"}
# Our core names -> this config's (rsl-rl PPO) names, so core validation errors name the key the user wrote.
CORE_NAMES = {"epochs": "num_learning_epochs", "minibatches": "num_mini_batches", "clip_eps": "clip_param",
              "value_coef": "value_loss_coef", "value_clip": "value_clip_param", "lr_schedule": "schedule"}
# Keys of rsl-rl's PPO config (and of mjlab's / IsaacLab's PPO dataclasses) without a meaning for a
# flow policy: accepted so that a PPO config subclass works, ignored with one warning.
PPO_ONLY_KEYS = ("entropy_coef", "normalize_advantage_per_mini_batch", "optimizer",
                 "use_mixed_precision", "share_cnn_encoders", "grad_reduce_bucket_mb")
UNSUPPORTED_EXTENSIONS = ("rnd_cfg", "symmetry_cfg")
MODEL_IGNORED_KEYS = ("distribution_cfg", "init_noise_std", "noise_std_type")
MODEL_UNSUPPORTED_KEYS = ("cnn_cfg", "rnn_type")


@dataclass
class FPOPlusPlusConfig:
    """``cfg["algorithm"]`` of ``FPOPlusPlus``. Defaults are the released FPO++ base values
    (``isaaclab_fpo/rl_cfg.py``); configs/control/ holds the G1-tracking and locomotion families.

    Keys shared with rsl-rl's PPO config keep PPO's names and meaning. Network widths, activation
    and whether to normalise observations are read from ``cfg["actor"]`` / ``cfg["critic"]``
    (``hidden_dims``, ``activation``, ``obs_normalization``), like rsl-rl's own models.
    """

    num_learning_epochs: int = option("passes over each rollout (FPO++: 16, humanoid locomotion 32)", default=16)
    num_mini_batches: int = option("minibatches per epoch (FPO++: 4, tracking 6)", default=4)
    reshuffle_each_epoch: bool = option("new minibatch permutation per epoch (FPO++: one for all epochs)", default=False)
    clip_param: float = option("per-draw trust region epsilon (FPO++: 0.05, tracking 0.01)", default=0.05)
    learning_rate: float = option("initial AdamW learning rate (FPO++: 1e-4)", default=1e-4)
    schedule: str = option("'fixed', 'adaptive' (FPO++: per minibatch on the KL proxy, tracking) or 'clip_fraction'",
                           default="fixed")
    desired_kl: float = option("'adaptive' target of the KL proxy (FPO++ tracking: 1e-4)", default=1e-4)
    lr_min: float = option("adaptive learning-rate floor (FPO++: 1e-5)", default=1e-5)
    lr_max: float = option("adaptive learning-rate ceiling (FPO++: 1e-2)", default=1e-2)
    target_clip_fraction: float = option("'clip_fraction' schedule target", default=0.2)
    gamma: float = option("discount", default=0.99)
    lam: float = option("GAE lambda", default=0.95)
    value_loss_coef: float = option("value-loss weight, as in rsl-rl's PPO (FPO++: 1)", default=1.0)
    use_clipped_value_loss: bool = option("PPO-style clipped value loss (FPO++: False)", default=False)
    value_clip_param: float = option("value clipping range when use_clipped_value_loss", default=0.2)
    max_grad_norm: float = option("global gradient-norm clip (FPO++: 1)", default=1.0)
    weight_decay: float = option("AdamW weight decay of the RL optimizer (FPO++: 1e-4)", default=1e-4)
    adam_betas: list[float] = option("AdamW betas (FPO++: 0.9,0.999; tracking 0.9,0.95)",
                                     default_factory=lambda: [0.9, 0.999])
    adam_eps: float = option("AdamW eps (FPO++: 1e-8)", default=1e-8)
    advantage_clip: float = option("clamp batch-normalised advantages to +-this (FPO++: 100; 0 = off)", default=100.0)
    num_draws: int = option("Monte-Carlo (eps, t) draws per action (FPO++: 16, humanoid locomotion 32)", default=16)
    sampling_steps: int = option("Euler steps of the flow sampler (FPO++: 64)", default=64)
    time_skew_b: float = option("b in t = 0.005 + 0.99 (1 - (1 - u)^(1/b)); 1 = uniform", default=1.0)
    time_embed_dim: int = option("flow-time features [cos(2^j t), sin(2^j t)] (FPO++: 8)", default=8)
    cfm_reduction: str = option(f"CFM loss over action dims, {CFM_REDUCTIONS} (FPO++: sqrt; tracking mean)",
                                default="sqrt")
    action_noise_std: float = option("Gaussian noise on sampled actions, stored and executed (FPO++: 0.02)",
                                     default=0.02)
    action_bound: float = option(
        "environment action = action_bound * clip(a, -1, 1) for the flow's normalised action a",
        default=1.0,
    )
    log_ratio_max: float = option("per-draw log-ratio clamp from above, straight-through (FPO++: 10, tracking 3)",
                                  default=10.0)
    cfm_clamp: float = option("clamp old and new CFM losses at this (FPO++: 20, tracking off = 0)", default=20.0)
    cfm_clamp_negative: float = option("clamp the NEW CFM loss of negative-advantage draws (FPO++: 20)", default=20.0)
    knn_entropy_coef: float = option("k-NN entropy bonus on predicted actions (FPO++ tracking: 1e-5; 0 = off)",
                                     default=0.0)
    knn_entropy_k: int = option("k of the k-NN entropy estimate (FPO++ tracking: 5)", default=5)
    ema_decay: float = option("EMA of the actor, used for inference / export once active (FPO++: 0.95; 0 = off)",
                              default=0.95)
    ema_warmup_updates: int = option("RL updates before the EMA starts (FPO++: 500)", default=500)
    dipod_beta: float = option("DiPOD per-update ELBO term weight (Algorithm 2); 0 = off", default=0.0)
    distill_initial_iterations: int = option(
        "initial self-distillation (Algorithm 3) iterations before RL (published: 100); 0 = off", default=0)
    distill_every: int = option("interleaved self-distillation (Algorithm 1) after every n RL updates; 0 = off",
                                default=0)
    distill_iterations: int = option("iterations of each interleaved stage", default=20)
    distill_rollout_steps: int = option("teacher vector steps per distillation iteration (published: 8)", default=8)
    distill_updates: int = option("student AdamW steps per distillation iteration (published: 1)", default=1)
    distill_minibatch_size: int = option("pairs per student step, min(this, buffer), without replacement "
                                         "(published: 16384)", default=16384)
    distill_lr: float = option("distillation AdamW learning rate (published: 3e-4)", default=3e-4)
    distill_weight_decay: float = option("distillation AdamW weight decay (published: 1e-4)", default=1e-4)
    distill_max_grad_norm: float = option("distillation gradient-norm clip (published: 1)", default=1.0)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; choose one of {tuple(SCHEDULES)}")
        if self.cfm_reduction not in CFM_REDUCTIONS:
            raise ConfigError(f"cfm_reduction={self.cfm_reduction!r}; choose one of {CFM_REDUCTIONS}")
        for name in ("num_draws", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("learning_rate", "time_skew_b", "action_bound", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("distill_initial_iterations", "distill_every", "weight_decay", "action_noise_std",
                     "ema_warmup_updates"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay} must lie in [0, 1) (FPO++: 0.95)")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas={self.adam_betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma={self.gamma} must lie in (0, 1] and lam={self.lam} in [0, 1]")
        if self.time_embed_dim < 2 or self.time_embed_dim % 2:
            raise ConfigError(f"time_embed_dim={self.time_embed_dim} must be an even number >= 2 (FPO++: 8)")
        if self.knn_entropy_coef > 0 and self.knn_entropy_k >= self.num_draws:
            raise ConfigError(f"knn_entropy_k={self.knn_entropy_k} needs num_draws > k (num_draws={self.num_draws})")
        try:  # the core settings validate the update and distillation values
            self.update_settings()
            self.distill_settings(max(self.distill_initial_iterations, 1))
        except ConfigError as err:
            message = str(err)
            for core, ours in CORE_NAMES.items():
                message = message.replace(f"{core}=", f"{ours}=")
            raise ConfigError(message) from None

    def update_settings(self) -> UpdateSettings:
        return UpdateSettings(
            epochs=self.num_learning_epochs, minibatches=self.num_mini_batches,
            reshuffle_each_epoch=self.reshuffle_each_epoch, clip_eps=self.clip_param, log_ratio_max=self.log_ratio_max,
            cfm_clamp=self.cfm_clamp, cfm_clamp_negative=self.cfm_clamp_negative, knn_entropy_coef=self.knn_entropy_coef,
            knn_entropy_k=self.knn_entropy_k, dipod_beta=self.dipod_beta, value_coef=self.value_loss_coef,
            value_clip=self.value_clip_param if self.use_clipped_value_loss else 0.0, max_grad_norm=self.max_grad_norm,
            normalize_advantages=True, advantage_clip=self.advantage_clip, lr_schedule=SCHEDULES[self.schedule],
            desired_kl=self.desired_kl, target_clip_fraction=self.target_clip_fraction, lr_min=self.lr_min,
            lr_max=self.lr_max)

    def distill_settings(self, iterations: int) -> DistillSettings:
        return DistillSettings.from_front_end(self, iterations)


def parse_algorithm_config(alg_cfg: dict[str, Any]) -> FPOPlusPlusConfig:
    """``cfg["algorithm"]`` (minus ``class_name``) -> ``FPOPlusPlusConfig``; PPO-only keys are dropped with a warning."""
    values = {k: v for k, v in alg_cfg.items() if k not in ("class_name", "multi_gpu_cfg")}
    for key in UNSUPPORTED_EXTENSIONS:
        if values.pop(key, None) is not None:
            raise ConfigError(f"cfg['algorithm']['{key}'] is set, but FPOPlusPlus does not implement rsl-rl's "
                              f"{key[:-4]} extension; set it to None")
    ignored = sorted(key for key in PPO_ONLY_KEYS if key in values)
    for key in ignored:
        values.pop(key)
    if ignored:
        warnings.warn(f"FPOPlusPlus ignores the PPO-only keys {ignored} of cfg['algorithm'] "
                      "(a flow policy has no tractable entropy or KL)", stacklevel=3)
    return config_from_dict(FPOPlusPlusConfig, values, source="cfg['algorithm'] of FPOPlusPlus")


def model_settings(cfg: dict[str, Any], name: str) -> tuple[list[int], str, bool]:
    """``(hidden_dims, activation, obs_normalization)`` from ``cfg[name]`` (rsl-rl's model config), validated."""
    model_cfg = dict(cfg.get(name) or {})
    for key in MODEL_UNSUPPORTED_KEYS:
        if model_cfg.get(key) is not None:
            raise ConfigError(f"cfg['{name}']['{key}'] is set, but FPOPlusPlus builds MLP flow actors and critics only; "
                              "set it to None")
    ignored = sorted(key for key in MODEL_IGNORED_KEYS if model_cfg.get(key) is not None)
    if ignored:
        warnings.warn(f"FPOPlusPlus ignores cfg['{name}'] keys {ignored} (the flow has no output distribution)",
                      stacklevel=3)
    hidden = list(model_cfg.get("hidden_dims", (256, 256)))
    if not hidden or min(hidden) < 1:
        raise ConfigError(f"cfg['{name}']['hidden_dims']={hidden} needs at least one positive layer width")
    activation = str(model_cfg.get("activation") or "elu").lower()
    if activation not in ACTIVATIONS:
        raise ConfigError(f"cfg['{name}']['activation']={activation!r}; FPOPlusPlus supports {sorted(ACTIVATIONS)}")
    return hidden, activation, bool(model_cfg.get("obs_normalization", True))
