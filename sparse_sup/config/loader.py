"""Build a ``Config`` from YAML files and ``--section.key=value`` overrides, strictly.

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides. Unknown
sections or keys and values of the wrong type raise ``ValueError`` naming the key, the value and
what is allowed; nothing is touched on disk here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .schema import Config


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config file {str(path)!r} includes itself through 'base:'")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` (leading dashes allowed); the value is parsed as YAML."""
    body = text.lstrip("-")
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ValueError(f"override {text!r} must look like --section.key=value")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key.replace("-", "_"), yaml.safe_load(raw)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if hint is Any:
        return value
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, list):
        return tuple(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        name = getattr(expected, "__name__", str(expected))
        raise ValueError(f"{key}={value!r} is invalid: expected {name}, got {type(value).__name__}")
    return value


def _build_section(section: str, cls: type, values: dict) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"section {section!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(
                f"unknown key {section}.{key}{_suggest(key, known)}; {section} accepts: {', '.join(known)}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def build_config(raw: dict) -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise ValueError(
                f"unknown config section {section!r}{_suggest(section, list(sections))}; "
                f"allowed: {', '.join(sections)}"
            )
        built[section] = _build_section(section, hints[section], values or {})
    return Config(**built)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (or the defaults), apply overrides, validate everything."""
    raw = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        section, key, value = parse_override(text)
        if section in raw and not isinstance(raw[section], dict):
            raise ValueError(f"section {section!r} must be a mapping")
        raw.setdefault(section, {})[key] = value
    return build_config(raw)


def config_to_dict(config: Config) -> dict:
    """Plain dict (tuples as lists) suitable for YAML."""

    def plain(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(config))
