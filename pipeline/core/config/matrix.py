"""Stage matrices: one stage block in the file, one ordinary stage per combination of values.

A stage may declare ``matrix: {key.path: values, ...}``. ``values`` is a list of scalars, each variant's name part
being ``<last key>_<value>`` (``kope_false``, ``seed_1``, ``lr_0p001``), or a mapping of labels to values, the
label being the name part (``{vit: {kope: false}, kope: {}}``). The stage becomes one stage per combination, named
``<stage>-<part>-<part>...`` in the order the keys are written (``pretrain-kope_false-seed_1``), so the names are
valid stage names (they name folders). A value is set at its key path in a copy of the block: a mapping merges
into a mapping already there (as includes do), anything else replaces what is there.

Every stage that refers to an expanded stage (``@stage`` or ``@stage/sub`` in any value, or its name in
``needs``) is expanded the same way, each copy wired to the matching variant (``export-kope_false-seed_1`` reads
``@pretrain-kope_false-seed_1``); a stage downstream of two matrices gets every combination. A list item
``@stage[*]`` (``@stage[*]/sub``; ``stage[*]`` in ``needs``) stands for every variant of ``stage`` that matches the
holder's own variant, and does not expand the stage holding it: that is how one report gathers a matrix.

The expansion is a function of the file alone: the same file always gives the same stages with the same settings,
so a changed matrix value changes (or, for a list value, renames) only the variants that hold it.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config.merge import deep_merge
from pipeline.core.config.types import setting
from pipeline.core.errors import ConfigError
from pipeline.core.graph import find_cycle, topological_order

MATRIX_KEY = "matrix"
VARIANT_KEY = "variant"
GATHER = "[*]"
MAX_VARIANTS = 1000
"""Most stages one block may expand to: a typo in a grid (an extra list) should not plan a million stages."""
FORBIDDEN_AXES = ("kind", "needs", MATRIX_KEY, VARIANT_KEY)
LABEL = re.compile(r"^[A-Za-z0-9_]+$")
_REF = re.compile(r"^@([A-Za-z0-9][A-Za-z0-9_-]*)(\[\*\])?(/.*)?$")
_NEED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*)(\[\*\])?$")

ErrorAt = Callable[[tuple[str, ...], str], ConfigError]


@dataclass
class Variant:
    """Where an expanded stage came from (written to the resolved config as its ``variant:`` block)."""

    of: str = setting(help="the stage as the pipeline file names it")
    axes: dict[str, str] = setting(default_factory=dict,
                                   help="matrix key path -> this variant's name part, in name order")


@dataclass(frozen=True)
class Axis:
    """One matrix key of one stage: its values and each value's name part."""

    origin: str
    path: str
    labels: tuple[str, ...]
    values: tuple[Any, ...] = field(compare=False)


@dataclass
class Expansion:
    """The stages after expansion, and how to point a path of an expanded stage back at the file."""

    stages: dict[str, Any]
    origin: dict[str, str] = field(default_factory=dict)  # expanded name -> name in the file
    own_axes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # expanded name -> its own matrix keys

    def source_path(self, path: tuple[str, ...]) -> tuple[str, ...]:
        """The file's key path for ``path`` of the expanded tree (a variant's own matrix value: the matrix key)."""
        if len(path) < 2 or path[0] != "stages" or path[1] not in self.origin:
            return path
        name, rest = path[1], ".".join(path[2:])
        axis = self._own_axis_of(name, rest)
        if axis is not None:
            return ("stages", self.origin[name], MATRIX_KEY, axis)
        return ("stages", self.origin[name], *path[2:])

    def explain(self, exc: ConfigError) -> ConfigError:
        """``exc`` about an expanded stage, restated for the file: at the matrix key when a matrix value is
        wrong, else at the stage's key, naming the variant."""
        key = exc.key or ""
        names = [name for name in self.origin if key == f"stages.{name}" or key.startswith(f"stages.{name}.")]
        if not names:
            return exc
        name = max(names, key=len)
        rest = key[len(f"stages.{name}") + 1:]
        axis = self._own_axis_of(name, rest)
        if axis is not None:
            where = f", at {rest}" if rest != axis else ""
            message = f"{exc.detail} (variant {name}{where})"
            return ConfigError(message, file=exc.file, key=f"stages.{self.origin[name]}.{MATRIX_KEY}.{axis}")
        key = ".".join(filter(None, (f"stages.{self.origin[name]}", rest)))
        return ConfigError(f"{exc.detail} (in variant {name})", file=exc.file, key=key)

    def _own_axis_of(self, name: str, rest: str) -> str | None:
        return next((axis for axis in self.own_axes.get(name, ())
                     if rest == axis or rest.startswith(axis + ".")), None)


def expand_matrices(stages: dict[str, Any], error_at: ErrorAt) -> Expansion:
    """Expand every matrix of ``stages`` (name -> raw block, names and blocks already checked); errors name the
    file's key path through ``error_at``."""
    if not any(MATRIX_KEY in block for block in stages.values()):
        return Expansion(dict(stages))
    direct = {name: _direct_refs(block, stages) for name, block in stages.items()}
    gathered = {name: _gathered_refs(block, stages) for name, block in stages.items()}
    graph = {name: [*direct[name], *gathered[name]] for name in stages}
    cycle = find_cycle(graph)
    if cycle:
        raise error_at(("stages", cycle[0], "needs"), f"dependency cycle: {' -> '.join(cycle)}")
    axes: dict[str, list[Axis]] = {}
    for name in topological_order(graph):
        inherited = list(dict.fromkeys(axis for ref in direct[name] for axis in axes[ref]))
        _check_distinct(name, inherited, error_at)
        own = _own_axes(name, stages[name], error_at)
        taken = {axis.path: axis.origin for axis in inherited}
        for axis in own:
            if axis.path in taken:
                raise error_at(("stages", name, MATRIX_KEY, axis.path),
                               f"'{axis.path}' is varied already by the matrix of stage '{taken[axis.path]}', "
                               "which this stage follows")
        axes[name] = inherited + own
        count = math.prod(len(axis.values) for axis in axes[name])
        if count > MAX_VARIANTS:
            raise error_at(("stages", name, MATRIX_KEY), f"{count:,} variants: more than {MAX_VARIANTS}")
    expansion = Expansion({})
    for name, block in stages.items():
        for choice in _choices(axes[name]):
            variant_name = _variant_name(name, axes[name], choice)
            if variant_name in expansion.stages or (variant_name != name and variant_name in stages):
                raise error_at(("stages", name, MATRIX_KEY), f"variant name '{variant_name}' is taken by another "
                                                             "stage")
            expansion.stages[variant_name] = _variant_block(name, block, axes, choice, stages, error_at)
            if axes[name]:
                expansion.origin[variant_name] = name
                expansion.own_axes[variant_name] = tuple(axis.path for axis in axes[name] if axis.origin == name)
    return expansion


def _check_distinct(name: str, inherited: list[Axis], error_at: ErrorAt) -> None:
    seen: dict[str, str] = {}
    for axis in inherited:
        if axis.path in seen:
            raise error_at(("stages", name), f"follows the matrices of stages '{seen[axis.path]}' and "
                                             f"'{axis.origin}', which both vary '{axis.path}'")
        seen[axis.path] = axis.origin


# --- references ---------------------------------------------------------------------------------------------


def _strings(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, bool]]:
    """Every string below ``node`` with its key path and whether it is a list item."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                yield (*path, str(key)), value, False
            else:
                yield from _strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            if isinstance(item, str):
                yield (*path, str(index)), item, True
            else:
                yield from _strings(item, (*path, str(index)))


def _parse_ref(text: str, in_needs: bool, stages: dict[str, Any]) -> tuple[str, bool, str] | None:
    """(stage, gathers every variant, sub-path) of a reference to a stage of the file, else None."""
    match = (_NEED if in_needs else _REF).match(text)
    if not match or match.group(1) not in stages:
        return None
    sub = "" if in_needs else (match.group(3) or "")
    return match.group(1), bool(match.group(2)), sub


def _refs(block: dict, stages: dict[str, Any]) -> Iterator[tuple[str, bool]]:
    for path, text, _ in _strings(block):
        ref = _parse_ref(text, path[0] == "needs", stages)
        if ref is not None:
            yield ref[0], ref[1]


def _direct_refs(block: dict, stages: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(stage for stage, gathers in _refs(block, stages) if not gathers))


def _gathered_refs(block: dict, stages: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(stage for stage, gathers in _refs(block, stages) if gathers))


# --- axes and names -----------------------------------------------------------------------------------------


def _own_axes(name: str, block: dict, error_at: ErrorAt) -> list[Axis]:
    if MATRIX_KEY not in block:
        return []
    matrix = block[MATRIX_KEY]
    where = ("stages", name, MATRIX_KEY)
    if not isinstance(matrix, dict) or not matrix:
        raise error_at(where, "expected a mapping of key paths to lists of values (or to mappings of labels to "
                              "values)")
    axes = []
    for path, values in matrix.items():
        key = (*where, str(path))
        parts = str(path).split(".")
        if not isinstance(path, str) or not all(parts):
            raise error_at(key, "a matrix key is a dotted key path of the stage, e.g. model.kwargs.kope")
        if parts[0] in FORBIDDEN_AXES:
            raise error_at(key, f"'{parts[0]}' cannot vary in a matrix")
        if isinstance(values, dict):
            labels = tuple(str(label) for label in values)
            for label in labels:
                if not LABEL.match(label):
                    raise error_at(key, f"label '{label}' names stages: use letters, digits and '_' only")
            choices = tuple(values.values())
        elif isinstance(values, list):
            labels = tuple(_value_label(parts[-1], value, key, error_at) for value in values)
            choices = tuple(values)
        else:
            raise error_at(key, f"expected a list of values or a mapping of labels to values, got "
                                f"{type(values).__name__}")
        if not labels:
            raise error_at(key, "no values")
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise error_at(key, f"two values give the same variant name part '{repeated[0]}'")
        axes.append(Axis(name, path, labels, choices))
    return axes


def _value_label(key: str, value: Any, where: tuple[str, ...], error_at: ErrorAt) -> str:
    """``<key>_<value>`` as a name part: ``kope_false``, ``seed_1``, ``lr_0p001``, ``lr_1em05``."""
    if isinstance(value, bool) or value is None:
        text = str(value).lower()
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, str) and value:
        text = value
    else:
        raise error_at(where, f"a list value must be a number, bool, null or non-empty string (got {value!r}); "
                              "give lists and mappings labels: {label: value, ...}")
    text = text.replace(".", "p").replace("-", "m").replace("+", "")
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{re.sub(r'[^A-Za-z0-9_]', '_', key)}_{text}")


def _choices(axes: list[Axis]) -> Iterator[dict[Axis, int]]:
    for combo in itertools.product(*(range(len(axis.values)) for axis in axes)):
        yield dict(zip(axes, combo))


def _variant_name(name: str, axes: list[Axis], choice: dict[Axis, int]) -> str:
    return "-".join([name, *(axis.labels[choice[axis]] for axis in axes)])


# --- building one variant -----------------------------------------------------------------------------------


def _variant_block(name: str, block: dict, axes: dict[str, list[Axis]], choice: dict[Axis, int],
                   stages: dict[str, Any], error_at: ErrorAt) -> dict:
    out = copy.deepcopy({key: value for key, value in block.items() if key != MATRIX_KEY})
    for axis in axes[name]:
        if axis.origin == name:
            _set_path(out, axis.path.split("."), copy.deepcopy(axis.values[choice[axis]]),
                      ("stages", name, MATRIX_KEY, axis.path), error_at)
    out = _rewire(out, (), axes, choice, stages, error_at, name)
    if axes[name]:
        out[VARIANT_KEY] = {"of": name, "axes": {axis.path: axis.labels[choice[axis]] for axis in axes[name]}}
    return out


def _set_path(node: dict, keys: list[str], value: Any, where: tuple[str, ...], error_at: ErrorAt) -> None:
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise error_at(where, f"cannot set a key inside '{key}', which is a {type(child).__name__}")
        node = child
    last = keys[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        deep_merge(node[last], value)
    else:
        node[last] = value



def _rewire(node: Any, path: tuple[str, ...], axes: dict[str, list[Axis]], choice: dict[Axis, int],
            stages: dict[str, Any], error_at: ErrorAt, holder: str) -> Any:
    """``node`` with references to expanded stages pointed at the matching variants and gathers spelled out."""
    if isinstance(node, dict):
        return {key: _rewire(value, (*path, str(key)), axes, choice, stages, error_at, holder)
                for key, value in node.items()}
    if isinstance(node, list):
        items: list[Any] = []
        in_needs = path == ("needs",)
        for index, item in enumerate(node):
            ref = _parse_ref(item, in_needs, stages) if isinstance(item, str) else None
            if ref is None:
                items.append(_rewire(item, (*path, str(index)), axes, choice, stages, error_at, holder))
            elif ref[1]:
                items.extend(_spell(ref, target, in_needs) for target in _gather(ref[0], axes, choice))
            else:
                items.append(_spell(ref, _variant_name(ref[0], axes[ref[0]], choice), in_needs))
        return items
    if isinstance(node, str):
        in_needs = path == ("needs",)
        ref = _parse_ref(node, in_needs, stages) if path else None
        if ref is None:
            return node
        if ref[1]:
            raise error_at(("stages", holder, *path), f"'{node}' stands for every variant of '{ref[0]}': it must be "
                                                      "an item of a list")
        return _spell(ref, _variant_name(ref[0], axes[ref[0]], choice), in_needs)
    return node


def _gather(stage: str, axes: dict[str, list[Axis]], choice: dict[Axis, int]) -> list[str]:
    """Every variant of ``stage`` agreeing with ``choice`` on the axes both have."""
    return [_variant_name(stage, axes[stage], option) for option in _choices(axes[stage])
            if all(choice.get(axis, index) == index for axis, index in option.items())]


def _spell(ref: tuple[str, bool, str], target: str, in_needs: bool) -> str:
    return target if in_needs else f"@{target}{ref[2]}"
