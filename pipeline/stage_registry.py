"""Find the module that implements a stage kind.

``kind: shard_imagenet`` names ``stages/shard_imagenet.py``; a dotted name (``mypkg.my_stage``) names any
importable module, so teams can add stages without editing this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import stages
from pipeline.config.validate import suggest


def builtin_kinds() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(stages.__path__) if not info.name.startswith("_"))


def load_stage_module(kind: str) -> ModuleType:
    """Import the module for ``kind``; raises LookupError with a suggestion when there is none."""
    module_name = kind if "." in kind else f"stages.{kind}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in (module_name, *_parents(module_name)):
            raise
        raise LookupError(f"unknown stage kind '{kind}'{suggest(kind, builtin_kinds())}") from None
    if not hasattr(module, "Settings") or not callable(getattr(module, "run", None)):
        raise LookupError(f"module '{module_name}' is not a stage: it needs a Settings dataclass and run()")
    return module


def _parents(module_name: str) -> list[str]:
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
