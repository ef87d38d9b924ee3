"""`bench` runs the real training path on a CPU (tiny preset) and prints one JSON line of figures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _bench(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "job", "bench", *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_bench_with_eager_baseline(tiny_tokenizer_dir):
    result = _bench(
        "--preset",
        "tiny",
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--max-length",
        "64",
        "--per-device-batch-size",
        "4",
        "--grad-accum",
        "1",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--compare",
        "eager",
        "--dataloader-workers",
        "0",
    )
    assert result["path"] == "job" and result["attention"] == "sdpa" and result["deepspeed"]
    assert result["baseline"]["path"] == "stock HF Bloom" and result["baseline"]["attention"] == "eager"
    assert result["tokens_per_s"] > 0 and result["tflops"] > 0 and result["step_s"] > 0
    assert result["steps_timed"] == 3
    assert result["speedup"] == pytest.approx(result["tokens_per_s"] / result["baseline"]["tokens_per_s"], rel=1e-2)
    assert result["measured_ceiling_tflops"] > 0 and result["mfu_measured"] > 0
    assert result["settings"]["deepspeed"] == "default" and result["settings"]["zero_stage"] == 2  # as make train
    assert result["settings"]["zero_stage"] == 2


def test_training_bench_against_no_deepspeed_in_one_process(tiny_tokenizer_dir):
    """The DeepSpeed overhead as one ratio: the same path, then again with --deepspeed none."""
    result = _bench(
        *("--preset", "tiny", "--tokenizer", str(tiny_tokenizer_dir), "--max-length", "64"),
        *("--per-device-batch-size", "4", "--grad-accum", "2", "--steps", "2", "--warmup", "1"),
        *("--compare", "no-deepspeed", "--dataloader-workers", "0"),
    )
    assert result["deepspeed"] and not result["baseline"]["deepspeed"]
    assert result["baseline"]["path"] == "job" and result["baseline"]["attention"] == result["attention"] == "sdpa"
    assert result["steps_timed"] == 2 and result["baseline"]["tokens_per_s"] > 0


def test_tokenize_bench_matches_the_bare_tokenizer(tiny_tokenizer_dir):
    result = _bench(
        *("--tokenize", "--tokenizer", str(tiny_tokenizer_dir), "--max-samples", "300", "--num-proc", "2"),
        *("--repeats", "2", "--scale", "2"),
    )
    assert result["documents"] == 600 and result["num_proc"] == 2 and result["repeats"] == 2
    assert result["tokens"] > 0 and result["prepare_vs_bare"] > 0 and result["prepare_vs_rust"] > 0
    assert result["prepare_vs_bare"] == pytest.approx(result["bare_s"] / result["prepare_s"], rel=2e-2)


def test_sweep_reports_a_failing_and_a_timed_out_variant_and_goes_on(tmp_path):
    """The `make bench-gpu` sweep's plumbing on a CPU (--dry-run, tiny preset): each variant in its own process
    with its own slice; a bad one (exit 2) and a hung one (killed at its slice) are reported, the next one runs,
    and the JSON lines and the table reach both stdout and the log."""
    variants = [
        {"name": "bad input", "args": ["--max-length", "1"], "slice_s": 120},
        # --deepspeed none: killed inside DeepSpeed's op JIT load, it would leave torch's build lock behind
        {"name": "never ends", "args": ["--steps", "100000", "--deepspeed", "none"], "slice_s": 15},
        {"name": "plain", "args": ["--deepspeed", "none"], "slice_s": 300},
    ]
    spec = tmp_path / "variants.json"
    spec.write_text(json.dumps(variants))
    started = time.monotonic()
    flags = ["--variants", str(spec), "--log-dir", str(tmp_path / "logs"), "--budget-s", "400"]
    proc = subprocess.run(
        [sys.executable, "-m", "tools.gpu_sweep", "--dry-run", *flags, "--no-tests", "--no-profile", "--no-end-to-end"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},  # its work folders stay here
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bench = [r for r in rows if r["step"] == "bench"]
    assert [(r["variant"], r["status"]) for r in bench] == [
        ("bad input", "failed"),
        ("never ends", "timeout"),
        ("plain", "ok"),
    ]
    assert "--max-length 1 is not at least 2" in bench[0]["error"]
    assert 15 <= bench[1]["seconds"] < 60  # killed at its slice, with its process group
    assert bench[2]["tokens_per_s"] > 0 and bench[2]["step_s"] > 0 and bench[2]["compile_s"] >= 0
    assert bench[2]["patches"]["attention"] == "sdpa" and bench[2]["deepspeed"] is False
    summary = rows[-1]
    assert summary["step"] == "summary" and summary["fastest"] == "plain" and summary["variants_ok"] == 1
    assert "| plain | ok |" in proc.stdout and "| never ends | timeout" in proc.stdout
    (log,) = (tmp_path / "logs").glob("bench-gpu-*.log")
    assert log.read_text(encoding="utf-8").splitlines()[1:] == proc.stdout.splitlines()[1:]
    assert time.monotonic() - started < 400


def test_every_gpu_sweep_command_parses_to_a_valid_config(tmp_path):
    """The sweep runs next on a lent GPU, unattended: each of its command lines must be one the CLI accepts and
    whose run config validates (a typo would cost a variant of that run)."""
    from job.cli import cli
    from job.core.config import RunConfig
    from job.run.deepspeed_config import deepspeed_config
    from tools.gpu_sweep import bench_argv, end_to_end_commands, gpu_variants

    commands = [[*bench_argv(False, 4, 2), *v.args] for v in gpu_variants(tmp_path)]
    commands += [argv for _, argv in end_to_end_commands(tmp_path, dry_run=False)]
    for argv in commands:
        assert argv[1:3] == ["-m", "job"]
        command = cli.commands[argv[3]]
        params = command.make_context(argv[3], argv[4:]).params
        if "config" in params:
            fields = {k: v for k, v in params.items() if k in RunConfig.field_names()}
            deepspeed_config(RunConfig.load(params["config"], **fields))  # reads and checks the DeepSpeed file


def test_sweep_stopped_by_sigterm_stops_its_running_step(tmp_path):
    """A step runs in a session of its own (so a slice can kill its whole tree); a SIGTERM to the sweep (GNU
    `timeout`, Ctrl-C) must take that step down too, not leave it running on the GPU."""
    import psutil

    spec = tmp_path / "variants.json"
    # --deepspeed none: a process killed while DeepSpeed JIT-loads an op leaves torch's build lock behind, which
    # would hang every later DeepSpeed start on this machine.
    never_ends = {"name": "never ends", "args": ["--steps", "100000", "--deepspeed", "none"], "slice_s": 300}
    spec.write_text(json.dumps([never_ends]))
    flags = ["--variants", str(spec), "--log-dir", str(tmp_path / "logs"), "--no-tests", "--no-profile"]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "tools.gpu_sweep", "--dry-run", *flags, "--no-end-to-end"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},  # its work folders stay here
    )

    def step_running() -> list:
        """The step's processes once the step has exec'd its command (the sweep has its Popen back by then)."""
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(sweep.pid).children(recursive=True)
            if any("job" in child.cmdline() for child in children):
                return children
        return []

    deadline = time.monotonic() + 60
    while not (children := step_running()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children, "the sweep started no step"
    sweep.send_signal(signal.SIGTERM)
    out, _ = sweep.communicate(timeout=30)
    assert sweep.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out[-3000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive


def test_prepare_bench_measures_each_size_against_the_bare_tokenizer(tiny_tokenizer_dir):
    result = _bench(
        *("--prepare", "--copies", "2,1", "--tokenizer", str(tiny_tokenizer_dir), "--max-samples", "200"),
        *("--num-proc", "2", "--max-length", "64", "--train-steps", "1"),
    )
    assert result["mode"] == "prepare" and result["processes"] == 2 and result["rust_tokens_per_s"] > 0
    small, large = result["sizes"]  # in order of size
    assert (small["copies"], large["copies"]) == (1, 2) and large["documents"] == 2 * small["documents"] == 400
    assert large["document_tokens"] == 2 * small["document_tokens"]  # checked against the bare tokenizer too
    for size in (small, large):
        assert size["processes"] == 2 and size["one_process_processes"] == 1
        assert size["tokens_per_s"] > 0 and size["one_process_tokens_per_s"] > 0 and size["speedup"] > 0
        assert 0 < size["peak_anon_gib"] <= size["peak_pss_gib"] and size["peak_rss_largest_gib"] > 0
    assert large["marginal_tokens_per_wall_s"] > 0 and large["per_process_vs_rust"] > 0 and large["cpu_vs_rust"] > 0
    assert all(s["train_start_peak_anon_gib"] > 0 and s["train_start_s"] > 0 for s in (small, large))
    assert "one_process_train_start_s" not in large  # one training run per size


def test_prepare_bench_refuses_bad_sizes():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "job", "bench", "--prepare", "--copies", "1,0"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --copies '1,0' is not a list of positive"), (
        proc.stderr[-3000:]
    )
