"""LLaDA-style decoding of a masked-diffusion language model.

The completion starts as ``gen_length`` mask tokens after the (left-padded) prompt and is decoded
in semi-autoregressive blocks of ``block_length`` tokens, left to right. Each block gets
``steps / num_blocks`` steps; a step runs the model once on the whole sequence, proposes a token
for every still-masked position of the current block (greedy at temperature 0, Gumbel-max at
temperature > 0, in float64) and reveals the ``k`` proposals with the highest score: the model's
probability of the proposed token (``low_confidence`` remasking) or a uniform draw (``random``).
The block's mask count is split evenly over its steps, the remainder going to the first steps.

Conventions (see docs/lm_sampler.md):
- the mask token is never proposed (its logit is set to -inf), so no mask is left at the end;
- ties between equal scores go to the leftmost position, so outputs are deterministic at
  temperature 0, and at temperature > 0 with a fixed ``torch.Generator``;
- classifier-free guidance runs an unconditional pass in the same forward (batch stacked), with
  the real prompt tokens replaced by the mask token, and uses
  ``uncond + (cfg_scale + 1) * (cond - uncond)``;
- with ``fill_after_eos`` (default) every position after the first EOS is set to EOS in the
  returned completion, the EOS-padded form the SFT data and the proxies use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dipod.config import ConfigError, option

REMASKING = ("low_confidence", "random")


@dataclass
class SamplerSettings:
    """Decoding settings; defaults are d1's LLaDA evaluation settings (256 tokens, blocks of 32, 128 steps)."""

    gen_length: int = option("completion length in tokens", default=256)
    block_length: int = option("semi-autoregressive block length; gen_length must be a multiple", default=32)
    steps: int = option("model calls over the whole completion; a multiple of gen_length / block_length", default=128)
    temperature: float = option("Gumbel-max sampling temperature (0 = greedy argmax)", default=0.0)
    remasking: str = option(f"which proposals a step keeps, one of {REMASKING}", default="low_confidence")
    cfg_scale: float = option("classifier-free guidance scale (0 = no unconditional pass)", default=0.0)
    fill_after_eos: bool = option("set every position after the first EOS to EOS in the result", default=True)

    def __post_init__(self) -> None:
        if self.gen_length < 1 or self.block_length < 1 or self.steps < 1:
            raise ConfigError(f"gen_length={self.gen_length}, block_length={self.block_length} and "
                              f"steps={self.steps} must all be >= 1")
        if self.gen_length % self.block_length:
            raise ConfigError(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; "
                              "change one of them (the sampler decodes whole blocks)")
        if self.steps % self.num_blocks:
            raise ConfigError(f"steps={self.steps} is not a multiple of the block count {self.num_blocks} "
                              f"(gen_length / block_length); use e.g. steps={self.num_blocks * max(1, self.steps // self.num_blocks)}")
        if self.steps_per_block > self.block_length:
            raise ConfigError(f"steps={self.steps} gives {self.steps_per_block} steps per block but a block has only "
                              f"{self.block_length} tokens, so some steps would reveal nothing; use steps <= gen_length")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.remasking not in REMASKING:
            raise ConfigError(f"remasking={self.remasking!r}; choose one of {REMASKING}")
        if not self.cfg_scale >= 0.0:
            raise ConfigError(f"cfg_scale={self.cfg_scale} must be >= 0 (0 = no guidance)")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def reveal_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens revealed at each of ``steps`` steps: ``num_masked`` split evenly, remainder to the first steps."""
    base, extra = divmod(num_masked, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def _check_inputs(lm, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor, settings: SamplerSettings,
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


def _block_logits(lm, ids_bt: torch.Tensor, attn_bt: torch.Tensor, prompt_attn: torch.Tensor, lo: int, hi: int,
                  cfg_scale: float) -> torch.Tensor:
    """Float32 logits ``[B, hi - lo, V]`` of the current block (guided when ``cfg_scale > 0``), mask token at -inf."""
    if cfg_scale == 0.0:
        logits_blv = lm.logits(ids_bt, attn_bt)[:, lo:hi].clone()
    else:
        prompt_len = prompt_attn.shape[1]
        uncond_ids_bt = ids_bt.clone()
        uncond_ids_bt[:, :prompt_len] = ids_bt[:, :prompt_len].masked_fill(prompt_attn.bool(), lm.mask_id)
        both_blv = lm.logits(torch.cat([ids_bt, uncond_ids_bt]), torch.cat([attn_bt, attn_bt]))[:, lo:hi]
        cond_blv, uncond_blv = both_blv.chunk(2)
        logits_blv = uncond_blv + (cfg_scale + 1.0) * (cond_blv - uncond_blv)
    logits_blv[..., lm.mask_id] = float("-inf")  # never propose the mask token
    return logits_blv


def _propose(logits_blv: torch.Tensor, temperature: float, remasking: str,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(tokens_bl, score_bl)``: a proposed token per position and the score that ranks it."""
    if temperature == 0.0:
        tokens_bl = logits_blv.argmax(dim=-1)
    else:
        # Gumbel-max: argmax(logits / T + G) is a draw from softmax(logits / T); float64 keeps the
        # noise's tails (and so the low-probability tokens) exact enough.
        uniform = torch.rand(logits_blv.shape, generator=generator, dtype=torch.float64, device=logits_blv.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min_(torch.finfo(torch.float64).tiny)))
        tokens_bl = (logits_blv.double() / temperature + gumbel).argmax(dim=-1)
    if remasking == "low_confidence":
        probs_blv = torch.softmax(logits_blv.double(), dim=-1)
        score_bl = probs_blv.gather(-1, tokens_bl.unsqueeze(-1)).squeeze(-1)
    else:
        score_bl = torch.rand(tokens_bl.shape, generator=generator, dtype=torch.float64, device=tokens_bl.device)
    return tokens_bl, score_bl


def top_k_mask(score_bl: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[B, L]`` marking each row's ``k`` highest scores; equal scores go to the leftmost position."""
    # A stable descending sort keeps equal scores in position order, so the tie rule is exact.
    top_idx_bk = torch.sort(score_bl, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(score_bl, dtype=torch.bool).scatter_(1, top_idx_bk, True)


def fill_after_first_eos(completion_bg: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Copy of ``completion_bg`` with every position after the first EOS of its row set to EOS."""
    is_eos_bg = completion_bg == eos_id
    after_first_eos_bg = (is_eos_bg.cumsum(dim=1) - is_eos_bg.long()) > 0
    return completion_bg.masked_fill(after_first_eos_bg, eos_id)


def generate(lm, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor, settings: SamplerSettings,
             generator: torch.Generator | None = None, return_order: bool = False):
    """Decode completions ``[B, G]`` for left-padded prompts ``[B, P]`` (``prompt_attn`` 0 on padding).

    ``lm`` is a ``dipod.lm.model.MaskedDiffusionLM`` (``logits``, ``model``, ``mask_id``, ``eos_id``).
    Randomness (temperature > 0 or ``random`` remasking) comes from ``generator`` (the global RNG
    when None). With ``return_order`` also returns ``order_bg`` (long ``[B, G]``): the step, counted
    from 0 over the whole decode, at which each position was revealed.
    """
    _check_inputs(lm, prompt_ids, prompt_attn, settings, generator)
    batch, prompt_len = prompt_ids.shape
    mask_id = lm.mask_id
    device = prompt_ids.device
    ids_bt = torch.cat([prompt_ids, torch.full((batch, settings.gen_length), mask_id, dtype=torch.long,
                                               device=device)], dim=1)
    attn_bt = torch.cat([prompt_attn.long(), torch.ones((batch, settings.gen_length), dtype=torch.long,
                                                        device=device)], dim=1)
    order_bg = torch.full((batch, settings.gen_length), -1, dtype=torch.long, device=device)
    # Every row's block is fully masked when its turn comes, so one schedule serves all rows.
    schedule = reveal_schedule(settings.block_length, settings.steps_per_block)

    was_training = lm.model.training
    lm.model.eval()
    try:
        with torch.inference_mode():
            step = 0
            for block in range(settings.num_blocks):
                start = block * settings.block_length
                lo, hi = prompt_len + start, prompt_len + start + settings.block_length
                for k in schedule:
                    logits_blv = _block_logits(lm, ids_bt, attn_bt, prompt_attn, lo, hi, settings.cfg_scale)
                    tokens_bl, score_bl = _propose(logits_blv, settings.temperature, settings.remasking, generator)
                    still_masked_bl = ids_bt[:, lo:hi] == mask_id
                    reveal_bl = top_k_mask(score_bl.masked_fill(~still_masked_bl, float("-inf")), k)
                    ids_bt[:, lo:hi] = torch.where(reveal_bl, tokens_bl, ids_bt[:, lo:hi])
                    order_bg[:, start:start + settings.block_length].masked_fill_(reveal_bl, step)
                    step += 1
    finally:
        lm.model.train(was_training)

    completion_bg = ids_bt[:, prompt_len:]
    if settings.fill_after_eos:
        completion_bg = fill_after_first_eos(completion_bg, lm.eos_id)
    return (completion_bg, order_bg) if return_order else completion_bg
