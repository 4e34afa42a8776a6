"""The block-causal masked process (SDAR / TraDo): attention is causal across blocks and bidirectional
inside one, so a block is denoised seeing only itself and the finished blocks before it.

Blocks are ``block_size`` positions counted from each row's first real token (the model's own
convention, ``config.json`` ``block_size``). The prompt's last block is shared with the first
generated tokens, as in SDAR's reference sampler (``block_diffusion_generate``): a prompt of ``L``
tokens is followed by ``(-L) % block_size`` masks that complete its block, then whole blocks of
masks, and the completion is the first ``gen_length`` tokens after the prompt.

Decoding (``decode``) runs the masked loop (``masked_sampling.decode_masked``) one model block at a
time. Rows of a batch have different prompt lengths, so their block boundaries differ; each row is
shifted (more left padding, which changes nothing for it) so that every row's boundaries fall on
the same columns: the window holding the prompts' last blocks then starts the canvas, with the
prompt tokens in it kept and its masks decoded. Later blocks cannot influence earlier ones, so
decoding past ``gen_length`` to the end of the last block changes no earlier token (and is what the
reference sampler does).

With ``kv_cache=prefix`` each window reads the finished blocks' keys and values from an exact prefix
cache (``dipod.lm.networks.block_cache``). The likelihood proxies are the per-block ELBO
(``block_likelihood``); the drift monitor reveals the blocks in turn, each in a random order.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from dipod.config import ConfigError
from dipod.lm.estimators import ESTIMATORS
from dipod.lm.networks import native_network
from dipod.lm.networks.block_cache import BlockCausalCachedForward
from dipod.lm.processes.base import BlockForward, Decoded, Proxies
from dipod.lm.processes.block_likelihood import block_proxies, completion_blocks, two_copy_logits
from dipod.lm.processes.masked import MaskedProcess
from dipod.lm.processes.masked_likelihood import masked_gap_lower_bound
from dipod.lm.processes.masked_sampling import decode_masked, family_sampler_defaults, fill_after_first_eos
from dipod.lm.processes.rank_sync import RankSynced, ranks_must_sync


def block_size_of(lm) -> int:
    """The model's block size (``NetworkSpec.block_size`` of our network, under any DDP / DeepSpeed / PEFT
    wrapper)."""
    spec = getattr(native_network(lm), "spec", None)
    if spec is None or spec.block_size is None:
        raise ValueError(f"{getattr(lm.family, 'name', 'this model')} is block-causal but its network records no "
                         "block size; load it into dipod's network (drop --trust_remote_code)")
    return spec.block_size


def aligned_layout(prompt_ids: Tensor, prompt_attn: Tensor, block: int, gen_length: int, mask_id: int,
                   pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(prefix_ids, prefix_attn, canvas, offset_n)``: prompts re-padded so that every row's block boundaries
    fall on the same columns; ``canvas`` starts with the window holding each prompt's last block (its prompt
    tokens kept, the rest masks) and runs whole blocks past ``gen_length``; row n's completion is
    ``canvas[n, offset_n : offset_n + gen_length]``."""
    batch = prompt_ids.shape[0]
    length_n = prompt_attn.long().sum(1)
    if bool((length_n == 0).any()):
        raise ValueError("a prompt has no tokens; block decoding starts from the prompt's last block")
    tail_n = (-length_n) % block  # masks that complete each prompt's last block
    width = int((length_n + tail_n).max())
    device = prompt_ids.device
    cols = torch.arange(width, device=device)
    start_n = width - tail_n - length_n
    is_prompt = (cols >= start_n[:, None]) & (cols < (width - tail_n)[:, None])
    real_idx = prompt_attn.shape[1] - length_n[:, None] + (cols - start_n[:, None])  # source column, where real
    taken = prompt_ids.gather(1, real_idx.clamp(0, prompt_ids.shape[1] - 1))
    aligned = torch.where(is_prompt, taken, torch.where(cols >= (width - tail_n)[:, None], mask_id, pad_id))
    canvas_length = block * -(-(block - int(tail_n.min()) + gen_length) // block)
    canvas = torch.cat([aligned[:, width - block:], torch.full((batch, canvas_length - block), mask_id,
                                                                dtype=torch.long, device=device)], dim=1)
    prefix_attn = is_prompt[:, :width - block].long()
    return aligned[:, :width - block], prefix_attn, canvas, block - tail_n


class BlockCausalProcess(MaskedProcess):
    name = "block_causal"

    def decode(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator=None,
               forward: BlockForward | None = None) -> Decoded:
        block = block_size_of(lm)
        settings = settings.resolved(family_sampler_defaults(lm))
        if settings.schedule != "blocks" or settings.block_length != block:
            raise ConfigError(f"{lm.family.name} decodes one model block at a time: set block_length={block} (its "
                              f"block size) and schedule=blocks (got block_length={settings.block_length}, "
                              f"schedule={settings.schedule})")
        if settings.kv_cache == "dual":
            raise ConfigError("kv_cache='dual' is the bidirectional Fast-dLLM cache; a block-causal model has an exact "
                              "one: kv_cache=prefix")
        synced = forward is None and ranks_must_sync(lm.model)
        if synced and settings.kv_cache != "prefix":
            raise ConfigError("with weights sharded over processes (ZeRO-3, FSDP) block decoding runs in lockstep "
                              "through the prefix cache: set kv_cache=prefix (the same tokens as without it)")
        if forward is None and settings.kv_cache == "prefix":
            network = native_network(lm)
            forward = BlockCausalCachedForward(network, uniform_passes=synced)
            if synced:
                forward = RankSynced(forward, network, prompt_ids.device)
                forward.start()
        prefix, prefix_attn, canvas, offset_n = aligned_layout(prompt_ids, prompt_attn, block, settings.gen_length,
                                                               lm.mask_id, lm.pad_id)
        inner = dataclasses.replace(settings, gen_length=canvas.shape[1], fill_after_eos=False,
                                    steps=settings.steps_per_block * (canvas.shape[1] // block))
        out = decode_masked(lm, prefix, prefix_attn, inner, generator, forward, canvas_bg=canvas)
        if synced:
            forward.finish()
        columns = offset_n[:, None] + torch.arange(settings.gen_length, device=canvas.device)
        completion_bg = out.completion_bg.gather(1, columns)
        if settings.fill_after_eos:
            completion_bg = fill_after_first_eos(completion_bg, lm.eos_id)
        return Decoded(completion_bg=completion_bg, order_bg=out.order_bg.gather(1, columns),
                       forward_passes=out.forward_passes, row_forwards=out.row_forwards, edits=out.edits)

    def proxies(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, seed: int,
                *, meanfield: bool = False) -> Proxies:
        if meanfield:
            raise ValueError(f"{lm.family.name} is block-causal: d1's mean-field log-probs are not defined for it; use "
                             "an estimator that reads the ELBO / EUBO (fpo, fpo++, spg)")
        return block_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, block_size_of(lm))

    def denoising_logits(self, lm, ids: Tensor, attn: Tensor, first: int, clean_completion: Tensor) -> Tensor:
        """Each completion block denoised seeing itself noisy and the earlier blocks clean, as decoding sees them
        (``two_copy_logits``; SDAR's training loss has the same context)."""
        return two_copy_logits(lm.model, ids[:, :first], attn[:, :first], ids[:, first:], clean_completion,
                               block_size_of(lm))

    def gap_lower_bound(self, lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings,
                        num_orders: int, seed: int) -> Tensor:
        """``IW_K - ELBO_K`` over orders that reveal the model's blocks in turn, each in a random order (the
        live tokens and tail of the per-block ELBO): ``log p_sigma(x) = sum_b log p_sigma(x_b | x_<b)``."""
        blocks_nl = completion_blocks(prompt_attn, completion_ids.shape[1], block_size_of(lm))
        return masked_gap_lower_bound(lm, prompt_ids, prompt_attn, completion_ids,
                                      dataclasses.replace(settings, masking="block_random"), num_orders, seed, blocks_nl)

    def check_estimator(self, cfg) -> None:
        if ESTIMATORS[cfg.estimator].needs_meanfield:
            raise ConfigError(f"estimator {cfg.estimator!r} reads d1's mean-field log-probs, which block-causal models "
                              "(SDAR, LLaDA2) do not define; use fpo, fpo++ or spg")
