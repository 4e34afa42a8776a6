"""Dataclass configs that are read from YAML files and command-line flags alike.

Precedence: dataclass defaults < ``--config FILE`` (YAML mapping) < ``--FIELD VALUE`` flags.
Every field is a flag, spelt with underscores or dashes (``--output_dir`` == ``--output-dir``).
Unknown keys fail with the list of valid ones; a dataclass validates its values in
``__post_init__`` and raises ``ConfigError`` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key or file is invalid; the message names it and the fix."""


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``: the one-line form of a config check."""
    if not ok:
        raise ConfigError(message)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def coerce_value(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a flag string) to the field type ``tp``, or raise ConfigError."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config field '{name}' may not be empty (expected {getattr(inner, '__name__', inner)})")
    try:
        origin = typing.get_origin(inner)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(inner) or (str,)
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            converted = [coerce_value(name, item_tp, v.strip() if isinstance(v, str) else v) for v in items]
            return tuple(converted) if origin is tuple else converted
        if origin is dict or inner is dict:
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return dict(value)
        if inner is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if inner is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config field '{name}': cannot read {value!r} as {getattr(inner, '__name__', inner)} ({exc})") from None
    return value


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name, field in fields.items():
        field.type = hints[name]
    return fields


def field_aliases(cls: type) -> dict[str, str]:
    """Old spellings still accepted (``option(..., aliases=...)``): alias -> field name."""
    return {alias: name for name, field in config_fields(cls).items() for alias in field.metadata.get("aliases", ())}


def canonical_keys(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` with old spellings renamed to their fields (both given: ConfigError)."""
    aliases = field_aliases(cls)
    out = dict(values)
    for alias, name in aliases.items():
        if alias in out:
            if name in values:
                raise ConfigError(f"{source} sets both {alias!r} and {name!r} ({alias!r} is its old name); keep {name!r}")
            out[name] = out.pop(alias)
    return out


def check_keys(cls: type, keys: typing.Iterable[str], source: str) -> None:
    valid = config_fields(cls)
    unknown = sorted(set(keys) - set(valid) - set(field_aliases(cls)))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} in {source}; valid keys for {cls.__name__}: {', '.join(sorted(valid))}"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys silently; a config that says two things is refused."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1} repeats it); "
                                  "keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    check_keys(cls, values, source)
    values = canonical_keys(cls, values, source)
    fields = config_fields(cls)
    kwargs = {k: coerce_value(k, fields[k].type, v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def save_config(cfg: Any, path: str | Path) -> None:
    from dipod.runlog import atomic_write_text

    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config_to_dict(cfg).items()}
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


def option(help: str, *, aliases: tuple[str, ...] = (), bare: str | None = None, **field_kwargs: Any) -> Any:
    """A dataclass field carrying the help text its command-line flag shows; ``aliases``: old names
    still accepted as flags and YAML keys; ``bare``: the value of the flag given without one
    (``--resume`` alone means ``--resume latest``)."""
    return dataclasses.field(metadata={"help": help, "aliases": aliases, "bare": bare}, **field_kwargs)


def _help_text(field: dataclasses.Field) -> str:
    doc = field.metadata.get("help", "")
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None
    )
    return f"{doc} (default: {default})".strip()


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--FIELD`` (and ``--FIELD-WITH-DASHES``) for every field; values stay strings until coerced."""
    for name, field in config_fields(cls).items():
        spellings = [name, *field.metadata.get("aliases", ())]
        flags = [f"--{n}" for n in spellings] + [f"--{n.replace('_', '-')}" for n in spellings if "_" in n]
        bare = field.metadata.get("bare")
        shape = {"nargs": "?", "const": bare} if bare is not None else {}
        parser.add_argument(*flags, dest=f"cfg__{name}", default=None, metavar="VALUE", help=_help_text(field), **shape)


def read_values(cls: type, argv: list[str] | None, prog: str, description: str = "") -> tuple[dict[str, Any], str]:
    """``(values, source)``: the fields an optional ``--config`` YAML file and the flags set (flags win),
    not yet validated, so a caller can put defaults of its own beneath them (``config_from_dict``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of field: value overrides")
    add_config_flags(parser, cls)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        file_values = load_yaml_mapping(args.config)
        check_keys(cls, file_values, args.config)
        values.update(canonical_keys(cls, file_values, args.config))
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            values[key[len("cfg__"):]] = value
    return values, args.config or "command line"


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str = "", base: dict | None = None) -> T:
    """Build ``cls`` from dataclass defaults, ``base``, an optional ``--config`` YAML file and flags."""
    values, source = read_values(cls, argv, prog, description)
    return config_from_dict(cls, {**(base or {}), **values}, source=source)
