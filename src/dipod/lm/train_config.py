"""The configuration of `dipod lm train`: one dataclass, paper defaults, validated before any compute.

Defaults mirror the paper's LLaDA-8B-Instruct runs (SPG with the mixed negative proxy plus DiPOD,
beta = 0.05; sequence length 256, block 32, 128 diffusion steps, 6 generations, lr 3e-6, LoRA
r = 128, alpha = 64). Every field is also a command-line flag. Fields that belong to some
estimators default to ``None``; their defaults, ranges and owners come from the estimator registry
(``dipod.lm.estimators``), so setting a field for another estimator (say ``--spg_mix_weight`` with
``--estimator fpo``) or one its estimator does not read fails before any compute, naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dipod.checkpoint import RESUME_HELP, RESUME_LATEST, resume_target
from dipod.config import ConfigError, option, require
from dipod.lm.estimators import ESTIMATORS as ESTIMATOR_RECORDS
from dipod.lm.estimators import OPTION_OWNERS, option_help, resolve_options
from dipod.lm.families import FAMILIES, FAMILY_HELP

from dipod.lm.proxies import MASKINGS, PROCESSES
from dipod.lm.sampler import DecodingOptions
from dipod.lm.tasks.base import STYLES

ESTIMATORS = tuple(ESTIMATOR_RECORDS)
LR_SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")

# field -> the estimators it belongs to (None elsewhere), from the registry
ESTIMATOR_FIELDS: dict[str, tuple[str, ...]] = OPTION_OWNERS


@dataclass
class TrainConfig(DecodingOptions):  # remasking, schedule, confidence_threshold, kv_cache, ...
    # --- model ---
    model: str = option("hub id or local directory of a mask predictor (dipod.lm.model.load_masked_lm)",
                       default="GSAI-ML/LLaDA-8B-Instruct")
    trust_remote_code: bool = option("run the model repository's own code: the legacy path for LLaDA / Dream "
                                     "(transformers 4.56-4.57); by default they load into dipod's own network",
                                     default=False)
    mask_token_id: int | None = option(
        "mask token id for a model that defines none; must equal the model's own id otherwise", default=None)
    model_family: str | None = option(FAMILY_HELP, default=None)
    dtype: str = option(f"model weights dtype, one of {DTYPES}; proxy arithmetic is float32 anyway", default="bfloat16")
    load_in_4bit: bool = option("4-bit NF4 base weights via bitsandbytes, as the paper's runs (needs CUDA and "
                                "bitsandbytes)", default=False)
    lora_r: int = option("LoRA rank; 0 trains all weights", default=128)
    lora_alpha: float = option("LoRA alpha", default=64.0)
    lora_dropout: float = option("LoRA dropout", default=0.05)
    lora_target_modules: list[str] | None = option("LoRA target module names (None: the loader's default)", default=None)
    gradient_checkpointing: bool = option("recompute activations in backward to save memory", default=False)
    gpu_memory_gib: float | None = option("memory of one GPU; a run whose `dipod lm memory` plan exceeds it warns "
                                          "before any compute, naming the settings that fit (None: the device's)",
                                          default=None)
    # --- task and data ---
    task: str = option("task name (dipod.lm.tasks.get_task): sudoku4, countdown, gsm8k, math500, ...", default="gsm8k")
    train_data: str | None = option("training data file or hub dataset id (None: the task's default)", default=None)
    eval_data: str | None = option("held-out data file or hub dataset id (None: the task's default)", default=None)
    train_split: str = option("the task's training split, or the hub split read from train_data", default="train")
    eval_split: str = option("the task's held-out split (e.g. sudoku4 spg_test), or the hub split of eval_data",
                             default="test")
    prompt_style: str = option("'chat' or 'd1' (instruct models, chat template; d1 = the paper's format), 'd1_3shot' "
                               "(sudoku4) or 'compact' (tiny models)", default="chat")
    few_shot: int = option("number of solved training examples prepended to each prompt", default=0)
    max_prompt_length: int = option("prompts longer than this many tokens are cut from the left", default=256)
    reward_weights: list[float] | None = option(
        "one weight per reward function of the task, in the task's order (None: the task's weights)", default=None)
    # --- rollouts ---
    prompts_per_step: int = option("prompts per step over all processes; each gets num_generations completions", default=16)
    num_generations: int = option("completions per prompt (the GRPO group size), >= 2", default=6)
    generation_batch_size: int | None = option("completions generated per sampler call (lower it on OOM)", default=None)
    gen_length: int = option("completion length in tokens", default=256)
    block_length: int = option("semi-autoregressive block length; gen_length must be a multiple (justgrpo: of the "
                               "evaluation decoder only, its rollouts decode one token per step)", default=32)
    diffusion_steps: int = option("sampler steps over the whole completion (a multiple of the block count; justgrpo: "
                                  "evaluation only)", default=128)
    temperature: float = option("rollout sampling temperature (0 = greedy; justgrpo: > 0, its likelihood is read "
                                "at this temperature)", default=0.9)
    cfg_scale: float = option("classifier-free guidance scale of the sampler", default=0.0)
    scale_rewards: bool = option("divide group-centred advantages by the group's reward std", default=False)
    placebo_rewards: bool = option(
        "placebo control: shuffle the step's rewards across all its rollouts before the advantages, so they carry "
        "no information about the answers (logged rewards stay the true ones)", default=False)
    # --- likelihood proxies ---
    num_draws: int | None = option("Monte-Carlo masking draws K per completion (None: the process's released "
                                   "count, block_random 2, random 4)", default=None)
    masking: str = option("forward process: block_random (SPG's release), random (the d1 fork's FPO) or "
                          "unbiased_random (ours: any-order ELBO, half random's per-draw std)", default="block_random")
    reseed_masks: bool | None = option("new masks for every inner iteration (None: as released, block_random "
                                       "yes, random no)", default=None)
    min_t: float = option("smallest mask ratio of a draw", default=0.0)
    max_t: float = option("largest mask ratio of a draw", default=1.0)
    p_mask_prompt: float = option("probability of masking each prompt token in the proxies", default=0.0)
    max_tokens_per_forward: int | None = option("chunk proxy forwards to this many tokens (None: no chunking)", default=None)
    # --- estimator ---
    estimator: str = option(f"policy-gradient estimator, one of {ESTIMATORS}", default="spg")
    clip_eps: float | None = option(option_help("clip_eps", "PPO clip range"), default=None)
    log_ratio_max: float | None = option(option_help("log_ratio_max", "log-ratio clamp from above"), default=None)
    spg_negative_proxy: str | None = option(option_help("spg_negative_proxy", "proxy for negative advantages: "
                                                        "eubo, elbo or mix"), default=None)
    spg_mix_weight: float | None = option(option_help("spg_mix_weight", "EUBO weight in 'mix'"), default=None)
    eubo_beta: float | None = option(option_help("eubo_beta", "EUBO exponent beta (the release: 1.0 for sudoku)"),
                                     default=None)
    kl_beta: float | None = option(option_help("kl_beta", "KL weight to the reference (initial) policy: d1's k3 "
                                               "on mean-field log-probs, fpo's ELBO difference (opposes DiPOD)"),
                                   default=None)
    dipod_beta: float = option("DiPOD weight: adds beta * grad ELBO each update (0 turns DiPOD off)", default=0.05)
    dipod_normalisation: str | None = option(option_help(
        "dipod_normalisation", "DiPOD term per_token (-beta sum ELBO / sum L, SPG) or per_sequence "
        "(-beta mean ELBO, the d1 fork's FPO)"), default=None)
    dipod_unscored_eos: bool = option(
        "allow the DiPOD term with a masking process that never scores the EOS (random): answers that can end "
        "anywhere then lengthen under the term (measured on countdown, docs/lm_rl_diagnosis.md). Safe when every "
        "answer fills the completion (the tiny sudoku4 recipe); the d1 fork's FPO release runs this way", default=False)
    num_iterations: int = option("policy updates per rollout batch (mu)", default=12)
    # --- optimisation ---
    learning_rate: float = option("AdamW learning rate", default=3e-6)
    weight_decay: float = option("AdamW weight decay", default=0.1)
    adam_beta1: float = option("AdamW beta1", default=0.9)
    adam_beta2: float = option("AdamW beta2", default=0.99)
    max_grad_norm: float = option("gradient clipping norm (0 turns clipping off)", default=0.2)
    lr_scheduler: str = option(f"learning-rate schedule after warm-up, one of {LR_SCHEDULERS}", default="constant")
    warmup_steps: int = option("linear warm-up length in optimizer updates", default=0)
    gradient_accumulation_steps: int = option("micro-batches per update on each process", default=2)
    # --- run ---
    output_dir: str = option("run folder: metrics.jsonl, tb/, checkpoint-STEP/, final_model/", default="runs/lm_train")
    max_steps: int = option("rollout batches to train on (each makes num_iterations updates)", default=100)
    seed: int = option("seed of every random draw (same seed => same run on CPU)", default=42)
    resume: str | None = option(RESUME_HELP, default=None, bare=RESUME_LATEST)
    overwrite: bool = option("replace the run already in output_dir (its metrics, checkpoints, final model); "
                             "without it a folder holding a run is refused unless --resume", default=False)
    save_steps: int = option("write a checkpoint every this many steps (0: only at the end)", default=50)
    keep_checkpoints: int = option("how many checkpoints to keep", default=2)
    eval_steps: int = option("greedy held-out evaluation every this many steps (0: only before and after)", default=50)
    eval_examples: int = option("held-out examples per evaluation", default=64)
    gap_monitor_steps: int = option("drift monitor (IW_K - ELBO) every this many steps (0: off)", default=10)
    gap_monitor_sequences: int = option("rollouts per process the drift monitor scores", default=2)
    gap_monitor_orders: int = option("decoding orders K of the drift monitor", default=4)
    rollout_mismatch_steps: int = option(
        "every this many steps, also decode the step's prompts with the reference sampler (no threshold, no KV cache) "
        "and log mismatch/* (reward, ELBO per token, reveal confidence, forwards; docs/lm_fast_rollouts.md); 0: off",
        default=0)
    collapse_warn_fraction: float = option(
        "warn when at least this fraction of prompt groups has identical rewards 3 steps in a row", default=0.75)
    log_completions: int = option("held-out completions per evaluation written to completions.jsonl and printed",
                                  default=3)
    max_nonfinite_updates: int = option("stop after this many non-finite updates in a row", default=5)
    tensorboard: bool = option("mirror metrics to OUTPUT_DIR/tb", default=True)
    wandb_project: str | None = option("also log to this wandb project", default=None)
    progress_bar: bool = option("show a tqdm progress bar", default=True)
    save_final_model: bool = option("save the trained policy to OUTPUT_DIR/final_model", default=True)

    def __post_init__(self) -> None:
        self.resume = resume_target(self.resume)
        require(self.model_family is None or self.model_family in FAMILIES,
                f"model_family={self.model_family!r}; choose one of {sorted(FAMILIES)} or leave it out (detected)")
        require(self.estimator in ESTIMATOR_RECORDS,
                f"estimator={self.estimator!r}; choose one of {tuple(ESTIMATOR_RECORDS)}")
        try:
            self.estimator_options()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        require(self.num_generations >= 2, f"num_generations={self.num_generations}: group-relative advantages need >= 2 "
                                        "completions per prompt")
        # the sampler's own checks: gen_length a multiple of block_length, steps a multiple of the block count
        self.sampler_settings(self.temperature)
        require(not self.left_to_right() or self.temperature > 0,
                f"estimator={self.estimator} scores the likelihood of its sampled rollouts, which temperature="
                f"{self.temperature} (greedy) does not define; use --temperature 1.0 (the release's)")
        require(self.dtype in DTYPES, f"dtype={self.dtype!r}; choose one of {DTYPES}")
        if self.load_in_4bit:
            _check_4bit()
        require(self.prompt_style in STYLES, f"prompt_style={self.prompt_style!r}; choose one of {', '.join(STYLES)}")
        require(self.masking in MASKINGS, f"masking={self.masking!r}; choose one of {MASKINGS}")
        require(self.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler={self.lr_scheduler!r}; choose one of {LR_SCHEDULERS}")
        require(self.dipod_beta >= 0, f"dipod_beta={self.dipod_beta} must be >= 0 (0 turns DiPOD off)")
        require(self.dipod_beta == 0 or PROCESSES[self.masking].scores_eos or self.dipod_unscored_eos,
                f"dipod_beta={self.dipod_beta} with masking={self.masking}: this process never scores the EOS, so the "
                "DiPOD term cannot hold the answer length (on countdown it ran answers on to the full completion); use "
                "--masking unbiased_random or block_random (both score the EOS), or --dipod_unscored_eos true when every "
                "answer fills the completion or to reproduce the d1 fork's FPO release")
        require(self.dipod_normalisation is None or self.dipod_beta > 0,
                f"dipod_normalisation={self.dipod_normalisation!r} is unused with dipod_beta=0; remove it")
        require(0.0 <= self.min_t <= self.max_t <= 1.0, f"need 0 <= min_t <= max_t <= 1, got {self.min_t}, {self.max_t}")
        require(0.0 < self.collapse_warn_fraction <= 1.0,
                f"collapse_warn_fraction={self.collapse_warn_fraction} must lie in (0, 1]")
        require(self.log_completions >= 0, f"log_completions={self.log_completions} must be >= 0 (0: none)")
        require(0.0 <= self.p_mask_prompt < 1.0, f"p_mask_prompt={self.p_mask_prompt} must lie in [0, 1)")
        require(self.num_draws is None or self.num_draws >= 1, f"num_draws={self.num_draws} must be >= 1")
        for name in ("prompts_per_step", "num_iterations", "gradient_accumulation_steps", "max_steps",
                     "max_prompt_length", "max_nonfinite_updates", "eval_examples", "gap_monitor_orders",
                     "gap_monitor_sequences", "keep_checkpoints"):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        for name in ("save_steps", "eval_steps", "gap_monitor_steps", "warmup_steps", "few_shot", "lora_r",
                     "rollout_mismatch_steps"):
            require(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        require(self.generation_batch_size is None or self.generation_batch_size >= 1,
             f"generation_batch_size={self.generation_batch_size} must be >= 1")
        require(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        require(self.max_grad_norm >= 0, f"max_grad_norm={self.max_grad_norm} must be >= 0 (0: no clipping)")
        for name in ("train_data", "eval_data"):
            path = getattr(self, name)
            if path is not None and _looks_like_path(path) and not Path(path).exists():
                raise FileNotFoundError(f"{name}: no such file or folder {path}; pass an existing path or a hub dataset id")
        if _looks_like_path(self.model) and not Path(self.model).exists():
            raise FileNotFoundError(f"model: no such folder {self.model}; pass a local model folder or a hub id")

    # --- estimator-specific values: the registry's defaults under the fields that are set ---
    def estimator_options(self) -> dict:
        return resolve_options(self.estimator, {name: getattr(self, name) for name in ESTIMATOR_FIELDS})

    def option_value(self, name: str):
        """This estimator's value of option ``name`` (KeyError for an option it does not have)."""
        return self.estimator_options()[name]

    def kl_beta_value(self) -> float:
        return self.estimator_options().get("kl_beta", 0.0)

    def eubo_beta_value(self) -> float:
        """The EUBO exponent of the proxies (computed for every estimator, read by SPG only)."""
        return self.estimator_options().get("eubo_beta", ESTIMATOR_RECORDS["spg"].options["eubo_beta"].default)

    def needs_eubo(self) -> bool:
        return "eubo_n" in ESTIMATOR_RECORDS[self.estimator].reads(self.estimator_options())

    def num_draws_value(self) -> int:
        return self.num_draws if self.num_draws is not None else PROCESSES[self.masking].default_draws

    def reseed_masks_value(self) -> bool:
        return self.reseed_masks if self.reseed_masks is not None else PROCESSES[self.masking].reseeds_per_iteration

    def sampler_settings(self, temperature: float):
        """Decoding settings of this run at ``temperature`` (rollouts: the config's; evaluation: 0)."""
        from dipod.lm.sampler import SamplerSettings

        return SamplerSettings(gen_length=self.gen_length, block_length=self.block_length, steps=self.diffusion_steps,
                               temperature=temperature, cfg_scale=self.cfg_scale, **self.decoding_options())

    def left_to_right(self) -> bool:
        """The estimator reads the exact left-to-right likelihood, so its rollouts decode left to right."""
        return ESTIMATOR_RECORDS[self.estimator].left_to_right

    def rollout_settings(self):
        """Decoding settings of the rollouts: the config's at ``temperature`` or, for a left-to-right estimator
        (JustGRPO), one token per step left to right; held-out evaluation always decodes with the config's."""
        if self.left_to_right():
            from dipod.lm.left_to_right import left_to_right_settings

            return left_to_right_settings(self.gen_length, self.temperature)
        return self.sampler_settings(self.temperature)

    def with_changes(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def completions_per_process(cfg: TrainConfig, world: int) -> int:
    """The step's completions one of ``world`` processes rolls out; a ConfigError unless they split
    evenly over the processes and then over the accumulation steps (the trainer and `lm memory` alike)."""
    total = cfg.prompts_per_step * cfg.num_generations
    if total % world or (total // world) % cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"prompts_per_step x num_generations = {total} completions must split evenly over {world} "
            f"process(es) x gradient_accumulation_steps={cfg.gradient_accumulation_steps}; change one of them")
    return total // world


def _check_4bit() -> None:
    """load_in_4bit fails here, before any model is loaded, on a machine that cannot run it."""
    import torch

    from dipod.lm.model import nf4_quantization

    try:
        nf4_quantization("cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _looks_like_path(text: str) -> bool:
    """A hub id is ``owner/name``; anything starting like a file path or with more parts is a local path."""
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or Path(text).suffix in (
        ".json", ".jsonl", ".csv", ".parquet")
