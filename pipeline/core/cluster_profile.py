"""Cluster profiles (``configs/cluster/*.yaml``): where a pipeline's stages run, kept out of the pipeline file.

The same pipeline runs on a laptop, under torchrun on several machines, or on Slurm; only the profile given
to ``kope run --cluster`` changes. Profiles are validated like pipeline files (unknown keys, types and
ranges name the file and key) and may ``include:`` a shared base profile.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config.loader import load_raw
from pipeline.core.config.types import setting
from pipeline.core.config.validate import ValidationContext, build_dataclass
from pipeline.core.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "cluster"
ProfileExecutor = Literal["inline", "local", "torchrun", "slurm"]


@dataclass
class SlurmResources:
    """What one stage asks Slurm for; every key may be set per stage (by name or kind) under ``stages:``."""

    nodes: int = setting(1, ge=1, help="nodes per job")
    tasks_per_node: int = setting(1, ge=1, help="processes (ranks) per node: one per GPU for training")
    gpus_per_node: int = setting(0, ge=0, help="GPUs per node (0: do not ask for GPUs)")
    cpus_per_task: int = setting(1, ge=1, help="CPU cores per process (data loader workers + 1)")
    mem_gb: float | None = setting(None, gt=0, help="memory per node in GB (unset: the partition's default)")
    time_min: int = setting(60, ge=1, help="time limit in minutes; the stage checkpoints and requeues before it")
    partition: str | None = setting(None, help="Slurm partition")
    account: str | None = setting(None, help="Slurm account")
    qos: str | None = setting(None, help="quality of service")
    constraint: str | None = setting(None, help="node features, e.g. a100|h100")
    array: int = setting(0, ge=0, help="array tasks for stages that split their work into parts (0: one job)")
    array_parallelism: int = setting(64, ge=1, help="array tasks running at once")
    max_requeues: int = setting(20, ge=0, help="time-limit requeues before the stage gives up")
    signal_delay_s: int = setting(120, ge=10, help="seconds before the time limit the stage is told to checkpoint")
    setup: list[str] = setting(default_factory=list, help="shell lines run before the stage (module load, venv)")
    extra_sbatch: dict[str, Any] = setting(default_factory=dict, help="any other sbatch option, e.g. exclusive: true")


@dataclass
class SlurmProfile(SlurmResources):
    stages: dict[str, dict[str, Any]] = setting(default_factory=dict,
                                                help="per-stage overrides, keyed by stage name or kind")


@dataclass
class TorchrunProfile:
    """One torchrun per stage on each node; unset values come from torchrun's own ``PET_*`` variables."""

    nnodes: int | None = setting(None, ge=1, help="machines (env PET_NNODES; default 1)")
    nproc_per_node: int | None = setting(None, ge=1, help="processes per machine (env PET_NPROC_PER_NODE)")
    rdzv_endpoint: str | None = setting(None, help="host:port of the c10d rendezvous (env PET_RDZV_ENDPOINT, "
                                                   "or MASTER_ADDR:MASTER_PORT)")
    node_rank: int | None = setting(None, ge=0, help="this machine's index; 0 leads the run (env PET_NODE_RANK, "
                                                      "NODE_RANK)")
    rdzv_id: str | None = setting(None, help="rendezvous id prefix (default: the pipeline name)")


@dataclass
class ClusterProfile:
    executor: ProfileExecutor = setting(help="inline, local (processes here), torchrun, or slurm")
    slurm: SlurmProfile = setting(default_factory=SlurmProfile)
    torchrun: TorchrunProfile = setting(default_factory=TorchrunProfile)
    name: str = field(default="", init=False)
    source: str = field(default="", init=False)

    def slurm_resources(self, stage: str, kind: str) -> SlurmResources:
        """The profile's defaults, then the overrides for the stage's kind, then for its name."""
        return _resources_for(self.slurm, stage, kind, lambda path: self.source)

    def torchrun_settings(self, env: Mapping[str, str] | None = None) -> ResolvedTorchrun:
        return resolve_torchrun(self.torchrun, os.environ if env is None else env)


@dataclass(frozen=True)
class ResolvedTorchrun:
    nnodes: int
    nproc_per_node: int | None  # None: each stage's launch.nproc
    rdzv_endpoint: str | None
    node_rank: int | None
    rdzv_id: str | None

    @property
    def leads(self) -> bool:
        """The machine that holds the run lock and writes the resolved config; the others follow."""
        return self.nnodes == 1 or self.node_rank == 0


def resolve_torchrun(profile: TorchrunProfile, env: Mapping[str, str]) -> ResolvedTorchrun:
    def pick(value: Any, *names: str) -> str | None:
        if value is not None:
            return str(value)
        return next((env[name] for name in names if env.get(name)), None)

    endpoint = pick(profile.rdzv_endpoint, "PET_RDZV_ENDPOINT")
    if endpoint is None and env.get("MASTER_ADDR"):
        endpoint = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29400')}"
    try:
        nnodes = int(pick(profile.nnodes, "PET_NNODES") or 1)
        nproc_text = pick(profile.nproc_per_node, "PET_NPROC_PER_NODE")
        nproc = int(nproc_text) if nproc_text is not None else None
        rank_text = pick(profile.node_rank, "PET_NODE_RANK", "NODE_RANK")
        node_rank = int(rank_text) if rank_text is not None else None
    except ValueError as exc:
        raise ConfigError(f"torchrun settings from the environment: {exc}", file="<environment>") from None
    if nnodes > 1 and (endpoint is None or node_rank is None):
        missing = "rdzv_endpoint (PET_RDZV_ENDPOINT)" if endpoint is None else "node_rank (PET_NODE_RANK)"
        raise ConfigError(f"{nnodes} nodes need {missing}: set it in the profile or the environment",
                          file="<cluster profile>", key=f"torchrun.{missing.split()[0]}")
    return ResolvedTorchrun(nnodes, nproc, endpoint, node_rank, profile.rdzv_id)


def _resources_for(profile: SlurmProfile, stage: str, kind: str, file_of: Any) -> SlurmResources:
    base = {name: getattr(profile, name) for name in SlurmResources.__dataclass_fields__}
    for key in (kind, stage):
        for name, value in profile.stages.get(key, {}).items():
            merge = isinstance(value, dict) and isinstance(base.get(name), dict)
            base[name] = {**base[name], **value} if merge else value
    return build_dataclass(SlurmResources, base, ("slurm", "stages", stage), ValidationContext(file_of))


def profile_path(name_or_path: str) -> Path:
    """A profile name (``local``, ``slurm-example``) in configs/cluster/, or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"cluster profile not found: {path}", file="<command line>", key="--cluster")
        return path
    candidate = PROFILE_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"unknown cluster profile '{name_or_path}' (profiles: {known}; or give a path)",
                          file="<command line>", key="--cluster")
    return candidate


def load_profile(name_or_path: str) -> ClusterProfile:
    path = profile_path(name_or_path)
    tree, prov = load_raw(path)
    ctx = ValidationContext(prov.file_of)
    profile = build_dataclass(ClusterProfile, tree, (), ctx)
    profile.name, profile.source = path.stem, str(path)
    for stage, overrides in profile.slurm.stages.items():
        if not isinstance(overrides, dict):
            raise ctx.error(("slurm", "stages", stage), "expected a mapping of resources")
        _resources_for(profile.slurm, stage, stage, prov.file_of)
    return profile

