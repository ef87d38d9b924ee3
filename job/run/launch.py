"""Turning `--nproc/--nnodes/...` into a launch. Nothing else in the package starts processes.

The parent (`python -m job train`) checks everything, prepares the data once, writes the effective
config, then either runs the single worker in-process or re-launches itself through torchrun, whose
workers all read the same `run_config.json`; the parent waits and returns the exit code rank 0 recorded.

Signals: the parent holds a lock on the output folder for the run's lifetime (node 0). It starts torchrun
in a session of its own, so a signal to the parent's process group (a terminal, `timeout`) reaches only the
parent, which passes the first SIGTERM/SIGINT on, once; torchrun signals each worker's group and waits for
them up to `--shutdown-timeout-s`. `python -m job.run.launch` is torchrun that acts on the first signal only
and ends quietly after a signalled, clean shutdown (plain torchrun prints a traceback then).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.core.data_spec import DataSpec
from job.core.errors import EXIT_CRASH, EXIT_OK, EXIT_PREEMPTED, JobError
from job.core.files import FileLock, atomic_write_json
from job.core.logs import set_node_rank
from job.core.signals import STOP_SIGNALS, die_with_parent, raise_if_stopped
from job.core.topology import TOPOLOGY_DEFAULTS
from job.run.check_results import Preflight
from job.run.finish import finish_run
from job.run.launch_record import LAUNCH_ENV, Launch, with_resume_point, write_launch
from job.run.preflight import preflight
from job.run.resume import check_prepared_tokenizer

log = logging.getLogger("job")

# No in-place restarts: when a worker or a node fails, torchrun on every node ends, and Kubernetes replaces
# every pod (JobSet, TrainJob, Indexed Job alike), which then resume from the newest complete checkpoint. A
# surviving launcher that restarts in place and waits for a replacement node minutes later does not re-form the
# group: the new round dies on the c10d store's 60 s timeouts (k8s/README.md, "One pod replaced").
MULTINODE_RESTARTS = 0
LAUNCHER_PID_ENV = "JOB_LAUNCHER_PID"  # torchrun ends with the launcher that started it
# How long a node waits for the others to join (torchrun's default, 600 s, is shorter than a cold image pull).
RENDEZVOUS_JOIN_TIMEOUT_S = 1800


def rendezvous_id(cfg: RunConfig) -> str:
    """The same on every node of one run (they share --output-dir), different for runs into other folders."""
    return "job-" + hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16]


def prepare_inputs(cfg: RunConfig, found: Preflight | None = None) -> tuple[RunConfig, object]:
    """Prepare the data once (CPU work, before any launch), reusing what the preflight checks loaded.

    Returns a new config with `tokenizer` and `prepared` resolved to folders every worker reads (a mix: a
    `--prepared` mix of each source's folder, with the same weights), and the tokenizer. The prepared data goes
    to the cache, never half-way.
    """
    from job.data.corpus import load_run_corpus
    from job.data.mix import prepare_mix, sources
    from job.data.prepare import check_contents, prepare, read_prepared_key, read_prepared_stats
    from job.data.tokenizer import run_tokenizer, tokenizer_fingerprint

    found = found or Preflight(cfg)
    tokenizer = found.tokenizer or run_tokenizer(cfg)
    mix = sources(cfg)
    if cfg.prepared:
        keys = (
            {cfg.prepared.path: found.prepared_key}
            if mix is None
            else {s.path: found.prepared_keys.get(s.name) for s in mix}
        )
        for path, key in keys.items():
            check_prepared_tokenizer(path, key or read_prepared_key(path), tokenizer_fingerprint(tokenizer))
            check_contents(path)  # whole, before any worker maps it
        cfg = dataclasses.replace(cfg, max_length=read_prepared_stats(next(iter(keys)))["max_length"])
    elif mix is not None:  # each source prepared as a run on it alone would be; the workers read the mix
        cfg = dataclasses.replace(cfg, prepared=prepare_mix(cfg, tokenizer, found.corpora)[0])
    else:
        corpus = found.corpus or load_run_corpus(cfg)
        result = prepare(cfg, tokenizer, corpus=corpus)
        log.info(
            "data %s: %s (%s)",
            "cached" if result.cache_hit else "prepared",
            result.path,
            {k: result.stats[k] for k in ("documents", "tokens", "rows")},
        )
        cfg = dataclasses.replace(cfg, prepared=DataSpec.one(str(result.path)))
    return dataclasses.replace(cfg, tokenizer=tokenizer.name_or_path), tokenizer  # the folder every worker loads


def train(cfg: RunConfig, claimed: Callable[[Path], None] = lambda output: None) -> int:
    """Check everything, prepare, then write the config and launch; the exit code of the run. `claimed(output)` is
    called once node 0's launcher holds the run folder's lock: from then on the folder's verdict is this run's."""
    found = preflight(cfg)  # stops at the first failed check: nothing written yet
    cfg = found.cfg  # with the launch settings resolved
    set_node_rank(cfg.node_rank)  # this launcher's log lines name its node, from a flag as from the environment
    output = Path(cfg.output_dir)
    lock = OutputLock(output) if cfg.node_rank == 0 else None
    if lock and output.is_dir():
        lock.acquire()  # refuse a second run before preparing anything
    log.info("launch: %s", found.launch_row)
    cfg, _ = prepare_inputs(cfg, found)
    raise_if_stopped()  # a signal during preparation stops here even if a library's pool swallowed it

    output.mkdir(parents=True, exist_ok=True)
    if lock:  # the folder is this job's (resume.check_output): its own partial saves only
        lock.acquire()
        claimed(output)
        for path in checkpoints.remove_incomplete(output):
            log.warning("removed incomplete checkpoint %s (a save was interrupted)", path)
    last = checkpoints.resume_point(cfg.resume, output)
    launch = with_resume_point(found.launch, last)
    if lock and launch.universal_checkpoint:
        make_universal(last)
    if checkpoints.finished(last, cfg.max_steps):
        if run_files.recorded_code(output) == EXIT_OK and (output / run_files.FINAL).is_dir():
            log.info("%s already trained to step %d and exported: nothing to do", output, checkpoints.step_of(last))
            return EXIT_OK
        if cfg.node_rank != 0:
            return EXIT_OK
        log.info("%s trained to step %d; exporting it (the export was interrupted)", last, checkpoints.step_of(last))
        return finish_run(cfg, launch, last)
    (output / run_files.EXIT_STATUS).unlink(missing_ok=True)
    cfg.write(output / run_files.RUN_CONFIG)  # first: from here on other nodes see a folder of this job
    atomic_write_json(output / run_files.INPUTS, found.fingerprints)
    if cfg.node_rank == 0:
        write_launch(output, launch)

    if launch.world_size == 1:
        return _run_in_process(cfg, launch)
    return _run_torchrun(cfg, launch, output, lock)


class OutputLock:
    """One run per output folder: a lock on OUTPUT/job.lock (`FileLock`), held by the launcher until it exits.

    Only node 0's launcher takes it: every node of a multi-node run shares the folder.
    """

    def __init__(self, output: Path):
        self.lock = FileLock(output / run_files.LOCK)

    def acquire(self) -> None:
        if not self.lock.try_acquire():
            raise JobError(
                f"{self.lock.path.parent} is in use by a running job ({self.lock.holder()})",
                "wait for it to end, stop it, or use another --output-dir",
            )

    def fds(self) -> tuple[int, ...]:
        """For torchrun's `pass_fds`: it holds the lock too, so the lock covers the run until its last process."""
        fd = self.lock.fileno()
        return () if fd is None else (fd,)


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


def _run_in_process(cfg: RunConfig, launch: Launch) -> int:
    from job.run.worker import run_worker

    single_process_env(cfg)
    return run_worker(cfg, launch)


def torchrun_command(cfg: RunConfig, nproc: int, config_path: Path) -> list[str]:
    """The launcher command every node runs; workers run `python -m job worker --config run_config.json`.

    One node without a port: `--standalone`, torchrun binds a free port itself (no probe-then-bind race).
    Otherwise a c10d rendezvous at master_addr:master_port: the ranks are assigned when every node has
    joined; a failed worker or node ends torchrun on every node, and Kubernetes starts every pod anew.
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
        "job.run.launch",  # torchrun, quieter on signals (_quiet_torchrun)
        "--nproc-per-node",
        str(nproc),
        *rendezvous,
        "--max-restarts",
        str(MULTINODE_RESTARTS),
        "-m",
        "job",
        "worker",
        "--config",
        str(config_path),
    ]


def _run_torchrun(cfg: RunConfig, launch: Launch, output: Path, lock: OutputLock | None) -> int:
    nproc = launch.nproc_per_node
    command = torchrun_command(cfg, nproc, output / run_files.RUN_CONFIG)
    env = {
        **os.environ,
        LAUNCHER_PID_ENV: str(os.getpid()),
        LAUNCH_ENV: launch.to_json(),
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
        # A session of its own: a signal to our process group must reach torchrun once, through us. It holds the
        # output lock too (a SIGKILLed launcher leaves torchrun checkpointing: no second run may start beside it).
        child = subprocess.Popen(command, env=env, start_new_session=True, pass_fds=lock.fds() if lock else ())
        if received:
            child.send_signal(received[0])  # it came while torchrun was being started
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = run_files.recorded_code(output)
    if code is not None:
        return code
    if received:
        verdict = f"stopped by {signal.Signals(received[0]).name} before the workers recorded a verdict"
        code = EXIT_PREEMPTED
    else:  # a worker killed (the OOM killer) or crashed before it could record one
        verdict = f"the workers ended without a verdict (torchrun exit {returncode}); see the log above"
        code = returncode or EXIT_CRASH
    log.error(verdict)
    if lock:  # node 0's launcher records the run's verdict
        run_files.write_status_if_possible(output, code, verdict)
    return code


def _quiet_torchrun() -> int:
    """torchrun (same arguments), acting on the first SIGTERM/SIGINT only and without a traceback after it.

    Plain torchrun restarts its shutdown on every further signal (a signal to all processes, then ours
    forwarded), which cuts short its wait for the workers' checkpoint, and ends a clean signalled shutdown
    with a SignalException traceback. The workers' verdict is in run_files.EXIT_STATUS either way.
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
    if os.environ.get(LAUNCHER_PID_ENV):  # the launcher SIGKILLed: stop as on a SIGTERM (workers checkpoint)
        die_with_parent(signal.SIGTERM, int(os.environ[LAUNCHER_PID_ENV]))
    try:
        main()
    except SignalException:
        return EXIT_PREEMPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(_quiet_torchrun())
