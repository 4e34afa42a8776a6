"""DiffusionGemma (``transformers.models.diffusion_gemma``): a tiny faithful snapshot, decoding, and its ELBO.

DiffusionGemma is block diffusion with uniform noise: a causal encoder reads the prompt (and the
finished blocks) into a cache, and a bidirectional decoder denoises a canvas of
``config.canvas_length`` tokens that starts as uniformly random tokens. It runs on transformers'
own classes (no remote code); what dipod adds:

- ``build_tiny_diffusion_gemma(out_dir)``: transformers' ``DiffusionGemmaConfig`` /
  ``DiffusionGemmaForBlockDiffusion`` at a tiny size with random weights (the vision tower
  included, at its smallest) and our character tokenizer, saved with ``save_pretrained``:
  the snapshot the tests and ``benchmarks/build_tiny_diffusion_gemma.py`` use;
- ``decode``: the model's own entropy-bounded sampler (``model.generate``) or ours (ancestral
  sampling of the ELBO's process), behind ``dipod.lm.sampler.decode`` so ``lm eval / generate``
  and RL rollouts use them (``--uniform_sampler own | ancestral``), through the uniform process
  (``dipod.lm.processes.uniform``);
- ``compute_uniform_proxies``: the ELBO of the uniform-noise process per draw (``uniform_noise``;
  derivation in docs/lm_proxies.md), summed over canvas blocks, each conditioned on the clean
  prompt and earlier blocks, behind ``dipod.lm.proxies.compute_proxies`` (the same process).

Not provided: an EUBO for uniform noise (SPG needs ``spg_negative_proxy elbo``), d1's mean-field
log-probs, the KV cache and our masked sampler (DiffusionGemma has no mask token).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from dipod.config import ConfigError
from dipod.lm import uniform_noise
from dipod.lm.estimators import ESTIMATORS
from dipod.lm.model import eval_mode
from dipod.lm.processes.base import Decoded, Proxies

NOISE_STEPS = 32  # T of the ELBO's discrete process (alpha_t = 1 - t/T); docs/lm_proxies.md
SCHEDULE_WIDTH = 0.4  # t_max - t_min of the sampler's temperature schedule (its defaults: 0.4 -> 0.8)


def build_tiny_diffusion_gemma(out_dir: str | os.PathLike, *, canvas_length: int = 8, seed: int = 0) -> Path:
    """A tiny DiffusionGemma (about 0.16 M parameters) with our character tokenizer, saved to ``out_dir``."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    from dipod.lm.model import MaskedDiffusionLM, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    vocab = 128  # >= the tokenizer's ~100 ids; the image ids below sit above them, unused by text
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
        num_experts=4, top_k_experts=2, moe_intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                                  boi_token_id=vocab - 3, eoi_token_id=vocab - 2, image_token_id=vocab - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    lm = MaskedDiffusionLM(model=model, tokenizer=tokenizer, mask_id=-1, pad_id=tokenizer.pad_token_id,
                           eos_id=tokenizer.eos_token_id, source="tiny-diffusion-gemma")
    return lm.save_pretrained(out_dir)


def _row_groups(prompt_attn: Tensor):
    """Rows with the same padding pattern, and their real columns: each group runs without padding."""
    patterns, group = torch.unique(prompt_attn.bool(), dim=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        yield (group == g).nonzero().squeeze(1), pattern.nonzero().squeeze(1)


def decode(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator: torch.Generator | None = None):
    """Completions ``[B, gen_length]`` by ``settings.uniform_sampler``: the model's own or ours (ancestral)."""
    canvas = lm.model.config.canvas_length
    if settings.gen_length % canvas:
        raise ValueError(f"gen_length={settings.gen_length} must be a multiple of DiffusionGemma's canvas_length="
                         f"{canvas}")
    own = settings.uniform_sampler == "own"
    return (decode_own if own else decode_ancestral)(lm, prompt_ids, prompt_attn, settings, generator)


def decode_ancestral(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator: torch.Generator | None = None):
    """dipod's sampler: per canvas, ``x_T`` uniform, then ``x_{t-1} ~ p(x_{t-1} | x_t)`` for ``t = T .. 2`` and
    ``x_0 ~ p(x_0 | x_1)``, with ``T = steps`` and the ELBO's linear schedule: the generative model whose
    ELBO the proxies compute. ``temperature`` divides the denoiser's logits (0: its argmax, one-hot)."""
    model = lm.model
    canvas, vocab = model.config.canvas_length, model.config.text_config.vocab_size
    alphas = uniform_noise.linear_alphas(settings.steps)
    device = prompt_ids.device
    completion = torch.empty((prompt_ids.shape[0], settings.gen_length), dtype=torch.long, device=device)
    passes = 0

    def denoise(logits_ncv: Tensor) -> Tensor:
        if settings.temperature == 0:
            return torch.nn.functional.one_hot(logits_ncv.argmax(-1), vocab).double()
        return torch.softmax(logits_ncv.double() / settings.temperature, dim=-1)

    def draw(probs_ncv: Tensor) -> Tensor:
        flat = torch.multinomial(probs_ncv.reshape(-1, vocab).float().cpu(), 1, generator=generator)
        return flat.view(probs_ncv.shape[:-1]).to(device)

    with eval_mode(model), torch.inference_mode():
        for rows, cols in _row_groups(prompt_attn):
            seq = prompt_ids[rows][:, cols]
            for start in range(0, settings.gen_length, canvas):
                x = torch.randint(0, vocab, (len(rows), canvas), generator=generator).to(device)
                for t in range(settings.steps, 0, -1):
                    p0 = denoise(model(input_ids=seq, decoder_input_ids=x).logits.float())
                    x = draw(uniform_noise.reverse(p0, x, alphas, t) if t > 1 else p0)
                seq = torch.cat([seq, x], dim=1)
                passes += settings.steps
            completion[rows] = seq[:, len(cols):]
    return Decoded(completion_bg=completion, order_bg=torch.zeros_like(completion), forward_passes=passes)


def decode_own(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings, generator: torch.Generator | None = None):
    """Completions ``[B, gen_length]`` by the model's own sampler; ``steps`` caps its denoising steps per canvas.

    ``temperature`` is the end of its linear temperature schedule (``t_min``; 0 means 1e-4, the
    schedule divides by it) and the schedule keeps its default width: ``t_max = t_min + 0.4`` (the
    defaults are 0.4 -> 0.8). Rows are decoded without their padding, grouped by prompt length;
    randomness is seeded from ``generator`` (the global RNG is restored after).
    """
    model = lm.model
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    t_min = max(settings.temperature, 1e-4)
    completion = torch.full((prompt_ids.shape[0], settings.gen_length), lm.pad_id, dtype=torch.long,
                            device=prompt_ids.device)
    passes = 0
    with eval_mode(model), torch.inference_mode(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for rows, cols in _row_groups(prompt_attn):
            out = model.generate(prompt_ids[rows][:, cols], max_new_tokens=settings.gen_length,
                                 max_denoising_steps=settings.steps, t_min=t_min, t_max=t_min + SCHEDULE_WIDTH,
                                 pad_token_id=lm.pad_id, eos_token_id=lm.eos_id)
            new = out.sequences[:, len(cols):len(cols) + settings.gen_length]
            completion[rows, :new.shape[1]] = new
            # tokens_per_forward = generated tokens / decoder passes, per row: the most passes any row took
            per_forward = out.tokens_per_forward.float().clamp_min(1e-9)
            passes += int(torch.ceil(new.shape[1] / per_forward).max())
    order = torch.zeros_like(completion)  # the sampler reveals no fixed order: every position may change
    return Decoded(completion_bg=completion, order_bg=order, forward_passes=passes)


def block_elbo_terms(model, prefix_ids: Tensor, block_x0: Tensor, draws: int, alphas: Tensor,
                     generator: torch.Generator) -> Tensor:
    """``T * elbo_term`` of one canvas block for ``draws`` noisy copies: ``[B, draws]`` (float32, differentiable).

    ``prefix_ids`` [B, P]: the clean prompt and earlier blocks (no padding); ``block_x0`` [B, C].
    """
    batch, canvas = block_x0.shape
    steps = len(alphas) - 1
    vocab = model.config.text_config.vocab_size
    t_bk = torch.randint(1, steps + 1, (batch, draws), generator=generator)
    x0_nc = block_x0[:, None].expand(-1, draws, -1).reshape(-1, canvas)
    t_n = t_bk.reshape(-1)
    keep = torch.rand(x0_nc.shape, generator=generator) < alphas[t_n].float()[:, None]
    uniform = torch.randint(0, vocab, x0_nc.shape, generator=generator)
    xt_nc = torch.where(keep.to(x0_nc.device), x0_nc, uniform.to(x0_nc.device))
    prefix = prefix_ids[:, None].expand(-1, draws, -1).reshape(-1, prefix_ids.shape[1])
    logits = model(input_ids=prefix, decoder_input_ids=xt_nc).logits  # float32, softcapped: [B*K, C, V]
    logp0 = torch.log_softmax(logits.float(), dim=-1)
    terms = torch.zeros(batch * draws, dtype=logp0.dtype, device=logp0.device)
    for t in t_n.unique().tolist():
        rows = (t_n == t).nonzero().squeeze(1).to(logp0.device)
        terms[rows] = steps * uniform_noise.elbo_term(logp0[rows], x0_nc[rows], xt_nc[rows], alphas, t)
    return terms.view(batch, draws)


def compute_uniform_proxies(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings,
                            seed: int):
    """``Proxies`` of DiffusionGemma: the uniform-noise ELBO per draw, summed over canvas blocks.

    Every completion token is scored (the model's canvases are fixed-size; EOS and what follows are
    part of the canvas it produced). ``eubo_n`` is NaN: no EUBO is derived for uniform noise.
    """
    model = lm.model
    canvas = model.config.canvas_length
    batch, gen_length = completion_ids.shape
    if gen_length % canvas:
        raise ValueError(f"completion length {gen_length} must be a multiple of canvas_length={canvas}")
    alphas = uniform_noise.linear_alphas(NOISE_STEPS)
    generator = torch.Generator().manual_seed(int(seed))
    elbo_nk = None
    for rows, cols in _row_groups(prompt_attn):
        prompt = prompt_ids[rows][:, cols]
        total = 0.0
        for start in range(0, gen_length, canvas):
            prefix = torch.cat([prompt, completion_ids[rows, :start]], dim=1)
            total = total + block_elbo_terms(model, prefix, completion_ids[rows, start:start + canvas],
                                             settings.num_draws, alphas, generator)
        if elbo_nk is None:
            elbo_nk = total.new_zeros(batch, settings.num_draws)
        elbo_nk = elbo_nk.index_put((rows.to(total.device),), total)
    elbo_n = elbo_nk.mean(1)
    lengths_n = torch.full((batch,), float(gen_length), device=elbo_n.device)
    return Proxies(elbo_nk=elbo_nk, elbo_n=elbo_n, elbo_per_token_n=elbo_n / gen_length,
                   eubo_n=torch.full_like(elbo_n, float("nan")),
                   completion_mask_nl=torch.ones(batch, gen_length, device=elbo_n.device), lengths_n=lengths_n)


def check_estimator(cfg) -> None:
    """A ``TrainConfig`` whose estimator reads only the ELBO (this process has no EUBO, no mean-field log-probs)."""
    missing = sorted(set(ESTIMATORS[cfg.estimator].reads(cfg.estimator_options())) - {"elbo_nk", "elbo_n"})
    if missing:
        raise ConfigError(f"estimator {cfg.estimator!r} reads {missing}, which DiffusionGemma's uniform-noise process "
                          "does not provide (only its ELBO is derived); use fpo, fpo++, or spg with "
                          "--spg_negative_proxy elbo")
