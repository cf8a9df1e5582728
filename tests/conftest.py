"""Session-wide test setup.

Without CUDA, Triton kernels (the fused KoPE attention) run in Triton's CPU interpreter. Triton reads
``TRITON_INTERPRET`` when it is first imported, which any test (``torch.compile`` included) may cause, so it is set
here, before any test module is collected.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


SLURM_TESTS = "test_slurm_"  # the test files that use the one local Slurm (the fixture local_slurm)


def _scheduling_unit(nodeid: str) -> str:
    """A test file, or all the Slurm test files as one unit."""
    path = nodeid.split("::", 1)[0]
    return "slurm" if Path(path).name.startswith(SLURM_TESTS) else path


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (setup.cfg runs two workers) hands out whole test files, so each file's session runs
    (the resume matrix, ...) are built once, and all the Slurm test files as one unit: one worker runs them in
    turn (in parallel their jobs would queue behind each other's), mostly waiting on Slurm while the other
    computes. Units go out in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndSlurm(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scheduling_unit(nodeid)

    return FilesAndSlurm(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest tests start first so that the short ones fill the gaps at the end: slow before fast, and
    among the slow the end-to-end ones at the top of tests/ (README's demo). A test on the local Slurm outside
    the Slurm files would run beside them on another worker: refused."""
    for item in items:
        if "local_slurm" in item.fixturenames and _scheduling_unit(item.nodeid) != "slurm":
            raise pytest.UsageError(f"{item.nodeid} uses local_slurm: its file must be named {SLURM_TESTS}*.py")
    tests = Path(__file__).parent
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.path.parent != tests))
