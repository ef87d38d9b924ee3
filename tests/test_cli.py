"""Bad input through the real CLI: exit code 2, one line naming cause and fix, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from job.cli import cli
from tests.conftest import DOCS, REPO, write_jsonl


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def snapshot(root: Path) -> dict[str, int | None]:
    """Every path, with the content stamp of each file (a folder's own mtime moves when a probe file comes and goes)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else None for p in root.rglob("*")}


@pytest.fixture
def world(tmp_path, tiny_tokenizer_dir):
    """A folder with good inputs, so each case breaks exactly one thing."""
    write_jsonl(tmp_path / "good.jsonl", DOCS)
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    return tmp_path


def _tokenizer_with(world: Path, **changes) -> str:
    folder = world / "tok-bad"
    shutil.copytree(world / "tok", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def _model_folder(world: Path, config: str | None) -> str:
    folder = world / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    return str(folder)


_HELD: list[socket.socket] = []


def _busy_port(world: Path) -> str:
    holder = socket.socket()
    holder.bind(("", 0))
    holder.listen()
    _HELD.append(holder)  # kept open for the test's duration
    return str(holder.getsockname()[1])


def _previous_run(world: Path, **values) -> None:
    """A run of this job with a complete checkpoint (something to resume)."""
    out = world / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "COMPLETE").write_text("{}")
    (out / "run_config.json").write_text(json.dumps({"max_length": 999, **values}))


BASE = ["--tokenizer", "{w}/tok", "--output-dir", "{w}/out", "--max-steps", "1"]
CASES = {
    "missing data path": (["--data", "{w}/nope.jsonl"], None, "does not exist"),
    "folder that is not a dataset": (
        ["--data", "{w}/notes"],
        lambda w: (w / "notes").mkdir() or (w / "notes" / "README.txt").write_text("hi"),
        "is not a dataset",
    ),
    "wrong text column": (
        ["--data", "{w}/good.jsonl", "--text-column", "text"],
        None,
        "its columns are: completion, source",
    ),
    "empty corpus": (["--data", "{w}/empty.jsonl"], lambda w: write_jsonl(w / "empty.jsonl", []), "is empty"),
    "all texts empty": (
        ["--data", "{w}/blank.jsonl"],
        lambda w: write_jsonl(w / "blank.jsonl", ["", "  "]),
        "every text in column",
    ),
    "malformed jsonl line": (
        ["--data", "{w}/bad.jsonl"],
        lambda w: (w / "bad.jsonl").write_text('{"completion": "a"}\n{oops\n'),
        "line 2",
    ),
    "not utf-8": (
        ["--data", "{w}/gbk.jsonl"],
        lambda w: (w / "gbk.jsonl").write_bytes('{"completion": "中文"}\n'.encode("gbk")),
        "not UTF-8",
    ),
    "max length below 2": (["--max-length", "1"], None, "is not at least 2"),
    "tokenizer without eos": (
        ["--tokenizer", "{w}/tok-bad"],
        lambda w: _tokenizer_with(w, eos_token=None),
        "no eos token",
    ),
    "pad equal to eos": (["--tokenizer", "{w}/tok-bad"], lambda w: _tokenizer_with(w, pad_token="</s>"), "same id"),
    "model folder without config": (["--model", "{w}/model"], lambda w: _model_folder(w, None), "config.json"),
    "model folder with broken config": (["--model", "{w}/model"], lambda w: _model_folder(w, "{broken"), "config.json"),
    "tokenizer larger than model": (
        ["--model", "{w}/model"],
        lambda w: _model_folder(
            w, json.dumps({"model_type": "bloom", "vocab_size": 100, "hidden_size": 64, "n_layer": 2, "n_head": 2})
        ),
        "vocab",
    ),
    "deepspeed file not json": (
        ["--deepspeed", "{w}/ds.json"],
        lambda w: (w / "ds.json").write_text("{"),
        "not valid JSON",
    ),
    "deepspeed unknown key": (
        ["--deepspeed", "{w}/ds.json"],
        lambda w: (w / "ds.json").write_text('{"zero_optimisation": {}}'),
        "unknown key",
    ),
    "nproc above gpus": (["--device", "cuda", "--nproc", "2"], None, "GPU"),
    "output holds another run": (["--resume", "never"], _previous_run, "already holds a run"),
    "output holds a different run": ([], _previous_run, "holds a different run"),
    "output not writable": (["--output-dir", "/proc/job-test-out"], None, "not writable"),
    "output under a file": (["--output-dir", "{w}/good.jsonl/out"], None, "is a file"),
    "busy master port": (["--master-port", "{port}"], None, "already in use"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, case, job_cache):
    flags, setup, message = CASES[case]
    if setup:
        setup(world)
    port = _busy_port(world) if "{port}" in " ".join(flags) else "29500"
    args = [a.format(w=world, port=port) for a in ["train", *BASE, *flags]]
    before, cache_before = snapshot(world), snapshot(job_cache)
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert " -- " in lines[0]  # cause -- fix
    assert snapshot(world) == before  # nothing created or changed
    assert not [p for p in snapshot(job_cache) if p not in cache_before and "prepared" in p]


def test_too_little_disk_is_refused(world, monkeypatch):
    import job.doctor

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(job.doctor.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    before = snapshot(world)
    result = run_cli("train", *[a.format(w=world) for a in BASE], "--data", str(world / "good.jsonl"))
    assert result.exit_code == 2 and "a checkpoint needs about" in result.stderr
    assert snapshot(world) == before


def test_a_real_process_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "job", "prepare", "--data", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data path {tmp_path / 'missing.jsonl'} does not exist -- "
        "check the path (or leave --data out for the built-in)"
    ]
    debug = subprocess.run(
        [sys.executable, "-m", "job", "--debug", "prepare", "--data", "missing.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert "Traceback" in debug.stderr


def test_help_lists_the_commands():
    out = run_cli("--help").output
    for command in ("prepare", "tokenizer", "train", "generate", "smoke", "bench", "doctor"):
        assert command in out


def test_inconsistent_batch_settings_fail_before_any_process_starts(world):
    (world / "ds.json").write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 2}}))
    before = snapshot(world)
    result = run_cli("train", *[a.format(w=world) for a in BASE], "--deepspeed", str(world / "ds.json"))
    assert result.exit_code == 2 and "train_batch_size=7 but batch 16 x accumulation 4 x 1 processes" in result.stderr
    assert snapshot(world) == before


def test_doctor_prints_a_table_and_fails_on_a_bad_check(world):
    good = run_cli("doctor", *[a.format(w=world) for a in BASE], "--data", str(world / "good.jsonl"))
    assert good.exit_code == 0, good.output
    for row in ("devices", "deepspeed", "output", "master port", "/dev/shm", "caches", "data", "tokenizer", "disk"):
        assert any(line.startswith("ok ") and row in line for line in good.output.splitlines()), (row, good.output)
    (world / "ds.json").write_text("{")
    bad = run_cli(
        "doctor",
        *[a.format(w=world) for a in BASE],
        "--deepspeed",
        str(world / "ds.json"),
        "--text-column",
        "text",
        "--data",
        str(world / "good.jsonl"),
    )
    assert bad.exit_code == 2
    failed = [line for line in bad.output.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2 and "not valid JSON" in failed[0] and "its columns are" in failed[1]
    assert not (world / "out").exists()


def test_tokenizer_command_trains_a_loadable_bpe(world):
    result = run_cli(
        "tokenizer", "--data", str(world / "good.jsonl"), "--vocab-size", "300", "--output", str(world / "bpe")
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["eos"] == "</s>"
    from job.tokenizer import load_tokenizer

    tok = load_tokenizer(str(world / "bpe"))
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 3)


def test_generate_command_prints_one_continuation_per_prompt(world, tiny_tokenizer):
    from tests.conftest import tiny_bloom

    folder = world / "lm"
    tiny_bloom(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    (world / "prompts.txt").write_text("北京\n\n中国的经济\n", encoding="utf-8")
    result = run_cli(
        "generate",
        "--model",
        str(folder),
        "--prompt",
        "下面是",
        "--prompts-file",
        str(world / "prompts.txt"),
        "--greedy",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert result.exit_code == 0, result.output
    outs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["prompt"] for o in outs] == ["下面是", "北京", "中国的经济"]
    assert all(0 < o["new_tokens"] <= 5 for o in outs)
    refused = run_cli("generate", "--model", str(folder), "--prompt", "x", "--temperature", "0")
    assert refused.exit_code == 2 and "must be above 0 when sampling" in refused.stderr
