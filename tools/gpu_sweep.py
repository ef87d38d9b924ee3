"""`make bench-gpu`: everything the GPU figures need, in one call with one global deadline.

Steps, each in its own subprocess with its own time slice (a step that fails or outlives its slice is reported,
killed with its process group, and the sweep goes on): the CUDA tests; the memory plan's activations against the
measured peak for the 389m and 800m shapes (tools/plan_check.py, 90 s); one `python -m job bench` per variant, the
throughput levers added one at a time, then settings on top of the defaults; a torch-profiler table of the
fastest variant; the end-to-end train path (synthetic JSONL, a small BPE trained on it, `train`, `smoke`) as a
path check. Every result is a JSON line (stdout and the log); a readable table closes the run.

`--dry-run` is the same plumbing on a CPU with the tiny preset (tests/test_bench.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from job.core.run_files import FINAL

REPO = Path(__file__).resolve().parent.parent
TAIL_RESERVE_S = 150  # kept for the profile and the end-to-end path once the sweep starts
LEVERS_OFF = ["--no-fold-padding", "--no-fused-gelu", "--no-avoid-host-syncs", "--no-liger-loss"]


@dataclass
class Variant:
    name: str
    args: list[str]
    slice_s: float = 75.0
    note: str = ""


DEFAULTS = "defaults (all levers, no compile)"
NO_DEEPSPEED = "defaults, --deepspeed none"


def light_zero2_config(folder: Path) -> Path:
    """ds_config.json's ZeRO-2 without overlap_comm and contiguous_gradients: on one GPU there is nothing to
    overlap, and the contiguous buffer costs a gradient copy per parameter per micro-step."""
    ds = json.loads((REPO / "ds_config.json").read_text(encoding="utf-8"))
    ds["zero_optimization"].update(overlap_comm=False, contiguous_gradients=False)
    path = folder / "ds_zero2_light.json"
    path.write_text(json.dumps(ds, indent=2), encoding="utf-8")
    return path


def gpu_variants(folder: Path) -> list[Variant]:
    """Most informative first: the global deadline drops the tail, never the anchors."""
    off = LEVERS_OFF
    return [
        Variant("814ef2d path (levers off)", off, 150, "cold: first flex compile"),
        Variant(DEFAULTS, [], 90),
        Variant("defaults + compile blocks", ["--compile-blocks"], 120),
        Variant("defaults + compile, 64x1024 accum 1", ["--compile-blocks", *_batch(64, 1)], 120),
        Variant(NO_DEEPSPEED, ["--deepspeed", "none"]),
        Variant("defaults, seq 2048 (8 x 2048 x 4)", ["--max-length", "2048", *_batch(8, 4)], 90),
        Variant("+ fold padding", off[1:]),
        Variant("+ fold padding + fused GELU", off[2:]),
        Variant("+ ... + no host syncs (liger off)", off[3:]),
        Variant("defaults, ZeRO-1", ["--zero-stage", "1"]),
        Variant("defaults, ZeRO-2 no overlap/contiguous", ["--deepspeed", str(light_zero2_config(folder))]),
        Variant("defaults, 64x1024 accum 1", _batch(64, 1)),
        Variant("defaults + flex max-autotune", ["--flex-compile-mode", "max-autotune-no-cudagraphs"], 150),
        Variant("defaults + flex fwd_num_warps 8", ["--flex-kernel-options", '{"fwd_num_warps": 8}'], 90),
    ]


def dry_variants() -> list[Variant]:
    return [
        Variant("levers off", LEVERS_OFF, 240),
        Variant(DEFAULTS, [], 240),
        Variant(NO_DEEPSPEED, ["--deepspeed", "none"], 240),
    ]


def _batch(micro: int, accum: int) -> list[str]:
    return ["--per-device-batch-size", str(micro), "--grad-accum", str(accum)]


def bench_argv(dry_run: bool, steps: int, warmup: int) -> list[str]:
    base = [sys.executable, "-m", "job", "bench", "--synthetic", "--steps", str(steps), "--warmup", str(warmup)]
    if dry_run:
        return [*base, "--config", "quickstart", "--max-length", "64", *_batch(2, 2), "--dataloader-workers", "0"]
    return [*base, "--config", "h100"]


# ----------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    status: str  # ok | failed | timeout | skipped
    seconds: float
    stdout: str = ""
    stderr: str = ""
    code: int | None = None


@dataclass
class Sweep:
    budget_s: float
    log_dir: Path
    started: float = field(default_factory=time.monotonic)
    records: list[dict] = field(default_factory=list)
    child: subprocess.Popen | None = None  # the step running now
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (step, status, last stderr lines)

    def __post_init__(self):
        """One log file in `log_dir` (all that comes back from a lent GPU); each step's stderr and the train
        path's files in a work folder of their own."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.log = (self.log_dir / f"bench-gpu-{stamp}.log").open("a", encoding="utf-8")
        self.work = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{stamp}-"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        """Stopped from outside (e.g. `timeout`): the step runs in a session of its own, so stop it too."""
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGKILL)
        self.say(f"bench-gpu: stopped by {signal.Signals(signum).name} after {time.monotonic() - self.started:.0f} s")
        sys.exit(128 + signum)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def record(self, row: dict) -> None:
        row = {**row, "elapsed_s": round(time.monotonic() - self.started, 1)}
        self.records.append(row)
        self.say(json.dumps(row, ensure_ascii=False, default=str))

    def run(self, name: str, argv: list[str], slice_s: float, reserve_s: float = 0.0, env=None) -> Outcome:
        """Run `argv` in its own process group for at most its slice (and never past the deadline less
        `reserve_s`); a process that outlives it is killed with its children."""
        limit = min(slice_s, self.left() - reserve_s)
        if limit < 10:
            return Outcome("skipped", 0.0, stderr=f"no time left under the {self.budget_s:.0f} s deadline")
        started = time.monotonic()
        proc = self.child = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=limit)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            status = "timeout"
        self.child = None
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")[:60]
        (self.work / f"{len(self.records):02d}-{slug}.stderr").write_text(err, encoding="utf-8")
        if status != "ok":  # the log is all that comes back from a lent machine: keep the cause in it
            self.failures.append((name, status, "\n".join(err.strip().splitlines()[-25:])))
        return Outcome(status, time.monotonic() - started, out, err, proc.returncode)


def _pythonpath() -> str:
    extra = os.environ.get("PYTHONPATH")
    return f"{REPO}{os.pathsep}{extra}" if extra else str(REPO)


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-1200:]


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# ----------------------------------------------------------------------------------------------- steps
def run_tests(sweep: Sweep, dry_run: bool) -> None:
    argv = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider"]  # -v: a timeout shows which ran
    argv += ["tests/test_attention.py", "tests/test_model.py", "-k", "cuda"]
    out = sweep.run("cuda tests", argv, 60 if dry_run else 120, reserve_s=TAIL_RESERVE_S)
    summary = _tail(out.stdout, 1) if out.status != "timeout" else ""
    row = {"step": "cuda tests", "status": out.status, "seconds": round(out.seconds, 1), "summary": summary}
    if out.status != "ok":
        row["error"] = _tail(out.stdout + "\n" + out.stderr, 12)
    sweep.record(row)


def run_plan_check(sweep: Sweep, dry_run: bool) -> None:
    """The memory plan's activations against the measured peak, 389m and 800m (tools/plan_check.py): on a GPU only."""
    if dry_run:
        sweep.record({"step": "plan check", "status": "skipped", "seconds": 0.0, "error": "dry run: no GPU"})
        return
    out = sweep.run("plan check", [sys.executable, "-m", "tools.plan_check"], 90, reserve_s=TAIL_RESERVE_S)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for row in rows:  # one per preset and checkpointing; planned against measured
        status = "ok" if row.get("ok") else row.get("status", "off by more than 10%")
        sweep.record({**row, "status": status, "seconds": round(out.seconds, 1)})
    if out.status != "ok" and not rows:
        error = _tail(out.stderr, 12)
        sweep.record({"step": "plan check", "status": out.status, "seconds": round(out.seconds, 1), "error": error})


def bench_row(name: str, out: Outcome, result: dict | None) -> dict:
    row = {"step": "bench", "variant": name, "status": out.status, "seconds": round(out.seconds, 1)}
    if out.status == "ok" and result:
        settings = result.get("settings", {})
        row.update(
            seq=settings.get("max_length"),
            batch=f"{settings.get('per_device_batch_size')}x{settings.get('grad_accum')}",
            zero=settings.get("zero_stage"),
            tokens_per_s=result["tokens_per_s"],
            mfu_datasheet=result.get("mfu"),  # against the datasheet peak of the device it ran on
            mfu_measured=result.get("mfu_measured"),
            ceiling_tflops=result.get("measured_ceiling_tflops"),
            step_s=result["step_s"],
            peak_gib=result.get("peak_memory_gib"),
            compile_s=result.get("compile_s"),
            patches=settings.get("model_patches"),
            deepspeed=result.get("deepspeed"),
        )
    elif out.status == "ok":
        row.update(status="failed", error="no JSON line on stdout: " + _tail(out.stdout))
    else:
        row["error"] = _tail(out.stderr or out.stdout)
    return row


def run_variants(sweep: Sweep, variants: list[Variant], dry_run: bool, steps: int, warmup: int) -> list[dict]:
    rows = []
    for variant in variants:
        out = sweep.run(
            variant.name,
            [*bench_argv(dry_run, steps, warmup), *variant.args],
            variant.slice_s,
            reserve_s=TAIL_RESERVE_S if not dry_run else 0,
        )
        row = bench_row(variant.name, out, _last_json(out.stdout) if out.status == "ok" else None)
        row["args"] = " ".join(variant.args)
        sweep.record(row)
        rows.append(row)
    return rows


def run_profile(sweep: Sweep, best: dict, variants: list[Variant], dry_run: bool, warmup: int) -> dict | None:
    args = next(v.args for v in variants if v.name == best["variant"])
    argv = [*bench_argv(dry_run, 2, warmup), "--profile-steps", "2", *args]
    out = sweep.run("profile", argv, 180 if dry_run else 90, reserve_s=0 if dry_run else 90)
    result = _last_json(out.stdout) if out.status == "ok" else None
    row = {"step": "profile", "variant": best["variant"], "status": out.status, "seconds": round(out.seconds, 1)}
    if result and "profile" in result:
        row["top"] = result["profile"]["top"]
    else:
        row["error"] = _tail(out.stderr or out.stdout)
    sweep.record(row)
    return row


def synthetic_jsonl(path: Path, documents: int = 3000, seed: int = 0) -> None:
    """Random CJK 'articles' with punctuation: enough text to train a small BPE and a few dozen steps on."""
    rng = random.Random(seed)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(documents):
            sentences = ["".join(rng.choices(chars, k=rng.randint(5, 30))) for _ in range(rng.randint(2, 12))]
            f.write(json.dumps({"completion": "，".join(sentences) + "。"}, ensure_ascii=False) + "\n")


def end_to_end_commands(work: Path, dry_run: bool) -> list[tuple[str, list[str]]]:
    """Tokenizer, train (prepare, ZeRO-2, eval, export, report), smoke: the `make train` path, short."""
    data, tokenizer, output = work / "synthetic.jsonl", work / "bpe", work / "run"
    py = [sys.executable, "-m", "job"]
    recipe = ["--config", "quickstart", "--max-steps", "6"] if dry_run else ["--config", "h100", "--max-steps", "24"]
    recipe += ["--grad-accum", "1"]  # a path check: few tokens per step, every stage of the run
    return [
        ("e2e tokenizer", [*py, "tokenizer", "--data", str(data), "--vocab-size", "8000", "--output", str(tokenizer)]),
        (
            "e2e train",
            [
                *py, "train", *recipe, "--data", str(data), "--tokenizer", str(tokenizer), "--output-dir", str(output),
                "--eval-fraction", "0.05", "--eval-steps", "12", "--eval-batches", "2", "--save-steps", "24",
                "--logging-steps", "4", "--warmup-steps", "4", "--num-proc", "2", "--resume", "never",
            ],
        ),
        ("e2e smoke", [*py, "smoke", "--model", str(output / FINAL)]),
    ]  # fmt: skip


def run_end_to_end(sweep: Sweep, dry_run: bool) -> None:
    """The end-to-end commands on a synthetic JSONL, each in its own slice; the first failure ends the path."""
    work = sweep.work / "e2e"
    work.mkdir(exist_ok=True)
    synthetic_jsonl(work / "synthetic.jsonl", 300 if dry_run else 3000)
    try:
        for name, argv in end_to_end_commands(work, dry_run):
            out = sweep.run(name, argv, 150, env={"JOB_CACHE": str(work / "cache")})
            row = {"step": name, "status": out.status, "seconds": round(out.seconds, 1), "path_check": True}
            if name == "e2e train" and out.status == "ok":
                row["log"] = _tail(out.stderr, 4)
            if out.status != "ok":
                row["error"] = _tail(out.stderr or out.stdout)
            sweep.record(row)
            if out.status != "ok":
                return
    finally:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints and the export: gigabytes at the h100 shape


# ----------------------------------------------------------------------------------------------- summary
def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def table(rows: list[dict]) -> list[str]:
    head = "| variant | status | real tokens/s | MFU datasheet | MFU measured ceiling | step s | peak GiB | compile s |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['variant']} | {r['status']}{'' if ok else ': ' + r.get('error', '')[:80]} | "
            + (
                f"{r['tokens_per_s']:,.0f} | {_pct(r['mfu_datasheet'])} | {_pct(r['mfu_measured'])} | "
                f"{r['step_s']} | {r['peak_gib'] if r['peak_gib'] is not None else ''} | {r['compile_s']} |"
                if ok
                else "| | | | | |"
            )
        )
    return lines


def summarise(sweep: Sweep, rows: list[dict], profile: dict | None) -> None:
    ok = {r["variant"]: r for r in rows if r["status"] == "ok"}
    zero, plain = ok.get(DEFAULTS), ok.get(NO_DEEPSPEED)
    summary = {"step": "summary", "variants_ok": len(ok), "variants": len(rows)}
    if zero and plain:
        summary["zero_vs_no_deepspeed"] = round(zero["tokens_per_s"] / plain["tokens_per_s"], 3)
    if ok:
        best = max(ok.values(), key=lambda r: r["tokens_per_s"])
        summary.update(fastest=best["variant"], fastest_tokens_per_s=best["tokens_per_s"])
    summary["total_s"] = round(time.monotonic() - sweep.started, 1)
    sweep.record(summary)
    sweep.say("")
    for line in table(rows):
        sweep.say(line)
    if "fastest" in summary:
        sweep.say(f"\nfastest: {summary['fastest']}, {summary['fastest_tokens_per_s']:,.0f} real tokens/s")
    if "zero_vs_no_deepspeed" in summary:
        sweep.say(f"ZeRO-2 path / --deepspeed none (defaults): {summary['zero_vs_no_deepspeed']:.3f}")
    if profile and profile.get("top"):
        sweep.say("")
        sweep.say(f"Top kernels, {profile['variant']} (2 profiled optimizer steps):")
        sweep.say(f"| {next(iter(profile['top'][0]))} | calls | total ms | ms per call | share |")  # kernel on GPU
        sweep.say("| --- | --- | --- | --- | --- |")
        for k in profile["top"]:
            name = k.get("kernel") or k.get("operator")
            sweep.say(f"| {name} | {k['calls']} | {k['total_ms']} | {k['per_call_ms']} | {100 * k['share']:.1f}% |")
    others = [r for r in sweep.records if r["step"] not in ("bench", "summary") and "top" not in r]
    if others:
        sweep.say("")
        for r in others:
            sweep.say(f"{r['step']}: {r['status']} in {r['seconds']} s" + (f" -- {r['error']}" if "error" in r else ""))
    for name, status, lines in sweep.failures:
        sweep.say(f"\n--- {name} ({status}): last lines of its stderr ---\n{lines}")


@click.command()
@click.option("--budget-s", type=float, default=450.0, show_default=True, help="global deadline for everything")
@click.option("--log-dir", type=click.Path(), default="output", show_default=True)
@click.option("--dry-run", is_flag=True, help="CPU plumbing check: tiny preset, three variants")
@click.option("--steps", type=int, default=None, help="timed steps per variant (default 4; dry run 1)")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--variants", "variants_file", type=click.Path(exists=True), default=None,
              help="JSON list of {name, args, slice_s} instead of the built-in list")  # fmt: skip
@click.option("--tests/--no-tests", default=True, help="run the CUDA tests first")
@click.option("--profile/--no-profile", default=True, help="profile the fastest variant")
@click.option("--end-to-end/--no-end-to-end", default=True, help="the train + smoke path check")
@click.option("--plan-check/--no-plan-check", default=True, help="the memory plan against the measured peak")
def main(budget_s, log_dir, dry_run, steps, warmup, variants_file, tests, profile, end_to_end, plan_check):
    """The CUDA tests, the lever sweep, a kernel profile and the train path, under one deadline."""
    sweep = Sweep(budget_s, Path(log_dir))
    steps = steps if steps is not None else (1 if dry_run else 4)
    if variants_file:
        variants = [Variant(**v) for v in json.loads(Path(variants_file).read_text(encoding="utf-8"))]
    else:
        variants = dry_variants() if dry_run else gpu_variants(sweep.work)
    sweep.say(f"bench-gpu: {len(variants)} variants, budget {budget_s:.0f} s, log {sweep.log.name}, work {sweep.work}")
    if tests:
        run_tests(sweep, dry_run)
    if plan_check:
        run_plan_check(sweep, dry_run)
    rows = run_variants(sweep, variants, dry_run, steps, warmup)
    ok = [r for r in rows if r["status"] == "ok"]
    profiled = None
    if profile and ok:
        profiled = run_profile(sweep, max(ok, key=lambda r: r["tokens_per_s"]), variants, dry_run, warmup)
    if end_to_end:
        run_end_to_end(sweep, dry_run)
    summarise(sweep, rows, profiled)


if __name__ == "__main__":
    main()
