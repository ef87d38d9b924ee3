"""What a run folder (`--output-dir`) holds: each file's name, in one place.

| name | written by | what it is |
| --- | --- | --- |
| `run_config.json` | launch | the effective run config every worker reads |
| `launch.json` | launch | the launch as node 0 resolved it (`job.run.launch_record.Launch`) |
| `inputs.json` | launch | fingerprints of tokenizer, data and model, compared when the run resumes |
| `job.lock` | launch | held by the running job (node 0's launcher): one run per folder |
| `checkpoint-N/` | worker | Trainer checkpoints; only those with `COMPLETE` count |
| `metrics.jsonl` | worker | every log record (`job.core.metrics_log`) |
| `tensorboard/` | worker | TensorBoard events |
| `samples_before.json` | worker | generations of the untrained model, for the report |
| `final/` | finish | the verified HF export, with its model card `README.md` and `SHA256SUMS` |
| `report.md`, `loss.png`, `throughput.png` | finish | the run's report |
| `tracking.json` | worker | the W&B / MLflow run this folder continues, and the last step each was sent |
| `tracking/` | worker | W&B's run files and caches, MLflow's file store, where the user set none |
| `exit_status.json` | worker / finish | the verdict: exit code and message |
"""

from __future__ import annotations

import json
from pathlib import Path

from job.core.files import atomic_write_json

RUN_CONFIG = "run_config.json"
INPUTS = "inputs.json"
LAUNCH = "launch.json"
LOCK = "job.lock"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES_BEFORE = "samples_before.json"
FINAL = "final"
MODEL_CARD = "README.md"  # in final/
HASHES = "SHA256SUMS"  # in final/: the content hash of every file the export verified (`sha256sum -c` reads it)
REPORT = "report.md"
LOSS_PNG = "loss.png"
THROUGHPUT_PNG = "throughput.png"
EXIT_STATUS = "exit_status.json"
TRACKING = "tracking.json"
TRACKING_FILES = "tracking"  # a folder: W&B's run files and caches, MLflow's file store, where the user set none
NAMES = (
    RUN_CONFIG,
    LAUNCH,
    INPUTS,
    LOCK,
    METRICS,
    TENSORBOARD,
    SAMPLES_BEFORE,
    FINAL,
    REPORT,
    LOSS_PNG,
    THROUGHPUT_PNG,
    EXIT_STATUS,
    TRACKING,
    TRACKING_FILES,
)


def write_status(output: Path, code: int, message: str) -> None:
    """Rank 0's verdict, which the launcher returns as its exit code (torchrun itself only exits 0 or 1)."""
    atomic_write_json(output / EXIT_STATUS, {"code": code, "message": message})


def write_status_if_possible(output: Path, code: int, message: str) -> bool:
    """`write_status` where the run may have failed for want of room (a full disk, a file-size limit): the verdict
    is recorded if it can be; whether it was."""
    if not output.is_dir():
        return False
    try:
        write_status(output, code, message)
    except OSError:
        return False
    return True


def recorded_status(output: Path) -> dict | None:
    """Rank 0's verdict, {"code", "message"}, if one was recorded."""
    path = output / EXIT_STATUS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def recorded_code(output: Path) -> int | None:
    """The exit code rank 0 recorded, if any."""
    status = recorded_status(output)
    return int(status["code"]) if status else None
