r"""The exact likelihood of the left-to-right policy of a masked-diffusion LM (JustGRPO's), from packed forwards.

The left-to-right policy reveals one token per step, left to right: token ``t`` is drawn from the
model's prediction at position ``t`` of ``[prompt, y_<t, MASK x (G - t)]`` (``dipod.lm.sampler`` with
``left_to_right_settings``: block length 1, one step per token). Its log-likelihood is exact, no bound:

    log pi_LR(y) = sum_t log p(y_t | prompt, y_<t, MASK x (G - t)),

at the price of one forward per token (the release, LeapLabTHU/JustGRPO ``grpo.py``, runs them one
``t`` at a time). Here the ``B x G`` states are rows of one batch ``[B G, P + G]``, cut into chunks
of at most ``max_tokens_per_forward`` tokens, each chunk one forward that reads one position per row.
Under autograd every chunk of a multi-chunk call is checkpointed (``torch.utils.checkpoint``,
non-reentrant): the forward keeps only the chunk's log-probs and the chunk is recomputed in backward,
so an update holds one chunk's activations at a time whatever ``B x G`` (the release's backward per
token does the same with one forward per chunk). The logits are divided by the rollout temperature
and the mask token is excluded, as the sampler does, so these are the log-probs of the distribution
the rollouts were drawn from.

Shapes: ``prompt_ids``/``prompt_attn`` ``[B, P]`` (left-padded), ``completion_ids [B, G]``; rows ``r``
run sequence-major (``r = n G + t``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dipod.lm.proxies import Proxies, completion_mask
from dipod.lm.sampler import SamplerSettings


def left_to_right_settings(gen_length: int, temperature: float) -> SamplerSettings:
    """The sampler as JustGRPO's rollouts: one token per step, left to right (block length 1, steps =
    gen_length), full forwards, every sampled token kept (no fill after EOS: the scored tokens are the
    sampled ones)."""
    return SamplerSettings(gen_length=gen_length, block_length=1, steps=gen_length, temperature=temperature,
                           schedule="blocks", remasking="low_confidence", fill_after_eos=False)


def _chunk_log_probs(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, n_r: Tensor, t_r: Tensor,
                     temperature: float) -> Tensor:
    """``log p(y_t | prompt, y_<t, MASK...)`` ``[R]`` for the rows ``(n_r, t_r)``: one forward."""
    prompt_len, gen_length = prompt_ids.shape[1], completion_ids.shape[1]
    target_rl = completion_ids[n_r]
    positions_l = torch.arange(gen_length, device=completion_ids.device)
    state_rl = target_rl.masked_fill(positions_l[None] >= t_r[:, None], lm.mask_id)
    ids_rt = torch.cat([prompt_ids[n_r], state_rl], dim=1)
    attn_rt = torch.cat([prompt_attn[n_r], torch.ones_like(state_rl, dtype=prompt_attn.dtype)], dim=1)
    first = int(t_r.min())  # the head runs from the earliest position read in this chunk
    logits_rlv = lm.logits(ids_rt, attn_rt, first=prompt_len + first)
    logits_rv = logits_rlv[torch.arange(len(t_r), device=t_r.device), t_r - first] / temperature
    logits_rv = logits_rv.index_fill(-1, torch.tensor([lm.mask_id], device=logits_rv.device), float("-inf"))
    target_r = target_rl.gather(1, t_r[:, None]).squeeze(1)
    return logits_rv.log_softmax(-1).gather(-1, target_r[:, None]).squeeze(-1)


def left_to_right_log_probs(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor,
                            temperature: float = 1.0, max_tokens_per_forward: int | None = None) -> Tensor:
    """float32 ``[B, G]``: ``log p(y_t | prompt, y_<t, MASK x (G - t))`` at temperature ``temperature``.

    One forward per chunk of ``max(1, max_tokens_per_forward // (P + G))`` rows (all ``B G`` rows
    when None); chunks are checkpointed under autograd (module docstring).
    """
    if temperature <= 0:
        raise ValueError(f"left_to_right_log_probs: temperature={temperature} must be > 0 (the likelihood of a "
                         "greedy decoder is not defined)")
    batch, gen_length = completion_ids.shape
    device = completion_ids.device
    rows = batch * gen_length
    n_r = torch.arange(batch, device=device).repeat_interleave(gen_length)
    t_r = torch.arange(gen_length, device=device).repeat(batch)
    seq_len = prompt_ids.shape[1] + gen_length
    chunk = rows if max_tokens_per_forward is None else max(1, max_tokens_per_forward // seq_len)
    recompute = torch.is_grad_enabled() and chunk < rows
    out = []
    for start in range(0, rows, chunk):
        args = (lm, prompt_ids, prompt_attn, completion_ids, n_r[start:start + chunk], t_r[start:start + chunk],
                temperature)
        out.append(checkpoint(_chunk_log_probs, *args, use_reentrant=False) if recompute else _chunk_log_probs(*args))
    return torch.cat(out).view(batch, gen_length)


def left_to_right_proxies(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, temperature: float,
                          max_tokens_per_forward: int | None, bounds: Proxies | None = None) -> Proxies:
    """``bounds`` (or, without them, a ``Proxies`` holding no bound) with ``left_to_right_logp_nl`` filled;
    ``completion_mask_nl``/``lengths_n`` of a bound-free one count the tokens through the first EOS."""
    logp_nl = left_to_right_log_probs(lm, prompt_ids, prompt_attn, completion_ids, temperature, max_tokens_per_forward)
    if bounds is not None:
        bounds.left_to_right_logp_nl = logp_nl
        return bounds
    mask_nl = completion_mask(completion_ids, lm.eos_id)
    return Proxies(elbo_nk=None, elbo_n=None, elbo_per_token_n=None, eubo_n=None, completion_mask_nl=mask_nl,
                   lengths_n=mask_nl.sum(1), left_to_right_logp_nl=logp_nl)
