"""Files written through a temporary name keep the mode the user's umask gives (mkstemp alone makes them 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.checkpoint.files import save_safetensors
from pipeline.core.fsutil import atomic_write_text


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    import torch

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "state.json", "{}")
        save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == mode
