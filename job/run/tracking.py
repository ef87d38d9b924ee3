"""One W&B run and one MLflow run per job, however often it is preempted and resumed.

The run folder records the tracking run (`tracking.json`): its id, derived from the folder when the job first starts
(W&B takes it as the run id), the id MLflow gave its run, and the last step each backend was sent for each metric.
Each worker start puts these in the environment that transformers' `WandbCallback` and `MLflowCallback` and the
libraries themselves read (`WANDB_RUN_ID`, `WANDB_RESUME=allow`, `MLFLOW_RUN_ID`), with writable folders under
the run folder where the user set none (`WANDB_DIR`, an MLflow file store): in a pod only the output claim is
written and kept.

What the two callbacks lose across a resume, and what the subclasses here add:
- the steps between the checkpoint and the preemption are trained and logged again, and the resumed run evaluates
  again at its first step (`eval_on_start`): both callbacks would log those steps twice. Here a metric is sent
  only for a step after the last one already sent for it (the resume is exact, so the values are the same); to W&B,
  whose history takes only later steps once resumed, only for a step after the last one sent before the resume.
- `WandbCallback` logs without a step, so W&B counts its own, which restarts at 0 in a resumed offline run (the
  offline run files of one id then overlap). Here W&B's step is the Trainer's global step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from job.core import run_files
from job.core.errors import JobError
from job.core.files import atomic_write_json, refuse_link


def tracking_run_id(output: Path) -> str:
    """A W&B-valid run id (letters, digits, dashes) naming the folder, unique to this folder at this first start."""
    folder = output.resolve()
    stem = re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-")[:40] or "run"
    nonce = f"{folder}\0{os.urandom(8).hex()}"  # the same path reused for another job gets another run
    return f"{stem}-{hashlib.blake2b(nonce.encode(), digest_size=5).hexdigest()}"


class TrackingRecord:
    """`OUTPUT/tracking.json`: {"run_id", "mlflow_run_id", "mlflow_tracking_uri" (where that run is),
    "sent": {backend: {metric: last step sent}}}."""

    def __init__(self, output: Path):
        self.path = output / run_files.TRACKING
        self.values: dict[str, Any] = self._read() if self.path.exists() else {}
        if "run_id" not in self.values:
            self.values["run_id"] = tracking_run_id(output)
            self.save()
        # the last step each backend was sent before this worker started
        self.before = {b: max(sent.values(), default=-1) for b, sent in self.values.get("sent", {}).items()}

    def _read(self) -> dict[str, Any]:
        try:
            values = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problem = type(e).__name__
        else:
            if isinstance(values, dict) and isinstance(values.get("sent", {}), dict):
                return values
            problem = "not a record of this job"
        raise JobError(
            f"{self.path} is unreadable ({problem}): the tracking runs this folder continues are not known",
            "restore it from a copy of the run folder, or remove it to start new tracking runs",
        )

    @property
    def run_id(self) -> str:
        return self.values["run_id"]

    def save(self) -> None:
        atomic_write_json(self.path, self.values)

    def unsent(self, backend: str, step: int, logs: dict[str, Any], rows: bool = False) -> dict[str, Any]:
        """The metrics of `logs` not yet sent to `backend` for this step or a later one. `rows`: the backend keeps
        one row per step and only takes later steps (W&B), so nothing at a step an earlier worker sent."""
        if rows and step <= self.before.get(backend, -1):
            return {}
        sent = self.values.get("sent", {}).get(backend, {})
        return {k: v for k, v in logs.items() if step > sent.get(k, -1)}

    def mark_sent(self, backend: str, step: int, keys) -> None:
        sent = self.values.setdefault("sent", {}).setdefault(backend, {})
        sent.update(dict.fromkeys(keys, step))
        self.save()


def tracking_environment(
    output: Path, reporters: list[str], record: TrackingRecord, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set (where the user set nothing) what the tracking libraries read; returns what was set."""
    environ = os.environ if environ is None else environ
    run_folder = output.resolve()
    folder = run_folder / run_files.TRACKING_FILES
    defaults: dict[str, str] = {}
    if "wandb" in reporters:
        defaults |= {
            "WANDB_RUN_ID": record.run_id,
            "WANDB_RESUME": "allow",
            "WANDB_NAME": run_folder.name,
            # W&B writes its run files under WANDB_DIR/wandb, and keeps caches and settings under $HOME otherwise
            "WANDB_DIR": str(folder),
            "WANDB_CACHE_DIR": str(folder / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(folder / "wandb-config"),
            "WANDB_DATA_DIR": str(folder / "wandb-data"),
        }
    if "mlflow" in reporters:
        if not environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 refuses a file store unless asked; it needs no database package and suits a volume
            defaults |= {"MLFLOW_TRACKING_URI": (folder / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
        # MLflow's usage telemetry writes under $HOME and calls out: neither belongs in a batch job's pod
        defaults["MLFLOW_DISABLE_TELEMETRY"] = "true"
        uri = environ.get("MLFLOW_TRACKING_URI") or defaults["MLFLOW_TRACKING_URI"]
        if record.values.get("mlflow_run_id") and record.values.get("mlflow_tracking_uri") == uri:
            defaults["MLFLOW_RUN_ID"] = record.values["mlflow_run_id"]  # (another server has no such run)
    chosen = {k: v for k, v in defaults.items() if not environ.get(k)}
    if "MLFLOW_TRACKING_URI" in chosen:
        refuse_link(folder / "mlruns", run_folder)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        if name in chosen:
            refuse_link(Path(chosen[name]), run_folder)  # the libraries write below: never through a link
            Path(chosen[name]).mkdir(parents=True, exist_ok=True)
    environ.update(chosen)
    return chosen


class _AtStep:
    """The wandb module, with `log` pinned to the Trainer's global step (set before each call)."""

    def __init__(self, wandb):
        self._wandb = wandb
        self.step: int | None = None

    def __getattr__(self, name: str):
        return getattr(self._wandb, name)

    def log(self, data: dict, **kwargs):
        return self._wandb.log(data, step=self.step, **kwargs)


def resumed_callbacks(record: TrackingRecord) -> dict[type, type[TrainerCallback]]:
    """transformers' W&B and MLflow callbacks -> the ones that continue the recorded run."""
    from transformers.integrations.integration_utils import MLflowCallback, WandbCallback

    class ResumedWandbCallback(WandbCallback):
        def __init__(self):
            super().__init__()
            self._wandb = _AtStep(self._wandb)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            unsent = record.unsent("wandb", state.global_step, logs or {}, rows=True)
            if not unsent:
                return
            self._wandb.step = state.global_step
            super().on_log(args, state, control, model=model, logs=unsent, **kwargs)
            if state.is_world_process_zero:
                record.mark_sent("wandb", state.global_step, unsent)

    class ResumedMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            super().setup(args, state, model)
            run = self._ml_flow.active_run() if state.is_world_process_zero else None
            if run is not None and record.values.get("mlflow_run_id") != run.info.run_id:
                # the id a resumed run continues, on the server that knows it
                record.values.setdefault("sent", {}).pop("mlflow", None)  # a new MLflow run has nothing yet
                record.values |= {
                    "mlflow_run_id": run.info.run_id,
                    "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
                }
                record.save()

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            unsent = record.unsent("mlflow", state.global_step, logs or {})
            if not unsent:
                return
            super().on_log(args, state, control, unsent, model=model, **kwargs)
            if state.is_world_process_zero:
                record.mark_sent("mlflow", state.global_step, unsent)

    return {WandbCallback: ResumedWandbCallback, MLflowCallback: ResumedMLflowCallback}


def prepare_tracking(output: Path, reporters: list[str], rank0: bool) -> TrackingRecord | None:
    """Rank 0 of a run that reports to W&B or MLflow: the folder's record, its ids and folders in the environment
    (before the Trainer builds its callbacks, which read it). The other ranks log nothing: None."""
    if not rank0 or not {"wandb", "mlflow"} & set(reporters):
        return None
    record = TrackingRecord(output)
    tracking_environment(output, reporters, record)
    return record


def continue_tracking(trainer, record: TrackingRecord) -> None:
    """Swap the Trainer's W&B and MLflow callbacks for ones that continue the recorded tracking run."""
    present = {type(c) for c in trainer.callback_handler.callbacks}
    for cls, resumed in resumed_callbacks(record).items():
        if cls in present:  # (the Trainer made it: its package is installed)
            trainer.remove_callback(cls)
            trainer.add_callback(resumed())
