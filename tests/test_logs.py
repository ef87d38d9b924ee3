"""job.core.logs: every line of the job's own output with time, level and rank; JSON lines behind a switch;
library noise that asks nothing of the reader dropped."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
from click.testing import CliRunner

from job.cli import cli
from job.core import logs

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (INFO|WARNING|ERROR) (rank|node)\d+ .+$")


@pytest.fixture
def fresh_logging(monkeypatch):
    """setup_logging changes process-wide state: give each test its own and put it back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in ("RANK", "PET_NODE_RANK", "JOB_COMPLETION_INDEX", logs.LOG_FORMAT_ENV):
        monkeypatch.delenv(name, raising=False)
    # an earlier in-process CLI run left warnings captured, over a showwarning pytest has replaced since: then
    # setup_logging's capture would be a no-op (found by make test-random, seed 517086383)
    logging.captureWarnings(False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_text_lines_carry_utc_time_level_and_rank(fresh_logging, capsys, monkeypatch):
    logs.setup_logging("text")
    log = logging.getLogger("job")
    log.info("launch: nproc=1")  # a launcher: its node
    monkeypatch.setenv("RANK", "3")  # a worker: its global rank, read per record
    log.warning("训练 step 5")
    lines = _lines(capsys)
    assert len(lines) == 2 and all(LINE.match(line) for line in lines), lines
    assert lines[0].endswith(" INFO node0 launch: nproc=1")
    assert lines[1].endswith(" WARNING rank3 训练 step 5")


def test_a_launcher_names_its_node_from_the_launch_environment():
    assert logs.rank_label({"PET_NODE_RANK": "2", "JOB_COMPLETION_INDEX": "1"}) == "node2"
    assert logs.rank_label({"JOB_COMPLETION_INDEX": "1"}) == "node1"
    assert logs.rank_label({"RANK": "7", "PET_NODE_RANK": "1"}) == "rank7"
    assert logs.rank_label({}) == "node0"


def test_json_lines_behind_the_switch_reach_the_workers(fresh_logging, capsys, monkeypatch):
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
    logs.setup_logging()
    import os

    assert os.environ[logs.LOG_FORMAT_ENV] == "json"  # what torchrun's workers inherit
    monkeypatch.setenv("RANK", "1")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("job").exception("北京 failed")
    (line,) = _lines(capsys)
    entry = json.loads(line)
    assert {k: entry[k] for k in ("level", "rank", "logger", "message")} == {
        "level": "ERROR",
        "rank": "rank1",
        "logger": "job",
        "message": "北京 failed",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"]) and "ValueError: bad" in entry["traceback"]


def test_library_noise_is_dropped_and_the_rest_keeps_the_format(fresh_logging, capsys, monkeypatch):
    logs.setup_logging("text")
    deepspeed = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(deepspeed, "handlers", [])  # as adopt_library_loggers leaves it, whether or not DeepSpeed
    monkeypatch.setattr(deepspeed, "propagate", True)  # was imported by an earlier test
    deepspeed.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    deepspeed.warning("ZeRO-3 is slow here")  # a warning that may matter: kept
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings put back the original showwarning
        warnings.warn("OMP_NUM_THREADS/MKL_NUM_THREADS unset, we set it at 2", UserWarning, stacklevel=1)
        warnings.warn("something to act on", UserWarning, stacklevel=1)
        warnings.warn_explicit(  # a library's use of another library's deprecated call
            "`torch.distributed.all_gather_into_tensor` is deprecated.",
            FutureWarning,
            "/venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py",
            83,
        )
    with logs.prints_logged("deepspeed"):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("Using /cache/torch_extensions as PyTorch extensions root...", end="")
    lines = _lines(capsys)
    assert all(LINE.match(line.splitlines()[0]) for line in lines), lines
    text = "\n".join(lines)
    assert "Setting accelerator" not in text and "OMP_NUM_THREADS" not in text and "built successfully" not in text
    assert "deprecated" not in text
    assert "ZeRO-3 is slow here" in text and "something to act on" in text and "extensions root" in text


def test_library_loggers_are_adopted_after_import(fresh_logging, capsys):
    from transformers.utils import logging as hf_logging

    logs.setup_logging("text")
    logs.adopt_library_loggers()
    try:
        hf_logging.get_logger("transformers.trainer").warning("a transformers warning")
        assert not logging.getLogger("DeepSpeed").handlers
        logging.getLogger("DeepSpeed").warning("a DeepSpeed warning")
        assert not hf_logging.is_progress_bar_enabled()  # loading and shard bars: the job logs its own progress
    finally:
        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()
        hf_logging.enable_progress_bar()
    lines = _lines(capsys)
    assert [line.split(" ", 3)[3] for line in lines] == ["a transformers warning", "a DeepSpeed warning"], lines


def test_an_unknown_log_format_is_one_line_exit_2(fresh_logging):
    result = CliRunner().invoke(cli, ["doctor", "--help"], env={logs.LOG_FORMAT_ENV: "yaml"})
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: JOB_LOG_FORMAT='yaml' is not a log format -- use one of: text, json"
    ]
    assert "--log-format [text|json]" in CliRunner().invoke(cli, ["--help"]).output


def test_a_launcher_names_its_resolved_node_rank(monkeypatch):
    """`--node-rank 1` given as a flag (no launch variable set): the launcher's lines say node1, not node0."""
    from job.core import logs

    monkeypatch.setattr(logs, "_NODE_RANK", [])
    assert logs.rank_label({}) == "node0"
    logs.set_node_rank(1)
    assert logs.rank_label({}) == "node1"
    assert logs.rank_label({"RANK": "3"}) == "rank3"  # a worker names its global rank
