"""`dipod lm eval`: accuracy and mean reward of a masked-diffusion policy on a task's held-out set.

Decoding is greedy by default (temperature 0, low-confidence remasking), so the numbers are a
deterministic function of the model, the data and the sampler settings. ``evaluate_policy`` is
also what `dipod lm sft` calls for its periodic held-out evaluation.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dipod.config import ConfigError, config_from_dict, config_to_dict, option, read_values
from dipod.lm.families import FAMILIES, FAMILY_HELP
from dipod.lm.sampler import DecodingOptions, SamplerSettings, family_sampler_defaults
from dipod.lm.tasks.base import EVAL_RESPONSE_PREFIX
from dipod.lm.tasks.base import STYLES as PROMPT_STYLES
from dipod.runlog import atomic_write_json


@dataclass
class DecodeConfig(DecodingOptions):
    """Model loading and decoding settings shared by `dipod lm eval` and `dipod lm generate`.

    A model folder written by dipod carries its decoding recipe (``dipod_recipe.json``:
    dipod.lm.recipe); its values are the defaults here (task, prompt style, gen_length, block_length,
    steps, ...), flags and ``--config`` win (``parse_decode_config``). Without a recipe the defaults
    below apply (d1's LLaDA settings: 256 tokens, blocks of 32, 128 steps, chat prompts). The options
    shared with train and SFT (remasking, schedule, confidence_threshold, kv_cache, ...) come from
    ``DecodingOptions``; unset ones take the model family's defaults (docs/lm_sampler.md).
    """

    model: str = option("local directory (save_pretrained format, e.g. RUN/model from `dipod lm sft`) or hub id",
                       default="")
    task: str = option("task name (sudoku4, countdown, gsm8k, math500, ...) or package.module:Class of your own "
                       "Task (default: the model recipe's task)", default="")
    data: str | None = option("data file or hub dataset id to read instead of the task's own split", default=None)
    split: str = option("which split of the task to read (ignored with --data)", default="test")
    limit: int | None = option("use only the first LIMIT examples", default=None)
    prompt_style: str = option(f"prompt format, one of {PROMPT_STYLES} (default: the model recipe's, else chat)",
                               default="chat")
    max_prompt_length: int = option("prompts longer than this many tokens are cut from the left", default=256)
    gen_length: int = option("completion length in tokens (default: the model recipe's, else 256)", default=256)
    block_length: int = option("semi-autoregressive block length, gen_length a multiple (default: the model "
                               "recipe's, else 32)", default=32)
    steps: int = option("sampler steps over the whole completion (default: the model recipe's, else 128)",
                        default=128)
    temperature: float = option("sampling temperature (0 = greedy)", default=0.0)
    cfg_scale: float = option("classifier-free guidance scale", default=0.0)
    batch_size: int = option("prompts decoded per sampler call", default=64)
    seed: int = option("seed of the sampler's random draws (temperature > 0 or random remasking)", default=0)
    dtype: str = option("model dtype: float32, bfloat16 or float16", default="float32")
    trust_remote_code: bool = option("run the model repository's own code: the legacy path for LLaDA / Dream "
                                     "(transformers 4.56-4.57); by default they load into dipod's own network",
                                     default=False)
    mask_token_id: int | None = option(
        "mask token id for a model that defines none; must equal the model's own id otherwise", default=None)
    model_family: str | None = option(FAMILY_HELP, default=None)
    device: str = option("torch device", default="cpu")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("--model is required: a directory written by `dipod lm sft` (RUN/model) or a hub id")
        if not self.task:
            raise ConfigError("--task is required: the model has no recipe naming its task (e.g. --task sudoku4)")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_style={self.prompt_style!r}; choose one of {PROMPT_STYLES}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit} must be >= 1 (or leave it out for the whole split)")
        if self.batch_size < 1 or self.max_prompt_length < 1:
            raise ConfigError("batch_size and max_prompt_length must be >= 1")
        if self.model_family is not None and self.model_family not in FAMILIES:
            raise ConfigError(f"model_family={self.model_family!r}; choose one of {sorted(FAMILIES)} or leave it out (detected)")
        self.sampler_settings()  # validates the decoding fields

    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps,
                               temperature=self.temperature, cfg_scale=self.cfg_scale, **self.decoding_options())


@dataclass
class EvalConfig(DecodeConfig):
    json: str | None = option("write accuracy, mean reward, forward passes and per-example results to this JSON file",
                              default=None)
    samples: int = option("decode every example this many times (with --temperature > 0) and also report pass@1 "
                          "(mean accuracy of the samples) and pass@SAMPLES (some sample correct)", default=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples} must be >= 1")
        if self.samples > 1 and self.temperature == 0 and self.remasking != "random":
            raise ConfigError(f"samples={self.samples} with greedy decoding repeats one answer; set --temperature > 0")


def parse_decode_config(cls: type, argv: list[str], prog: str, description: str):
    """``cls`` (a DecodeConfig) from the model recipe < ``--config`` < flags; prints the effective
    decoding in one line on stderr."""
    from dipod.lm.recipe import describe, read_recipe, recipe_path

    values, source = read_values(cls, argv, prog, description)
    recipe = read_recipe(values["model"]) if values.get("model") else None
    base = recipe.values() if recipe is not None else {}
    cfg = config_from_dict(cls, {**base, **values}, source=source)
    print(f"{prog}: " + describe(config_to_dict(cfg), recipe_path(cfg.model), set(values)), file=sys.stderr)
    return cfg


@torch.no_grad()
def evaluate_policy(lm, task, examples: list[dict], settings: SamplerSettings | None = None, *,
                    prompt_style: str | None = None, max_prompt_length: int | None = None, batch_size: int = 64,
                    seed: int = 0) -> dict:
    """Decode every example and score it: ``{"accuracy", "mean_reward", "num_examples", "forward_passes",
    "row_forwards", "edits", "results"}``.

    ``settings``, ``prompt_style`` and ``max_prompt_length`` left out take the model's decoding
    recipe (``dipod.lm.recipe``; without one: ``SamplerSettings()``, compact prompts, 256 tokens).
    ``forward_passes`` counts the model calls the sampler ran over all batches, ``row_forwards`` the rows
    summed over those calls (the compute paid: finished rows leave the forwards), ``edits`` the revealed
    tokens token editing replaced (``edit_threshold``; 0 without it); ``results`` holds
    ``{"prompt", "completion", "reward", "correct"}`` per example, in order.
    """
    from dipod.lm.recipe import model_recipe, model_sampler_settings
    from dipod.lm.sampler import decode
    from dipod.lm.train_engine import decode_completions, encode_prompts

    if not examples:
        raise ValueError(f"task {task.name}: no examples to evaluate (empty split or data file)")
    recipe = model_recipe(lm) if None in (settings, prompt_style, max_prompt_length) else None
    settings = settings if settings is not None else model_sampler_settings(lm)
    prompt_style = prompt_style or (recipe.prompt_style if recipe is not None else "compact")
    max_prompt_length = max_prompt_length or (recipe.max_prompt_length if recipe is not None else 256)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    results, forward_passes, row_forwards, edits = [], 0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [task.prompt(ex, prompt_style) for ex in chunk]
        ids, attn = encode_prompts(lm, prompts, max_prompt_length, chat=prompt_style != "compact",
                                  response_prefix=EVAL_RESPONSE_PREFIX.get(prompt_style, ""))
        decoded = decode(lm, ids.to(lm.device), attn.to(lm.device), settings, generator=generator)
        forward_passes += decoded.forward_passes
        row_forwards += decoded.row_forwards
        edits += decoded.edits
        for prompt, text, ex in zip(prompts, decode_completions(lm, decoded.completion_bg), chunk):
            results.append({"prompt": prompt, "completion": text, "reward": float(task.reward(text, ex)),
                            "correct": bool(task.is_correct(text, ex))})
    return {"accuracy": sum(r["correct"] for r in results) / len(results),
            "mean_reward": sum(r["reward"] for r in results) / len(results),
            "num_examples": len(results), "forward_passes": forward_passes, "row_forwards": row_forwards,
            "edits": edits, "results": results}


def pass_at_k(lm, task, examples: list[dict], settings: SamplerSettings, samples: int, **decode_kwargs) -> dict:
    """Every example decoded ``samples`` times: ``{"pass@1": mean accuracy of the samples,
    "pass@SAMPLES": fraction of examples some sample solves, "sample_reward": mean reward}``."""
    report = evaluate_policy(lm, task, [ex for ex in examples for _ in range(samples)], settings, **decode_kwargs)
    correct_es = torch.tensor([row["correct"] for row in report["results"]], dtype=torch.float32).reshape(-1, samples)
    return {"pass@1": float(correct_es.mean()), f"pass@{samples}": float(correct_es.amax(dim=1).mean()),
            "sample_reward": report["mean_reward"]}


def decoding_protocol(settings: SamplerSettings, *, prompt_style: str, max_prompt_length: int, batch_size: int,
                      seed: int, dtype: str, device: str) -> dict:
    """Everything an accuracy depends on besides the model and the data, for result files: the
    prompt style (and the response prefix it implies), every sampler setting, dtype, batch size
    (padding changes what a batch decodes) and device."""
    return {"prompt_style": prompt_style, "response_prefix": EVAL_RESPONSE_PREFIX.get(prompt_style, ""),
            **dataclasses.asdict(settings), "max_prompt_length": max_prompt_length, "batch_size": batch_size,
            "seed": seed, "dtype": dtype, "device": str(device)}


def load_for_decoding(cfg: DecodeConfig):
    """``(lm, task, examples)`` for a DecodeConfig, validating the task before loading the model."""
    from dipod.lm.model import load_masked_lm
    from dipod.lm.tasks import get_task

    task = get_task(cfg.task)
    examples = task.load(cfg.split, path=cfg.data, limit=cfg.limit)
    lm = load_masked_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                        mask_token_id=cfg.mask_token_id, model_family=cfg.model_family, device=cfg.device)
    return lm, task, examples


def main(argv: list[str], prog: str = "dipod lm eval") -> int:
    cfg = parse_decode_config(EvalConfig, argv, prog, description="Accuracy and mean reward of a model on a task.")
    lm, task, examples = load_for_decoding(cfg)
    settings = cfg.sampler_settings().resolved(family_sampler_defaults(lm))  # the family's defaults filled in
    report = evaluate_policy(lm, task, examples, settings, prompt_style=cfg.prompt_style,
                             max_prompt_length=cfg.max_prompt_length, batch_size=cfg.batch_size, seed=cfg.seed)
    source = cfg.data or f"split {cfg.split}"
    print(f"{task.name} ({source}, {report['num_examples']} examples): "
          f"accuracy {report['accuracy']:.4f}  mean reward {report['mean_reward']:.4f}  "
          f"forward passes {report['forward_passes']}  row forwards {report['row_forwards']}")
    if cfg.samples > 1:
        report["sampling"] = pass_at_k(lm, task, examples, settings, cfg.samples, prompt_style=cfg.prompt_style,
                                       max_prompt_length=cfg.max_prompt_length, batch_size=cfg.batch_size,
                                       seed=cfg.seed + 1)
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in report["sampling"].items())
              + f"  ({cfg.samples} samples per example at temperature {cfg.temperature:g})")
    if cfg.json:
        atomic_write_json(Path(cfg.json), {
            "model": cfg.model, "task": task.name, "data": cfg.data, "split": None if cfg.data else cfg.split,
            "prompt_style": cfg.prompt_style,
            "sampler": dataclasses.asdict(settings),
            "protocol": decoding_protocol(settings, prompt_style=cfg.prompt_style, max_prompt_length=cfg.max_prompt_length,
                                          batch_size=cfg.batch_size, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device),
            **report})
        print(f"wrote {cfg.json}", file=sys.stderr)
    return 0
