"""Preflight: one list of checks for `train` and `doctor`; output folders, resume rules, weights, memory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.core.errors import JobError
from job.core.weights import check_weights
from job.run import preflight as doctor
from job.run.check_results import Check, Preflight
from job.run.resume import check_output
from tests.conftest import REPO, complete_checkpoint, tiny_bloom


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

    monkeypatch.setattr(doctor, "CHECKS", [doctor.check_output, spy, doctor.check_writable])
    cfg = RunConfig.load(output_dir=str(tmp_path / "out"))
    results, _ = doctor.run_checks(cfg)
    assert [r.name for r in results] == ["output", "spy", "writable"]
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


def test_memory_preflight_is_the_plan_and_counts_the_attention_scores_unless_flex():
    from job.model.build import model_config
    from job.run.memory_plan import ModelShape, activation_bytes, settings_of

    cfg = RunConfig.load(max_length=100_000, per_device_batch_size=16)
    config = model_config(cfg, 600)
    shape = ModelShape.from_config(config)
    need = sum(activation_bytes(shape, settings_of(cfg, "sdpa")))  # sdpa: one [B, H, T, T] bias per step
    assert need >= 16 * config.n_head * 100_000**2 * 4
    flex = sum(activation_bytes(shape, settings_of(RunConfig.load(max_length=100_000, attention="flex"), "flex")))
    assert flex < need / 40  # flex never builds the scores

    def memory_row(cfg):  # the check plans the resolved launch
        found = Preflight(cfg, model_config=config)
        doctor.check_launch(found)
        return doctor.check_memory(found)

    result = memory_row(cfg)
    assert not result.ok and "the memory plan does not fit" in result.detail and "--max-length" in result.fix
    assert memory_row(RunConfig.load()).ok
    assert "--plan off" in memory_row(RunConfig.load(plan="off")).detail


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


@pytest.mark.parametrize("name", ["checkpoint-7", "final", "final.partial", "metrics.jsonl", "launch.json", "tracking"])
def test_a_run_folder_whose_own_names_link_outside_is_refused(tmp_path, name):
    out = tmp_path / "out"
    complete_checkpoint(out, 5)
    (out / run_files.RUN_CONFIG).write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / ".job-writing").touch()
    (out / name).symlink_to(outside, target_is_directory=True)
    result = check_output(Preflight(RunConfig.load(output_dir=str(out))))
    assert not result.ok and f"{out / name} is a symbolic link (to {outside})" in result.detail, result
    assert "remove the link" in result.fix
    assert sorted(p.name for p in outside.iterdir()) == [".job-writing"]


# ------------------------------------------------------------------------------- folders the run writes
OTHER_UID = 1000  # the image's user, as the pods run it


@pytest.fixture
def shared_root():
    """A folder another uid can enter (pytest's own tmp folders are private to this uid), removed afterwards."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="job-writable-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


def as_pod_user(path: Path) -> None:
    """Give `path` to the uid the check runs as (the pods' 1000 when this is root, else this uid)."""
    import os

    if os.getuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(0o755)


def lock(path: Path) -> None:
    """Make `path` unwritable for that uid: root's and mode 755 when this is root (the child runs as 1000),
    else mode 555 (this uid, which permissions bind)."""
    import os

    if os.getuid() == 0:
        os.chown(path, 0, 0)
        path.chmod(0o755)
    else:
        path.chmod(0o555)


def pod_folders(root: Path) -> dict[str, Path]:
    """The pod's volumes as folders under `root`: /output, and on /cache what the image's ENV points at."""
    folders = {"output": root / "output", "cache": root / "cache"}
    for sub in ("job", "huggingface", "home", "tmp"):
        folders[sub] = root / "cache" / sub
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
        as_pod_user(path)
    return folders


def check_writable_as_pod_user(folders: dict[str, Path]) -> dict:
    """check_writable in a forked child that runs as the pods' uid (root here drops to it with setgid/setuid), with
    the image's variables pointing into `folders`: what `doctor` in a pod sees. (A fork, not a new interpreter:
    this one may live where that uid cannot read.)"""
    import os
    import tempfile

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            if os.getuid() == 0:
                os.setgroups([])
                os.setgid(OTHER_UID)
                os.setuid(OTHER_UID)
            for name in doctor.WRITTEN_FOLDER_VARIABLES:
                os.environ.pop(name, None)
            os.environ.update(
                JOB_CACHE=str(folders["job"]), HF_HOME=str(folders["huggingface"]), HOME=str(folders["home"])
            )
            tempfile.tempdir = str(folders["tmp"])
            result = doctor.check_writable(Preflight(RunConfig.load(output_dir=str(folders["output"] / "run"))))
            line = doctor.format_table([result])
            os.write(write, json.dumps({"ok": result.ok, "line": line, "uid": os.getuid()}).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and text, text
    found = json.loads(text)
    assert found["uid"] == (OTHER_UID if os.getuid() == 0 else os.getuid())
    return found


@pytest.mark.parametrize(
    "locked, named", [("output", "--output-dir"), ("job", "JOB_CACHE"), ("huggingface", "HF_HOME"), ("tmp", "the temp")]
)
def test_doctor_names_a_folder_the_pod_user_cannot_write_and_the_fix(shared_root, locked, named):
    """A volume root owned by another uid (what a ReadWriteMany volume without fsGroup gives a pod): one line that
    names the folder, the uid and the fix; writable again, the check passes."""
    folders = pod_folders(shared_root)
    assert check_writable_as_pod_user(folders)["ok"]
    lock(folders[locked])
    result = check_writable_as_pod_user(folders)
    assert not result["ok"]
    (line,) = result["line"].splitlines()
    assert line.startswith("FAIL writable") and named in line and f"{folders[locked]} is not writable by uid" in line
    assert "make k8s-volume-permissions" in line
    assert not [p for p in shared_root.rglob(".job-write-test-*")], "the probe files are removed"
    as_pod_user(folders[locked])
    assert check_writable_as_pod_user(folders)["ok"]


def test_the_volume_permissions_job_makes_root_owned_volumes_writable_for_the_pods(shared_root):
    """k8s/volume-permissions/job.yaml's very command, run here as root (its pod's user) on folders laid out as
    fresh ReadWriteMany volumes (root's, mode 755): before it the pods' uid cannot write, after it the check
    passes, and the mount points are 1000:1000, mode 775."""
    import os
    import subprocess

    import yaml

    if os.getuid() != 0:
        pytest.skip("the Job runs as root (chown to another uid); this test needs root too")
    (job,) = [d for d in yaml.safe_load_all((REPO / "k8s" / "volume-permissions" / "job.yaml").read_text()) if d]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsUser"] == 0
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    folders = pod_folders(shared_root)
    for sub in ("job", "huggingface", "home"):  # the pods make these themselves, on the volume
        folders[sub].rmdir()
    host = {"/data": shared_root / "data", "/output": folders["output"], "/cache": folders["cache"]}
    host["/data"].mkdir()
    for path in host.values():
        lock(path)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert set(container["command"][4:]) == mounts == set(host)
    assert not check_writable_as_pod_user(folders)["ok"]
    command = [str(host[arg]) if arg in host else arg for arg in container["command"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("owner 1000:1000, mode 775") == len(host), done.stdout
    assert check_writable_as_pod_user(folders)["ok"]
    for path in host.values():
        assert (path.stat().st_uid, path.stat().st_gid, path.stat().st_mode & 0o777) == (1000, 1000, 0o775)
