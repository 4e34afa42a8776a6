"""What can be checked about a model before any of its code runs: where it is, its raw
``config.json`` and, for a local snapshot, that the files loading will need are all there.

``dipod.lm.model.load_masked_lm`` calls these first, so a wrong path or an incomplete download is
one clear message (naming the file and the fix) instead of a failure deep inside transformers.
Once the tokenizer is loaded, ``check_tokenizer_fits`` catches one copied from another model.
"""

from __future__ import annotations

import json
import os
import re
import warnings


def locate_model(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """``(name, local)``: an existing local directory with a ``config.json``, or a hub id
    (``reference:TASK`` names the folder of TASK's tiny reference policy)."""
    from dipod.lm.reference import resolve_model_name  # imported here: it imports the loaders

    name = resolve_model_name(os.fspath(name_or_path))
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
    return name, local


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a path.

    ``org/name`` whose ``org`` is a local folder (``runs/tiny``) is a missing path too: failing at
    once beats a slow, doomed hub lookup on an offline machine.
    """
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def read_config_dict(name: str, local: bool) -> dict:
    """The raw ``config.json`` (no model code runs): enough to pick the family and check the snapshot."""
    if local:
        path = os.path.join(name, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it from the model's repository or "
                             "save the model again with save_pretrained") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object of model settings, not a {type(config).__name__}")
        return config
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(name)[0]
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {name!r} (no such local directory; tried it as a hub id): {err} Pass a local "
            "directory written by save_pretrained, or a hub id reachable from this machine (download it first "
            "when offline)") from err


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_snapshot(name: str, config: dict, need_code: bool = True) -> None:
    """A local snapshot has the weights, a tokenizer and (``need_code``) every code file its auto_map needs."""
    def missing(what: str, files) -> FileNotFoundError:
        return FileNotFoundError(
            f"model directory {name!r} has no {what} ({' or '.join(files)}); the snapshot is incomplete: "
            "download the whole repository again (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) "
            "or save the model with save_pretrained")

    if not any(os.path.isfile(os.path.join(name, f)) for f in _WEIGHT_FILES):
        raise missing("weights", _WEIGHT_FILES)
    if not any(os.path.isfile(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        raise missing("tokenizer", _TOKENIZER_FILES)
    if not need_code:
        return
    # auto_map entries look like "modeling_llada.LLaDAModelLM"; the code may import siblings
    # ("from .generation_utils import ..."), which must be there too.
    todo = [ref.split("--")[-1].split(".")[0] for ref in (config.get("auto_map") or {}).values() if isinstance(ref, str)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = os.path.join(name, module + ".py")
        if not os.path.isfile(path):
            raise missing(f"model code file {module}.py (named by config.json auto_map or imported by its code)",
                          (module + ".py",))
        with open(path, encoding="utf-8") as f:
            todo += re.findall(r"^\s*from \.(\w+) import", f.read(), flags=re.MULTILINE)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def check_tokenizer_fits(name: str, local: bool, config: dict, tokenizer, vocab_size: int | None) -> None:
    """Catch a tokenizer copied from another model. More tokens than the model embeds is refused (their
    ids index past the embedding); an EOS that neither config.json nor generation_config.json names is
    warned about: completions would end at the wrong token (instruct models may name their end-of-turn
    token in generation_config.json only, so that file counts too)."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab_size}; "
            "the tokenizer is from another model: copy the model's own tokenizer files into its folder")
    named = _ids(config.get("eos_token_id"))
    generation = os.path.join(name, "generation_config.json")
    if local and os.path.isfile(generation):
        with open(generation, encoding="utf-8") as f:
            named |= _ids(json.load(f).get("eos_token_id"))
    eos = getattr(tokenizer, "eos_token_id", None)
    if named and eos is not None and eos not in named:
        warnings.warn(
            f"model {name!r}: its tokenizer's EOS {tokenizer.eos_token!r} (id {eos}) is not the EOS its config names "
            f"({', '.join(map(str, sorted(named)))}); is the tokenizer from another model? Completions will end at "
            f"id {eos}: copy the model's own tokenizer files into its folder if that is wrong", stacklevel=3)
