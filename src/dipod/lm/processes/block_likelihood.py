r"""The likelihood proxies of a block-causal masked model (SDAR / TraDo, LLaDA2.x): the per-block ELBO.

A block-causal model factorises over its blocks, ``log pi(x) = sum_b log pi(x_b | x_<b)``, and each
factor is a masked-diffusion model of one block given the clean earlier blocks, so the sequence ELBO
is the sum of the block ELBOs (EBPO in DARE; the SDAR / dFactory training loss is the same quantity):

* Blocks are the model's (``block_size`` positions from each row's first real token); the prompt's
  last block is shared with the first completion tokens. Live tokens: the completion through its
  first EOS (``L_n``); positions after it are masked in every copy and never scored; the prompt is
  never masked.
* Per draw and per block ``b`` with ``L_b`` live tokens: ``t_b = min_t + (max_t - min_t) u_b``,
  ``m_b = clamp(ceil(t_b L_b), 1, L_b)`` of its live tokens masked (a uniform subset; at least one,
  as EBPO asks), weight ``L_b / m_b``. With ``t ~ U[0, 1)`` every draw is an unbiased estimate of
  ``sum_b E_sigma[log p_sigma(x_b | x_<b)]`` (the any-order ELBO of each block), which is at most
  ``sum_b log E_sigma[p_sigma(x_b | x_<b)]`` (Jensen): tests/test_lm_block_likelihood.py enumerates it.
* ``ELBO_nk = sum_b (L_b / m_b) sum_{l in b masked} log p(x_l | noisy block b, clean blocks < b)``.
* All blocks of a draw go through ONE forward over ``[clean sequence | noisy sequence]`` (the
  position ids twice) under the block-diffusion mask: a clean query sees the clean keys of its own
  and earlier blocks; a noisy query sees the noisy keys of its own block and the clean keys of the
  earlier blocks. ``B x K`` rows of length ``2 (P + G)``, chunked to ``max_tokens_per_forward``.
* EUBO: SPG's surrogate with each token weighted by its block's ``L_b / m_b``.
* With one block holding the whole sequence this is ``masked_likelihood``'s ``unbiased_random``
  process on a bidirectional model (tested). ``ProxySettings.masking`` / ``block_length`` describe the
  full-sequence processes and do not apply; ``p_mask_prompt`` must be 0; no mean-field copy (d1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipod.lm.networks.transformer import row_positions
from dipod.lm.processes.base import Proxies
from dipod.lm.processes.masked_likelihood import completion_mask, eubo_surrogate


def completion_blocks(prompt_attn: Tensor, gen_length: int, block: int) -> Tensor:
    """``[B, G]``: the model block of each completion position, counted from the row's first real token."""
    attn_bt = torch.cat([prompt_attn.long(), torch.ones(prompt_attn.shape[0], gen_length, dtype=torch.long,
                                                        device=prompt_attn.device)], dim=1)
    return row_positions(attn_bt)[:, prompt_attn.shape[1]:] // block


def draw_block_masks(block_nl: Tensor, live_nl: Tensor, settings, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(masked_nkl, weight_nkl)`` of ``settings.num_draws`` draws (CPU): per block a noise level and a uniform
    subset of its live tokens, at least one; ``weight_nkl`` is ``L_b / m_b`` on every position of block ``b``.
    Consumes ``u [B, K, blocks]`` then ``scores [B, K, G]`` from ``generator``."""
    block_nl, live_nl = block_nl.cpu(), live_nl.bool().cpu()
    first_nl = block_nl - block_nl[:, :1]  # 0 for the first completion block
    batch, gen_length = live_nl.shape
    blocks = int(first_nl.max()) + 1
    u_nkj = torch.rand(batch, settings.num_draws, blocks, generator=generator)
    scores_nkl = torch.rand(batch, settings.num_draws, gen_length, generator=generator)
    onehot_nlj = torch.nn.functional.one_hot(first_nl, blocks).float() * live_nl[..., None]
    live_per_block_nj = onehot_nlj.sum(1)
    t_nkj = settings.min_t + (settings.max_t - settings.min_t) * u_nkj
    count_nkj = torch.minimum(torch.ceil(t_nkj * live_per_block_nj[:, None]).clamp_min(1), live_per_block_nj[:, None])
    # rank of each live token among the live tokens of its block (a uniform random order): sort by block, then
    # score (later positions after every live one), and subtract the live tokens of the earlier blocks
    keys_nkl = torch.where(live_nl[:, None], first_nl[:, None].float(), float(blocks)) + scores_nkl
    earlier_nj = live_per_block_nj.cumsum(1) - live_per_block_nj
    rank_nkl = keys_nkl.argsort(-1).argsort(-1) - earlier_nj.gather(1, first_nl)[:, None].long()
    count_nkl = count_nkj.gather(2, first_nl[:, None].expand(-1, settings.num_draws, -1))
    masked_nkl = live_nl[:, None] & (rank_nkl < count_nkl)
    live_nkl = live_per_block_nj.gather(1, first_nl)[:, None].expand_as(count_nkl)
    weight_nkl = torch.where(masked_nkl, live_nkl / count_nkl.clamp_min(1), 0.0)
    return masked_nkl | ~live_nl[:, None], weight_nkl


def two_copy_mask(attn_bt: Tensor, block: int) -> Tensor:
    """Boolean ``[B, 1, 2T, 2T]`` over ``[clean | noisy]`` copies of a sequence (module docstring)."""
    block_bt = row_positions(attn_bt) // block
    real_b1t = (attn_bt != 0)[:, None, :]
    query_bq1, key_b1k = block_bt[:, :, None], block_bt[:, None, :]
    clean_to_clean = (key_b1k <= query_bq1) & real_b1t
    noisy_to_clean = (key_b1k < query_bq1) & real_b1t
    noisy_to_noisy = (key_b1k == query_bq1) & real_b1t
    top = torch.cat([clean_to_clean, torch.zeros_like(clean_to_clean)], dim=2)
    bottom = torch.cat([noisy_to_clean, noisy_to_noisy], dim=2)
    return torch.cat([top, bottom], dim=1)[:, None]


def noisy_log_probs(model, prompt_ids: Tensor, prompt_attn: Tensor, noisy_rl: Tensor, targets_rl: Tensor,
                    block: int, max_tokens_per_forward: int | None) -> Tensor:
    """float32 ``log p(targets | clean earlier blocks, noisy own block)`` ``[R, G]``, one two-copy forward per chunk.

    ``model`` is our network (possibly wrapped by PEFT / DDP): called with the two-copy mask."""
    rows, length = prompt_ids.shape[0], prompt_ids.shape[1] + targets_rl.shape[1]
    chunk = rows if max_tokens_per_forward is None else max(1, max_tokens_per_forward // (2 * length))
    out = []
    for lo in range(0, rows, chunk):
        part = slice(lo, lo + chunk)
        logits_rlv = two_copy_logits(model, prompt_ids[part], prompt_attn[part], noisy_rl[part], targets_rl[part], block)
        target = targets_rl[part, :, None]
        out.append((logits_rlv.gather(-1, target) - logits_rlv.logsumexp(-1, keepdim=True)).squeeze(-1))
    return torch.cat(out, dim=0)


def two_copy_logits(model, prompt_ids: Tensor, prompt_attn: Tensor, noisy_rl: Tensor, targets_rl: Tensor,
                    block: int) -> Tensor:
    """float32 logits ``[R, G, V]`` of the noisy completion, each block seeing itself noisy and the earlier
    blocks clean (``targets_rl``): one forward over ``[clean | noisy]`` under ``two_copy_mask``."""
    prompt_len = prompt_ids.shape[1]
    clean_rt = torch.cat([prompt_ids, targets_rl], dim=1)
    noisy_rt = torch.cat([prompt_ids, noisy_rl], dim=1)
    attn_rt = torch.cat([prompt_attn.long(), torch.ones_like(targets_rl)], dim=1)
    positions_rt = row_positions(attn_rt)
    return model(torch.cat([clean_rt, noisy_rt], dim=1), None, torch.cat([positions_rt, positions_rt], dim=1),
                 first=clean_rt.shape[1] + prompt_len, mask=two_copy_mask(attn_rt, block)).float()


def score_block_draw(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, masked_nkl: Tensor,
                     weight_nkl: Tensor, settings, block: int) -> Proxies:
    """The proxies of given draws (``draw_block_masks``' output, or masks a test enumerates)."""
    batch, gen_length = completion_ids.shape
    draws = masked_nkl.shape[1]
    device = completion_ids.device
    live_nl = completion_mask(completion_ids, lm.eos_id, include_eos=True)
    masked_nkl, weight_nkl = masked_nkl.to(device), weight_nkl.to(device)
    noisy_nkl = completion_ids[:, None].expand(-1, draws, -1).masked_fill(masked_nkl, lm.mask_id)
    logp_nkl = noisy_log_probs(
        lm.model, prompt_ids[:, None].expand(-1, draws, -1).flatten(0, 1),
        prompt_attn[:, None].expand(-1, draws, -1).flatten(0, 1), noisy_nkl.flatten(0, 1),
        completion_ids[:, None].expand(-1, draws, -1).flatten(0, 1), block,
        settings.max_tokens_per_forward).view(batch, draws, gen_length)
    scored_nkl = masked_nkl & live_nl.bool()[:, None]
    elbo_nk = torch.where(scored_nkl, weight_nkl * logp_nkl, 0.0).sum(-1)
    elbo_n = elbo_nk.mean(1)
    lengths_n = live_nl.sum(1)
    return Proxies(elbo_nk=elbo_nk, elbo_n=elbo_n, elbo_per_token_n=elbo_n / lengths_n.clamp_min(1.0),
                   eubo_n=eubo_surrogate(logp_nkl, scored_nkl, weight_nkl.clamp_min(1e-30), settings.eubo_beta,
                                         lengths_n),
                   completion_mask_nl=live_nl, lengths_n=lengths_n)


def block_proxies(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, seed: int,
                  block: int) -> Proxies:
    """The per-block ELBO, its EUBO surrogate and the rest of ``Proxies`` from one seeded draw."""
    if settings.p_mask_prompt:
        raise ValueError(f"p_mask_prompt={settings.p_mask_prompt}: the block-causal ELBO never masks the prompt "
                         "(earlier blocks are clean context); set p_mask_prompt 0")
    live_nl = completion_mask(completion_ids, lm.eos_id, include_eos=True)
    masked_nkl, weight_nkl = draw_block_masks(completion_blocks(prompt_attn, completion_ids.shape[1], block), live_nl,
                                              settings, torch.Generator().manual_seed(int(seed)))
    return score_block_draw(lm, prompt_ids, prompt_attn, completion_ids, masked_nkl, weight_nkl, settings, block)
