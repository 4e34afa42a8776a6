"""The configuration of `dipod lm train`: one dataclass, paper defaults, validated before any compute.

Defaults mirror the paper's LLaDA-8B-Instruct runs (SPG with the mixed negative proxy plus DiPOD,
beta = 0.05; sequence length 256, block 32, 128 diffusion steps, 6 generations, lr 3e-6, LoRA
r = 128, alpha = 64). Every field is also a command-line flag. Fields that belong to one estimator
default to ``None`` and are resolved by the ``*_value`` helpers, so setting a field for another
estimator (say ``--spg_mix_weight`` with ``--estimator fpo``) fails instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from dipod.config import ConfigError

ESTIMATORS = ("d1", "fpo", "fpo++", "spg")
LR_SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")

# field -> the estimators it belongs to (None elsewhere)
ESTIMATOR_FIELDS: dict[str, tuple[str, ...]] = {
    "clip_eps": ("d1", "fpo", "fpo++"),
    "log_ratio_max": ("fpo++",),
    "spg_negative_proxy": ("spg",),
    "spg_mix_weight": ("spg",),
    "eubo_beta": ("spg",),
    "kl_beta": ("d1",),
}
DEFAULT_CLIP_EPS = {"d1": 0.2, "fpo": 0.2, "fpo++": 0.05}


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    # --- model ---
    model: str = _help("hub id or local directory of a mask predictor (dipod.lm.model.load_masked_lm)",
                       default="GSAI-ML/LLaDA-8B-Instruct")
    trust_remote_code: bool = _help("allow the model repository's own code (LLaDA needs true)", default=False)
    mask_token_id: int | None = _help("mask token id when the tokenizer has none (LLaDA: 126336)", default=None)
    dtype: str = _help(f"model weights dtype, one of {DTYPES}; proxy arithmetic is float32 anyway", default="bfloat16")
    lora_r: int = _help("LoRA rank; 0 trains all weights", default=128)
    lora_alpha: float = _help("LoRA alpha", default=64.0)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: list[str] | None = _help("LoRA target module names (None: the loader's default)", default=None)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    # --- task and data ---
    task: str = _help("task name (dipod.lm.tasks.get_task): sudoku4, countdown, gsm8k, math500, ...", default="gsm8k")
    train_data: str | None = _help("training data file or hub dataset id (None: the task's default)", default=None)
    eval_data: str | None = _help("held-out data file or hub dataset id (None: the task's default)", default=None)
    prompt_style: str = _help("'chat' (instruct models, chat template) or 'compact' (tiny models)", default="chat")
    few_shot: int = _help("number of solved training examples prepended to each prompt", default=0)
    max_prompt_length: int = _help("prompts longer than this many tokens are cut from the left", default=256)
    reward_weights: list[float] | None = _help(
        "one weight per reward function of the task, in the task's order (None: the task's weights)", default=None)
    # --- rollouts ---
    prompts_per_step: int = _help("prompts per step over all processes; each gets num_generations completions", default=16)
    num_generations: int = _help("completions per prompt (the GRPO group size), >= 2", default=6)
    generation_batch_size: int | None = _help("completions generated per sampler call (lower it on OOM)", default=None)
    gen_length: int = _help("completion length in tokens", default=256)
    block_length: int = _help("semi-autoregressive block length; gen_length must be a multiple", default=32)
    diffusion_steps: int = _help("sampler steps over the whole completion (a multiple of the block count)", default=128)
    temperature: float = _help("rollout sampling temperature (0 = greedy)", default=0.9)
    remasking: str = _help("sampler remasking: low_confidence or random", default="low_confidence")
    cfg_scale: float = _help("classifier-free guidance scale of the sampler", default=0.0)
    scale_rewards: bool = _help("divide group-centred advantages by the group's reward std", default=False)
    # --- likelihood proxies ---
    num_draws: int = _help("Monte-Carlo masking draws K per completion for ELBO/EUBO", default=2)
    masking: str = _help("forward process: block_random (SPG) or random", default="block_random")
    min_t: float = _help("smallest mask ratio of a draw", default=0.0)
    max_t: float = _help("largest mask ratio of a draw", default=1.0)
    p_mask_prompt: float = _help("probability of masking each prompt token in the proxies", default=0.0)
    max_tokens_per_forward: int | None = _help("chunk proxy forwards to this many tokens (None: no chunking)", default=None)
    # --- estimator ---
    estimator: str = _help(f"policy-gradient estimator, one of {ESTIMATORS}", default="spg")
    clip_eps: float | None = _help("PPO clip range (d1, fpo: 0.2; fpo++: 0.05)", default=None)
    log_ratio_max: float | None = _help("fpo++: log-ratio clamp from above (default 3.0)", default=None)
    spg_negative_proxy: str | None = _help("spg: proxy for negative advantages: eubo, elbo or mix (default mix)", default=None)
    spg_mix_weight: float | None = _help("spg: EUBO weight in 'mix' (default 0.5)", default=None)
    eubo_beta: float | None = _help("spg: EUBO exponent beta (default 1.5; 1.0 for sudoku)", default=None)
    kl_beta: float | None = _help("d1: weight of the k3 KL to the initial (reference) policy (default 0)", default=None)
    dipod_beta: float = _help("DiPOD weight: adds beta * grad ELBO each update (0 turns DiPOD off)", default=0.05)
    num_iterations: int = _help("policy updates per rollout batch (mu)", default=12)
    # --- optimisation ---
    learning_rate: float = _help("AdamW learning rate", default=3e-6)
    weight_decay: float = _help("AdamW weight decay", default=0.1)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.99)
    max_grad_norm: float = _help("gradient clipping norm (0 turns clipping off)", default=0.2)
    lr_scheduler: str = _help(f"learning-rate schedule after warm-up, one of {LR_SCHEDULERS}", default="constant")
    warmup_steps: int = _help("linear warm-up length in optimizer updates", default=0)
    gradient_accumulation_steps: int = _help("micro-batches per update on each process", default=2)
    # --- run ---
    output_dir: str = _help("run folder: metrics.jsonl, tb/, checkpoint-STEP/, final_model/", default="runs/lm_train")
    max_steps: int = _help("rollout batches to train on (each makes num_iterations updates)", default=100)
    seed: int = _help("seed of every random draw (same seed => same run on CPU)", default=42)
    resume: str | None = _help("'latest' (newest checkpoint in output_dir) or a checkpoint-STEP folder", default=None)
    save_steps: int = _help("write a checkpoint every this many steps (0: only at the end)", default=50)
    keep_checkpoints: int = _help("how many checkpoints to keep", default=2)
    eval_steps: int = _help("greedy held-out evaluation every this many steps (0: only before and after)", default=50)
    eval_examples: int = _help("held-out examples per evaluation", default=64)
    gap_monitor_steps: int = _help("drift monitor (IW_K - ELBO) every this many steps (0: off)", default=10)
    gap_monitor_sequences: int = _help("rollouts per process the drift monitor scores", default=2)
    gap_monitor_orders: int = _help("decoding orders K of the drift monitor", default=4)
    max_nonfinite_updates: int = _help("stop after this many non-finite updates in a row", default=5)
    tensorboard: bool = _help("mirror metrics to OUTPUT_DIR/tb", default=True)
    wandb_project: str | None = _help("also log to this wandb project", default=None)
    progress_bar: bool = _help("show a tqdm progress bar", default=True)
    save_final_model: bool = _help("save the trained policy to OUTPUT_DIR/final_model", default=True)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.estimator in ESTIMATORS, f"estimator={self.estimator!r}; choose one of {ESTIMATORS}")
        foreign = [name for name, owners in ESTIMATOR_FIELDS.items()
                   if getattr(self, name) is not None and self.estimator not in owners]
        need(not foreign, f"{', '.join(f'{n} (used by {ESTIMATOR_FIELDS[n]})' for n in foreign)} "
                          f"do not apply to estimator={self.estimator!r}; remove them or change --estimator")
        need(self.num_generations >= 2, f"num_generations={self.num_generations}: group-relative advantages need >= 2 "
                                        "completions per prompt")
        # the sampler's own checks: gen_length a multiple of block_length, steps a multiple of the block count
        from dipod.lm.sampler import SamplerSettings

        SamplerSettings(gen_length=self.gen_length, block_length=self.block_length, steps=self.diffusion_steps,
                        temperature=self.temperature, remasking=self.remasking, cfg_scale=self.cfg_scale)
        need(self.dtype in DTYPES, f"dtype={self.dtype!r}; choose one of {DTYPES}")
        need(self.prompt_style in ("chat", "compact"), f"prompt_style={self.prompt_style!r}; choose chat or compact")
        need(self.masking in ("block_random", "random"), f"masking={self.masking!r}; choose block_random or random")
        need(self.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler={self.lr_scheduler!r}; choose one of {LR_SCHEDULERS}")
        need(self.dipod_beta >= 0, f"dipod_beta={self.dipod_beta} must be >= 0 (0 turns DiPOD off)")
        need(self.kl_beta is None or self.kl_beta >= 0, f"kl_beta={self.kl_beta} must be >= 0")
        need(self.spg_negative_proxy in (None, "eubo", "elbo", "mix"),
             f"spg_negative_proxy={self.spg_negative_proxy!r}; choose eubo, elbo or mix")
        need(self.spg_mix_weight is None or 0.0 <= self.spg_mix_weight <= 1.0,
             f"spg_mix_weight={self.spg_mix_weight} must lie in [0, 1]")
        need(self.eubo_beta is None or self.eubo_beta > 0, f"eubo_beta={self.eubo_beta} must be > 0")
        need(self.clip_eps is None or self.clip_eps > 0, f"clip_eps={self.clip_eps} must be > 0")
        need(0.0 <= self.min_t <= self.max_t <= 1.0, f"need 0 <= min_t <= max_t <= 1, got {self.min_t}, {self.max_t}")
        need(0.0 <= self.p_mask_prompt < 1.0, f"p_mask_prompt={self.p_mask_prompt} must lie in [0, 1)")
        for name in ("prompts_per_step", "num_iterations", "gradient_accumulation_steps", "max_steps", "num_draws",
                     "max_prompt_length", "max_nonfinite_updates", "eval_examples", "gap_monitor_orders",
                     "gap_monitor_sequences", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("save_steps", "eval_steps", "gap_monitor_steps", "warmup_steps", "few_shot", "lora_r"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        need(self.generation_batch_size is None or self.generation_batch_size >= 1,
             f"generation_batch_size={self.generation_batch_size} must be >= 1")
        need(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        need(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0: no clipping)")
        for name in ("train_data", "eval_data"):
            path = getattr(self, name)
            if path is not None and _looks_like_path(path) and not Path(path).exists():
                raise FileNotFoundError(f"{name}: no such file or folder {path}; pass an existing path or a hub dataset id")
        if _looks_like_path(self.model) and not Path(self.model).exists():
            raise FileNotFoundError(f"model: no such folder {self.model}; pass a local model folder or a hub id")

    # --- estimator-specific values with their defaults ---
    def clip_eps_value(self) -> float:
        return self.clip_eps if self.clip_eps is not None else DEFAULT_CLIP_EPS.get(self.estimator, 0.2)

    def log_ratio_max_value(self) -> float:
        return 3.0 if self.log_ratio_max is None else self.log_ratio_max

    def spg_negative_proxy_value(self) -> str:
        return self.spg_negative_proxy or "mix"

    def spg_mix_weight_value(self) -> float:
        return 0.5 if self.spg_mix_weight is None else self.spg_mix_weight

    def eubo_beta_value(self) -> float:
        return 1.5 if self.eubo_beta is None else self.eubo_beta

    def kl_beta_value(self) -> float:
        return self.kl_beta or 0.0

    def needs_eubo(self) -> bool:
        return self.estimator == "spg" and self.spg_negative_proxy_value() != "elbo"

    def with_changes(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _looks_like_path(text: str) -> bool:
    """A hub id is ``owner/name``; anything starting like a file path or with more parts is a local path."""
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or Path(text).suffix in (
        ".json", ".jsonl", ".csv", ".parquet")
