"""job.core.topology: launch settings from flags, the torchrun/Kubeflow environment, or defaults."""

from __future__ import annotations

import pytest

from job.core.config import RunConfig
from job.core.errors import JobError
from job.core.topology import MULTINODE_PORT, resolve_topology
from job.run.preflight import check_topology
from tests.conftest import KUBEFLOW_ENV


def test_the_torchrun_environment_fills_what_no_flag_sets():
    cfg, sources = resolve_topology(RunConfig.load(), KUBEFLOW_ENV)
    assert (cfg.nproc, cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port) == (
        8,
        4,
        2,
        "run-node-0-0.run",
        29400,
    )
    assert sources == {
        "nproc": "PET_NPROC_PER_NODE",
        "nnodes": "PET_NNODES",
        "node_rank": "PET_NODE_RANK",
        "master_addr": "PET_MASTER_ADDR",
        "master_port": "PET_MASTER_PORT",
    }
    detail = check_topology(cfg, sources, 8).detail
    assert "nnodes=4 (PET_NNODES)" in detail and "node_rank=2 (PET_NODE_RANK)" in detail


def test_flags_win_over_the_environment():
    cfg, sources = resolve_topology(RunConfig.load(nnodes=2, node_rank=1, master_addr="10.0.0.5"), KUBEFLOW_ENV)
    assert (cfg.nnodes, cfg.node_rank, cfg.master_addr) == (2, 1, "10.0.0.5")
    assert (cfg.nproc, cfg.master_port) == (8, 29400)  # no flag: still the environment's
    assert [sources[k] for k in ("nnodes", "node_rank", "master_addr", "nproc")] == [
        "flag",
        "flag",
        "flag",
        "PET_NPROC_PER_NODE",
    ]
    assert "node_rank=1 (flag)" in check_topology(cfg, sources, 8).detail


def test_an_indexed_job_gives_the_node_rank():
    loaded = RunConfig.load(nnodes=3)
    cfg, sources = resolve_topology(loaded, {"JOB_COMPLETION_INDEX": "2"})
    assert sources["node_rank"] == "JOB_COMPLETION_INDEX"
    assert cfg.node_rank == 2 and cfg.master_port == MULTINODE_PORT  # across nodes the port cannot be random
    assert loaded.node_rank is None  # a new value: the loaded config is never changed
    cfg, _ = resolve_topology(loaded, {"JOB_COMPLETION_INDEX": "2", "PET_NODE_RANK": "1"})
    assert cfg.node_rank == 1  # torchrun's own variable first


def test_defaults_without_flags_or_environment():
    cfg, sources = resolve_topology(RunConfig.load(), {})
    assert set(sources.values()) == {"default"}
    assert (cfg.nproc, cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port) == (None, 1, 0, "127.0.0.1", None)
    assert "master_port=any" in check_topology(cfg, sources, 8).detail


@pytest.mark.parametrize(
    "env, words",
    [
        ({"PET_NNODES": "1:4"}, ["PET_NNODES='1:4'", "elastic"]),
        ({"PET_NPROC_PER_NODE": "many"}, ["PET_NPROC_PER_NODE='many'"]),
        ({"PET_NNODES": "2", "JOB_COMPLETION_INDEX": "2"}, ["JOB_COMPLETION_INDEX=2 is not below PET_NNODES=2"]),
        ({"PET_NODE_RANK": "3", "PET_NNODES": "2"}, ["PET_NODE_RANK=3 is not below PET_NNODES=2"]),
        ({"PET_NODE_RANK": "1"}, ["PET_NODE_RANK=1 is not below --nnodes 1 (the default)"]),
        ({"JOB_COMPLETION_INDEX": "-1"}, ["JOB_COMPLETION_INDEX='-1' is not at least 0"]),  # a whole number
        ({"PET_NODE_RANK": "-2"}, ["PET_NODE_RANK='-2' is not at least 0"]),
        ({"PET_MASTER_PORT": "70000"}, ["PET_MASTER_PORT='70000' is not a port"]),
        ({"PET_NPROC_PER_NODE": "0"}, ["PET_NPROC_PER_NODE='0' is not at least 1"]),  # named as it was given
    ],
)
def test_a_bad_environment_is_a_one_line_error(env, words):
    with pytest.raises(JobError) as e:
        resolve_topology(RunConfig.load(), env)
    assert all(w in str(e.value) for w in words) and e.value.fix


def test_a_flag_and_a_variable_are_each_named_as_set():
    with pytest.raises(JobError, match="--node-rank 3 is not below PET_NNODES=2"):
        resolve_topology(RunConfig.load(node_rank=3), {"PET_NNODES": "2"})


def test_nproc_auto_means_one_process_per_gpu():
    cfg, sources = resolve_topology(RunConfig.load(), {"PET_NPROC_PER_NODE": "auto"})
    assert sources["nproc"] == "PET_NPROC_PER_NODE"
    assert cfg.nproc is None


def test_usable_cpus_is_the_affinity_mask_capped_by_the_cgroup_limit(tmp_path):
    import os

    from job.core.topology import usable_cpus

    mask = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == mask  # no cgroup files: the mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == mask  # v2, no limit
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1  # half a CPU: still one process
    (tmp_path / "cpu.max").write_text(f"{(mask + 7) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == mask  # a limit above the mask: the mask
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1  # v1: 1.5 CPUs, rounded down
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path) == mask
