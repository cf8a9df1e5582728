"""Turn a raw config mapping into a settings dataclass, checking every key against its type hint.

Errors name the key path and the file the value came from, and suggest the closest valid key for a
typo, so a mistake is caught before any stage starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

from pipeline.core.config.types import InputPath, SettingError, is_stage_ref, split_stage_ref
from pipeline.core.errors import ConfigError

FileOf = Callable[[tuple[str, ...]], str]


@dataclasses.dataclass
class ValidationContext:
    """What validation needs beyond the value: provenance, stage names, and the references it finds."""

    file_of: FileOf
    stage_names: frozenset[str] = frozenset()
    stage_refs: set[str] = dataclasses.field(default_factory=set)
    external_paths: set[str] = dataclasses.field(default_factory=set)

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(message, file=self.file_of(path) or None, key=".".join(path) or None)


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if tp is InputPath:
        return "path"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def build_dataclass(cls: type, data: Any, path: tuple[str, ...], ctx: ValidationContext) -> Any:
    """Build ``cls`` from a mapping: unknown, missing, mistyped or out-of-range keys raise ConfigError, and so
    does a cross-field rule of the class's ``check()``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ctx.error(path, f"expected a mapping of settings, got {type(data).__name__}")
    cls, data = _pick_variant(cls, data, path, ctx)
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    for key in data:
        if key not in fields:
            raise ctx.error((*path, str(key)), f"unknown key{suggest(str(key), fields)}")
    values = {}
    for name, field in fields.items():
        key_path = (*path, name)
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ctx.error(key_path, f"missing required value ({_type_name(hints[name])})")
            continue
        value = convert(hints[name], data[name], key_path, ctx)
        check_range(field, value, key_path, ctx)
        values[name] = value
    built = cls(**values)
    check = getattr(built, "check", None)
    if callable(check):
        try:
            check()
        except SettingError as exc:
            raise ctx.error((*path, *exc.key.split(".")) if exc.key else path, exc.message) from None
    return built


def _pick_variant(cls: type, data: dict, path: tuple[str, ...], ctx: ValidationContext) -> tuple[type, dict]:
    """The variant of a sum-type settings class that ``data`` selects, and ``data`` without the blocks of the
    other variants (each validated against its own variant first, so a typo there is still an error)."""
    variants: dict[str, type] | None = getattr(cls, "__variants__", None)
    if not variants:
        return cls, data
    key = cls.__variant_key__
    default = next(field.default for field in dataclasses.fields(cls) if field.name == key)
    choice = data.get(key, default)
    if choice not in variants:
        hint = suggest(str(choice), list(variants))
        raise ctx.error((*path, key), f"must be one of {', '.join(map(repr, variants))}, got {choice!r}{hint}")
    chosen = variants[choice]
    own = {field.name for field in dataclasses.fields(chosen)}
    kept = dict(data)
    for other in variants.values():
        if other is chosen:
            continue
        hints = typing.get_type_hints(other)
        for field in dataclasses.fields(other):
            if field.name not in own and field.name in kept:
                convert(hints[field.name], kept.pop(field.name), (*path, field.name), ctx)
    return chosen, kept


def check_range(field: dataclasses.Field, value: Any, path: tuple[str, ...], ctx: ValidationContext) -> None:
    bounds = field.metadata
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    for name, fails, word in (("ge", lambda b: value < b, ">="), ("le", lambda b: value > b, "<="),
                              ("gt", lambda b: value <= b, ">"), ("lt", lambda b: value >= b, "<")):
        bound = bounds.get(name)
        if bound is not None and fails(bound):
            raise ctx.error(path, f"value {value} out of range: must be {word} {bound}")


def convert(tp: Any, value: Any, path: tuple[str, ...], ctx: ValidationContext) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in that type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is InputPath:
        return _input_path(value, path, ctx)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, ctx)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (arg for arg in args if arg is not type(None)):
            try:
                return convert(arg, value, path, ctx)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ctx.error(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(choice) for choice in choices])
            raise ctx.error(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ctx.error(path, f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ctx.error(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(convert(arg, item, (*path, str(i)), ctx) for i, (arg, item) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        items = [convert(item_type, item, (*path, str(i)), ctx) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(path, f"expected a mapping, got {type(value).__name__}")
        _, value_type = typing.get_args(tp) or (str, Any)
        return {str(key): convert(value_type, item, (*path, str(key)), ctx) for key, item in value.items()}
    return _scalar(tp, value, path, ctx)


def _scalar(tp: Any, value: Any, path: tuple[str, ...], ctx: ValidationContext) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"settings type {tp!r} at {'.'.join(path)} is not supported")
    raise ctx.error(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _input_path(value: Any, path: tuple[str, ...], ctx: ValidationContext) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.error(path, f"expected a path, got {value!r}")
    if is_stage_ref(value):
        stage, _ = split_stage_ref(value)
        if stage not in ctx.stage_names:
            raise ctx.error(path, f"refers to unknown stage '{stage}'{suggest(stage, ctx.stage_names)}")
        ctx.stage_refs.add(stage)
        return value
    if not Path(value).exists():
        raise ctx.error(path, f"path does not exist: {value}")
    ctx.external_paths.add(value)
    return value
