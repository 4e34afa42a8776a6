"""Masked-diffusion language models: load LLaDA, Dream or a Hugging Face mask predictor, or build the tiny one.

A mask predictor returns ``[B, T, V]`` logits over the full sequence with bidirectional
attention. How to call it (attention input, shifted logits, checkpointing, saving) is its
family's business (dipod.lm.families); ``MaskedDiffusionLM.logits`` is the one path every caller
(sampler, proxies, SFT, drift monitor) takes, so a family's convention applies everywhere.
``load_masked_lm`` loads one from a hub id or a local directory, resolves the family and the
mask / pad / EOS / end-of-turn token ids, and optionally wraps it with LoRA adapters (``peft``).

``build_tiny_model`` creates the CPU default: a small ModernBERT masked LM (bidirectional, rotary
positions) from a config, plus a character-level tokenizer built with ``tokenizers``; both are
saved with ``save_pretrained`` so ``load_masked_lm(dir)`` loads them exactly like a hub checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dipod.lm.families import FAMILIES, ModelFamily, detect_family, get_family
from dipod.lm.snapshot import check_snapshot, check_tokenizer_fits, locate_model, read_config_dict
from dipod.runlog import make_temp_dir, user_mode

PAD_TOKEN, MASK_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<mask>", "<eos>", "<unk>"
TINY_SPECIAL_TOKENS = (PAD_TOKEN, MASK_TOKEN, EOS_TOKEN, UNK_TOKEN)
# One token per character: digits, ASCII letters, punctuation (covers + - * / ( ) = , : < > .),
# space and newline. Anything else encodes as <unk>.
TINY_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

LEGACY_TRANSFORMERS = FAMILIES["llada"].hub_code_transformers  # where the hub code of LLaDA and Dream loads

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass
class LoraSettings:
    """LoRA adapters through ``peft``. Defaults follow d1/SPG (r 128, alpha 64, dropout 0.05).

    ``target_modules``: module-name suffixes to adapt, ``"all-linear"`` (every linear layer but
    the output head; works for any architecture), or None for the model family's default
    (dipod.lm.families: every linear layer of the transformer blocks). The head is never adapted.
    """

    r: int = 128
    alpha: float = 64.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] | None = None

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
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("LoraSettings: target_modules is empty; name module suffixes or use 'all-linear'")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode (no dropout) inside the block; its previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class MaskedDiffusionLM:
    """A mask predictor with its tokenizer, its family and the special-token ids the proxies and sampler need.

    ``eot_id`` is the end-of-turn token of the family's chat format (LLaDA ``<|eot_id|>``, Dream
    ``<|im_end|>``), None when the family or tokenizer has none.
    """

    model: nn.Module
    tokenizer: Any
    mask_id: int
    pad_id: int
    eos_id: int
    eot_id: int | None = None
    family: ModelFamily = field(default=FAMILIES["hf_masked_lm"])
    source: str = field(default="")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: Tensor, attn: Tensor, first: int = 0) -> Tensor:
        """float32 logits ``[B, T - first, V]`` for ``ids`` with 0/1 mask ``attn``; ``[:, i]`` predicts
        token ``first + i``. Callers that read the completion only pass its start as ``first``.

        The family decides how the model is called (dipod.lm.families), so a shifted model is
        shifted for every caller; rows are independent of the rest of the batch.
        """
        return self.family.logits(self.model, ids, attn, first)

    def save_pretrained(self, out_dir: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
        """Write model + tokenizer (+ ``extra_files``: name -> text, e.g. the decoding recipe) to
        ``out_dir`` atomically (LoRA adapters are merged into a copy)."""
        out = Path(out_dir)
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(f".{out.name}.", out.parent)
        try:
            with self.family.saving(model):
                model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            for written in tmp.rglob("*"):  # safetensors writes its shards 0600: unreadable to a team
                user_mode(written, 0o777 if written.is_dir() else 0o666)
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


def _special_id(tokenizer: Any, config: Any, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    if value is None:
        value = getattr(config, attr, None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _resolve_mask_id(name: str, tokenizer: Any, config: Any, requested: int | None, vocab_size: int | None) -> int:
    """The model's mask id (tokenizer or config); ``requested`` (--mask_token_id) must agree with it."""
    sources = {where: int(v) for where, v in (("tokenizer", getattr(tokenizer, "mask_token_id", None)),
                                              ("config.json", getattr(config, "mask_token_id", None)))
               if v is not None}
    if len(set(sources.values())) > 1:
        raise ValueError(f"model {name!r}: its tokenizer's mask token id {sources['tokenizer']} disagrees with "
                         f"config.json mask_token_id {sources['config.json']}; fix the snapshot")
    model_id = next(iter(sources.values()), None)
    if requested is not None and model_id is not None and requested != model_id:
        where = " and ".join(sources)
        raise ValueError(f"--mask_token_id={requested} disagrees with the model's mask token id {model_id} (from its "
                         f"{where}); drop --mask_token_id (the model's id is used) or load the model it belongs to")
    mask_id = model_id if model_id is not None else requested
    if mask_id is None:
        raise ValueError(f"model {name!r} defines no mask token (neither tokenizer nor config has mask_token_id); "
                         "pass --mask_token_id with the id the model was trained with")
    if mask_id < 0 or (vocab_size is not None and mask_id >= vocab_size):
        fix = ("fix --mask_token_id" if model_id is None else
               f"fix mask_token_id in the snapshot's {' and '.join(sources)} (or load the model it belongs to)")
        raise ValueError(f"mask_token_id={mask_id} is outside the vocabulary [0, {vocab_size}); {fix}")
    return mask_id


def nf4_quantization(device: str | torch.device):
    """The paper's 4-bit base model (bitsandbytes NF4, double quantisation, bf16 compute), or a
    ValueError naming the fix when this machine cannot run it (it needs CUDA and bitsandbytes)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"load_in_4bit needs a CUDA device (bitsandbytes 4-bit kernels), got device {device!r}; "
                         "set load_in_4bit false here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes (or set "
                         "load_in_4bit false)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16)


@contextlib.contextmanager
def _damaged_weights_named(name: str):
    """safetensors' own error on a truncated or damaged file (a copy cut short) as one line naming the model."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ValueError(f"model {name!r}: a weights file cannot be read ({exc}); it is truncated or damaged: copy "
                         "or save the model again") from None


def load_masked_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    mask_token_id: int | None = None,
    model_family: str | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    device: str | torch.device = "cpu",
    load_in_4bit: bool = False,
) -> MaskedDiffusionLM:
    """Load a mask predictor and its tokenizer from a local directory or a hub id.

    Everything that can be checked from ``config.json`` and the folder is checked before any model
    code runs: the family (``model_family`` or detected, see dipod.lm.families) and that a local
    snapshot has its weights and tokenizer. LLaDA and Dream load into our own network from their
    checkpoint files (dipod.lm.networks.checkpoint_model; no hub code, any transformers 5.x);
    ``trust_remote_code=True`` runs their hub code instead (the legacy path, on the transformers
    versions that code loads on: ``ModelFamily.hub_code_transformers``). Other models load through transformers' Auto classes. A local directory is
    loaded with ``local_files_only=True`` (never touches the network). The mask id is the model's
    (tokenizer or config); ``mask_token_id`` only fills in for a model that has none and must
    agree otherwise. ``lora.target_modules=None`` means the family's default targets.
    ``load_in_4bit`` quantises the base weights (``nf4_quantization``; LoRA adapters stay bf16).
    """
    torch_dtype = resolve_dtype(dtype)
    name, local = locate_model(name_or_path)
    raw_config = read_config_dict(name, local)
    family = get_family(model_family) if model_family else detect_family(raw_config, name)
    ours = family.native and not trust_remote_code
    if ours and load_in_4bit:
        legacy = (f", or use the legacy path (--trust_remote_code true on transformers {hub_code_versions(family)})"
                  if family.hub_code_transformers and family.process != "block_causal" else "")
        raise ValueError(f"load_in_4bit quantises through the hub code's from_pretrained; {family.name} loads into "
                         f"dipod's own network here. Set load_in_4bit false{legacy}")
    with _damaged_weights_named(name):
        if ours:
            model, tokenizer, config = _load_checkpoint_network(name, local, torch_dtype)
        else:
            model, tokenizer, config = _load_with_transformers(name, local, raw_config, family, torch_dtype,
                                                               trust_remote_code, load_in_4bit, device)

    embeddings = model.get_input_embeddings()
    # (DeepSpeed ZeRO-3 loads partitioned weights: their full shape is ds_shape)
    vocab_size = getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)[0] if embeddings is not None else None
    check_tokenizer_fits(name, local, raw_config, tokenizer, vocab_size)
    # Uniform-noise models have no mask token; -1 matches no token id.
    mask_id = -1 if family.noise == "uniform" else _resolve_mask_id(name, tokenizer, config, mask_token_id, vocab_size)
    eos_id = _special_id(tokenizer, config, "eos_token_id")
    if eos_id is None:
        raise ValueError(f"model {name!r} defines no EOS token; its tokenizer needs an eos_token")
    pad_id = _special_id(tokenizer, config, "pad_token_id")
    pad_id = eos_id if pad_id is None else pad_id
    eot_id = None
    if family.end_of_turn_token is not None:
        eot_id = tokenizer.convert_tokens_to_ids(family.end_of_turn_token)
        eot_id = None if eot_id == getattr(tokenizer, "unk_token_id", None) else eot_id

    if not load_in_4bit:
        model.to(device)
    if gradient_checkpointing:
        family.enable_activation_checkpointing(model)
    if lora is not None:
        model = apply_lora(model, _family_lora_targets(lora, family, ours))
    return MaskedDiffusionLM(model=model, tokenizer=tokenizer, mask_id=mask_id, pad_id=pad_id, eos_id=eos_id,
                             eot_id=eot_id, family=family, source=name)


def _family_lora_targets(lora: LoraSettings, family: ModelFamily, ours: bool) -> LoraSettings:
    """The family's default targets when none are named; on our network, hub-code names are translated."""
    if lora.target_modules is None:
        default = family.lora_targets if ours or family.hub_lora_targets is None else family.hub_lora_targets
        return dataclasses.replace(lora, target_modules=default)
    if ours and not isinstance(lora.target_modules, str):
        names = tuple(dict.fromkeys(family.hub_module_names.get(m, m) for m in lora.target_modules))
        return dataclasses.replace(lora, target_modules=names)
    return lora


def _load_checkpoint_network(name: str, local: bool, dtype: torch.dtype):
    """LLaDA / Dream into our own network: config.json + safetensors + tokenizer, no model code run."""
    from dipod.lm.networks.checkpoint_model import load_checkpoint_model

    if not local:
        from huggingface_hub import snapshot_download

        try:  # weights, config, tokenizer (and the hub code, kept so a saved copy still runs it)
            name = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt",
                                                           "*.model", "*.tiktoken"])
        except Exception as err:  # noqa: BLE001 - hub / network errors of any kind
            raise FileNotFoundError(f"could not download model {name!r}: {err}. Download it first (e.g. "
                                    "`huggingface-cli download ORG/NAME --local-dir DIR`) and pass DIR") from err
    check_snapshot(name, read_config_dict(name, True), need_code=False)
    model = load_checkpoint_model(name, dtype)
    return model, _load_tokenizer(name), model.config


def _load_tokenizer(model_dir: str):
    """The snapshot's tokenizer without any model code.

    tokenizer_config.json names its class; a class of transformers is used as it is, anything else
    (a tokenizer of the hub code) is replaced by transformers' fast tokenizer, which reads the same
    ``tokenizer.json`` (vocabulary, special tokens, chat template). Neither looks at config.json.
    """
    import transformers

    path = Path(model_dir) / "tokenizer_config.json"
    named = json.loads(path.read_text()).get("tokenizer_class") if path.is_file() else None
    cls = getattr(transformers, str(named), None) if named else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        if not (Path(model_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"model directory {model_dir!r}: its tokenizer class {named!r} is not one of transformers' and there "
                "is no tokenizer.json to read instead; add the repository's tokenizer.json (or save the tokenizer "
                "once with the legacy path, --trust_remote_code true on transformers 4.56-4.57)")
        cls = transformers.PreTrainedTokenizerFast
    return cls.from_pretrained(model_dir, local_files_only=True)


def _load_with_transformers(name: str, local: bool, raw_config: dict, family: ModelFamily, dtype: torch.dtype,
                            trust_remote_code: bool, load_in_4bit: bool, device):
    """A transformers model (and, with ``trust_remote_code``, the hub code of LLaDA / Dream: the legacy path)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if (family.needs_remote_code or raw_config.get("auto_map")) and not trust_remote_code:
        raise ValueError(
            f"model {name!r} ({family.name}) ships its own model code (config.json auto_map); pass "
            "--trust_remote_code true to run it")
    supported = family.hub_code_transformers
    if family.native and supported and not supported[0] <= _version(transformers.__version__) < supported[1]:
        (low_major, low_minor), (high_major, high_minor) = supported
        raise ValueError(
            f"--trust_remote_code true runs the hub code of {family.name}, which loads on transformers "
            f"{hub_code_versions(family)} only (installed: {transformers.__version__}). Drop --trust_remote_code: "
            f"dipod loads {family.name} into its own network on any supported transformers; or pip install "
            f"'transformers>={low_major}.{low_minor},<{high_major}.{high_minor}'")
    if family.native and family.process == "block_causal" and trust_remote_code:
        # the block-causal process passes a block mask and positions the hub code's forward does not take the
        # same way; running it anyway would decode and score with the wrong attention, silently
        raise ValueError(
            f"--trust_remote_code true is not supported for {family.name} yet: dipod's block-causal decoding and "
            f"likelihoods are not wired to its hub code. Drop --trust_remote_code: dipod loads {family.name} into "
            "its own network, whose logits equal the hub code's to 1e-5 (docs/lm_block_diffusion.md)")
    if local:
        check_snapshot(name, raw_config)
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    # a quantised model is placed by from_pretrained (bitsandbytes weights are not moved afterwards)
    quantized = {"quantization_config": nf4_quantization(device), "device_map": {"": device}} if load_in_4bit else {}
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        auto = getattr(transformers, family.auto_class())
        model = auto.from_pretrained(name, config=config, dtype=dtype, **kwargs, **quantized)
    except OSError as err:
        where = "from local directory" if local else "(no such local directory; tried it as a hub id)"
        raise FileNotFoundError(
            f"could not load model {name!r} {where}: {err} Pass a local directory written by save_pretrained, "
            "or a hub id reachable from this machine (download it first when offline)") from err
    return model, tokenizer, config


def hub_code_versions(family: ModelFamily) -> str:
    """The transformers versions the family's hub code loads on, as people write them ("4.56-4.57")."""
    (low_major, low_minor), (high_major, high_minor) = family.hub_code_transformers
    return f"{low_major}.{low_minor}-{high_major}.{high_minor - 1}"  # the ranges end before a x.y with y > 0


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters stay trainable.

    Name suffixes (and ``"all-linear"``) are expanded to the full names of the matching linear
    layers, leaving out the output head (LLaDA's hub-code head and its blocks' MLP output share the
    name ``ff_out``).
    """
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets == "all-linear":  # expanded here: peft's own expansion accepts only transformers models
        targets = tuple({n.rsplit(".", 1)[-1] for n, m in linears.items() if m is not head})
    if not isinstance(targets, str):
        full = [n for n, m in linears.items() if m is not head and n.rsplit(".", 1)[-1] in targets]
        unmatched = sorted(set(targets) - {n.rsplit(".", 1)[-1] for n in full})
        if unmatched:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"LoRA target_modules {unmatched} match no linear layer of the model (output head "
                             f"excluded); linear layers here are named {names}")
        targets = full
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
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


GLOBAL_ATTENTION_EVERY = 3  # ModernBERT's default; what transformers 4.57 applied to our tiny models


def modernbert_layer_types(num_layers: int, global_every: int) -> list[str]:
    """transformers 5's ``layer_types`` for the layer pattern 4.x derives from ``global_attn_every_n_layers``."""
    return ["sliding_attention" if i % global_every else "full_attention" for i in range(num_layers)]


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

    Defaults (about 0.7 M parameters) train quickly on a 2-core CPU. Positions are rotary (no learned
    position table). ModernBERT's layer pattern: every third layer (0, 3, ...) global attention with
    rope theta 160k, the others local (a 128-token band, theta 10k). config.json states it twice, as
    ``global_attn_every_n_layers`` (what transformers 4.x reads) and ``layer_types`` (5.x): when the
    two disagree, the versions compute different models from one file (the shipped reference
    policies were trained under 4.57 with this pattern). Its decoding recipe (``dipod_recipe.json``):
    compact prompts (the character tokenizer has no chat template), one block of 32 tokens, 32 steps.
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
        global_attn_every_n_layers=GLOBAL_ATTENTION_EVERY,
        layer_types=modernbert_layer_types(num_layers, GLOBAL_ATTENTION_EVERY), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, cls_token_id=None, sep_token_id=None,
        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModernBertForMaskedLM(config)
    lm = MaskedDiffusionLM(model=model, tokenizer=tokenizer, mask_id=tokenizer.mask_token_id,
                           pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, source="tiny")
    from dipod.lm.recipe import RECIPE_FILE, TINY_MODEL_RECIPE  # imported here: the recipe imports the sampler

    return lm.save_pretrained(out_dir, extra_files={RECIPE_FILE: TINY_MODEL_RECIPE.to_json()})
