"""Read a pipeline YAML file with its includes and command-line overrides into one validated config.

Any mapping may hold ``include: FILE`` or ``include: [FILE, ...]`` (paths relative to the file that
includes them); the included files are merged in order and the mapping's own keys win. Every value
remembers the file it came from, so validation errors name the right file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config.merge import deep_merge
from pipeline.core.config.schema import PipelineConfig, build_pipeline
from pipeline.core.errors import ConfigError

INCLUDE_KEY = "include"
COMMAND_LINE = "<command line>"
MAX_VALUES = 100_000
"""Most values a config file may hold once YAML aliases are expanded: a few hundred bytes of nested aliases
(an "alias bomb") would otherwise expand to billions of values in the merge and in ``kope config``."""
KeyPath = tuple[str, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        tree = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML{where}: {problem}", file=source) from None
    _check_expanded_size(tree, source)
    return tree


def _check_expanded_size(tree: Any, source: str) -> None:
    """Count the values ``tree`` holds with every alias expanded (shared nodes counted once per use, each node
    sized once), refusing recursive aliases and more than :data:`MAX_VALUES`."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a YAML alias refers to a node that contains it (recursive alias)", file=source)
        active.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_VALUES:
                raise ConfigError(f"more than {MAX_VALUES:,} values once YAML aliases are expanded "
                                  "(an alias bomb?)", file=source)
        active.discard(key)
        sizes[key] = total
        return total

    size(tree)


def read_text(path: Path) -> str:
    """A config file's text: UTF-8 (a byte-order mark is allowed); anything else is one line naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save the file as UTF-8", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None


class Provenance:
    """Which file each key path came from; the longest recorded prefix of a path answers."""

    def __init__(self) -> None:
        self._files: dict[KeyPath, str] = {}

    def record(self, path: KeyPath, source: str) -> None:
        for key in [key for key in self._files if key[: len(path)] == path]:
            del self._files[key]
        self._files[path] = source

    def record_default(self, path: KeyPath, source: str) -> None:
        """Note a mapping's file without forgetting where its included keys came from."""
        self._files.setdefault(path, source)

    def file_of(self, path: KeyPath) -> str:
        for end in range(len(path), -1, -1):
            if path[:end] in self._files:
                return self._files[path[:end]]
        return self._files.get((), "")


def _dotted(path: KeyPath) -> str:
    return ".".join(path)


def _read_file(path: Path, chain: tuple[Path, ...]) -> Any:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"include cycle: {cycle}", file=str(chain[-1]), key=INCLUDE_KEY)
    if not path.is_file():
        source = str(chain[-1]) if chain else str(path)
        raise ConfigError(f"file not found: {path}", file=source, key=INCLUDE_KEY if chain else None)
    return parse_yaml(read_text(path), str(path))


def _expand(node: Any, source: Path, chain: tuple[Path, ...], path: KeyPath, prov: Provenance) -> Any:
    """Resolve includes below ``node`` and record where each key came from."""
    if not isinstance(node, dict):
        prov.record(path, str(source))
        return node
    merged: dict[str, Any] = {}
    includes = node.get(INCLUDE_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise ConfigError("must be a file name or a list of file names", file=str(source),
                          key=_dotted((*path, INCLUDE_KEY)))
    prov.record_default(path, str(source))
    for name in includes:
        included = (source.parent / name).resolve()
        content = _read_file(included, (*chain, source))
        if content is None:
            continue
        if not isinstance(content, dict):
            raise ConfigError("an included file must hold a mapping", file=str(included))
        deep_merge(merged, _expand(content, included, (*chain, source), path, prov))
    own = {key: value for key, value in node.items() if key != INCLUDE_KEY}
    for key, value in own.items():
        if not isinstance(key, str):
            raise ConfigError(f"keys must be strings, got {key!r}", file=str(source), key=_dotted(path))
        expanded = _expand(value, source, chain, (*path, key), prov)
        deep_merge(merged, {key: expanded})
    return merged



def apply_override(tree: dict, override: str, prov: Provenance) -> None:
    """Set ``stage.key.path=value`` (or a top-level ``key=value``) in the raw config tree."""
    key_text, sep, value_text = override.partition("=")
    if not sep or not key_text.strip():
        raise ConfigError(f"override {override!r} must look like stage.key.path=value", file=COMMAND_LINE)
    keys = tuple(part.strip() for part in key_text.split("."))
    if any(not part for part in keys):
        raise ConfigError(f"override {override!r} has an empty key", file=COMMAND_LINE)
    stages = tree.get("stages")
    if keys[0] != "stages" and isinstance(stages, dict) and keys[0] in stages:
        keys = ("stages", *keys)
    value = parse_yaml(value_text, COMMAND_LINE) if value_text.strip() else ""
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set a key inside a {type(child).__name__}", file=COMMAND_LINE,
                              key=_dotted(keys[: depth + 1]))
        node = child
    node[keys[-1]] = value
    prov.record(keys, COMMAND_LINE)


def load_raw(path: Path | str, overrides: list[str] = ()) -> tuple[dict, Provenance]:
    """The merged, overridden config tree of a pipeline file, before validation."""
    source = Path(path).resolve()
    content = _read_file(source, ())
    if not isinstance(content, dict):
        raise ConfigError("a pipeline file must hold a mapping", file=str(path))
    prov = Provenance()
    tree = _expand(content, source, (), (), prov)
    for override in overrides:
        apply_override(tree, override, prov)
    return tree, prov


def load_pipeline(path: Path | str, overrides: list[str] = ()) -> PipelineConfig:
    """Load, merge and validate a pipeline file; raises :class:`ConfigError` naming file and key path."""
    tree, prov = load_raw(path, overrides)
    return build_pipeline(tree, prov.file_of, source=Path(path))
