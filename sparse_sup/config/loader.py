"""Build a ``Config`` from YAML files and ``--section.key=value`` overrides, strictly.

A YAML file may name a ``base:`` file (relative to itself) whose values it overrides; ``--config``
takes a path or the name of a preset (``debug-cpu``: ``configs/debug-cpu.yaml``, shipped in the
wheel as ``sparse_sup/configs/``). Unknown sections or keys, values of the wrong type, non-finite
numbers and YAML syntax errors raise ``ConfigError`` naming the key (or file, line and column), the
value and what is allowed; nothing is touched on disk here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import Config

# presets: the repository's configs/ (source tree, editable install) or the wheel's sparse_sup/configs/
_PACKAGE = Path(__file__).resolve().parents[1]
PRESET_DIRS = (_PACKAGE.parent / "configs", _PACKAGE / "configs")
# renamed keys: (section, old) -> (new, value both readings agree on, explanation)
_RENAMED = {
    ("tickets", "ema_decay"): (
        "ema_ticket_weight",
        0.5,
        "the weight of the NEW ticket in S <- (1 - w) * S + w * T_i (the old ema_decay a is w = 1 - a)",
    ),
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def preset_names() -> list[str]:
    """Names accepted by ``--config NAME`` (the YAML files of the preset directory)."""
    for directory in PRESET_DIRS:
        if directory.is_dir():
            return sorted(p.stem for p in directory.glob("*.yaml"))
    return []


def resolve_config_path(path: str | Path) -> Path:
    """An existing file as given, else the preset of that name (``debug-cpu`` or ``debug-cpu.yaml``)."""
    given = Path(path)
    if given.is_file():
        return given
    if given.parent == Path(".") and given.suffix in ("", ".yaml"):
        for directory in PRESET_DIRS:
            preset = directory / f"{given.stem}.yaml"
            if preset.is_file():
                return preset
    names = preset_names()
    raise ConfigError(
        f"config file {str(path)!r} does not exist and is not a preset name; "
        f"presets: {', '.join(names) if names else 'none installed'}{_suggest(given.stem, names)}"
    )


def _yaml_error(where: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ConfigError(f"{where}{at}: YAML syntax error: {problem}; fix the YAML there")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise _yaml_error(f"config file {str(path)!r}", err) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
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
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise _yaml_error(f"override {text!r}", err) from None
    return section, key.replace("-", "_"), value


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
        raise ConfigError(errors[0])
    if hint is Any:
        return value
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if expected in (int, float) and isinstance(value, bool) or not isinstance(value, expected):
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{key}={value!r} is invalid: expected {name}, got {type(value).__name__}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is invalid: expected a finite number")
    if expected in (list, tuple) and args:
        if expected is tuple and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{key}={list(value)!r} is invalid: expected {len(args)} values")
        kinds = [args[0]] * len(value) if expected is list or args[-1] is Ellipsis else args
        items = [_coerce(f"{key}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, kinds))]
        return expected(items)
    return value


def _build_section(section: str, cls: type, values: dict) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if (section, key) in _RENAMED:  # old run configs with the neutral value still load
            new, neutral, meaning = _RENAMED[section, key]
            if value != neutral or new in values:
                raise ConfigError(f"{section}.{key} was renamed to {section}.{new}: {meaning}")
            key = new
        if key not in known:
            raise ConfigError(
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
            raise ConfigError(
                f"unknown config section {section!r}{_suggest(section, list(sections))}; "
                f"allowed: {', '.join(sections)}"
            )
        built[section] = _build_section(section, hints[section], values or {})
    return Config(**built)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (a file or a preset name; None: the dataclass defaults), apply overrides,
    validate everything. Raises ``ConfigError``."""
    raw = _read_yaml(resolve_config_path(path)) if path else {}
    for text in overrides:
        section, key, value = parse_override(text)
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping")
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
