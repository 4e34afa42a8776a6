"""The trainer's side of the engine contracts (docs/design.md): settings built from a TrainConfig,
prompt encoding, completion decoding, model loading and saving.

Everything the RL loop needs from dipod.lm.model / proxies / sampler / tasks goes through here, so
``trainer.py`` reads as the algorithm and this file as the wiring.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from dipod.lm.processes.registry import process_of
from dipod.lm.sampler import SamplerSettings
from dipod.lm.sampler import generate as _sample
from dipod.lm.train_config import TrainConfig


def get_task(name: str):
    from dipod.lm.tasks import get_task as _get_task

    return _get_task(name)


def compute_proxies(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, seed: int,
                    meanfield: bool = False):
    from dipod.lm.proxies import compute_proxies as _compute

    return _compute(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, meanfield=meanfield)


def gap_lower_bound(lm, prompt_ids: Tensor, prompt_attn: Tensor, completion_ids: Tensor, settings, num_orders: int,
                    seed: int) -> Tensor:
    from dipod.lm.proxies import gap_lower_bound as _gap

    return _gap(lm, prompt_ids, prompt_attn, completion_ids, settings, num_orders, seed)


def proxy_settings(cfg: TrainConfig):
    from dipod.lm.proxies import ProxySettings

    return ProxySettings(num_draws=cfg.num_draws, masking=cfg.masking, min_t=cfg.min_t, max_t=cfg.max_t,
                         block_length=cfg.block_length, p_mask_prompt=cfg.p_mask_prompt,
                         eubo_beta=cfg.eubo_beta_value(), max_tokens_per_forward=cfg.max_tokens_per_forward)


def generate(lm, prompt_ids: Tensor, prompt_attn: Tensor, settings: SamplerSettings, generator) -> Tensor:
    # The sampler runs under inference_mode; a clone makes the ids usable in autograd forwards.
    return _sample(lm, prompt_ids, prompt_attn, settings, generator=generator).clone()


def reward_table(task, weights: list[float] | None) -> tuple[list[str], list, Tensor]:
    """``(names, functions, weights [F])`` of the task's reward functions, weights overridable."""
    table = task.reward_functions
    names = list(table)
    functions = [table[n][0] if isinstance(table[n], tuple) else table[n] for n in names]
    default = [float(table[n][1]) if isinstance(table[n], tuple) else 1.0 for n in names]
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"reward_weights has {len(weights)} values but task {task.name} has {len(names)} reward "
                         f"functions {names}; give one weight per function in that order")
    return names, functions, torch.tensor(weights if weights is not None else default, dtype=torch.float32)


def encode_prompts(lm, texts: list[str], max_prompt_length: int, chat: bool,
                   response_prefix: str = "") -> tuple[Tensor, Tensor]:
    """Left-padded ``(prompt_ids [B, P], prompt_attn [B, P])``; over-long prompts lose their start.
    With `chat`, each text is a user turn under the chat template, followed by `response_prefix`
    (the start of the assistant's reply, e.g. the d1 evaluation's "<reasoning>")."""
    tok = lm.tokenizer
    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                 + response_prefix for t in texts]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(len(r) > max_prompt_length for r in rows):
        warnings.warn(f"some prompts exceed max_prompt_length={max_prompt_length} tokens and were cut from the left",
                      stacklevel=2)
        rows = [r[-max_prompt_length:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # tokenisation is per string anyway; this loop is not on the hot path
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attn[i, width - len(r):] = 1
    return ids, attn


def decode_completions(lm, completion_ids: Tensor) -> list[str]:
    """Text of each completion up to (not including) its first EOS or end-of-turn token.

    Chat models end a turn before EOS (LLaDA writes ``<|eot_id|><|endoftext|>``); whatever a model
    writes after its turn ended is not part of the answer the graders read.
    """
    ids = completion_ids.cpu()
    stop_ids = [i for i in (lm.eos_id, getattr(lm, "eot_id", None)) if i is not None]
    if stop_ids:
        is_stop = torch.isin(ids, torch.tensor(stop_ids))
        ids = ids.masked_fill(is_stop.cumsum(dim=1) > 0, lm.pad_id)
    return lm.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)


def load_policy(cfg: TrainConfig, device):
    from dipod.lm.model import LoraSettings, load_masked_lm

    lora = None
    if cfg.lora_r > 0:
        targets = {"target_modules": tuple(cfg.lora_target_modules)} if cfg.lora_target_modules else {}
        lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, **targets)
    lm = load_masked_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                        mask_token_id=cfg.mask_token_id, model_family=cfg.model_family, lora=lora,
                        gradient_checkpointing=cfg.gradient_checkpointing,
                        device=device, load_in_4bit=cfg.load_in_4bit)
    process_of(lm).check_estimator(cfg)  # e.g. DiffusionGemma's process has no EUBO
    lm.model.train()
    return lm


def load_reference(cfg: TrainConfig, device):
    """A frozen copy of the initial policy (for d1's KL term)."""
    from dipod.lm.model import load_masked_lm

    ref = load_masked_lm(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                         mask_token_id=cfg.mask_token_id, model_family=cfg.model_family, device=device,
                         load_in_4bit=cfg.load_in_4bit)
    ref.model.eval().requires_grad_(False)
    return ref
