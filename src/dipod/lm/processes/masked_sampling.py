"""The masked processes' decoding loop (LLaDA's blocks, Dream's global schedule, threshold decoding)
and its small parts: the block forwards, guidance, top-k / top-p filtering, proposals, EOS filling.
What it does and its conventions: ``dipod.lm.sampler``'s docstring and docs/lm_sampler.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.config import ConfigError
from dipod.lm.active_rows import ActiveRows
from dipod.lm.model import eval_mode
from dipod.lm.processes.base import BlockForward, Decoded
from dipod.lm.processes.token_editing import TokenEditing
from dipod.lm.reveal import REVEAL_RULES, top_k_mask


def family_sampler_defaults(lm) -> dict:
    """The model family's ``sampler_defaults`` (empty for a model without a family)."""
    return dict(getattr(getattr(lm, "family", None), "sampler_defaults", None) or {})


def full_forward(lm) -> BlockForward:
    """The default block forward: the whole sequence through the model, logits of ``lo:hi`` kept."""

    def forward(x_bt: Tensor, attn_bt: Tensor, lo: int, hi: int, new_block: bool) -> Tensor:
        return lm.logits(x_bt, attn_bt, first=lo)[:, :hi - lo]

    forward.keep_rows = lambda keep_b: None  # stateless: rows may leave between any two calls
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
    """Float32 logits ``[B, hi - lo, V]`` of the current block (guided when ``cfg_scale > 0``), a fresh tensor."""
    if cfg_scale == 0.0:
        logits_blv = forward(ids_bt, attn_bt, lo, hi, new_block).float().clone()
    else:
        prompt_len = prompt_attn.shape[1]
        uncond_ids_bt = ids_bt.clone()
        uncond_ids_bt[:, :prompt_len] = ids_bt[:, :prompt_len].masked_fill(prompt_attn.bool(), mask_id)
        both_blv = forward(torch.cat([ids_bt, uncond_ids_bt]), torch.cat([attn_bt, attn_bt]), lo, hi, new_block)
        cond_blv, uncond_blv = both_blv.float().chunk(2)
        logits_blv = uncond_blv + (cfg_scale + 1.0) * (cond_blv - uncond_blv)
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


def _propose(logits_blv: Tensor, mask_id: int, temperature: float, generator: torch.Generator | None,
             rows: ActiveRows) -> Tensor:
    """A proposed non-mask token per position: the argmax at temperature 0, else a draw from
    ``softmax(logits / T)`` conditioned on not being the mask token (noise drawn for the whole batch)."""
    if temperature == 0.0:
        mask_logit_bl = logits_blv[..., mask_id].clone()
        logits_blv[..., mask_id] = float("-inf")  # in place and restored: no copy of the [B, L, V] logits
        tokens_bl = logits_blv.argmax(dim=-1)
        logits_blv[..., mask_id] = mask_logit_bl
        return tokens_bl
    # Gumbel-max: argmax(logits / T + G) is a draw from softmax(logits / T); float64 keeps the
    # noise's tails (and so the low-probability tokens) exact enough.
    uniform = rows.uniform_rows(logits_blv.shape, generator, logits_blv.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min_(torch.finfo(torch.float64).tiny)))
    noisy_blv = logits_blv.double() / temperature + gumbel
    noisy_blv[..., mask_id] = float("-inf")
    return noisy_blv.argmax(dim=-1)


def fill_after_first_eos(completion_bg: Tensor, eos_id: int) -> Tensor:
    """Copy of ``completion_bg`` with every position after the first EOS of its row set to EOS."""
    is_eos_bg = completion_bg == eos_id
    after_first_eos_bg = (is_eos_bg.cumsum(dim=1) - is_eos_bg.long()) > 0
    return completion_bg.masked_fill(after_first_eos_bg, eos_id)


def decode_masked(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings,
                  generator: torch.Generator | None = None, forward: BlockForward | None = None,
                  canvas_bg: Tensor | None = None) -> Decoded:
    """The masked processes' decoding loop behind ``dipod.lm.sampler.decode`` (arguments as there; inputs
    already checked). ``forward`` defaults to ``block_forward(lm, settings.kv_cache)``. ``canvas_bg``
    (default all masks) is the completion to start from: only its mask positions are decoded (the
    block-causal process puts a prompt's tail there)."""
    settings = settings.resolved(family_sampler_defaults(lm))
    rule = REVEAL_RULES[settings.remasking]
    batch, prompt_len = prompt_ids.shape
    mask_id, device = lm.mask_id, prompt_ids.device
    if canvas_bg is None:
        canvas_bg = torch.full((batch, settings.gen_length), mask_id, dtype=torch.long, device=device)
    ids_bt = torch.cat([prompt_ids, canvas_bg], dim=1)
    attn_bt = torch.cat([prompt_attn.long(), torch.ones((batch, settings.gen_length), dtype=torch.long,
                                                        device=device)], dim=1)
    order_bg = torch.full((batch, settings.gen_length), -1, dtype=torch.long, device=device)
    forward = forward if forward is not None else block_forward(lm, settings.kv_cache)
    if settings.stop_at_eos and lm.eos_id is None:
        raise ConfigError("stop_at_eos stops a row at its first EOS, but the model has no EOS token id; "
                          "set eos_token_id when loading it or leave stop_at_eos off")
    fresh_bg = canvas_bg == mask_id  # the positions this call decodes (a block-causal canvas starts with prompt)

    step = row_forwards = 0
    # Only a forward that declares keep_rows (ours do) may see the batch shrink within a block.
    rows = ActiveRows(batch, device, settings.compact_rows and hasattr(forward, "keep_rows"))
    editing = (None if settings.edit_threshold is None
               else TokenEditing(settings.edit_threshold, settings.max_post_steps, fresh_bg))
    with eval_mode(lm.model), (torch.no_grad() if _sharded(lm.model) else torch.inference_mode()):
        for start, end in settings.blocks():
            lo, hi = prompt_len + start, prompt_len + end
            count = settings.count_rule(end - start)
            block_step = 0
            rows.start_block(ids_bt[:, lo:hi] == mask_id)
            if editing is not None:
                editing.start_block(start, end)
            while True:
                masked_al = rows.select(ids_bt)[:, lo:hi] == mask_id
                if editing is None:
                    masked_al = rows.drop_finished(masked_al, forward)
                    live_a = masked_al.any(dim=1)
                else:  # a row whose masks are gone may still edit
                    masked_al = rows.drop_finished(masked_al, forward, editing.live(rows, masked_al))
                    live_a = editing.live(rows, masked_al)
                if not live_a.any():
                    break
                ids_at = rows.select(ids_bt)
                logits_alv = _guided_block_logits(forward, mask_id, ids_at, rows.select(attn_bt),
                                                  rows.select(prompt_attn), lo, hi, settings.cfg_scale,
                                                  new_block=block_step == 0)
                if not settings.mask_in_confidence:
                    logits_alv[..., mask_id] = float("-inf")
                logits_alv = filter_logits(logits_alv, settings.temperature, settings.top_k, settings.top_p)
                tokens_al = _propose(logits_alv, mask_id, settings.temperature, generator, rows)
                score_al = rule.score(logits_alv, tokens_al, settings.temperature, generator)
                masked_score_al = score_al.masked_fill(~masked_al, float("-inf"))
                if masked_al.any():  # never more than the masks left (a canvas may start a block with fewer)
                    reveal_al = top_k_mask(masked_score_al, torch.minimum(
                        count(block_step, masked_al, masked_score_al), masked_al.sum(1)))
                else:  # only edits are left in this block (count rules know only the block's reveal steps)
                    reveal_al = torch.zeros_like(masked_al)
                write_al = reveal_al
                if editing is not None:
                    write_al = reveal_al | editing.step(rows, live_a, masked_al, ids_at[:, lo:hi], tokens_al, score_al,
                                                        start, end)
                rows.put(ids_bt, lo, hi, torch.where(write_al, tokens_al, ids_at[:, lo:hi]))
                rows.put(order_bg, start, end, rows.select(order_bg)[:, start:end].masked_fill(reveal_al, step))
                if settings.stop_at_eos:
                    _stop_ended_rows(ids_bt, rows, prompt_len, fresh_bg, mask_id, lm.eos_id)
                row_forwards += ids_at.shape[0]
                step += 1
                block_step += 1

    completion_bg = ids_bt[:, prompt_len:]
    if settings.fill_after_eos:
        completion_bg = fill_after_first_eos(completion_bg, lm.eos_id)
    return Decoded(completion_bg=completion_bg, order_bg=order_bg, forward_passes=step, row_forwards=row_forwards,
                   edits=0 if editing is None else editing.edits)


def _stop_ended_rows(ids_bt: Tensor, rows: ActiveRows, prompt_len: int, fresh_bg: Tensor, mask_id: int,
                     eos_id: int) -> None:
    """``stop_at_eos``: the active rows whose completion has ended (an EOS this call revealed, every position
    before it revealed) get EOS in their remaining masks, so they leave the forwards from the next step on.
    The revealed tokens never change, so with ``fill_after_eos`` the result is the one decoding on would give."""
    completion_ag = rows.select(ids_bt)[:, prompt_len:]
    masked_ag = completion_ag == mask_id
    revealed_before_ag = masked_ag.cumsum(dim=1) == 0  # every position up to here revealed
    ended_a = (revealed_before_ag & (completion_ag == eos_id) & rows.select(fresh_bg)).any(dim=1) & masked_ag.any(1)
    if bool(ended_a.any()):
        index_e = rows.index_a[ended_a]
        ids_bt[index_e, prompt_len:] = completion_ag[ended_a].masked_fill(masked_ag[ended_a], eos_id)


def _sharded(model: torch.nn.Module) -> bool:
    """Weights sharded by DeepSpeed ZeRO-3 (``ds_id``) or FSDP2 (DTensor). Their engine gathers them in
    the forward into buffers it reuses; gathered under inference_mode those could never take part in
    a backward again, so such a model samples under no_grad."""
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())
