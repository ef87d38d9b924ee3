"""Bad input through the real CLI: exit code 2, one line naming cause and fix, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from job.cli import cli
from job.model.build import PRESET_SHAPES
from tests.conftest import DOCS, REPO, complete_checkpoint, write_jsonl


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


def _previous_run(world: Path, inputs: dict | None = None, **values) -> None:
    """A run of this job with a complete checkpoint (something to resume), and the inputs it recorded."""
    out = world / "out"
    complete_checkpoint(out, 2)
    (out / "run_config.json").write_text(json.dumps({"max_length": 999} if inputs is None else values))
    if inputs is not None:
        (out / "inputs.json").write_text(json.dumps(inputs))


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
    # the job deletes only what it wrote: a stock HF Trainer's run folder is not ours
    "foreign output folder": ([], lambda w: _foreign_folder(w / "out"), "holds no run of this job"),
    "resume with another tokenizer": ([], lambda w: _previous_run(w, inputs={"tokenizer": "0" * 16}), "tokenizer"),
    "prepared with a larger tokenizer": (
        ["--prepared", "{w}/prepared"],
        lambda w: _prepared_with_another_tokenizer(w),
        "changed: tokenizer",
    ),
    # ranges and choices
    "learning rate -1": (["--learning-rate", "-1"], None, "--learning-rate -1.0 is not above 0"),
    "warmup -5": (["--warmup-steps", "-5"], None, "--warmup-steps -5 is not at least 0"),
    "adam beta2 1.5": (["--adam-beta2", "1.5"], None, "is not in [0, 1)"),
    "weight decay -1": (["--weight-decay", "-1"], None, "is not at least 0"),
    "eval batches -1": (["--eval-batches", "-1"], None, "is not at least 0"),
    "max nonfinite steps 0": (["--max-nonfinite-steps", "0"], None, "is not at least 1"),
    "max steps 0": (["--max-steps", "0"], None, "--max-steps 0 is not -1 or at least 1"),
    "unknown lr scheduler": (["--lr-scheduler", "bogus"], None, "not a valid SchedulerType"),
    "unknown report_to": (["--report-to", "tensorboard,bogus"], None, "bogus is not a reporting integration"),
    "zero stage without deepspeed": (["--zero-stage", "3", "--deepspeed", "none"], None, "has no effect"),
    "flex attention on a cpu": (["--attention", "flex"], None, "cannot train on cpu"),
    "training-arg unknown": (["--training-arg", "no_such_field=1"], None, "not a TrainingArguments field"),
    "training-arg owned by the run": (["--training-arg", "learning_rate=1"], None, "set by the run config"),
    "training-arg of the wrong type": (["--training-arg", "ddp_timeout=soon"], None, "does not fit its type"),
    "training-arg refused by transformers": (["--training-arg", "optim=bogus"], None, "not a valid OptimizerNames"),
    "training-arg push_to_hub": (["--training-arg", "push_to_hub=true"], None, "python -m job push --model"),
    "training-arg hub_model_id": (["--training-arg", "hub_model_id=a/b"], None, "hub_model_id is not supported"),
    # files vs folders, unreadable files
    "config is a folder": (["--config", "{w}/cfgdir"], lambda w: (w / "cfgdir").mkdir(), "is a folder"),
    "deepspeed is a folder": (["--deepspeed", "{w}/dsdir"], lambda w: (w / "dsdir").mkdir(), "is a folder"),
    "deepspeed optimizer conflicts": (
        ["--deepspeed", "{w}/ds.json"],
        lambda w: (w / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})),
        "optimizer.params.lr=0.1 but the run has --learning-rate=",
    ),
    "resume folder is not a checkpoint": (
        ["--resume", "{w}/notes"],
        lambda w: (w / "notes").mkdir() or (w / "notes" / "a.txt").write_text("x"),
        "is not a checkpoint",
    ),
    "resume checkpoint of another shape": (["--resume", "{w}/ckpt"], lambda w: _checkpoint(w / "ckpt"), "model shape"),
    "resume a save that never completed": (
        ["--resume", "{w}/run/checkpoint-3"],
        lambda w: _checkpoint(w / "run" / "checkpoint-3", shape=False),
        "not a complete checkpoint",
    ),
    "resume another run's checkpoint": (
        ["--resume", "{w}/run/checkpoint-3", "--learning-rate", "0.5"],
        lambda w: _other_run(w / "run", 3),
        "different run (changed: learning_rate)",
    ),
    "truncated weights": (["--model", "{w}/lm"], lambda w: _saved_model(w / "lm", cut=100), "truncated or corrupt"),
    "max length beyond memory": (["--max-length", "100000"], None, "the memory plan does not fit"),
    # data: the file, the line, the value's type
    "number deep in a jsonl": (
        ["--data", "{w}/deep.jsonl"],
        lambda w: _jsonl_with(w / "deep.jsonl", 3000, 12345),
        "deep.jsonl line 3001: 'completion' is a JSON number (12345), not a string",
    ),
    "list near the top of a jsonl": (
        ["--data", "{w}/top.jsonl"],
        lambda w: _jsonl_with(w / "top.jsonl", 1, ["中"]),
        "top.jsonl line 2: 'completion' is a JSON array",
    ),
    "other compression": (
        ["--data", "{w}/docs.jsonl.xz"],
        lambda w: (w / "docs.jsonl.xz").write_bytes(b"\xfd7zXZ"),
        "docs.jsonl.xz is not .json, .jsonl, .json.gz, .jsonl.gz or .parquet",
    ),
    "a .gz name on a plain file": (
        ["--data", "{w}/docs.jsonl.gz"],
        lambda w: write_jsonl(w / "docs.jsonl.gz", ["好"]),
        "docs.jsonl.gz is named .gz but is not gzip data",
    ),
    "a key twice in a record": (
        ["--data", "{w}/twice.jsonl"],
        lambda w: (w / "twice.jsonl").write_text('{"completion": "好", "completion": "坏"}\n'),
        "twice.jsonl line 1 has the key 'completion' twice",
    ),
    "every text null": (
        ["--data", "{w}/nulls.jsonl"],
        lambda w: (w / "nulls.jsonl").write_text('{"completion": null}\n' * 3),
        "has a string 'completion' (it is null or missing in every one)",
    ),
    "a .parquet that is not Parquet": (
        ["--data", "{w}/docs.parquet"],
        lambda w: (w / "docs.parquet").write_text("completion\n好\n"),
        "docs.parquet is not a readable Parquet file",
    ),
}


def _foreign_folder(out: Path) -> None:
    """What a stock HF Trainer run leaves: checkpoint-N folders (no COMPLETE marker) and a user's notes."""
    for step in (500, 1000):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("my run")


def _prepared_with_another_tokenizer(world: Path) -> None:
    from job.core.config import RunConfig
    from job.data.prepare import prepare
    from job.data.tokenizer import train_tokenizer

    larger = train_tokenizer(DOCS * 20, 900, world / "tok-900")
    prepare(RunConfig.load(data=str(world / "good.jsonl"), max_length=16), larger, str(world / "prepared"))


def _checkpoint(folder: Path, shape: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if shape:
        shape = {"vocab_size": 640, "hidden_size": 999, "n_layer": 1, "n_head": 1}
        (folder / "config.json").write_text(json.dumps(shape))


def _other_run(output: Path, step: int) -> None:
    """A complete checkpoint of a run of this job recorded with the defaults' learning rate."""
    from job.core.config import RunConfig

    complete_checkpoint(output, step)
    RunConfig.load(learning_rate=1e-3).write(output / "run_config.json")


def _saved_model(folder: Path, cut: int = 0) -> None:
    from tests.conftest import tiny_bloom

    tiny_bloom(640).save_pretrained(folder)
    weights = folder / "model.safetensors"
    if cut:
        weights.write_bytes(weights.read_bytes()[:-cut])


def _jsonl_with(path: Path, good: int, bad) -> None:
    write_jsonl(path, ["好"] * good)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"completion": bad}, ensure_ascii=False) + "\n")


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
    import job.run.preflight

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(job.run.preflight.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    before = snapshot(world)
    result = run_cli("train", *[a.format(w=world) for a in BASE], "--data", str(world / "good.jsonl"))
    assert result.exit_code == 2 and "10 MiB free at" in result.stderr, result.output
    need = re.search(r"a checkpoint and the one before it need about (\d+(\.\d+)?) (KiB|MiB)", result.stderr)
    assert need and float(need[1]) > 0, result.stderr  # real figures for a small model, not "0.0 GiB"
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
    assert proc.returncode == 2, proc.stderr
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


@pytest.mark.parametrize(
    "argv, words",
    [
        (["generate", "--model", "m", "--prompt", "x", "--top-k", "-5"], "'--top-k': -5 is not in the range x>=0"),
        (["generate", "--model", "m", "--prompt", "x", "--temperature", "nan"], "nan is not a finite number"),
        (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "1000000000"], "'--max-new-tokens'"),
        (["bench", "--steps", "-3"], "'--steps': -3 is not in the range x>=1"),
        (["train", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["train", "--learning-rate", "inf"], "--learning-rate inf is not a finite number"),
        (["train", "--weight-decay", "inf"], "--weight-decay inf is not a finite number"),
        (["train", "--epochs", "inf"], "--epochs inf is not a finite number"),
        (["train", "--seed", "99999999999"], "--seed 99999999999 is not in"),
        (["train", "--vocab-size", "99999999999999999999"], "--vocab-size 99999999999999999999 is not in"),
        (["train", "--training-arg", "hub_token=hf_abcdef"], "would write a credential"),
        (["train", "--training-arg", "fsdp=full_shard"], "--training-arg fsdp is not supported"),
        (["train", "--training-arg", "save_only_model=true"], "--training-arg save_only_model is not supported"),
    ],
)
def test_a_real_process_refuses_bad_values_in_one_line(tmp_path, argv, words):
    """Through `main()` (Click's usage errors included): one line naming the cause and where help is, exit 2,
    nothing written, and no secret echoed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "job", *argv], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert "hf_abcdef" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_commands():
    """Each command is listed as a command (its own line in the Commands section), not just named somewhere."""
    out = run_cli("--help").output
    listed = {line.split()[0] for line in out.split("Commands:", 1)[1].splitlines() if line.strip()}
    commands = {"prepare", "tokenizer", "train", "generate", "smoke", "bench", "doctor", "plan", "push"}
    assert listed == commands  # not worker


def test_train_help_is_grouped_by_concern_and_shows_the_recipe_values():
    out = run_cli("train", "--help").output
    sections = [line for line in out.splitlines() if line.endswith("options:")]
    assert sections == [
        "Data options:",
        "Model options:",
        "Optimisation options:",
        "Distributed options:",
        "Checkpoints options:",
        "Throughput levers options:",
        "Logging options:",
        "Other options:",
    ]
    section = lambda name: out.split(f"{name} options:", 1)[1].split("options:", 1)[0]
    assert "--learning-rate" in section("Optimisation") and "--master-port" in section("Distributed")
    assert "--fused-gelu" in section("Throughput levers") and "--save-steps" in section("Checkpoints")
    assert str(REPO) not in out  # no machine path as a default
    recipe = run_cli("train", "--config", "quickstart", "--help").output
    assert "quickstart: 0.003" in " ".join(recipe.split())  # the recipe's learning rate beside the default


def test_inconsistent_batch_settings_fail_before_any_process_starts(world):
    (world / "ds.json").write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 2}}))
    before = snapshot(world)
    result = run_cli("train", *[a.format(w=world) for a in BASE], "--deepspeed", str(world / "ds.json"))
    assert (
        result.exit_code == 2 and "train_batch_size=7 but batch 16 x accumulation 4 x 1 processes" in result.stderr
    ), result.output
    assert snapshot(world) == before


def test_doctor_prints_a_table_and_fails_on_a_bad_check(world):
    good = run_cli("doctor", *[a.format(w=world) for a in BASE], "--data", str(world / "good.jsonl"))
    assert good.exit_code == 0, good.output
    for row in ("devices", "deepspeed", "output", "master port", "/dev/shm", "writable", "data", "tokenizer", "disk"):
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
    assert bad.exit_code == 2, bad.output
    failed = [line for line in bad.output.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2 and "not valid JSON" in failed[0] and "its columns are" in failed[1]
    assert not (world / "out").exists()


def test_tokenizer_command_trains_a_loadable_bpe(world):
    result = run_cli(
        "tokenizer", "--data", str(world / "good.jsonl"), "--vocab-size", "300", "--output", str(world / "bpe")
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["eos"] == "</s>"
    from job.data.tokenizer import load_tokenizer

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
    assert refused.exit_code == 2 and "'--temperature': 0.0 is not in the range 0<x" in refused.stderr, refused.output


def test_generate_without_flags_draws_as_the_report_does(world, tiny_tokenizer):
    from job.model.generate import generate, load_for_inference
    from job.model.sampling import READING_SAMPLES
    from tests.conftest import tiny_bloom

    folder = world / "lm"
    tiny_bloom(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    args = ["generate", "--model", str(folder), "--prompt", "北京", "--max-new-tokens", "8", "--json"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    model, tok = load_for_inference(folder)
    assert [json.loads(result.stdout)] == generate(model, tok, ["北京"], max_new_tokens=8, **READING_SAMPLES)
    assert run_cli(*args).stdout == result.stdout  # and it repeats


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda w: (w / "bpe").write_text("a file"), "is a file"),
        (lambda w: (w / "bpe").mkdir() or (w / "bpe" / "notes.txt").write_text("mine"), "is not empty"),
    ],
)
def test_tokenizer_output_that_is_not_new_is_refused_and_kept(world, make, message):
    make(world)
    before = snapshot(world)
    result = run_cli(
        "tokenizer", "--data", str(world / "good.jsonl"), "--vocab-size", "300", "--output", str(world / "bpe")
    )
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1, result.output
    assert snapshot(world) == before


def test_generate_and_smoke_refuse_truncated_weights_and_non_utf8_prompts(world):
    _saved_model(world / "lm", cut=1000)
    for args in (
        ["generate", "--model", str(world / "lm"), "--prompt", "北京"],
        ["smoke", "--model", str(world / "lm")],
    ):
        result = run_cli(*args)
        assert result.exit_code == 2 and "truncated or corrupt" in result.stderr, result.output
    (world / "gbk.txt").write_bytes("北京\n".encode("gbk"))
    result = run_cli("generate", "--model", str(world / "lm"), "--prompts-file", str(world / "gbk.txt"))
    assert result.exit_code == 2 and "is not UTF-8 text" in result.stderr, result.output


def test_every_option_has_help():
    import click

    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not command.hidden:
                assert param.help, (name, param.name)
    command = cli.commands["train"]
    ctx = click.Context(command)
    text = " ".join(command.get_help(ctx).split())
    assert "--learning-rate FLOAT peak learning rate [default: 0.002]" in text, text
    preset = next(p for p in command.params if p.name == "preset")
    assert list(preset.type.choices) == list(PRESET_SHAPES)


def test_doctor_refuses_flex_attention_on_a_cpu_as_train_does(world):
    result = run_cli(
        "doctor", *[a.format(w=world) for a in BASE], "--data", str(world / "good.jsonl"), "--attention", "flex"
    )
    assert result.exit_code == 2, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "devices" in failed[0] and "cannot train on cpu" in failed[0], result.output
    assert not (world / "out").exists()


def test_a_signal_to_a_command_other_than_train_says_what_it_stopped(tmp_path):
    """SIGTERM while `tokenizer` reads its corpus (a FIFO nobody writes: it waits there): exit 75, one line, and no
    mention of training, which that command never does."""
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    argv = ["tokenizer", "--data", str(fifo), "--vocab-size", "300", "--output", str(tmp_path / "tok")]
    proc = subprocess.Popen([sys.executable, "-m", "job", *argv], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while Path(f"/proc/{proc.pid}/wchan").read_text() not in ("fifo_open", "wait_for_partner"):  # nobody writes
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert err.strip().splitlines() == ["stopped by SIGTERM -- run the same command again"], err
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize(
    "env, row",
    [
        ({"PET_NNODES": "1:4"}, "launch"),  # what PyTorchJob sets under an elastic policy
        ({"PET_NNODES": "two"}, "launch"),
        ({"PET_NPROC_PER_NODE": "0"}, "launch"),
        ({"PET_NNODES": "2", "JOB_COMPLETION_INDEX": "-1"}, "launch"),
        ({"PET_MASTER_PORT": "99999999999999999999"}, "launch"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "localhost"}, "rendezvous"),
    ],
)
def test_doctor_and_train_refuse_a_bad_environment_in_one_line(world, monkeypatch, env, row):
    """Never a traceback (exit 1 reads as a crash to Kubernetes): doctor fails the row, train exits 2 on it."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [a.format(w=world) for a in BASE] + ["--data", str(world / "good.jsonl")]
    doctor = CliRunner().invoke(cli, ["doctor", *args])
    assert doctor.exit_code == 2 and isinstance(doctor.exception, SystemExit), doctor
    failed = [line for line in doctor.output.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].split()[1] == row, doctor.output
    train = CliRunner().invoke(cli, ["train", *args])
    assert train.exit_code == 2 and isinstance(train.exception, SystemExit), train
    assert len(train.stderr.strip().splitlines()) == 1 and train.stderr.startswith("error: "), train.stderr
    assert not (world / "out").exists()
