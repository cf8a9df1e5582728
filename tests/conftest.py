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


# Session fixtures that train whole runs: a worker builds its own copy of each it needs, so the tests that
# share one run on one worker too.
SHARED_RUNS = ("local_slurm", "downstream_run", "matrix")


def pytest_collection_modifyitems(config, items) -> None:
    """Scheduling for pytest-xdist (setup.cfg runs two workers, in collection order). The tests on the one
    local Slurm form one group that one worker runs in turn (in parallel their jobs would queue behind each
    other's), much of it waiting on Slurm while the other worker computes; so do the tests of each shared run.
    The longest tests start first so that the short ones fill the gaps at the end: slow before fast, and among
    the slow the end-to-end ones at the top of tests/ (README's demo)."""
    for item in items:
        shared = next((name for name in SHARED_RUNS if name in item.fixturenames), None)
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared))
    tests = Path(__file__).parent
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.path.parent != tests))
