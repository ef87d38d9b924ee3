"""The launch, resolved once (job/run/launch_record.py): what it holds, the universal-checkpoint decision, and how a
worker reads it (its launcher's environment, else the run folder's record)."""

from __future__ import annotations

import json

import pytest

from job.core import run_files
from job.core.config import RunConfig
from job.core.errors import JobError
from job.run.launch_record import LAUNCH_ENV, Launch, read_launch, with_resume_point, write_launch
from tests.conftest import launch_of


def test_the_launch_holds_what_every_reader_needs():
    cfg = RunConfig.load(per_device_batch_size=4, grad_accum=3, device="cpu", nnodes=2, node_rank=1, master_port=29500)
    launch = launch_of(cfg, nproc=2)
    assert (launch.nproc_per_node, launch.nnodes, launch.node_rank, launch.world_size) == (2, 2, 1, 4)
    assert (launch.device, launch.attention, launch.global_batch) == ("cpu", "sdpa", 4 * 3 * 4)
    assert not launch.given_prepared and launch.universal_checkpoint is None
    with pytest.raises(JobError, match="--attention flex cannot train on cpu"):
        launch_of(RunConfig.load(device="cpu", attention="flex"))


def _zero_checkpoint(folder, world: int):
    """A checkpoint as DeepSpeed ZeRO leaves it: one optimizer shard per data-parallel rank."""
    shards = folder / "global_step4"
    shards.mkdir(parents=True)
    for rank in range(world):
        (shards / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (folder / "latest").write_text("global_step4")
    return folder


def test_a_zero_checkpoint_of_another_world_size_loads_through_its_universal_form(tmp_path):
    launch = launch_of(RunConfig.load(device="cpu"), nproc=2)
    other = _zero_checkpoint(tmp_path / "checkpoint-4", world=4)
    same = _zero_checkpoint(tmp_path / "checkpoint-8", world=2)
    resumed = with_resume_point(launch, other)
    assert resumed.universal_checkpoint == str(other) and resumed.loads_universal(other)
    assert not resumed.loads_universal(same)  # a restart after a newer save of this world: the ZeRO files
    assert with_resume_point(launch, same).universal_checkpoint is None
    assert with_resume_point(launch, None).universal_checkpoint is None


def test_a_worker_reads_its_launchers_environment_else_the_run_folders_record(tmp_path, monkeypatch):
    launch = launch_of(RunConfig.load(device="cpu"), nproc=2)
    write_launch(tmp_path, launch)
    assert json.loads((tmp_path / run_files.LAUNCH).read_text())["world_size"] == 2
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    assert read_launch(tmp_path) == launch
    node1 = Launch(**{**json.loads(launch.to_json()), "node_rank": 1})
    monkeypatch.setenv(LAUNCH_ENV, node1.to_json())
    assert read_launch(tmp_path) == node1  # this node's view, not node 0's record
    monkeypatch.delenv(LAUNCH_ENV)
    with pytest.raises(JobError, match=r"launch\.json is missing or unreadable"):
        read_launch(tmp_path / "elsewhere")


@pytest.mark.parametrize("plan", ["check", "auto"])
def test_the_launch_records_the_memory_plan_it_settled_on(tmp_path, plan):
    """The memory check plans the resolved launch (its processes, device and attention kind) and records the settings
    it settled on, which launch.json keeps."""
    from job.model.build import preset_config
    from job.run.preflight import Preflight, check_launch, check_memory

    found = Preflight(RunConfig.load(device="cpu", plan=plan, output_dir=str(tmp_path / "run")))
    check_launch(found)
    found.model_config = preset_config("tiny", 512)
    assert check_memory(found).ok
    memory = found.launch.memory
    assert memory.chosen_by == ("--plan auto" if plan == "auto" else "the run's settings")
    assert memory.per_device_batch_size * memory.grad_accum == found.cfg.per_device_batch_size * found.cfg.grad_accum
    assert 0 < memory.bytes_per_device <= memory.device_memory
    write_launch(tmp_path, found.launch)
    assert Launch.from_dict(json.loads((tmp_path / run_files.LAUNCH).read_text())) == found.launch
