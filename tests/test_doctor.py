"""Preflight: one list of checks for `train` and `doctor`; output folders, resume rules, weights, memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from job.core import checkpoints
from job.core.config import RunConfig
from job.core.errors import JobError
from job.core.weights import check_weights
from job.run import preflight as doctor
from job.run.check_results import Check, Preflight
from job.run.resume import check_output
from tests.conftest import REPO, complete_checkpoint, launch_of, tiny_bloom


def _run(output: Path, config: dict, complete: bool) -> None:
    if complete:
        complete_checkpoint(output, 4)
    else:
        (output / "checkpoint-4").mkdir(parents=True)
    (output / "run_config.json").write_text(json.dumps(config))


def test_a_start_that_failed_before_any_checkpoint_does_not_block_the_corrected_rerun(tmp_path):
    out = tmp_path / "out"
    _run(out, {"learning_rate": -1.0}, complete=False)
    result = check_output(Preflight(RunConfig.load(output_dir=str(out), learning_rate=1e-3)))
    assert result.ok and "starts afresh" in result.detail
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    checkpoints.mark_complete(out / "checkpoint-4", 4)  # now there is a run to resume: a change is refused
    result = check_output(Preflight(RunConfig.load(output_dir=str(out), learning_rate=1e-3)))
    assert not result.ok and "changed: learning_rate" in result.detail


def test_paths_are_compared_resolved(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    out = tmp_path / "out"
    _run(out, RunConfig.load(output_dir=str(out), data=str(data)).to_dict(), complete=True)
    monkeypatch.chdir(tmp_path)
    same = RunConfig.load(output_dir="out/", data="./d.jsonl")  # trailing slash, relative paths
    assert check_output(Preflight(same)).ok, check_output(Preflight(same))
    other = tmp_path / "e.jsonl"
    other.write_text("{}\n")
    result = check_output(Preflight(RunConfig.load(output_dir="out", data=str(other))))
    assert not result.ok and "changed: data" in result.detail


def test_doctor_runs_exactly_the_checks_train_runs(tmp_path, monkeypatch):
    """One list: doctor prints a row per entry of doctor.CHECKS, and train stops at the first failing one."""
    seen = []

    def spy(p):
        seen.append("spy")
        return Check("spy", False, "the spy failed", "remove the spy")

    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_output, spy, doctor.check_cache])
    cfg = RunConfig.load(output_dir=str(tmp_path / "out"))
    results, _ = doctor.run_checks(cfg)
    assert [r.name for r in results] == ["output", "spy", "caches"]
    with pytest.raises(JobError, match="spy: the spy failed -- remove the spy"):
        doctor.preflight(cfg)
    assert seen == ["spy", "spy"]


def test_truncated_and_corrupt_safetensors_are_named(tmp_path):
    tiny_bloom(64).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    check_weights(tmp_path)  # intact
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(JobError, match=r"truncated or corrupt \(\d+ bytes where its header describes \d+\)"):
        check_weights(tmp_path)
    weights.write_bytes(struct.pack("<Q", 20) + b"{not json at all...}" + data[28:])
    with pytest.raises(JobError, match="a corrupt header"):
        check_weights(tmp_path)
    weights.write_bytes(b"\x00\x01")
    with pytest.raises(JobError, match="no valid header"):
        check_weights(tmp_path)


def test_memory_preflight_counts_the_attention_scores_unless_flex(monkeypatch):
    from job.model.build import model_config

    cfg = RunConfig.load(max_length=100_000, per_device_batch_size=16)
    config = model_config(cfg, 600)
    need = doctor.activation_bytes(cfg, config, "sdpa")  # sdpa on a CPU: [B, H, T, T] fp32 per layer
    assert need >= 16 * config.n_head * 100_000**2 * 4 * config.n_layer
    flex = doctor.activation_bytes(RunConfig.load(max_length=100_000, attention="flex"), config, "flex")
    assert flex < need / 500  # flex never builds the scores
    found = Preflight(cfg, model_config=config, launch=launch_of(cfg))
    result = doctor.check_memory(found)
    assert not result.ok and "lower --max-length" in result.fix
    small = RunConfig.load()
    assert doctor.check_memory(Preflight(small, model_config=config, launch=launch_of(small))).ok


def test_a_folder_of_someone_else_is_refused_a_volume_root_is_not(tmp_path):
    out = tmp_path / "out"
    (out / "lost+found").mkdir(parents=True)
    assert check_output(Preflight(RunConfig.load(output_dir=str(out)))).ok
    (out / "checkpoint-500").mkdir()
    result = check_output(Preflight(RunConfig.load(output_dir=str(out))))
    assert not result.ok and "not empty (checkpoint-500)" in result.detail and "new or empty" in result.fix


def test_a_run_folder_is_its_real_path(tmp_path):
    """`PARENT/missing/../run` names `PARENT/run`: its run is found and a changed setting refused (the preflight used
    to see a new folder there and the run then resumed the other run's checkpoint)."""
    run = tmp_path / "run"
    _run(run, RunConfig.load(output_dir=str(run), learning_rate=1e-3).to_dict(), complete=True)
    found = Preflight(RunConfig.load(output_dir=str(tmp_path / "missing" / ".." / "run"), learning_rate=5e-3))
    doctor.check_launch(found)
    assert found.cfg.output_dir == str(run)
    result = check_output(found)
    assert not result.ok and "changed: learning_rate" in result.detail
    assert not (tmp_path / "missing").exists()


def test_doctor_says_a_folder_whose_run_is_going_is_in_use(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    run = tmp_path / "run"
    _run(run, RunConfig.load(output_dir=str(run)).to_dict(), complete=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from job.run.launch import OutputLock; from pathlib import Path;"
            "lock = OutputLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = check_output(Preflight(RunConfig.load(output_dir=str(run))))
        assert not result.ok and f"in use by a running job (pid {holder.pid}" in result.detail
        # node 1 of a multi-node run that starts after node 0 has taken the lock: its own run holds it
        other_node = check_output(Preflight(RunConfig.load(output_dir=str(run), nnodes=2, node_rank=1)))
        assert other_node.ok, other_node.detail
    finally:
        holder.kill()
        holder.wait()
    assert check_output(Preflight(RunConfig.load(output_dir=str(run)))).ok


def test_a_missing_or_unreadable_record_is_a_refusal_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    _run(run, RunConfig.load(output_dir=str(run)).to_dict(), complete=True)
    (run / "run_config.json").write_text("{not json")
    with pytest.raises(JobError, match=r"run_config\.json is unreadable"):
        check_output(Preflight(RunConfig.load(output_dir=str(run))))
    with pytest.raises(JobError, match=r"inputs\.json is missing"):
        from job.run.resume import _require_same_inputs

        _require_same_inputs({"tokenizer": "t"}, run)


@pytest.mark.parametrize(
    "addr, refused",
    [
        *[(a, True) for a in ("127.0.0.1", "127.0.1.1", "localhost", "::1", "[::1]", "0.0.0.0")],
        *[(a, False) for a in ("run-node-0-0.run", "10.0.0.5", "fd00::5")],
    ],
)
def test_a_rendezvous_a_later_node_cannot_reach_is_refused(addr, refused):
    """Node rank > 0 joins node 0 at master_addr: its own loopback would wait out the whole join timeout."""
    cfg = RunConfig.load(nnodes=2, node_rank=1, master_addr=addr, master_port=29500)
    result = doctor.check_rendezvous(Preflight(cfg))
    assert result.ok is not refused, result
    if refused:
        assert addr in result.detail and "PET_MASTER_ADDR" in result.fix
    node0 = RunConfig.load(nnodes=2, node_rank=0, master_addr=addr, master_port=29500)
    assert doctor.check_rendezvous(Preflight(node0)).ok  # node 0 hosts it: its own address is fine there
    assert doctor.check_rendezvous(Preflight(RunConfig.load(nnodes=1, node_rank=0, master_addr=addr))).ok


def test_a_refused_launch_setting_fails_its_row_and_the_later_rows_still_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PET_NNODES", "1:4")
    monkeypatch.setenv("PET_NODE_RANK", "3")
    cfg = RunConfig.load(output_dir=str(tmp_path / "out"), node_rank=2)  # a flag the fallback cannot keep
    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_launch, doctor.check_deepspeed, doctor.check_rendezvous])
    results, found = doctor.run_checks(cfg)
    assert [(r.name, r.ok) for r in results] == [("launch", False), ("deepspeed", True), ("rendezvous", True)]
    assert "elastic" in results[0].detail and "--nnodes" in results[0].fix
    assert (found.cfg.nnodes, found.cfg.node_rank) == (1, 0)


@pytest.mark.parametrize("reporter", ["wandb", "mlflow"])
def test_a_reporting_integration_without_its_package_is_refused_naming_the_extra(reporter, monkeypatch):
    from transformers.integrations import integration_utils

    cfg = RunConfig.load(report_to=f"tensorboard,{reporter}")
    installed = reporter in integration_utils.get_available_reporting_integrations()
    if installed:  # an environment with the extra: take it away
        monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(JobError) as e:
        doctor.check_settings(Preflight(cfg))
    assert f"--report-to {reporter}: its package is not installed" in e.value.cause
    assert f"requirements-{reporter}.txt" in e.value.fix and (REPO / doctor.TRACKING_EXTRAS[reporter]).is_file()
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard", reporter])
    assert doctor.check_settings(Preflight(cfg)).ok  # with the package: accepted


def test_kubeflow_reporting_is_left_to_transformers(monkeypatch):
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_URL", raising=False)
    with pytest.raises(JobError, match="KUBEFLOW_TRAINER_SERVER_URL"):
        doctor.check_settings(Preflight(RunConfig.load(report_to="kubeflow")))


def test_an_explicit_loopback_master_addr_means_every_node_on_this_host(monkeypatch):
    """From the environment or the default, loopback on node rank 1 is refused; as a flag it is the user's word."""
    monkeypatch.setenv("PET_MASTER_ADDR", "127.0.0.1")
    found = Preflight(RunConfig.load(nnodes=2, node_rank=1, master_port=29500))
    doctor.check_launch(found)
    assert not doctor.check_rendezvous(found).ok
    found = Preflight(RunConfig.load(nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=29500))
    doctor.check_launch(found)
    result = doctor.check_rendezvous(found)
    assert result.ok and "on this host" in result.detail
