"""job.core.termination: the verdict in the container's termination message, from every way `train` ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from job import cli as cli_module
from job.core import run_files, termination
from job.core.errors import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, JobError
from job.core.signals import Stopped
from tests.conftest import REPO, complete_checkpoint, train_args


@pytest.fixture
def message_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv(termination.TERMINATION_LOG_ENV, str(path))
    return path


def _run_folder(root: Path, step: int, final: bool) -> Path:
    checkpoint = complete_checkpoint(root, step)
    if final:
        (root / "final").mkdir()
    return checkpoint


def test_where_the_message_goes(tmp_path, monkeypatch):
    assert termination.termination_path({"JOB_TERMINATION_LOG": str(tmp_path / "t")}) == tmp_path / "t"
    assert termination.termination_path({"JOB_TERMINATION_LOG": ""}) is None  # switched off (the workers)
    monkeypatch.setattr(termination, "DEFAULT_PATH", tmp_path / "absent")
    assert termination.termination_path({}) is None  # not in a container: nothing written anywhere
    present = tmp_path / "termination-log"
    present.write_text("")
    monkeypatch.setattr(termination, "DEFAULT_PATH", present)
    assert termination.termination_path({}) == present
    monkeypatch.setenv(termination.TERMINATION_LOG_ENV, str(tmp_path))  # a folder: not writable as a file
    assert termination.record_termination(2, "error: x") is None  # the verdict never fails the job


def test_the_message_names_code_meaning_verdict_step_checkpoint_and_model(tmp_path):
    checkpoint = _run_folder(tmp_path, 12, final=False)
    text = termination.termination_message(EXIT_PREEMPTED, "stopped by SIGTERM at step 12", tmp_path)
    assert text.splitlines() == [
        "exit 75 (preempted: stopped by a signal; the same command resumes)",
        "stopped by SIGTERM at step 12",
        "last step: 12",
        f"checkpoint: {checkpoint}",
    ]
    (tmp_path / "final").mkdir()
    assert termination.termination_message(EXIT_OK, "done", tmp_path).splitlines()[-1] == f"model: {tmp_path / 'final'}"
    long = termination.termination_message(EXIT_OK, "北京" * 3000)
    assert len(long.encode()) <= termination.LIMIT_BYTES and long.endswith("...\n")  # the kubelet keeps 4096 bytes


def _fake_launch(monkeypatch, output: Path, code: int, message: str | None):
    def launch(cfg, claimed):
        output.mkdir(parents=True, exist_ok=True)
        if message is not None:
            run_files.write_status(output, code, message)
        return code

    monkeypatch.setattr("job.run.launch.train", launch)


@pytest.mark.parametrize(
    "code, status, first",
    [
        (EXIT_OK, "model saved to OUT/final", "exit 0 (success)"),
        (EXIT_DIVERGED, "loss was not finite for 3 consecutive steps", "exit 3 (diverged"),
        (EXIT_PREEMPTED, "stopped by SIGTERM at step 12; complete checkpoint", "exit 75 (preempted"),
        (EXIT_PREEMPTED, None, "exit 75 (preempted"),  # the workers recorded nothing
    ],
)
def test_train_writes_the_verdict_it_exits_with(tmp_path, message_file, monkeypatch, code, status, first):
    output = tmp_path / "out"
    _fake_launch(monkeypatch, output, code, status)
    checkpoint = _run_folder(output, 12, final=code == EXIT_OK)
    result = CliRunner().invoke(cli_module.cli, ["train", "--output-dir", str(output)])
    assert result.exit_code == code, result.output
    lines = message_file.read_text().splitlines()
    assert lines[0].startswith(first) and f"checkpoint: {checkpoint}" in lines and "last step: 12" in lines
    assert lines[1] == (status or f"train ended with exit code {code}")


def test_bad_input_and_a_failed_doctor_write_their_one_line(tmp_path, message_file, monkeypatch, tiny_tokenizer_dir):
    def refuse(cfg, claimed):
        raise JobError("data path x.jsonl does not exist", "check the path")

    monkeypatch.setattr("job.run.launch.train", refuse)
    result = CliRunner().invoke(cli_module.cli, ["train", "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message_file.read_text().splitlines() == [
        "exit 2 (bad input or configuration: a retry fails the same way until it is fixed)",
        "error: data path x.jsonl does not exist -- check the path",
    ]
    monkeypatch.setenv("PET_NNODES", "1:4")
    message_file.unlink()
    args = ["--output-dir", str(tmp_path / "out"), "--data", "x", "--tokenizer", str(tiny_tokenizer_dir)]
    result = CliRunner().invoke(cli_module.cli, ["doctor", *args])
    assert result.exit_code == 2, result.output
    lines = message_file.read_text().splitlines()
    assert lines[0].startswith("exit 2 (bad input") and all(line.startswith("FAIL") for line in lines[1:])
    assert any("PET_NNODES='1:4'" in line for line in lines) and any(" data " in line for line in lines)


def test_a_signal_before_training_and_a_crash_write_theirs(message_file, monkeypatch):
    def stopped(**kwargs):
        raise Stopped(signal.SIGTERM)

    monkeypatch.setattr(cli_module, "cli", SimpleNamespace(main=stopped))
    monkeypatch.setattr(cli_module, "_INVOKED", {"command": "train"})  # as the group records it, nothing earlier
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == EXIT_PREEMPTED
    assert message_file.read_text().splitlines()[1] == (
        "stopped by SIGTERM before training began -- run the same command again"
    )

    def crash(**kwargs):
        raise RuntimeError("NCCL error: unhandled system error\nmore detail")

    monkeypatch.setattr(cli_module, "cli", SimpleNamespace(main=crash))
    with pytest.raises(RuntimeError):  # the traceback still reaches the log
        cli_module.main()
    assert message_file.read_text().splitlines() == [
        "exit 1 (crash: see the log; a retry may get past it)",
        "crash: RuntimeError: NCCL error: unhandled system error",
    ]


def test_a_worker_leaves_the_message_to_its_launcher(message_file, monkeypatch):
    monkeypatch.setattr("job.run.worker.run_worker", lambda cfg: 0)
    config = message_file.parent / "run_config.json"
    config.write_text("{}")
    CliRunner().invoke(cli_module.cli, ["worker", "--config", str(config)], catch_exceptions=False)
    assert termination.termination_path() is None
    termination.record_termination(1, "a worker crashed")
    assert not message_file.exists()


def _job(argv: list[str], tmp_path: Path, message_file: Path, limit_kib: int | None = None, **env):
    """`python -m job ARGV` in a process of its own (under `ulimit -f` when `limit_kib` is given)."""
    command = [sys.executable, "-m", "job", *argv]
    if limit_kib is not None:
        command = ["bash", "-c", f'ulimit -f {limit_kib}; exec "$@"', "bash", *command]
    environ = {**os.environ, "PYTHONPATH": str(REPO), termination.TERMINATION_LOG_ENV: str(message_file), **env}
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=600)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_usage_error_replaces_a_stale_message_with_its_own(tmp_path, message_file, log_format):
    message_file.write_text("exit 0 (success)\nmodel saved to an earlier run\n")
    proc = _job(["train", "--max-steps", "abc"], tmp_path, message_file, JOB_LOG_FORMAT=log_format)
    assert proc.returncode == 2, proc.stderr
    (shown,) = proc.stderr.strip().splitlines()  # a command's own refusal: its line, in either log format
    assert shown.startswith("error: Invalid value for '--max-steps'") and "--help" in shown
    assert message_file.read_text().splitlines() == [
        "exit 2 (bad input or configuration: a retry fails the same way until it is fixed)",
        shown,
    ]


def test_a_crash_under_json_logging_is_json_and_leaves_a_verdict(tmp_path, message_file, monkeypatch, capfd):
    from job.core.logs import setup_logging

    def crash(**kwargs):
        raise RuntimeError("NCCL error: unhandled system error\nmore detail")

    setup_logging("json")
    output = tmp_path / "run"
    output.mkdir()
    monkeypatch.setattr(cli_module, "cli", SimpleNamespace(main=crash))
    claimed = {"output_dir": str(output), "run_folder": str(output)}  # as `train` records it, its lock held
    monkeypatch.setattr(cli_module, "_INVOKED", claimed)
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    assert e.value.code == 1
    records = [json.loads(line) for line in capfd.readouterr().err.strip().splitlines()]  # no raw traceback lines
    assert records[-1]["message"] == "crash: RuntimeError: NCCL error: unhandled system error"
    assert "RuntimeError" in records[-1]["traceback"]
    assert run_files.recorded_status(output) == {
        "code": 1,
        "message": "crash: RuntimeError: NCCL error: unhandled system error",
    }
    assert message_file.read_text().startswith("exit 1 (crash")


@pytest.mark.parametrize("folder", ["foreign", "running"])
def test_a_crash_before_the_folder_is_claimed_writes_no_verdict_into_it(tmp_path, message_file, monkeypatch, folder):
    """Another tool's folder, or one a running job holds: a crash in the checks before the lock is taken leaves it
    as it was (its termination message still says what happened)."""
    from job.core.files import FileLock
    from job.run import launch

    output = tmp_path / "out"
    output.mkdir()
    if folder == "foreign":
        (output / "notes.txt").write_text("not a run\n")
    else:
        complete_checkpoint(output, 3)
        (output / run_files.RUN_CONFIG).write_text("{}")
        run_files.write_status(output, 0, "the running job's own verdict")
        running = FileLock(output / run_files.LOCK)
        assert running.try_acquire()

    def crash(cfg):
        raise RuntimeError("a library failed while checking")

    monkeypatch.setattr(launch, "preflight", crash)
    before = sorted((p.name, p.read_bytes()) for p in output.iterdir() if p.is_file())
    monkeypatch.setattr(sys, "argv", ["job", "train", "--output-dir", str(output)])
    with pytest.raises(RuntimeError):
        cli_module.main()
    assert sorted((p.name, p.read_bytes()) for p in output.iterdir() if p.is_file()) == before
    assert message_file.read_text().splitlines()[:2] == [
        "exit 1 (crash: see the log; a retry may get past it)",
        "crash: RuntimeError: a library failed while checking",
    ]


@pytest.mark.slow
def test_a_file_size_limit_hit_while_saving_a_checkpoint_is_one_line_with_a_verdict(
    tmp_path, message_file, tiny_tokenizer_dir
):
    from job.data.corpus import builtin_articles
    from tests.conftest import write_jsonl

    write_jsonl(tmp_path / "docs.jsonl", builtin_articles()[:100])
    message_file.write_text("stale\n")
    argv = [
        *train_args(max_steps=3, save_steps=2, eval_steps=2, eval_batches=1),
        *("--preset", "tiny", "--deepspeed", "none", "--data", "docs.jsonl", "--output-dir", "out"),
        *("--tokenizer", str(tiny_tokenizer_dir)),
    ]
    # 400 KiB: the prepared data and the run's small files fit, a checkpoint's weights do not (EFBIG)
    proc = _job(argv, tmp_path, message_file, limit_kib=400, JOB_LOG_FORMAT="json")
    assert proc.returncode == 2, proc.stderr[-3000:]
    *logged, refusal = proc.stderr.strip().splitlines()
    assert all(json.loads(line)["level"] != "ERROR" for line in logged)  # JSON records, no traceback lines
    errors = [refusal]  # the command's own one line, as every refusal
    assert refusal.startswith("error: no room to write") and "File too large" in refusal
    assert run_files.recorded_status(tmp_path / "out") == {"code": 2, "message": errors[0]}
    assert message_file.read_text().splitlines()[:2] == [
        "exit 2 (bad input or configuration: a retry fails the same way until it is fixed)",
        errors[0],
    ]
