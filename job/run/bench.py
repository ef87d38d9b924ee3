"""Benchmarks of the real paths: training steps through `Trainer` (+ DeepSpeed, the chosen attention) and
tokenization through `prepare`, each against its stock baseline measured in the same process."""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from job.core.config import RunConfig, field_meta
from job.core.units import flops_per_token, significant, throughput
from job.run.deepspeed_config import zero_stage_in_use

# The config fields a benchmark's figures depend on, reported beside them: by their concern in the config.
BENCH_SETTING_GROUPS = ("model", "optimisation", "throughput levers")


class StepTimer(TrainerCallback):
    """Wall time and real tokens of each optimizer step after the warm-up (and the first step's time: compiles)."""

    def __init__(self, warmup: int, profile_steps: int = 0):
        self.warmup = warmup
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.first_step_s: float | None = None
        self.profile_steps = profile_steps
        self.profiler = None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_steps and state.global_step == self.warmup:  # profile the first timed steps
            self.profiler = _start_profiler()
        self._sync()
        self._start, self._seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        seconds = time.perf_counter() - self._start
        if state.global_step == 1:
            self.first_step_s = seconds
        if state.global_step > self.warmup:
            self.times.append(seconds)
            self.tokens.append(state.num_input_tokens_seen - self._seen)
        if self.profiler is not None and state.global_step == self.warmup + self.profile_steps:
            self.profiler.stop()


def _start_profiler():
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def kernel_table(prof, rows: int = 25) -> list[dict]:
    """The top GPU kernels by total device time (CUDA); on a CPU the top operators by self CPU time instead."""
    events = prof.key_averages()
    cuda = torch.cuda.is_available()
    if cuda:  # kernel rows only: no operator rows, whose device time double-counts their kernels
        events = [e for e in events if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
        time_of = lambda e: e.self_device_time_total  # microseconds
    else:
        events = [e for e in events if e.self_cpu_time_total > 0]
        time_of = lambda e: e.self_cpu_time_total
    total = sum(time_of(e) for e in events) or 1.0
    top = sorted(events, key=time_of, reverse=True)[:rows]
    return [
        {
            "kernel" if cuda else "operator": e.key[:90],
            "calls": e.count,
            "total_ms": round(time_of(e) / 1e3, 2),
            "per_call_ms": round(time_of(e) / 1e3 / max(1, e.count), 4),
            "share": round(time_of(e) / total, 4),
        }
        for e in top
    ]


def synthetic_data(rows: int, length: int, vocab: int, eos: int, mean_document: int = 400, seed: int = 0):
    """Random token rows with an eos ending a document every ~mean_document tokens (packed-like)."""
    import datasets

    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(rows, length), dtype=np.int64)
    ids[rng.random((rows, length)) < 1.0 / mean_document] = eos
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids.tolist()})})


def synthetic_tokenizer(vocab_size: int, folder: Path):
    """A word-level tokenizer of exactly `vocab_size` entries with Bloom's specials at 0-3: all that random-token
    benchmarks need (a size, an eos, a pad), without a corpus or BPE training (e.g. on a bare GPU box)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from job.data.tokenizer import SPECIALS

    vocab = {t: i for i, t in enumerate([*SPECIALS, *(f"t{i}" for i in range(len(SPECIALS), vocab_size))])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def bench_training(
    cfg: RunConfig, steps: int, warmup: int, synthetic: bool, stock: bool = False, profile_steps: int = 0
) -> dict:
    """Time `steps` optimizer steps after `warmup` of `cfg`'s training path; `stock` undoes the model's patches."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from job.data.tokenizer import run_tokenizer
    from job.model.patches import undo_patches
    from job.run.launch import prepare_inputs
    from job.run.launch_record import resolve_launch
    from job.run.metrics import measure_matmul_tflops, peak_tflops
    from job.run.worker import build_trainer

    if synthetic and not (cfg.tokenizer or cfg.model):  # random tokens need only a vocabulary size, eos and pad
        folder = Path(cfg.output_dir).parent / "tokenizer"
        tokenizer = synthetic_tokenizer(cfg.vocab_size, folder)
        cfg = dataclasses.replace(cfg, tokenizer=str(folder))
    elif synthetic:
        tokenizer = run_tokenizer(cfg)
        cfg = dataclasses.replace(cfg, tokenizer=tokenizer.name_or_path)
    else:
        cfg, tokenizer = prepare_inputs(cfg)
    cfg = dataclasses.replace(cfg, eval_fraction=0.0)  # no evaluation inside the timed run
    # bench is its own launcher: one node, the processes torch.distributed already has (one without)
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    launch = resolve_launch(dataclasses.replace(cfg, nproc=world, nnodes=1, node_rank=0))
    rows = (steps + warmup + 1) * launch.global_batch
    data = synthetic_data(rows, cfg.max_length, len(tokenizer), tokenizer.eos_token_id) if synthetic else None
    timer = StepTimer(warmup, profile_steps)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # A run before this one in the process may have set up DeepSpeed: forget it, or the next Trainer uses it
    # too (Accelerate leaves ACCELERATE_USE_DEEPSPEED=true behind, which TrainingArguments then obeys).
    AcceleratorState._reset_state()
    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    trainer = build_trainer(cfg, launch, data=data, callbacks=[timer])
    trainer.args.save_strategy = "no"  # the Trainer would save at the last step: seconds of I/O, never timed
    if stock:
        undo_patches(trainer.model)
    if not synthetic and len(trainer.get_train_dataloader()) < (steps + warmup) * cfg.grad_accum:
        data = synthetic_data(rows, cfg.max_length, len(tokenizer), tokenizer.eos_token_id)
        trainer.train_dataset = data["train"]
        synthetic = True
    trainer.train()
    per_token = flops_per_token(trainer.model.config, cfg.max_length)
    step_s = statistics.median(timer.times)
    device = torch.device(launch.device)
    peak = peak_tflops(device)
    figures = throughput(sum(timer.tokens), sum(timer.times), per_token, world, peak)
    result = {
        "path": "stock HF Bloom" if stock else "job",
        "attention": getattr(trainer.model, "job_attention", cfg.attention),
        "model_patches": getattr(trainer.model, "job_patches", {}),
        "deepspeed": bool(trainer.is_deepspeed_enabled),  # as the Trainer ran, not as asked
        "tokens_per_s": round(sum(timer.tokens) / sum(timer.times), 1),
        "tflops": figures["tflops_per_device"],  # per device, as MFU counts it
        "mfu": figures.get("mfu"),
        "step_s": round(step_s, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "steps_timed": len(timer.times),
        "first_step_s": round(timer.first_step_s, 2),
        "compile_s": round(max(0.0, timer.first_step_s - step_s), 2),  # the first step's extra: compiles, caches
        "flops_per_token": per_token,
        "data": "synthetic" if synthetic else "prepared",
        "_device": device,
    }
    if timer.profiler is not None:
        result["profile"] = {"steps": profile_steps, "top": kernel_table(timer.profiler)}
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if peak is None or device.type == "cpu":
        result["mfu_datasheet_note"] = "no datasheet peak for this device"
    result["_measured_ceiling"] = measure_matmul_tflops(device, torch.bfloat16 if cfg.bf16 else torch.float32)
    return result


def baseline(cfg: RunConfig, compare: str, output: Path) -> tuple[RunConfig, bool]:
    """The (config, stock) of the `--compare` run: only the compared setting differs."""
    base = dataclasses.replace(cfg, output_dir=str(output / "baseline"))
    if compare == "no-deepspeed":
        return dataclasses.replace(base, deepspeed="none", zero_stage=None), False
    return dataclasses.replace(base, attention=compare), compare == "eager"


def run_bench(
    cfg: RunConfig, steps: int, warmup: int, synthetic: bool, compare: str | None, profile_steps: int = 0
) -> dict:
    """One JSON-able summary: the configured path, and the stock path in the same process if asked."""
    from job.run.worker import stop_dataloader_workers

    output = Path(tempfile.mkdtemp(prefix="job-bench-"))
    try:
        cfg = dataclasses.replace(
            cfg,
            output_dir=str(output / "run"),
            save_steps=10**9,
            eval_steps=0,
            report_to="none",
            max_steps=steps + warmup,
            resume="never",
        )
        main = bench_training(cfg, steps, warmup, synthetic, profile_steps=profile_steps)
        device, ceiling = main.pop("_device"), main.pop("_measured_ceiling")
        summary = {
            **main,
            "measured_ceiling_tflops": significant(ceiling),
            "mfu_measured": significant(main["tflops"] / ceiling) if ceiling else None,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "settings": {
                **{k: v for k, v in cfg.to_dict().items() if field_meta(k)["group"] in BENCH_SETTING_GROUPS},
                "max_length": cfg.max_length,
                "deepspeed": cfg.to_dict()["deepspeed"],
                "zero_stage": zero_stage_in_use(cfg),
                "model_patches": main.pop("model_patches"),
            },
        }
        if compare:
            base_cfg, stock = baseline(cfg, compare, output)
            base = bench_training(base_cfg, steps, warmup, synthetic, stock=stock)
            base.pop("_device"), base.pop("_measured_ceiling")
            summary["baseline"] = {
                k: base[k]
                for k in ("path", "attention", "deepspeed", "tokens_per_s", "tflops", "step_s", "peak_memory_gib")
            }
            summary["speedup"] = round(main["tokens_per_s"] / base["tokens_per_s"], 3)
        return summary
    finally:
        stop_dataloader_workers()  # they ignore SIGTERM: left alive, the process would wait for them at exit
        shutil.rmtree(output, ignore_errors=True)


# ------------------------------------------------------------------ tokenization
_BARE_TOKENIZER = None


def _load_bare(folder: str) -> None:
    global _BARE_TOKENIZER
    from transformers import AutoTokenizer

    _BARE_TOKENIZER = AutoTokenizer.from_pretrained(folder)


def _bare_chunk(texts: list[str]) -> int:
    """The batched fast tokenizer as users call it."""
    return sum(len(ids) for ids in _BARE_TOKENIZER(texts, add_special_tokens=False)["input_ids"])


def _rust_chunk(texts: list[str]) -> int:
    """Its Rust tokenizer's fastest batched call (no offsets): what no wrapper around it can beat."""
    encodings = _BARE_TOKENIZER.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return sum(len(e.ids) for e in encodings)


def bench_tokenize(cfg: RunConfig, repeats: int = 3, scale: int = 1) -> dict:
    """`prepare` against the bare batched fast tokenizer on the same text and process count.

    Each of the `repeats` rounds times the three in turn; the best time of each counts (timeit's rule: the
    minimum is the run least disturbed by other work on the machine). `scale` > 1 tokenizes the corpus that
    many times over, so fixed costs (forking workers, writing files) weigh as little as on a real corpus.
    """
    import datasets

    from job.data.corpus import TEXT, Corpus, load_run_corpus
    from job.data.prepare import prepare, tokenizer_threads
    from job.data.tokenizer import run_tokenizer

    corpus = load_run_corpus(cfg)
    if scale > 1:
        rows = datasets.concatenate_datasets([corpus.rows] * scale)
        corpus = Corpus.of(rows, f"{corpus.fingerprint}x{scale}", corpus.name)
    tokenizer = run_tokenizer(cfg)
    texts = corpus.rows[TEXT][:]
    chunks = [texts[i : i + 1000] for i in range(0, len(texts), 1000)]  # prepare's map batch size
    best = {"bare": float("inf"), "rust": float("inf"), "prepare": float("inf")}
    counts = {}

    def clock(name, run):
        start = time.perf_counter()
        counts[name] = run()
        best[name] = min(best[name], time.perf_counter() - start)

    pool = None
    processes = tokenizer_threads(cfg)  # what prepare uses
    if processes > 1:  # one tokenizer per worker, loaded before the clock starts
        pool = multiprocessing.get_context("spawn").Pool(processes, _load_bare, (tokenizer.name_or_path,))
        pool.map(_bare_chunk, [["warm-up"]] * processes)
    else:
        _load_bare(tokenizer.name_or_path)
    try:
        for _ in range(repeats):
            for name, chunk_fn in (("bare", _bare_chunk), ("rust", _rust_chunk)):
                clock(name, lambda f=chunk_fn: sum(pool.map(f, chunks) if pool else map(f, chunks)))
            with tempfile.TemporaryDirectory() as tmp:
                out = str(Path(tmp) / "out")
                clock(
                    "prepare",
                    lambda o=out: prepare(
                        dataclasses.replace(cfg, eval_fraction=0.0), tokenizer, o, corpus=corpus
                    ).stats["document_tokens"],
                )
    finally:
        if pool:
            pool.close()
    tokens = counts["bare"]
    assert counts["rust"] == counts["prepare"] == tokens, f"the tokenizations disagree: {counts}"
    return {
        "mode": "tokenize",
        "num_proc": processes,
        "repeats": repeats,
        "scale": scale,
        "documents": len(texts),
        "characters": sum(len(t) for t in texts),
        "tokens": tokens,
        **{f"{name}_tokens_per_s": round(tokens / seconds) for name, seconds in best.items()},
        **{f"{name}_s": round(seconds, 3) for name, seconds in best.items()},
        "prepare_vs_bare": round(best["bare"] / best["prepare"], 3),
        "prepare_vs_rust": round(best["rust"] / best["prepare"], 3),
    }


# ------------------------------------------------------------------ prepare at corpus scale
def bench_prepare(cfg: RunConfig, copies: list[int], train_steps: int = 0) -> dict:
    """`python -m job prepare` in a child process on N copies of the corpus (a Parquet file, read as a real corpus
    is), per N: its wall time, tokens/s and peak memory; with more than one process, also one process on the same
    file (the speedup). Against the bare Rust tokenizer (`encode_batch_fast`) timed here on the same texts.

    Every tokenizer call runs one Rust thread (TOKENIZERS_PARALLELISM=false), so prepare's N threads (reported as
    "processes", --num-proc) are N cores. The marginal rate between two sizes leaves out the fixed costs (imports,
    loading the tokenizer): what a corpus of 100 GB sees. Memory: `_sample_tree`. With `train_steps`, a tiny model
    also trains that many steps on each size's prepared rows: the memory of starting a run (training reads the rows
    memory-mapped).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from job.data.corpus import TEXT, load_run_corpus
    from job.data.prepare import token_ids_function, tokenizer_threads
    from job.data.tokenizer import run_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the Rust tokenizer at each call, and by the children
    corpus = load_run_corpus(cfg)
    tokenizer = run_tokenizer(cfg)
    texts = corpus.rows[TEXT][:]
    token_ids = token_ids_function(tokenizer)
    rounds = 3  # the mean, not the best: prepare's one long run meets the machine's other work as this does
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        rust_tokens = sum(len(ids) for i in range(0, len(texts), 1000) for ids in token_ids(texts[i : i + 1000]))
    rust_seconds, rust_cpu = (time.perf_counter() - start) / rounds, (time.process_time() - cpu) / rounds
    rust_rate = rust_tokens / rust_seconds
    processes = tokenizer_threads(cfg)
    runs = {"": processes, "one_process_": 1} if processes > 1 else {"": 1}  # label -> processes
    labels = list(runs)
    sizes = []
    with tempfile.TemporaryDirectory(prefix="job-bench-prepare-") as tmp:
        folder = Path(tmp)
        for n in sorted(copies):
            corpus_file = folder / f"x{n}.parquet"
            with pq.ParquetWriter(corpus_file, pa.schema([(TEXT, pa.string())])) as writer:
                for _ in range(n):
                    writer.write_table(pa.table({TEXT: texts}))
            size = {"copies": n, "documents": n * len(texts), "document_tokens": n * rust_tokens}
            for label, count in runs.items():
                steps = train_steps if not label else 0  # the run's memory: once per size
                run = _measured_prepare(
                    cfg, corpus_file, str(tokenizer.name_or_path), count, folder / f"{label}{n}", steps
                )
                assert run["document_tokens"] == n * rust_tokens, "prepare and the bare tokenizer disagree"
                size.update({f"{label}{k}": v for k, v in run.items() if k != "document_tokens"})
            if processes > 1:
                size["speedup"] = round(size["tokens_per_s"] / size["one_process_tokens_per_s"], 3)
            if sizes:  # the fixed costs (imports, loading the tokenizer, forking) cancel out between two sizes
                added = size["document_tokens"] - sizes[-1]["document_tokens"]
                for label in labels:
                    for clock in ("wall_s", "cpu_s"):
                        seconds = max(size[f"{label}{clock}"] - sizes[-1][f"{label}{clock}"], 1e-9)
                        size[f"{label}marginal_tokens_per_{clock}"] = round(added / seconds)
                size["per_process_vs_rust"] = round(size["marginal_tokens_per_wall_s"] / processes / rust_rate, 3)
                size["cpu_vs_rust"] = round(size["marginal_tokens_per_cpu_s"] * rust_cpu / rust_tokens, 3)
                if processes > 1:
                    size["marginal_speedup"] = round(
                        size["marginal_tokens_per_wall_s"] / size["one_process_marginal_tokens_per_wall_s"], 3
                    )
            size["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine: the figures' noise
            sizes.append(size)
            corpus_file.unlink()
    return {
        "mode": "prepare",
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "processes": processes,
        "cpus": os.cpu_count(),
        "rust_tokens_per_s": round(rust_rate),  # one process, one thread
        "rust_tokens_per_cpu_s": round(rust_tokens / rust_cpu),
        "sizes": sizes,
    }


def _measured_prepare(
    cfg: RunConfig, corpus_file: Path, tokenizer: str, processes: int, work: Path, train_steps: int = 0
) -> dict:
    """One `prepare` child process, then (`train_steps`) a short training run on what it wrote: their figures (a
    private cache: nothing is left behind)."""
    work.mkdir()
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf"), "JOB_CACHE": str(work / "job")}
    try:
        args = ["prepare", "--data", str(corpus_file), "--tokenizer", tokenizer, "--max-length", str(cfg.max_length)]
        args += ["--eval-fraction", str(cfg.eval_fraction), "--seed", str(cfg.seed), "--num-proc", str(processes)]
        args += ["--packing" if cfg.packing else "--no-packing", "--output", str(work / "p")]
        seconds, cpu, peak, out = _measured_child(args, env, work)
        stats = json.loads(out)
        result = {
            "processes": processes,
            "tokens": stats["tokens"],
            "document_tokens": stats["document_tokens"],
            "wall_s": round(seconds, 2),
            "cpu_s": round(cpu, 2),  # the whole tree's, its workers' included
            "tokens_per_s": round(stats["document_tokens"] / seconds),
            **{f"peak_{name}_gib": round(value / 2**30, 3) for name, value in peak.items()},
        }
        if train_steps:  # the start of a run on it: tiny model, one process, the prepared rows memory-mapped
            args = ["train", "--prepared", str(work / "p"), "--tokenizer", tokenizer, "--preset", "tiny"]
            args += ["--max-steps", str(train_steps), "--deepspeed", "none", "--report-to", "none", "--nproc", "1"]
            args += ["--eval-batches", "1", "--per-device-batch-size", "4", "--grad-accum", "1", "--device", "cpu"]
            args += ["--dataloader-workers", "0", "--resume", "never", "--output-dir", str(work / "run")]
            seconds, _, peak, _ = _measured_child(args, env, work)
            result["train_start_s"] = round(seconds, 1)
            result.update({f"train_start_peak_{name}_gib": round(value / 2**30, 3) for name, value in peak.items()})
        return result
    finally:
        shutil.rmtree(work)


def _measured_child(args: list[str], env: dict, work: Path) -> tuple[float, float, dict[str, int], str]:
    """`python -m job ARGS`: its wall and CPU seconds, peak memory (`_sample_tree`) and stdout."""
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(work / "out", "w+") as out, open(work / "err", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "job", *args], stdout=out, stderr=err, env=env)
        peak = _sample_tree(proc)
        seconds, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
        err.seek(0)
        assert proc.returncode == 0, f"{args[0]} failed: {err.read()[-2000:]}"
        out.seek(0)
        return seconds, cpu, peak, out.read()


def _children_cpu_s() -> float:
    """CPU seconds of every finished child process and of the children they waited for."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sample_tree(proc: subprocess.Popen) -> dict[str, int]:
    """Until `proc` exits, every 50 ms: the memory of it and its descendants (bytes, each the peak over time).

    pss: the tree's proportional set size, each shared page counted once (forked workers share most of theirs);
    anon: its anonymous part, what the kernel cannot reclaim (file pages of memory-mapped Arrow files it can);
    rss_largest: the resident set of the largest single process, as `ps` shows it.
    """
    import psutil

    root = psutil.Process(proc.pid)
    peak = {"pss": 0, "anon": 0, "rss_largest": 0}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        now = {"pss": 0, "anon": 0, "rss_largest": 0}
        for member in tree:
            try:
                fields = dict(
                    line.split(":") for line in Path(f"/proc/{member.pid}/smaps_rollup").read_text().splitlines()[1:]
                )
            except (OSError, ValueError):
                continue  # exited meanwhile
            kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
            now["pss"] += kib["Pss"]
            now["anon"] += kib["Pss_Anon"]
            now["rss_largest"] = max(now["rss_largest"], kib["Rss"])
        peak = {k: max(peak[k], now[k]) for k in peak}
        time.sleep(0.05)
    proc.wait()
    return peak


def dumps(summary: dict) -> str:
    return json.dumps(summary, ensure_ascii=False, default=str)
