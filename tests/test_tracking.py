"""job.run.tracking: one W&B run and one MLflow run per run folder, every step sent once across a preemption and a
resume. The real libraries, no server: W&B offline (its run files read back), MLflow with a file store."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.core import checkpoints, run_files
from job.core.errors import EXIT_PREEMPTED, JobError
from job.run.tracking import TrackingRecord, tracking_environment, tracking_run_id
from tests.conftest import REPO, train_args, write_jsonl


def test_the_run_id_names_the_folder_is_recorded_and_read_back(tmp_path):
    output = tmp_path / "Run 7 (zh)"
    output.mkdir()
    run_id = TrackingRecord(output).run_id
    assert re.fullmatch(r"run-7-zh-[0-9a-f]{10}", run_id)
    assert json.loads((output / run_files.TRACKING).read_text())["run_id"] == run_id
    assert TrackingRecord(output).run_id == run_id  # a resume reads it back
    assert tracking_run_id(output) != run_id  # the same path for another job: another run


def test_the_environment_points_into_the_run_folder_unless_the_user_chose(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    record = TrackingRecord(output)
    environ = {"WANDB_DIR": "/mine", "WANDB_RESUME": ""}
    chosen = tracking_environment(output, ["wandb", "mlflow"], record, environ)
    assert "WANDB_DIR" not in chosen and environ["WANDB_DIR"] == "/mine"
    assert environ["WANDB_RUN_ID"] == record.run_id and environ["WANDB_RESUME"] == "allow"
    assert Path(environ["WANDB_CACHE_DIR"]).is_dir() and Path(environ["WANDB_CACHE_DIR"]).is_relative_to(output)
    assert environ["MLFLOW_TRACKING_URI"] == (output / "tracking" / "mlruns").as_uri()
    assert "MLFLOW_RUN_ID" not in environ  # MLflow names its run: known after the first start
    record.values |= {"mlflow_run_id": "abc", "mlflow_tracking_uri": "https://mlflow.internal"}
    server = {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}
    assert tracking_environment(output, ["mlflow"], record, server) == {
        "MLFLOW_RUN_ID": "abc",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    other = {"MLFLOW_TRACKING_URI": "https://other.internal"}  # a server that never saw the run: a new one there
    assert "MLFLOW_RUN_ID" not in tracking_environment(output, ["mlflow"], record, other)
    assert tracking_environment(output, ["tensorboard"], record, {}) == {}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"run_id": "r", "sent": 3}'])
def test_a_damaged_record_is_one_line_not_a_new_run(tmp_path, text):
    (tmp_path / run_files.TRACKING).write_text(text)
    with pytest.raises(JobError, match=f"{tmp_path / run_files.TRACKING} is unreadable .*not known"):
        TrackingRecord(tmp_path)
    assert (tmp_path / run_files.TRACKING).read_text() == text  # left as it was, for the user to restore


@pytest.mark.parametrize("linked", ["wandb-cache", "mlruns"])
def test_a_link_inside_the_tracking_folder_is_refused(tmp_path, linked):
    output, outside = tmp_path / "run", tmp_path / "elsewhere"
    (output / run_files.TRACKING_FILES).mkdir(parents=True)
    outside.mkdir()
    (output / run_files.TRACKING_FILES / linked).symlink_to(outside, target_is_directory=True)
    with pytest.raises(JobError, match=f"{linked} is a symbolic link .*the job writes only inside"):
        tracking_environment(output, ["wandb", "mlflow"], TrackingRecord(output), {})
    assert list(outside.iterdir()) == []


def test_a_metric_is_sent_once_per_step_and_backend(tmp_path):
    record = TrackingRecord(tmp_path)
    record.mark_sent("mlflow", 5, {"loss": 1.0, "epoch": 0.1})
    logs = {"eval_loss": 2.0, "epoch": 0.1}
    assert record.unsent("mlflow", 5, logs) == {"eval_loss": 2.0}  # an eval at a step whose loss was sent
    assert record.unsent("mlflow", 4, {"loss": 1.1}) == {}  # a step a resume repeats
    assert record.unsent("wandb", 4, {"loss": 1.1}) == {"loss": 1.1}  # another backend
    resumed = TrackingRecord(tmp_path)  # read back from the run folder
    assert resumed.unsent("mlflow", 5, {"loss": 1.0}) == {}
    assert resumed.unsent("mlflow", 5, logs, rows=True) == {}  # W&B: no step a worker before this one sent
    resumed.mark_sent("mlflow", 6, {"loss": 1.0})
    assert resumed.unsent("mlflow", 6, logs, rows=True) == logs  # this worker's own step: the same row


# ------------------------------------------------------------------ a preempted and resumed run, end to end
def _wandb_records(path: Path):
    """The records of a W&B run file (`run-ID.wandb`): a LevelDB-style log of 32 KiB blocks, each record a
    7-byte header (CRC32, length, type: full/first/middle/last) and a chunk of one protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (length, kind) == (0, 0):
            pos += block - pos % block
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_history(wandb_dir: Path) -> tuple[set[str], dict[str, list[int]]]:
    """The run ids of every offline run file, and each metric's logged steps, in the order logged."""
    ids, steps = set(), {}
    for path in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        steps.setdefault(key, []).append(record.history.step.num)
    return ids, steps


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HOME": str(home)}


def _logged_losses(output: Path) -> int:
    path = output / run_files.METRICS
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_a_preempted_and_resumed_run_is_one_tracking_run_with_every_step_once(
    tmp_path, tiny_tokenizer_dir, monkeypatch
):
    for extra in ("wandb", "mlflow"):  # make setup installs both (requirements-dev.txt)
        reason = f"{extra} is an optional extra: pip install -c constraints.txt -r requirements-{extra}.txt"
        pytest.importorskip(extra, reason=reason)
    from mlflow.tracking import MlflowClient

    from job.data.corpus import builtin_articles

    data = write_jsonl(tmp_path / "docs.jsonl", builtin_articles()[:200])
    output = tmp_path / "run"
    steps = 30
    args = train_args(
        data=data,
        tokenizer=tiny_tokenizer_dir,
        output_dir=output,
        deepspeed="none",
        max_steps=steps,
        save_steps=4,
        eval_steps=10,
        eval_fraction=0.05,
        eval_batches=1,
        report_to="wandb,mlflow",
    )
    command, env = [sys.executable, "-m", "job", *args], _env(tmp_path / "home")
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.time() + 600
        while _logged_losses(output) < 6:  # past a checkpoint (every 4 steps), with steps logged after it
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped = checkpoints.step_of(checkpoints.latest_complete(output))
    assert 6 <= stopped < steps
    # Resume from the checkpoint before: the steps logged after it are trained and logged again, as after a kill.
    earlier = checkpoints.complete_checkpoints(output)[-2]
    restart = checkpoints.step_of(earlier)  # (rotated away as the resumed run saves)
    assert restart < stopped
    resumed = subprocess.run(
        [*command, "--resume", str(earlier)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # nothing outside the run folder: a pod's home and working directory are read-only or lost with it
    assert [p for p in (tmp_path / "home").rglob("*") if re.search("wandb|mlflow", p.name)] == []
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlruns").exists()
    record = json.loads((output / run_files.TRACKING).read_text())
    train_steps, eval_steps = list(range(1, steps + 1)), [0, 10, 20, 30]
    # W&B: every session's run file under the run folder, one run id, each metric at each step once
    wandb_dir = output / "tracking" / "wandb"
    assert len(list(wandb_dir.glob("offline-run-*"))) == 2
    ids, history = _wandb_history(wandb_dir)
    assert ids == {record["run_id"]}
    assert history["train/loss"] == train_steps
    assert history["eval/loss"] == eval_steps  # not the resumed run's first (W&B takes no step it has passed)
    assert history["train/global_step"] == sorted(set(history["train/global_step"]))  # W&B's step is the step
    # MLflow: one run in the file store under the run folder, each metric at each step once
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the job sets it for its default store
    client = MlflowClient((output / "tracking" / "mlruns").as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_id for r in runs] == [record["mlflow_run_id"]]
    assert [m.step for m in client.get_metric_history(record["mlflow_run_id"], "loss")] == train_steps
    # and the resumed run's evaluation at its first step, a step without one before
    evaluated = [m.step for m in client.get_metric_history(record["mlflow_run_id"], "eval_loss")]
    assert evaluated == sorted({restart, *eval_steps})


def test_the_release_publishes_a_tracking_variant_of_every_tag():
    import yaml

    release = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    job = release["jobs"]["image"]  # (the other job is CI, which it needs)
    variants = job["strategy"]["matrix"]["include"]
    assert {"suffix": "-tracking", "tracking": "wandb,mlflow"} in variants and {
        "suffix": "",
        "tracking": "",
    } in variants
    (meta,) = [s for s in job["steps"] if "metadata-action" in s.get("uses", "")]
    assert "suffix=${{ matrix.suffix }}" in meta["with"]["flavor"].splitlines()
    (build,) = [s for s in job["steps"] if "build-push-action" in s.get("uses", "")]
    assert "TRACKING=${{ matrix.tracking }}" in build["with"]["build-args"].splitlines()
    (move,) = [s for s in job["steps"] if "imagetools create" in s.get("run", "")]  # the tags, after the test
    assert move["env"]["TAGS"] == "${{ steps.meta.outputs.tags }}"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert 'ARG TRACKING=""' in dockerfile and '-r "requirements-$extra.txt"' in dockerfile
    for extra in variants[-1]["tracking"].split(","):
        assert (REPO / f"requirements-{extra}.txt").is_file() and f"requirements-{extra}.txt" in dockerfile


def _containers(node):
    if isinstance(node, dict):
        yield from node.get("containers", [])
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


@pytest.mark.parametrize("manifest", ["job.yaml", "indexed/job.yaml", "jobset/jobset.yaml", "trainjob/runtime.yaml"])
def test_training_pods_take_the_tracking_keys_from_the_documented_secret(manifest):
    import yaml

    (secret,) = re.findall(
        r"kubectl create secret generic (\S+) --from-literal=WANDB_API_KEY", (REPO / "k8s" / "README.md").read_text()
    )
    text = (REPO / "k8s" / manifest).read_text()
    containers = [c for doc in yaml.safe_load_all(text) for c in _containers(doc) if c.get("envFrom")]
    assert containers, f"no container of {manifest} reads a Secret"
    for container in containers:
        assert {"secretRef": {"name": secret, "optional": True}} in container["envFrom"]
    assert not re.search(r"WANDB_API_KEY|MLFLOW_TRACKING_(PASSWORD|TOKEN)", text)  # never a value in a manifest
