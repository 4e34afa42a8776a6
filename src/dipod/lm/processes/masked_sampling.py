"""The masked processes' decoding loop (LLaDA's blocks, Dream's global schedule, threshold decoding)
and its small parts: the block forwards, guidance, top-k / top-p filtering, proposals, EOS filling.
What it does and its conventions: ``dipod.lm.sampler``'s docstring and docs/lm_sampler.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.config import ConfigError
from dipod.lm.model import eval_mode
from dipod.lm.processes.base import BlockForward, Decoded
from dipod.lm.reveal import REVEAL_RULES, top_k_mask


def family_sampler_defaults(lm) -> dict:
    """The model family's ``sampler_defaults`` (empty for a model without a family)."""
    return dict(getattr(getattr(lm, "family", None), "sampler_defaults", None) or {})


def full_forward(lm) -> BlockForward:
    """The default block forward: the whole sequence through the model, logits of ``lo:hi`` kept."""

    def forward(x_bt: Tensor, attn_bt: Tensor, lo: int, hi: int, new_block: bool) -> Tensor:
        return lm.logits(x_bt, attn_bt, first=lo)[:, :hi - lo]
    return forward


def block_forward(lm, kv_cache: str | None) -> BlockForward:
    """The full forward, or with ``kv_cache`` the cached one of ``dipod.lm.networks`` (imported only then)."""
    if kv_cache is None:
        return full_forward(lm)
    try:
        from dipod.lm.networks import make_cached_forward
    except ModuleNotFoundError as exc:
        if exc.name not in ("dipod.lm.networks",):
            raise
        raise ConfigError(f"kv_cache={kv_cache!r} needs dipod.lm.networks, which this install lacks; "
                          "leave kv_cache unset") from None
    return make_cached_forward(lm, kv_cache)  # raises for a family without our implementation


def _guided_block_logits(forward: BlockForward, mask_id: int, ids_bt: Tensor, attn_bt: Tensor,
                         prompt_attn: Tensor, lo: int, hi: int, cfg_scale: float, new_block: bool) -> Tensor:
    """Float32 logits ``[B, hi - lo, V]`` of the current block (guided when ``cfg_scale > 0``), mask token at -inf."""
    if cfg_scale == 0.0:
        logits_blv = forward(ids_bt, attn_bt, lo, hi, new_block).float().clone()
    else:
        prompt_len = prompt_attn.shape[1]
        uncond_ids_bt = ids_bt.clone()
        uncond_ids_bt[:, :prompt_len] = ids_bt[:, :prompt_len].masked_fill(prompt_attn.bool(), mask_id)
        both_blv = forward(torch.cat([ids_bt, uncond_ids_bt]), torch.cat([attn_bt, attn_bt]), lo, hi, new_block)
        cond_blv, uncond_blv = both_blv.float().chunk(2)
        logits_blv = uncond_blv + (cfg_scale + 1.0) * (cond_blv - uncond_blv)
    logits_blv[..., mask_id] = float("-inf")  # never propose the mask token
    return logits_blv


def filter_logits(logits_blv: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Logits with the tokens outside the top-k / the top-p nucleus of ``softmax(logits / T)`` at -inf.

    As Dream's sampler: the nucleus is the smallest set of most likely tokens whose mass exceeds
    ``top_p`` (the most likely token always stays), then only the ``top_k`` largest logits stay
    (ties with the k-th are kept).
    """
    if top_p is not None and top_p < 1.0:
        tempered_blv = logits_blv / temperature if temperature > 0 else logits_blv
        sorted_blv, order_blv = torch.sort(tempered_blv, dim=-1, descending=True)
        beyond_blv = torch.softmax(sorted_blv, dim=-1).cumsum(dim=-1) > top_p
        # a token goes when the mass of the tokens ranked above it already exceeds top_p
        beyond_blv = torch.cat([torch.zeros_like(beyond_blv[..., :1]), beyond_blv[..., :-1]], dim=-1)
        drop_blv = torch.zeros_like(logits_blv, dtype=torch.bool).scatter_(-1, order_blv, beyond_blv)
        logits_blv = logits_blv.masked_fill(drop_blv, float("-inf"))
    if top_k is not None and top_k < logits_blv.shape[-1]:
        kth_bl1 = logits_blv.topk(top_k, dim=-1).values[..., -1:]
        logits_blv = logits_blv.masked_fill(logits_blv < kth_bl1, float("-inf"))
    return logits_blv


def _propose(logits_blv: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """A proposed token per position: the argmax at temperature 0, else a draw from ``softmax(logits / T)``."""
    if temperature == 0.0:
        return logits_blv.argmax(dim=-1)
    # Gumbel-max: argmax(logits / T + G) is a draw from softmax(logits / T); float64 keeps the
    # noise's tails (and so the low-probability tokens) exact enough.
    uniform = torch.rand(logits_blv.shape, generator=generator, dtype=torch.float64, device=logits_blv.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min_(torch.finfo(torch.float64).tiny)))
    return (logits_blv.double() / temperature + gumbel).argmax(dim=-1)


def fill_after_first_eos(completion_bg: Tensor, eos_id: int) -> Tensor:
    """Copy of ``completion_bg`` with every position after the first EOS of its row set to EOS."""
    is_eos_bg = completion_bg == eos_id
    after_first_eos_bg = (is_eos_bg.cumsum(dim=1) - is_eos_bg.long()) > 0
    return completion_bg.masked_fill(after_first_eos_bg, eos_id)


def decode_masked(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings,
                  generator: torch.Generator | None = None, forward: BlockForward | None = None) -> Decoded:
    """The masked processes' decoding loop behind ``dipod.lm.sampler.decode`` (arguments as there; inputs
    already checked). ``forward`` defaults to ``block_forward(lm, settings.kv_cache)``."""
    settings = settings.resolved(family_sampler_defaults(lm))
    rule = REVEAL_RULES[settings.remasking]
    batch, prompt_len = prompt_ids.shape
    mask_id, device = lm.mask_id, prompt_ids.device
    ids_bt = torch.cat([prompt_ids, torch.full((batch, settings.gen_length), mask_id, dtype=torch.long,
                                               device=device)], dim=1)
    attn_bt = torch.cat([prompt_attn.long(), torch.ones((batch, settings.gen_length), dtype=torch.long,
                                                        device=device)], dim=1)
    order_bg = torch.full((batch, settings.gen_length), -1, dtype=torch.long, device=device)
    forward = forward if forward is not None else block_forward(lm, settings.kv_cache)

    step = 0
    with eval_mode(lm.model), (torch.no_grad() if _sharded(lm.model) else torch.inference_mode()):
        for start, end in settings.blocks():
            lo, hi = prompt_len + start, prompt_len + end
            count = settings.count_rule(end - start)
            block_step = 0
            while (masked_bl := ids_bt[:, lo:hi] == mask_id).any():
                logits_blv = _guided_block_logits(forward, mask_id, ids_bt, attn_bt, prompt_attn, lo, hi,
                                                  settings.cfg_scale, new_block=block_step == 0)
                logits_blv = filter_logits(logits_blv, settings.temperature, settings.top_k, settings.top_p)
                tokens_bl = _propose(logits_blv, settings.temperature, generator)
                score_bl = rule.score(logits_blv, tokens_bl, settings.temperature, generator)
                score_bl = score_bl.masked_fill(~masked_bl, float("-inf"))
                reveal_bl = top_k_mask(score_bl, count(block_step, masked_bl, score_bl))
                ids_bt[:, lo:hi] = torch.where(reveal_bl, tokens_bl, ids_bt[:, lo:hi])
                order_bg[:, start:end].masked_fill_(reveal_bl, step)
                step += 1
                block_step += 1

    completion_bg = ids_bt[:, prompt_len:]
    if settings.fill_after_eos:
        completion_bg = fill_after_first_eos(completion_bg, lm.eos_id)
    return Decoded(completion_bg=completion_bg, order_bg=order_bg, forward_passes=step)


def _sharded(model: torch.nn.Module) -> bool:
    """Weights sharded by DeepSpeed ZeRO-3 (``ds_id``) or FSDP2 (DTensor). Their engine gathers them in
    the forward into buffers it reuses; gathered under inference_mode those could never take part in
    a backward again, so such a model samples under no_grad."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())
