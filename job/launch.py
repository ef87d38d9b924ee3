"""Turning `--nproc/--nnodes/...` into a launch. Nothing else in the package starts processes.

The parent (`python -m job train`) checks everything, prepares the data once, writes the effective
config, then either runs the single worker in-process or re-launches itself through torchrun, whose
workers all read the same `run_config.json`; the parent waits and returns the exit code rank 0 recorded.

Signals: the parent holds a lock on the output folder for the run's lifetime (node 0). It starts torchrun
in a session of its own, so a signal to the parent's process group (a terminal, `timeout`) reaches only the
parent, which passes the first SIGTERM/SIGINT on, once; torchrun signals each worker's group and waits for
them up to `--shutdown-timeout-s`. `python -m job.launch` is torchrun that acts on the first signal only
and ends quietly after a signalled, clean shutdown (plain torchrun prints a traceback then).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from job import checkpoints, doctor
from job.checkpoints import LOCK_FILE, STATUS_FILE
from job.config import RunConfig
from job.errors import EXIT_CRASH, EXIT_OK, EXIT_PREEMPTED, STOP_SIGNALS, JobError

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
    output = Path(cfg.output_dir)
    lock = OutputLock(output) if cfg.node_rank == 0 else None
    if lock and output.is_dir():
        lock.acquire()  # refuse a second run before preparing anything
    log.info("launch: %s", found.launch)
    cfg, _ = prepare_inputs(cfg, found)

    output.mkdir(parents=True, exist_ok=True)
    if lock:  # the folder is this job's (doctor.check_output): its own partial saves only
        lock.acquire()
        for path in checkpoints.remove_incomplete(output):
            log.warning("removed incomplete checkpoint %s (a save was interrupted)", path)
    last = checkpoints.resume_point(cfg.resume, output)
    world = doctor.processes_per_node(cfg) * cfg.nnodes
    if lock and last and checkpoints.zero_world_size(last) not in (None, world):
        make_universal(last)
    if checkpoints.finished(last, cfg.max_steps):
        if _recorded_code(output) == EXIT_OK and (output / checkpoints.FINAL).is_dir():
            log.info("%s already trained to step %d and exported: nothing to do", output, checkpoints.step_of(last))
            return EXIT_OK
        if cfg.node_rank != 0:
            return EXIT_OK
        from job.train import publish

        log.info("%s trained to step %d; exporting it (the export was interrupted)", last, checkpoints.step_of(last))
        return publish(cfg, last, processes=world)
    (output / STATUS_FILE).unlink(missing_ok=True)
    cfg.write(output / "run_config.json")  # first: from here on other nodes see a folder of this job
    (output / doctor.INPUTS_FILE).write_text(json.dumps(found.fingerprints, indent=2) + "\n")

    nproc = doctor.processes_per_node(cfg)
    if nproc == 1 and cfg.nnodes == 1:
        return _run_in_process(cfg)
    return _run_torchrun(cfg, nproc, output)


class OutputLock:
    """One run per output folder: an exclusive `flock` on OUTPUT/job.lock, held by the launcher until it exits.

    The kernel drops it when the process ends, however it ends, so a killed run leaves nothing stuck. Only
    node 0's launcher takes it: every node of a multi-node run shares the folder.
    """

    def __init__(self, output: Path):
        self.path = output / LOCK_FILE
        self.handle = None

    def acquire(self) -> None:
        if self.handle is not None:
            return
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise JobError(
                f"{self.path.parent} is in use by a running job ({holder})",
                "wait for it to end, stop it, or use another --output-dir",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle  # kept open (and locked) for the life of this process


def make_universal(checkpoint: Path) -> None:
    """DeepSpeed's universal checkpoint beside a ZeRO one (once), which loads at any data-parallel world size.

    `ds_to_universal` is DeepSpeed's own converter; `--inject_missing_state` adds the parameter layout that
    Megatron-DeepSpeed records and the Trainer does not. Workers then load it (`"load_universal": true`).
    """
    if checkpoints.universal_tag(checkpoint):
        return
    tag = (checkpoint / "latest").read_text().strip()
    target = checkpoint / f"{tag}_universal"
    if target.exists():
        shutil.rmtree(target)  # a conversion that was interrupted
    log.info(
        "%s was written by %s processes: converting it to a universal checkpoint",
        checkpoint,
        checkpoints.zero_world_size(checkpoint),
    )
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint / tag),
        "--output_folder",
        str(target),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not checkpoints.universal_tag(checkpoint):
        raise RuntimeError(f"ds_to_universal failed on {checkpoint}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")


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
        "job.launch",  # torchrun, quieter on signals (_quiet_torchrun)
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
    child: subprocess.Popen | None = None
    received: list[int] = []

    def forward(signum, frame):  # Kubernetes signals PID 1 only: pass it on to torchrun, which tells the workers
        received.append(signum)
        if child is not None and len(received) == 1:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        # A session of its own: a signal to our process group must reach torchrun once, through us.
        child = subprocess.Popen(command, env=env, start_new_session=True)
        if received:
            child.send_signal(received[0])  # it came while torchrun was being started
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = _recorded_code(output)
    if code is not None:
        return code
    if received:
        log.error("stopped by %s before the workers recorded a verdict", signal.Signals(received[0]).name)
        return EXIT_PREEMPTED
    log.error("the workers ended without a verdict (torchrun exit %s); see the log above", returncode)
    return returncode or EXIT_CRASH


def _recorded_code(output: Path) -> int | None:
    """The exit code rank 0 recorded in STATUS_FILE, if any."""
    status = output / STATUS_FILE
    return int(json.loads(status.read_text())["code"]) if status.exists() else None


def _quiet_torchrun() -> int:
    """torchrun (same arguments), acting on the first SIGTERM/SIGINT only and without a traceback after it.

    Plain torchrun restarts its shutdown on every further signal (a signal to all processes, then ours
    forwarded), which cuts short its wait for the workers' checkpoint, and ends a clean signalled shutdown
    with a SignalException traceback. The workers' verdict is in STATUS_FILE either way.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    handled = os.environ.get("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")
    stop_names = {sig.name for sig in STOP_SIGNALS}
    # torchrun's --signals-to-handle, read from the environment: SIGTERM/SIGINT are ours, below
    os.environ["PET_SIGNALS_TO_HANDLE"] = ",".join(s for s in handled if s.strip() not in stop_names)
    seen: list[int] = []

    def first_only(signum, frame):
        if not seen:
            seen.append(signum)
            raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    for sig in STOP_SIGNALS:
        signal.signal(sig, first_only)
    try:
        main()
    except SignalException:
        return EXIT_PREEMPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(_quiet_torchrun())
