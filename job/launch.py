"""Turning `--nproc/--nnodes/...` into a launch. Nothing else in the package starts processes.

The parent (`python -m job train`) checks everything, prepares the data once, writes the effective
config, then either runs the single worker in-process or re-launches itself through torchrun, whose
workers all read the same `run_config.json`. Signals reach the workers (torchrun forwards them); the
parent waits and returns the exit code rank 0 recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from job import checkpoints, doctor
from job.config import RunConfig
from job.errors import EXIT_CRASH, JobError
from job.train import STATUS_FILE

log = logging.getLogger("job")

# Where a launch setting comes from when no flag (or --config file) sets it: torchrun's own PET_* variables,
# which Kubeflow's PyTorchJob and TrainJob set in every pod, then an Indexed Job's completion index (JobSet
# pods have it too) for the node rank; else the default. The same names torchrun reads, so one pod spec
# works under every launcher.
TOPOLOGY_ENV = {
    "nproc": ("PET_NPROC_PER_NODE",),
    "nnodes": ("PET_NNODES",),
    "node_rank": ("PET_NODE_RANK", "JOB_COMPLETION_INDEX"),
    "master_addr": ("PET_MASTER_ADDR",),
    "master_port": ("PET_MASTER_PORT",),
}
TOPOLOGY_DEFAULTS = {"nproc": None, "nnodes": 1, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": None}
MULTINODE_PORT = 29500  # every node must agree, so across nodes the port cannot be picked at random
# torchrun restarts every node's workers (a new c10d rendezvous round, each resuming from the newest complete
# checkpoint) up to this many times when a worker or a node fails; one node alone has nothing to wait for.
MULTINODE_RESTARTS = 3
# How long a node waits for the others to join (torchrun's default, 600 s, is shorter than a cold image pull).
RENDEZVOUS_JOIN_TIMEOUT_S = 1800


def resolve_topology(cfg: RunConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Fill the launch settings that no flag set, from `environ` (default os.environ), else the defaults.

    Returns where each one came from: "flag" (a flag or the --config file), a variable's name, or "default".
    """
    environ = os.environ if environ is None else environ
    sources = {}
    for name, variables in TOPOLOGY_ENV.items():
        if getattr(cfg, name) is not None:
            sources[name] = "flag"
            continue
        variable = next((v for v in variables if environ.get(v, "").strip()), None)
        sources[name] = variable or "default"
        value = TOPOLOGY_DEFAULTS[name] if variable is None else _env_value(name, variable, environ[variable].strip())
        setattr(cfg, name, value)
    if cfg.master_port is None and cfg.nnodes > 1:
        cfg.master_port = MULTINODE_PORT
    cfg.validate()  # node rank below the node count, a real port: now that both are known
    return sources


def _env_value(name: str, variable: str, text: str) -> int | str | None:
    flag = "--" + name.replace("_", "-")
    if name == "master_addr":
        return text
    if name == "nproc" and text in ("auto", "gpu"):
        return None  # torchrun's words for "one process per GPU": our default too
    if not text.isdigit():
        hint = " (an elastic range: a ZeRO checkpoint is tied to its world size)" if ":" in text else ""
        raise JobError(f"{variable}={text!r} is not a whole number{hint}", f"set {variable} to one, or pass {flag}")
    return int(text)


def rendezvous_id(cfg: RunConfig) -> str:
    """The same on every node of one run (they share --output-dir), different for runs into other folders."""
    return "job-" + hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16]


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
    log.info("launch: %s", found.launch)
    cfg, _ = prepare_inputs(cfg, found)

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
        ("MASTER_ADDR", cfg.master_addr or TOPOLOGY_DEFAULTS["master_addr"]),
        ("MASTER_PORT", str(cfg.master_port or 0)),  # 0: the store of a world of one binds any free port
    ):
        os.environ.setdefault(key, value)


def _run_in_process(cfg: RunConfig) -> int:
    from job.train import run_worker

    single_process_env(cfg)
    return run_worker(cfg)


def torchrun_command(cfg: RunConfig, nproc: int, config_path: Path) -> list[str]:
    """The launcher command every node runs; workers run `python -m job worker --config run_config.json`.

    One node without a port: `--standalone`, torchrun binds a free port itself (no probe-then-bind race).
    Otherwise a c10d rendezvous at master_addr:master_port: the ranks are assigned when every node has
    joined, and a failed worker or node restarts all of them (a replacement pod joins the new round).
    """
    if cfg.nnodes == 1 and cfg.master_port is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [
            "--nnodes",
            str(cfg.nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{cfg.master_addr}:{cfg.master_port}",
            "--rdzv-id",
            rendezvous_id(cfg),
            "--rdzv-conf",
            f"join_timeout={RENDEZVOUS_JOIN_TIMEOUT_S}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *rendezvous,
        "--max-restarts",
        str(MULTINODE_RESTARTS if cfg.nnodes > 1 else 0),
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
