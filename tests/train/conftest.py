"""Fixtures of the training tests: demo shards built once per session by the real sharding stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.train.helpers import captioned_demo_shards, demo_shards, use_shared_torch_extensions


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> dict[str, Path]:
    """``train`` (90 images, one per class) and ``val`` (90) demo datasets."""
    use_shared_torch_extensions()
    return demo_shards(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def captions(tmp_path_factory) -> Path:
    """The demo's captioned set (64 images), downloaded by the real ``shard_datacomp`` stage from 127.0.0.1."""
    use_shared_torch_extensions()
    return captioned_demo_shards(tmp_path_factory.mktemp("captions"))


@pytest.fixture
def one_rank(monkeypatch) -> None:
    """This process as a process group of one (DeepSpeed reads the torchrun variables)."""
    from pipeline.core.ranks import free_port

    use_shared_torch_extensions()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", os.environ.get("MASTER_PORT") or str(free_port()))
