"""What a run folder (`--output-dir`) holds: each file's name, in one place.

| name | written by | what it is |
| --- | --- | --- |
| `run_config.json` | launch | the effective run config every worker reads |
| `inputs.json` | launch | fingerprints of tokenizer, data and model, compared when the run resumes |
| `job.lock` | launch | held by the running job (node 0's launcher): one run per folder |
| `checkpoint-N/` | worker | Trainer checkpoints; only those with `COMPLETE` count |
| `metrics.jsonl` | worker | every log record (`job.core.metrics_log`) |
| `tensorboard/` | worker | TensorBoard events |
| `samples_before.json` | worker | generations of the untrained model, for the report |
| `final/` | publish | the verified HF export, with its model card `README.md` |
| `report.md`, `loss.png`, `throughput.png` | publish | the run's report |
| `tracking.json` | worker | the W&B / MLflow run this folder continues, and the last step each was sent |
| `tracking/` | worker | W&B's run files and caches, MLflow's file store, where the user set none |
| `exit_status.json` | worker / publish | the verdict: exit code and message |
"""

from __future__ import annotations

import json
from pathlib import Path

from job.core.files import atomic_write_json

RUN_CONFIG = "run_config.json"
INPUTS = "inputs.json"
LOCK = "job.lock"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES_BEFORE = "samples_before.json"
FINAL = "final"
MODEL_CARD = "README.md"  # in final/
REPORT = "report.md"
LOSS_PNG = "loss.png"
THROUGHPUT_PNG = "throughput.png"
STATUS = "exit_status.json"
TRACKING = "tracking.json"


def write_status(output: Path, code: int, message: str) -> None:
    """Rank 0's verdict, which the launcher returns as its exit code (torchrun itself only exits 0 or 1)."""
    atomic_write_json(output / STATUS, {"code": code, "message": message})


def recorded_status(output: Path) -> dict | None:
    """Rank 0's verdict, {"code", "message"}, if one was recorded."""
    path = output / STATUS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def recorded_code(output: Path) -> int | None:
    """The exit code rank 0 recorded, if any."""
    status = recorded_status(output)
    return int(status["code"]) if status else None
