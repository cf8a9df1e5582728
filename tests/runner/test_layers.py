"""Layers import only downward (see docs/architecture.md): every import statement in the package, lazy ones inside
functions included, goes to the module's own layer part or to a lower layer."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = {
    "pipeline.core": 0,
    "pipeline.models": 1, "pipeline.data": 1, "pipeline.checkpoint": 1,
    "pipeline.train": 2,
    "pipeline.export": 3,
    "pipeline.evaluation": 4, "pipeline.report": 4,
    "stages": 5, "cluster": 5,
}


def part_of(module: str) -> str | None:
    return next((part for part in sorted(LAYERS, key=len, reverse=True)
                 if module == part or module.startswith(part + ".")), None)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_module_imports_from_a_layer_above_or_beside_its_own():
    wrong = []
    for path in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/**/*.py"), *REPO.glob("cluster/**/*.py")]):
        source = part_of(module_name(path))
        if source is None:
            continue
        for line, target in imports(path):
            dest = part_of(target)
            if dest is not None and dest != source and LAYERS[dest] >= LAYERS[source]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({source}) imports {target} ({dest})")
    assert not wrong, "\n".join(wrong)


def test_executors_do_not_import_the_runner():
    wrong = [f"{path.relative_to(REPO)}:{line}" for path in REPO.glob("cluster/**/*.py")
             for line, target in imports(path) if target in ("pipeline.core.runner", "pipeline.core.planner")]
    assert not wrong, wrong
