"""Masked-diffusion language models: load any Hugging Face mask predictor, or build the tiny one.

A mask predictor is any model whose forward ``model(input_ids=ids, attention_mask=attn).logits``
returns ``[B, T, V]`` logits over the full sequence with bidirectional attention (LLaDA, or a BERT-
style masked LM). ``load_masked_lm`` loads one from a hub id or a local directory, resolves the
mask / pad / EOS token ids, and optionally wraps it with LoRA adapters (``peft``).

``build_tiny_model`` creates the CPU default: a small ModernBERT masked LM (bidirectional, rotary
positions) from a config, plus a character-level tokenizer built with ``tokenizers``; both are
saved with ``save_pretrained`` so ``load_masked_lm(dir)`` loads them exactly like a hub checkpoint.
"""

from __future__ import annotations

import copy
import os
import shutil
import string
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PAD_TOKEN, MASK_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<mask>", "<eos>", "<unk>"
TINY_SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN, EOS_TOKEN, UNK_TOKEN)
# One token per character: digits, ASCII letters, punctuation (covers + - * / ( ) = , : < > .),
# space and newline. Anything else encodes as <unk>.
TINY_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass
class LoraSettings:
    """LoRA adapters through ``peft``. Defaults follow d1/SPG (r 128, alpha 64, dropout 0.05).

    ``target_modules``: module-name suffixes to adapt, or ``"all-linear"`` (every linear layer but
    the output head; works for any architecture). LLaDA: ``q_proj,k_proj,v_proj``.
    """

    r: int = 128
    alpha: float = 64.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraSettings: r={self.r} must be a positive integer (LoRA rank)")
        if self.alpha <= 0:
            raise ValueError(f"LoraSettings: alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings: dropout={self.dropout} must lie in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            # "q_proj,k_proj" from a command line becomes a tuple of names.
            self.target_modules = tuple(m.strip() for m in self.target_modules.split(",") if m.strip())
        if not self.target_modules:
            raise ValueError("LoraSettings: target_modules is empty; name module suffixes or use 'all-linear'")


@dataclass
class MaskedDiffusionLM:
    """A mask predictor with its tokenizer and the special-token ids the proxies and sampler need."""

    model: nn.Module
    tokenizer: Any
    mask_id: int
    pad_id: int
    eos_id: int
    source: str = field(default="")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: Tensor, attn: Tensor) -> Tensor:
        """float32 logits ``[B, T, V]`` of ``model(input_ids=ids, attention_mask=attn)``."""
        out = self.model(input_ids=ids, attention_mask=attn)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise ValueError(
                f"model {self.source!r} returned no .logits; dipod needs a mask predictor whose forward "
                "returns logits over the full sequence (e.g. LLaDA, or an AutoModelForMaskedLM)")
        return logits.float()

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write model + tokenizer to ``out_dir`` atomically (LoRA adapters are merged into a copy)."""
        out = Path(out_dir)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            old = out.with_name(f".{out.name}.old")
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a path.

    ``org/name`` whose ``org`` is a local folder (``runs/tiny``) is a missing path too: failing at
    once beats a slow, doomed hub lookup on an offline machine.
    """
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _resolve_special_id(tokenizer: Any, config: Any, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    if value is None:
        value = getattr(config, attr, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def load_masked_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    mask_token_id: int | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
) -> MaskedDiffusionLM:
    """Load a mask predictor and its tokenizer from a local directory or a hub id.

    A local directory is loaded with ``local_files_only=True`` (never touches the network).
    ``trust_remote_code`` is passed only as given (LLaDA needs ``True``). The mask id is
    ``mask_token_id`` if given, else the tokenizer's, else the config's; LLaDA's is 126336.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    name = os.fspath(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    local = os.path.isdir(os.path.expanduser(name))
    if not local and (_looks_like_path(name) or os.path.exists(name)):
        raise FileNotFoundError(
            f"model path {name!r} is not a directory; pass a directory written by save_pretrained "
            "(e.g. from `dipod lm sft` or build_tiny_model) or a hub id like 'GSAI-ML/LLaDA-8B-Instruct'")
    if local:
        name = os.path.expanduser(name)
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(
                f"model directory {name!r} has no config.json; point to a directory written by save_pretrained")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        try:
            model = AutoModelForMaskedLM.from_pretrained(name, config=config, dtype=torch_dtype, **kwargs)
        except ValueError:
            # Remote-code mask predictors such as LLaDA register only AutoModel.
            model = AutoModel.from_pretrained(name, config=config, dtype=torch_dtype, **kwargs)
    except OSError as err:
        where = "from local directory" if local else "(no such local directory; tried it as a hub id)"
        raise FileNotFoundError(
            f"could not load model {name!r} {where}: {err} Pass a local directory written by save_pretrained, "
            "or a hub id reachable from this machine (download it first when offline)") from err

    mask_id = mask_token_id if mask_token_id is not None else _resolve_special_id(tokenizer, config, "mask_token_id")
    if mask_id is None:
        raise ValueError(
            f"model {name!r} defines no mask token (neither tokenizer nor config has mask_token_id); "
            "pass --mask_token_id (LLaDA: 126336)")
    vocab_size = model.get_input_embeddings().weight.shape[0] if model.get_input_embeddings() is not None else None
    if mask_id < 0 or (vocab_size is not None and mask_id >= vocab_size):
        raise ValueError(f"mask_token_id={mask_id} is outside the vocabulary [0, {vocab_size}); fix --mask_token_id")
    eos_id = _resolve_special_id(tokenizer, config, "eos_token_id")
    if eos_id is None:
        raise ValueError(f"model {name!r} defines no EOS token; its tokenizer needs an eos_token")
    pad_id = _resolve_special_id(tokenizer, config, "pad_token_id")
    pad_id = eos_id if pad_id is None else pad_id

    model.to(device)
    if gradient_checkpointing:
        if getattr(model, "supports_gradient_checkpointing", False):
            # Non-reentrant checkpointing also works when only LoRA adapters require grad.
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            warnings.warn(f"model {name!r} does not support gradient checkpointing; continuing without it")
    if lora is not None:
        model = apply_lora(model, lora)
    return MaskedDiffusionLM(model=model, tokenizer=tokenizer, mask_id=mask_id, pad_id=pad_id,
                             eos_id=eos_id, source=name)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target_modules={targets!r} did not match the model ({err}); "
                         f"linear layers here are named {names}") from err


def build_tiny_tokenizer(max_length: int = 256):
    """Character-level tokenizer: ids 0..3 are <pad>, <mask>, <eos>, <unk>, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*TINY_SPECIAL_TOKENS, *TINY_ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    backend.decoder = decoders.Fuse()  # join characters back without separators
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, mask_token=MASK_TOKEN, eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False, model_max_length=max_length,
        padding_side="left")


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Create a tiny bidirectional ModernBERT masked LM + character tokenizer and save both to ``out_dir``.

    Defaults (about 0.7 M parameters) train quickly on a 2-core CPU. Every layer uses full
    (global) attention; positions are rotary, so there is no learned position table.
    """
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    for label, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                         ("intermediate_size", intermediate_size), ("max_positions", max_positions)):
        if value <= 0:
            raise ValueError(f"build_tiny_model: {label}={value} must be positive")
    tokenizer = build_tiny_tokenizer(max_positions)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_positions,
        layer_types=["full_attention"] * num_layers, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, cls_token_id=None, sep_token_id=None,
        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModernBertForMaskedLM(config)
    lm = MaskedDiffusionLM(model=model, tokenizer=tokenizer, mask_id=tokenizer.mask_token_id,
                           pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, source="tiny")
    return lm.save_pretrained(out_dir)
