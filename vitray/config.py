"""One config mechanism for every stage: typed dataclasses validated at construction.

A config is a (possibly nested) dataclass. Each field carries its default and a
docstring-like comment next to it; validation lives in ``__post_init__`` and raises
:class:`ConfigError` naming the offending field. Configs round-trip through plain
dicts (and so YAML/JSON): :func:`from_dict` rejects unknown keys by name, and
:func:`to_dict` produces the resolved config written next to every output.

Overrides from the command line use dotted keys: ``--set model.depth=2``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the dotted field name."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def check(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, message)


def to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _coerce(tp: Any, value: Any, field: str) -> Any:
    """Convert a YAML/JSON/CLI value to the annotated field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, field)
            except (ConfigError, TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ConfigError(field, f"cannot interpret {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=field + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(field, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(field, f"expected an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(field, f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(field, f"expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(field, f"expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(field, f"expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not exc.field.startswith(prefix):
            raise ConfigError(prefix + exc.field, str(exc).split(": ", 1)[1]) from None
        raise


def parse_overrides(pairs: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(pair, "override must look like key=value")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(base: dict, override: Mapping) -> dict:
    """Recursive dict merge; ``override`` wins."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load(cls: type[T], base: T | None = None, path: str | None = None,
         overrides: Mapping | None = None) -> T:
    """Resolve a config: ``base`` (a recipe) <- YAML file at ``path`` <- ``overrides``."""
    data = to_dict(base) if base is not None else {}
    if path:
        with open(path) as f:
            data = merge(data, yaml.safe_load(f) or {})
    if overrides:
        data = merge(data, overrides)
    return from_dict(cls, data)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-runs validation (variants of named recipes)."""
    return dataclasses.replace(cfg, **changes)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
