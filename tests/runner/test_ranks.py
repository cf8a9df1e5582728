"""Rank, world size and master address from torchrun's or Slurm's variables, in one place."""

from __future__ import annotations

from pipeline.core.ranks import RankInfo, rank_info_from_env

SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
              "SLURM_JOB_NODELIST": "gpu[010-011]"}


def test_single_process_without_a_launcher():
    assert rank_info_from_env({}) == RankInfo(0, 1, 0, "127.0.0.1", 29500)


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    assert rank_info_from_env(env) == RankInfo(5, 8, 1, "node0", 29400)


def test_slurm_task_takes_the_first_node_and_a_port_from_its_job_id():
    info = rank_info_from_env(SLURM_TASK)
    assert info == RankInfo(3, 4, 1, "gpu010", 20000 + 1234)
    other_job = rank_info_from_env({**SLURM_TASK, "SLURM_JOB_ID": "1235"})
    assert other_job.master_port != info.master_port, "two jobs on one node must not share a port"


def test_explicit_master_and_torchrun_inside_an_allocation_win():
    assert rank_info_from_env({**SLURM_TASK, "MASTER_ADDR": "login", "MASTER_PORT": "31000"}).master_addr == "login"
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert rank_info_from_env({**SLURM_TASK, **torchrun}) == RankInfo(0, 2, 0, "a", 1)


def test_node_lists():
    def first(nodelist: str) -> str:
        return rank_info_from_env({**SLURM_TASK, "SLURM_JOB_NODELIST": nodelist}).master_addr

    assert first("kope-node[1-2]") == "kope-node1"
    assert first("gpu[020,010-012],cpu5") == "gpu020"
    assert first("cpu5,gpu[1-2]") == "cpu5"
    assert first("single") == "single"


def test_exported_variables_read_back():
    info = RankInfo(2, 4, 0, "kope-node2", 21234)
    assert rank_info_from_env(info.export()) == info
