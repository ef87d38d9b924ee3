"""The end of a run, in one process: the verified export of the last checkpoint to `OUTPUT/final`, the report, and
the verdict (`exit_status.json`). Also the whole of a rerun whose training had finished but whose export had not
(`job.run.launch.train`): the last checkpoint holds everything it needs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.core.errors import EXIT_OK
from job.core.logs import adopt_library_loggers
from job.core.metrics_log import eval_losses, read_metrics
from job.run.launch_record import Launch

log = logging.getLogger("job")


def record_verdict(output: Path, rank0: bool, code: int, message: str) -> int:
    """Record the verdict (rank 0) and log it; returns the exit code."""
    if rank0:
        run_files.write_status(output, code, message)
        log.info(message)
    return code


def finish_run(
    cfg: RunConfig,
    launch: Launch,
    checkpoint: Path,
    expected_parameters: int | None = None,
    final_metrics: dict | None = None,
    seconds: float | None = None,
) -> int:
    """Export `checkpoint` to OUTPUT/final with its model card, write the report and the verdict."""
    from job.run.model_card import render_model_card
    from job.run.report import report_run, run_figures, run_summary

    adopt_library_loggers()  # also in a launcher that only exports (a rerun): no loading bars, our format
    output = Path(cfg.output_dir)
    state = checkpoints.trainer_state(checkpoint)
    records = read_metrics(output / run_files.METRICS)
    if final_metrics is None:  # a rerun: the evaluation after the last step (a mix: each source's), if it was logged
        rows = [r for r in records if eval_losses(r) and r.get("step") == state["global_step"]]
        final_metrics = {k: v for r in rows for k, v in r.items()}
    figures = run_figures(records, run_summary(state, final_metrics, seconds))
    card = render_model_card(cfg, figures, expected_parameters, launch)
    final = checkpoints.export_final(checkpoint, output, expected_parameters, texts={run_files.MODEL_CARD: card})
    before_path = output / run_files.SAMPLES_BEFORE
    before = json.loads(before_path.read_text(encoding="utf-8")) if before_path.exists() else []
    report_run(cfg, state, launch.world_size, final, before, final_metrics, seconds)
    return record_verdict(output, True, EXIT_OK, f"model saved to {final}")
