"""Turning `--nproc/--nnodes/...` into a launch. Nothing else in the package starts processes.

The parent (`python -m job train`) checks everything, prepares the data once, writes the effective
config, then either runs the single worker in-process or re-launches itself through torchrun, whose
workers all read the same `run_config.json`. Signals reach the workers (torchrun forwards them); the
parent waits and returns the exit code rank 0 recorded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from job import checkpoints, doctor
from job.config import RunConfig
from job.errors import EXIT_CRASH
from job.train import STATUS_FILE

log = logging.getLogger("job")


def prepare_inputs(cfg: RunConfig, found: doctor.Preflight | None = None):
    """Prepare the data once (CPU work, before any launch), reusing what the preflight checks loaded.

    Returns the config with `tokenizer` and `prepared` resolved to folders every worker reads, and the
    tokenizer. The prepared data goes to the cache, never half-way.
    """
    from job.corpus import load_corpus
    from job.prepare import prepare, read_prepared_key, read_prepared_stats
    from job.tokenizer import resolve_tokenizer, tokenizer_fingerprint

    found = found or doctor.Preflight(cfg)
    tokenizer = found.tokenizer or resolve_tokenizer(cfg.tokenizer, cfg.model, cfg.vocab_size, cfg.trust_remote_code)
    if cfg.prepared:
        key = found.prepared_key or read_prepared_key(cfg.prepared)
        doctor.check_prepared_tokenizer(cfg.prepared, key, tokenizer_fingerprint(tokenizer))
        cfg.max_length = read_prepared_stats(cfg.prepared)["max_length"]
    else:
        corpus = found.corpus or load_corpus(cfg.data, cfg.text_column, cfg.max_samples)
        result = prepare(cfg, tokenizer, corpus=corpus)
        log.info(
            "data %s: %s (%s)",
            "cached" if result.cache_hit else "prepared",
            result.path,
            {k: result.stats[k] for k in ("documents", "tokens", "rows")},
        )
        cfg.prepared = str(result.path)
    cfg.tokenizer = tokenizer.name_or_path  # the folder every worker loads
    return cfg, tokenizer


def train(cfg: RunConfig) -> int:
    """Check everything, prepare, then write the config and launch; the exit code of the run."""
    found = doctor.preflight(cfg)  # stops at the first failed check: nothing written yet
    cfg, _ = prepare_inputs(cfg, found)
    cfg.master_port = doctor.resolve_master_port(cfg)

    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if cfg.node_rank == 0:  # the folder is this job's (doctor.check_output): its own partial saves only
        for path in checkpoints.remove_incomplete(output):
            log.warning("removed incomplete checkpoint %s (a save was interrupted)", path)
    (output / STATUS_FILE).unlink(missing_ok=True)
    cfg.write(output / "run_config.json")  # first: from here on other nodes see a folder of this job
    (output / doctor.INPUTS_FILE).write_text(json.dumps(found.fingerprints, indent=2) + "\n")

    nproc = doctor.processes_per_node(cfg)
    if nproc == 1 and cfg.nnodes == 1:
        return _run_in_process(cfg)
    return _run_torchrun(cfg, nproc, output)


def single_process_env(cfg: RunConfig) -> None:
    """DeepSpeed expects a process group even for one process: describe a world of one."""
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", cfg.master_addr),
        ("MASTER_PORT", str(cfg.master_port)),
    ):
        os.environ.setdefault(key, value)


def _run_in_process(cfg: RunConfig) -> int:
    from job.train import run_worker

    single_process_env(cfg)
    return run_worker(cfg)


def torchrun_command(cfg: RunConfig, nproc: int, config_path: Path) -> list[str]:
    """The launcher command every node runs; workers run `python -m job worker --config run_config.json`."""
    rendezvous = [
        "--nnodes",
        str(cfg.nnodes),
        "--node-rank",
        str(cfg.node_rank),
        "--master-addr",
        cfg.master_addr,
        "--master-port",
        str(cfg.master_port),
    ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *rendezvous,
        "--max-restarts",
        "0",
        "-m",
        "job",
        "worker",
        "--config",
        str(config_path),
    ]


def _run_torchrun(cfg: RunConfig, nproc: int, output: Path) -> int:
    command = torchrun_command(cfg, nproc, output / "run_config.json")
    env = {
        **os.environ,
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(cfg.shutdown_timeout_s),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
    }
    log.info("launching: %s", " ".join(command))
    child = subprocess.Popen(command, env=env)

    def forward(signum, frame):  # Kubernetes signals PID 1 only: pass it on to torchrun, which tells the workers
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = output / STATUS_FILE
    if status.exists():
        return int(json.loads(status.read_text())["code"])
    log.error("the workers ended without a verdict (torchrun exit %s); see the log above", returncode)
    return returncode or EXIT_CRASH
