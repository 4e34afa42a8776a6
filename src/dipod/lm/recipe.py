"""The decoding recipe a model folder written by dipod carries: ``dipod_recipe.json``.

A policy is only as good as the decoding it was trained for: the tiny reference policies answer in
16 tokens decoded one per step, a LLaDA run in 256 tokens, blocks of 32, 128 steps. Every folder
dipod writes (``dipod lm sft``'s ``model/``, an RL run's ``final_model/``, the shipped reference
policies) records how it was evaluated, and `dipod lm eval`, `lm generate` and the Python entry
points (``decode`` / ``evaluate_policy`` without settings) take that recipe as their default:
explicit flags (or settings) win.

The file is a JSON object of ``DecodingRecipe`` fields (a subset of `dipod lm eval`'s flags), read
and validated like a config: an unknown key, a missing required key or a bad value names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dipod.config import ConfigError, config_from_dict, config_to_dict, option, require
from dipod.lm.sampler import DecodingOptions, SamplerSettings
from dipod.lm.tasks.base import STYLES

RECIPE_FILE = "dipod_recipe.json"
REQUIRED = ("gen_length", "block_length", "steps", "prompt_style")
# the fields an echo line always shows; decoding options show only when they differ from the built-ins
HEADLINE = ("task", "prompt_style", "gen_length", "block_length", "steps", "temperature")


@dataclass
class DecodingRecipe(DecodingOptions):  # remasking, schedule, confidence_threshold, kv_cache, ...
    """How a model folder is meant to be decoded; every field is also a `dipod lm eval` flag."""

    task: str | None = option("the task the model was trained on (None: not recorded)", default=None)
    prompt_style: str = option(f"prompt format, one of {STYLES}", default="compact")
    max_prompt_length: int = option("prompts longer than this many tokens are cut from the left", default=256)
    gen_length: int = option("completion length in tokens", default=256)
    block_length: int = option("semi-autoregressive block length", default=32)
    steps: int = option("sampler steps over the whole completion", default=128)
    temperature: float = option("sampling temperature of the evaluation (0 = greedy)", default=0.0)
    cfg_scale: float = option("classifier-free guidance scale", default=0.0)

    def __post_init__(self) -> None:
        require(self.prompt_style in STYLES, f"prompt_style={self.prompt_style!r}; choose one of {STYLES}")
        require(self.max_prompt_length >= 1, f"max_prompt_length={self.max_prompt_length} must be >= 1")
        self.sampler_settings()  # the sampler's own checks

    def sampler_settings(self, **changes) -> SamplerSettings:
        values = {name: getattr(self, name) for name in ("gen_length", "block_length", "steps", "temperature",
                                                         "cfg_scale")}
        return SamplerSettings(**{**values, **self.decoding_options(), **changes})

    def values(self) -> dict:
        """The recipe as `dipod lm eval` flag values (an unrecorded task left out)."""
        return {k: v for k, v in config_to_dict(self).items() if not (k == "task" and v is None)}

    @classmethod
    def of(cls, settings: SamplerSettings, *, prompt_style: str, max_prompt_length: int,
           task: str | None) -> "DecodingRecipe":
        """The recipe of a run that evaluates with ``settings`` (its held-out evaluation's)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        decoding = {k: v for k, v in dataclasses.asdict(settings).items() if k in fields}
        return cls(task=task, prompt_style=prompt_style, max_prompt_length=max_prompt_length, **decoding)

    def to_json(self) -> str:
        values = config_to_dict(self)
        own = [f.name for f in dataclasses.fields(DecodingRecipe) if f.name not in values or
               f.name not in {g.name for g in dataclasses.fields(DecodingOptions)}]
        return json.dumps({**{k: values[k] for k in own}, **values}, indent=2) + "\n"  # its own fields first


# what build_tiny_model records: the format its character tokenizer can read, one block of 32 tokens
TINY_MODEL_RECIPE = DecodingRecipe(prompt_style="compact", gen_length=32, block_length=32, steps=32)


def _model_folder(model: str | os.PathLike) -> Path | None:
    from dipod.lm.reference import resolve_model_name

    folder = Path(resolve_model_name(os.fspath(model))).expanduser()
    return folder if folder.is_dir() else None


def read_recipe(model: str | os.PathLike) -> DecodingRecipe | None:
    """The recipe of a local model folder (or ``reference:TASK``), None for a hub id or a folder without one."""
    folder = _model_folder(model)
    path = None if folder is None else folder / RECIPE_FILE
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete it (decoding flags are then required) or "
                          "rewrite it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of recipe fields, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    require(not missing, f"{path} lacks {missing}; add them (gen_length, block_length, steps, prompt_style)")
    return config_from_dict(DecodingRecipe, data, source=str(path))


def model_recipe(lm) -> DecodingRecipe | None:
    """The recipe of a loaded ``MaskedDiffusionLM`` (read from the folder it was loaded from)."""
    source = getattr(lm, "source", "") or ""
    return read_recipe(source) if source and source != "tiny" else None


def model_sampler_settings(lm, **changes) -> SamplerSettings:
    """The sampler settings a loaded model is meant to be decoded with: its recipe's, else the built-in
    ``SamplerSettings`` defaults (d1's LLaDA settings); ``changes`` win."""
    recipe = model_recipe(lm)
    return recipe.sampler_settings(**changes) if recipe is not None else SamplerSettings(**changes)


def describe(values: dict, recipe_path: Path | None, explicit: set[str]) -> str:
    """One line: the effective decoding and where it came from (the echo of eval / generate / eval-sweep)."""
    builtins = {f.name: f.default for f in dataclasses.fields(DecodingOptions)}
    shown = [k for k in HEADLINE if values.get(k) is not None]
    shown += [k for k in builtins if k in values and values[k] != builtins[k]]
    text = " ".join(f"{k}={values[k]:g}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in shown)
    origin = f"model recipe {recipe_path}" if recipe_path else f"built-in defaults (the model has no {RECIPE_FILE})"
    flags = sorted(explicit & (set(shown) | {"max_prompt_length", "cfg_scale"}))
    return f"decoding: {text} ({origin}{'; from flags/config: ' + ', '.join(flags) if flags else ''})"


def recipe_path(model: str | os.PathLike) -> Path | None:
    folder = _model_folder(model)
    return folder / RECIPE_FILE if folder is not None and (folder / RECIPE_FILE).is_file() else None
