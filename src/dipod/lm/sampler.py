"""Decoding of a masked-diffusion language model: LLaDA's semi-autoregressive blocks, Dream's
global schedule, and threshold parallel decoding, in one loop.

The completion starts as ``gen_length`` mask tokens after the (left-padded) prompt. It is decoded
block by block, left to right: ``block_length`` tokens per block with the ``blocks`` schedule
(LLaDA), the whole completion as one block with the ``global`` schedule (Dream). A step obtains the
current block's logits from a ``forward`` callable (the full model by default, a KV-cached one with
``kv_cache``), proposes a token for every still-masked position of the block (greedy at temperature
0, Gumbel-max at temperature > 0, in float64), scores the proposals with the reveal rule
(``dipod.lm.reveal.REVEAL_RULES``) and reveals each row's ``k`` best, ``k`` given by the count rule:
LLaDA's even split of a block over its steps, Dream's ``linspace(1, eps, steps + 1)`` schedule, or,
with ``confidence_threshold``, every position whose score exceeds the threshold (at least one).

Conventions (see docs/lm_sampler.md):
- the mask token is never proposed (the proposal is the best non-mask token), so no mask is left
  at the end; with ``mask_in_confidence`` (default) its logit stays in the softmax that scores the
  proposals, as in LLaDA's ``generate()`` and Dream's ``diffusion_generate``; without it the mask
  logit is -inf before filtering and scoring (dipod's earlier rule);
- with ``compact_rows`` (default) finished rows leave the forwards (``dipod.lm.active_rows``);
- with ``edit_threshold`` (block-causal models: LLaDA2.1's token editing) a step also replaces revealed
  tokens of the current block, and a block ends only once a mask-free step edits nothing
  (``dipod.lm.processes.token_editing``);
- ties between equal scores go to the leftmost position, so outputs are deterministic at
  temperature 0, and at temperature > 0 with a fixed ``torch.Generator``;
- classifier-free guidance runs an unconditional pass in the same forward (batch stacked), with
  the real prompt tokens replaced by the mask token, and uses
  ``uncond + (cfg_scale + 1) * (cond - uncond)``;
- with ``fill_after_eos`` (default) every position after the first EOS is set to EOS in the
  returned completion, the EOS-padded form the SFT data and the proxies use;
- settings left unset (``None``) take the model family's ``sampler_defaults`` (Dream: the global
  schedule and ``maskgit_plus``), then the built-in ones (``blocks``, ``low_confidence``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from dipod.config import ConfigError, option
from dipod.lm.processes.registry import process_of
from dipod.lm.processes.base import BlockForward, Decoded
from dipod.lm.processes.masked_sampling import (block_forward, family_sampler_defaults, fill_after_first_eos,
                                                filter_logits, full_forward)
from dipod.lm.reveal import REVEAL_RULES, even_counts, global_counts, reveal_schedule, threshold_counts, top_k_mask

SCHEDULES = ("blocks", "global")
KV_CACHES = ("prefix", "dual")
BUILTIN_DEFAULTS = {"remasking": "low_confidence", "schedule": "blocks"}

__all__ = ["BlockForward", "DecodingOptions", "SamplerSettings", "Decoded", "decode", "generate", "block_forward",
           "full_forward", "family_sampler_defaults", "fill_after_first_eos", "filter_logits", "reveal_schedule",
           "top_k_mask"]


UNIFORM_SAMPLERS = ("own", "ancestral")  # dipod.lm.diffusion_gemma


@dataclass
class DecodingOptions:
    """Decoding options shared by every config that decodes (train, SFT, eval, generate): declared once here."""

    remasking: str | None = option(f"reveal rule, one of {tuple(REVEAL_RULES)} (None: the model family's, "
                                   "else low_confidence)", default=None)
    schedule: str | None = option(f"how many tokens a step reveals, one of {SCHEDULES}: LLaDA's blocks, or Dream's "
                                  "global schedule over the whole completion (None: the model family's, else blocks)",
                                  default=None)
    schedule_eps: float = option("global schedule: final time eps of linspace(1, eps, steps + 1) (Dream's eps)",
                                 default=1e-3)
    confidence_threshold: float | None = option(
        "threshold parallel decoding: each step reveals every masked position of the block whose score exceeds "
        "this, at least one (None: the schedule's fixed counts)", default=None)
    max_reveal_per_step: int | None = option("with confidence_threshold: reveal at most this many per step",
                                             default=None)
    mask_in_confidence: bool = option(
        "keep the mask token's logit in the softmax that scores proposals, as LLaDA's generate() and Dream's "
        "diffusion_generate do (false: set it to -inf first, dipod's earlier rule); the mask token itself is "
        "never proposed either way", default=True)
    stop_at_eos: bool = option(
        "a row whose completion has ended (an EOS revealed, every position before it revealed) stops: its "
        "remaining masks become EOS and it leaves the forwards. With fill_after_eos the completions are those "
        "decoding on gives, except sampled threshold / random-remasking runs: there a different draw of the same "
        "distribution (docs/lm_sampler.md)", default=False)
    edit_threshold: float | None = option(
        "block-causal models: LLaDA2.1's token editing; each step also replaces every revealed token of the current "
        "block whose proposal differs and scores above this (LLaDA2.1: 0.9; None: no editing; "
        "docs/lm_block_diffusion.md)", default=None)
    max_post_steps: int = option("with edit_threshold: at most this many editing-only steps per block once its masks "
                                 "are gone (LLaDA2.1's max_post_steps)", default=16)
    kv_cache: str | None = option(f"block KV cache for decoding, one of {KV_CACHES} (None: full forwards)",
                                  default=None)
    top_k: int | None = option("propose only among the k most likely tokens; scores read the filtered "
                               "distribution (Dream's top_k; None: no filter)", default=None)
    top_p: float | None = option("propose only within the nucleus of this tempered probability mass; scores read "
                                 "the filtered distribution (Dream's top_p; None: no filter)", default=None)
    uniform_sampler: str = option(f"uniform-noise families (DiffusionGemma), one of {UNIFORM_SAMPLERS}: 'own' (the "
                                  "model's entropy-bounded sampler) or 'ancestral' (dipod's: x_(t-1) ~ p(x_(t-1) | x_t) "
                                  "of the ELBO's process, steps per canvas)", default="own")

    def _check_probability_threshold(self, field: str, example: str, unset: str) -> None:
        """A threshold on the reveal rule's score: in (0, 1], and the rule's score must be a probability."""
        value = getattr(self, field)
        if value is None:
            return
        if not 0.0 < value <= 1.0:  # also rejects NaN
            raise ConfigError(f"{field}={value} must lie in (0, 1] ({example}), or leave it {unset}")
        if self.remasking is not None and not REVEAL_RULES[self.remasking].is_probability:
            usable = tuple(name for name, rule in REVEAL_RULES.items() if rule.is_probability)
            raise ConfigError(f"{field} compares a probability, but remasking={self.remasking!r} scores are not "
                              f"one; use one of {usable}")

    def decoding_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DecodingOptions)}

    def check_decoding_options(self) -> None:
        if self.remasking is not None and self.remasking not in REVEAL_RULES:
            raise ConfigError(f"remasking={self.remasking!r}; choose one of {tuple(REVEAL_RULES)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if not 0.0 < self.schedule_eps < 1.0:
            raise ConfigError(f"schedule_eps={self.schedule_eps} must lie in (0, 1) (Dream uses 1e-3)")
        threshold = self.confidence_threshold
        self._check_probability_threshold("confidence_threshold", "e.g. 0.9", "unset for the fixed schedule")
        if self.max_reveal_per_step is not None:
            if threshold is None:
                raise ConfigError("max_reveal_per_step caps threshold decoding; set confidence_threshold too "
                                  "or remove max_reveal_per_step")
            if self.max_reveal_per_step < 1:
                raise ConfigError(f"max_reveal_per_step={self.max_reveal_per_step} must be >= 1")
        self._check_probability_threshold("edit_threshold", "LLaDA2.1 uses 0.9", "unset: no token editing")
        if self.edit_threshold is not None and self.stop_at_eos:
            raise ConfigError("stop_at_eos stops a row at an EOS it takes as final, but token editing (edit_threshold) "
                              "may still change revealed tokens; use one of them")
        if self.max_post_steps < 0:
            raise ConfigError(f"max_post_steps={self.max_post_steps} must be >= 0 (LLaDA2.1 uses 16)")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache={self.kv_cache!r}; choose one of {KV_CACHES} or leave it unset")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1 (or leave it unset: no filter)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1] (or leave it unset: no filter)")
        if self.uniform_sampler not in UNIFORM_SAMPLERS:
            raise ConfigError(f"uniform_sampler={self.uniform_sampler!r}; choose one of {UNIFORM_SAMPLERS}")


@dataclass
class SamplerSettings(DecodingOptions):
    """Decoding settings; defaults are d1's LLaDA evaluation settings (256 tokens, blocks of 32, 128 steps)."""

    gen_length: int = option("completion length in tokens", default=256)
    block_length: int = option("semi-autoregressive block length (blocks schedule); gen_length must be a multiple",
                               default=32)
    steps: int = option("model calls over the whole completion (fixed schedules); with the blocks schedule a "
                        "multiple of gen_length / block_length", default=128)
    temperature: float = option("Gumbel-max sampling temperature (0 = greedy argmax)", default=0.0)
    cfg_scale: float = option("classifier-free guidance scale (0 = no unconditional pass)", default=0.0)
    fill_after_eos: bool = option("set every position after the first EOS to EOS in the result", default=True)
    compact_rows: bool = option("run each forward only on the rows with masks left in the block, so a batch "
                                "costs the sum of its rows' forwards (same outputs; false: every row in every "
                                "forward of a block)", default=True)

    def __post_init__(self) -> None:
        if self.gen_length < 1 or self.block_length < 1 or self.steps < 1:
            raise ConfigError(f"gen_length={self.gen_length}, block_length={self.block_length} and "
                              f"steps={self.steps} must all be >= 1")
        self.check_decoding_options()
        if self.schedule == "global":
            if self.steps > self.gen_length:
                raise ConfigError(f"steps={self.steps} exceeds gen_length={self.gen_length}; use steps <= gen_length")
        else:  # blocks, or unset: checked as blocks so that a config fails before any model is loaded
            hint = "" if self.schedule else " (or set schedule=global: one block, as Dream decodes)"
            if self.gen_length % self.block_length:
                raise ConfigError(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length};"
                                  f" change one of them (the sampler decodes whole blocks){hint}")
            if self.steps % self.num_blocks:
                raise ConfigError(f"steps={self.steps} is not a multiple of the block count {self.num_blocks} "
                                  f"(gen_length / block_length); use e.g. "
                                  f"steps={self.num_blocks * max(1, self.steps // self.num_blocks)}{hint}")
            if self.steps_per_block > self.block_length:
                raise ConfigError(f"steps={self.steps} gives {self.steps_per_block} steps per block but a block has "
                                  f"only {self.block_length} tokens, so some steps would reveal nothing; "
                                  "use steps <= gen_length")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not self.cfg_scale >= 0.0:
            raise ConfigError(f"cfg_scale={self.cfg_scale} must be >= 0 (0 = no guidance)")

    @property
    def num_blocks(self) -> int:
        return 1 if self.schedule == "global" else self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def resolved(self, family_defaults: dict | None = None) -> "SamplerSettings":
        """A copy with every unset option filled: the family's ``sampler_defaults`` first, then the built-in ones."""
        family_defaults = dict(family_defaults or {})
        unknown = sorted(set(family_defaults) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"sampler_defaults names unknown SamplerSettings fields {unknown}")
        changes = {name: value for name, value in family_defaults.items()
                   if value is not None and getattr(self, name) is None}
        merged = dataclasses.replace(self, **changes)
        return dataclasses.replace(merged, **{name: value for name, value in BUILTIN_DEFAULTS.items()
                                              if getattr(merged, name) is None})

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each block within the completion, left to right."""
        length = self.gen_length if self.schedule == "global" else self.block_length
        return [(start, start + length) for start in range(0, self.gen_length, length)]

    def count_rule(self, block_length: int):
        """How many tokens each step of a block reveals (``dipod.lm.reveal`` count rules)."""
        if self.confidence_threshold is not None:
            return threshold_counts(self.confidence_threshold, self.max_reveal_per_step)
        if self.schedule == "global":
            return global_counts(self.steps, self.schedule_eps)
        return even_counts(block_length, self.steps_per_block)




def _check_inputs(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings: SamplerSettings,
                  generator: torch.Generator | None) -> None:
    if not isinstance(settings, SamplerSettings):
        raise TypeError(f"settings must be a SamplerSettings, got {type(settings).__name__}")
    if lm.mask_id is None:
        raise ValueError("the model has no mask token id; set mask_token_id when loading it")
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids must be a [B, P] long tensor, got {prompt_ids.dtype} {tuple(prompt_ids.shape)}")
    if prompt_attn.shape != prompt_ids.shape:
        raise ValueError(f"prompt_attn {tuple(prompt_attn.shape)} must have the shape of prompt_ids "
                         f"{tuple(prompt_ids.shape)}")
    if prompt_attn.numel() and not ((prompt_attn == 0) | (prompt_attn == 1)).all():
        raise ValueError("prompt_attn must hold only 0 (padding) and 1 (prompt token)")
    if (prompt_attn[:, 1:] < prompt_attn[:, :-1]).any():
        raise ValueError("prompts must be left-padded: in each row of prompt_attn the 0s must come before the 1s")
    if generator is not None and generator.device.type != prompt_ids.device.type:
        raise ValueError(f"generator is on {generator.device} but the prompts are on {prompt_ids.device}; "
                         "create the generator on the prompts' device")




















def decode(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings: SamplerSettings | None = None,
           generator: torch.Generator | None = None, forward: BlockForward | None = None) -> Decoded:
    """Decode completions for left-padded prompts ``[B, P]`` (``prompt_attn`` 0 on padding) by the model's
    diffusion process (``dipod.lm.processes``; the masked loop of ``masked_sampling`` for LLaDA and Dream).

    ``settings=None``: the model's decoding recipe (``dipod.lm.recipe.model_sampler_settings``: a
    folder written by dipod records it; else the ``SamplerSettings()`` defaults).

    ``lm`` is a ``dipod.lm.model.MaskedDiffusionLM`` (``logits``, ``model``, ``mask_id``, ``eos_id``,
    optionally ``family.sampler_defaults``). Randomness (temperature > 0 or ``random`` remasking)
    comes from ``generator`` (the global RNG when None). ``forward`` replaces the block forward
    (default: ``settings.kv_cache``'s, i.e. the full model when unset): it is called as
    ``forward(x_bt, attn_bt, lo, hi, new_block)`` and returns float32 logits ``[B, hi - lo, V]``
    predicting positions ``lo..hi-1``, with ``new_block`` true on each block's first step. With
    ``settings.compact_rows`` a forward that has a ``keep_rows(keep_b)`` method is called only on the
    rows with masks left in the block (``dipod.lm.active_rows``); one without is always given every row.
    """
    if settings is None:
        from dipod.lm.recipe import model_sampler_settings  # imported here: the recipe imports this module

        settings = model_sampler_settings(lm)
    _check_inputs(lm, prompt_ids, prompt_attn, settings, generator)
    return process_of(lm).decode(lm, prompt_ids, prompt_attn, settings, generator, forward)


def generate(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings: SamplerSettings | None = None,
             generator: torch.Generator | None = None, return_order: bool = False,
             forward: BlockForward | None = None):
    """``decode``'s completions ``[B, G]`` (and with ``return_order`` its ``order_bg``)."""
    out = decode(lm, prompt_ids, prompt_attn, settings, generator=generator, forward=forward)
    return (out.completion_bg, out.order_bg) if return_order else out.completion_bg
