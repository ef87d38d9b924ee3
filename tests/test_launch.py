"""Real two-process CPU runs through the CLI and torchrun: every ZeRO stage and plain DDP agree, a SIGTERM
checkpoints and exits 75, a kill during a save loses only that save, and resumes continue the same curve.
First, without any run: where the launch settings come from (flags, torchrun/Kubeflow environment, defaults)
and the torchrun command they make, parsed by torchrun's own parser."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.core import checkpoints, run_files
from job.core.config import RunConfig
from job.core.errors import EXIT_CRASH, EXIT_MEANINGS, EXIT_PREEMPTED
from job.core.topology import resolve_topology
from job.run.launch import RENDEZVOUS_JOIN_TIMEOUT_S, torchrun_command
from tests.conftest import KUBEFLOW_ENV, REPO, tiny_bloom, train_args

pytestmark = pytest.mark.slow
STEPS = 12
# fp32 on CPU. DDP all-reduces whole gradients; ZeRO-1/2 reduce-scatter flattened buckets and ZeRO-3 also
# gathers parameters: the same sums in a different order differ by ~1e-7 relative, and 12 Adam steps grow
# that to ~1e-5. A real divergence (a rank training alone, a wrong batch or learning rate) shows up at 1e-2.
STAGE_TOLERANCE = 1e-3


def job_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "job", *args]


def two_process_run(model: Path, tokenizer: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """A tiny 2-process run of STEPS steps with a checkpoint every 4; EXTRA flags come last and win."""
    return [
        *train_args(
            model=model,
            tokenizer=tokenizer,
            data=data,
            output_dir=output,
            nproc=2,
            max_steps=STEPS,
            save_steps=4,
            eval_fraction=0.05,
            eval_steps=0,
            eval_batches=1,
            report_to="none",
        ),
        *extra,
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _torchrun_config(command: list[str], monkeypatch):
    """The launch torchrun itself would make of these arguments."""
    from torch.distributed.run import config_from_args, get_args_parser

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else torchrun sets it in this process
    for name in KUBEFLOW_ENV:  # torchrun reads PET_* for flags not given; the command must not depend on them
        monkeypatch.delenv(name, raising=False)
    assert command[1:3] == ["-m", "job.run.launch"]  # torchrun's own main (launch._quiet_torchrun), same arguments
    parsed = get_args_parser().parse_args(command[3:])
    launch, _, args = config_from_args(parsed)
    assert args[-3:] == ["worker", "--config", "run/run_config.json"]
    return launch, parsed


def test_one_node_lets_torchrun_pick_the_port(monkeypatch):
    cfg, _ = resolve_topology(RunConfig.load(nproc=2), {})
    command = torchrun_command(cfg, 2, Path("run/run_config.json"))
    assert "--standalone" in command and "--master-port" not in command
    launch, parsed = _torchrun_config(command, monkeypatch)
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node, launch.max_restarts) == (1, 1, 2, 0)
    assert parsed.standalone  # torchrun binds localhost:0 itself: nothing probed, nothing to race for


def test_nodes_meet_at_a_c10d_rendezvous_and_end_together_on_a_failure(monkeypatch, tmp_path):
    configs = []
    for rank in ("0", "2"):
        cfg, _ = resolve_topology(
            RunConfig.load(output_dir=str(tmp_path / "run")), {**KUBEFLOW_ENV, "PET_NODE_RANK": rank}
        )
        command = torchrun_command(cfg, cfg.nproc, Path("run/run_config.json"))
        configs.append(_torchrun_config(command, monkeypatch)[0])
    for launch in configs:
        assert launch.rdzv_backend == "c10d" and launch.rdzv_endpoint == "run-node-0-0.run:29400"
        assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (4, 4, 8)
        # no in-place restart: every node's torchrun ends when one fails, and Kubernetes replaces every pod
        assert launch.max_restarts == 0 and int(launch.rdzv_configs["join_timeout"]) == RENDEZVOUS_JOIN_TIMEOUT_S
    assert configs[0].run_id == configs[1].run_id  # one rendezvous for every node of the run
    other, _ = resolve_topology(RunConfig.load(output_dir=str(tmp_path / "other")), KUBEFLOW_ENV)
    launch, _ = _torchrun_config(torchrun_command(other, 8, Path("run/run_config.json")), monkeypatch)
    assert launch.run_id != configs[0].run_id


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], log: Path) -> int:
    with log.open("w") as out:
        return subprocess.run(
            job_command(*args), stdout=out, stderr=subprocess.STDOUT, env=_env(), timeout=900
        ).returncode


def losses(output: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl (a resumed run appends; later lines win)."""
    curve = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            curve[row["step"]] = row["loss"]
    return curve


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer_dir):
    """A small saved Bloom (every run starts from the same weights) and a corpus."""

    from job.data.corpus import builtin_articles
    from tests.conftest import write_jsonl

    root = tmp_path_factory.mktemp("launch")
    tiny_bloom(640, hidden_size=32, n_head=2).save_pretrained(root / "model")
    write_jsonl(root / "docs.jsonl", builtin_articles()[:400])
    return root / "model", tiny_tokenizer_dir, root / "docs.jsonl", root


@pytest.fixture(scope="module")
def reference(inputs):
    """The uninterrupted ZeRO-2 run every other run is compared with."""
    model, tok, data, root = inputs
    output = root / "ref"
    assert run(two_process_run(model, tok, data, output), root / "ref.log") == 0, (root / "ref.log").read_text()[-3000:]
    return output


def test_reference_run_is_complete(reference):
    curve = losses(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1]
    assert [p.name for p in checkpoints.complete_checkpoints(reference)] == ["checkpoint-8", "checkpoint-12"]
    assert (reference / "final" / "model.safetensors").exists()
    status = json.loads((reference / "exit_status.json").read_text())
    assert status["code"] == 0


# ZeRO-3 with everything that saves GPU memory: activation checkpointing, optimizer states and step on the CPU
# (DeepSpeed's CPU Adam, a C++ build on its first use)
LOW_MEMORY = ["--zero-stage", "3", "--gradient-checkpointing", "--offload", "optimizer"]


def _stage_flags(stage: str) -> list[str]:
    if stage == "low-memory":
        return LOW_MEMORY
    return ["--deepspeed", "none"] if stage == "none" else ["--zero-stage", stage]


def _stage_run(inputs, stage: str) -> Path:
    """The uninterrupted 2-process run with this ZeRO stage (or plain DDP), made once per session."""
    model, tok, data, root = inputs
    output = root / f"stage-{stage}"
    if not (output / "final").exists():
        flags = _stage_flags(stage)
        assert run(two_process_run(model, tok, data, output, *flags), root / f"{stage}.log") == 0, (
            root / f"{stage}.log"
        ).read_text()[-3000:]
    return output


@pytest.mark.parametrize("stage", ["none", "1", "3"])
def test_every_stage_follows_the_same_loss_curve(inputs, reference, stage):
    output = _stage_run(inputs, stage)
    ours, ref = losses(output), losses(reference)
    assert sorted(ours) == sorted(ref)
    for step in ref:
        assert abs(ours[step] - ref[step]) <= STAGE_TOLERANCE * ref[step], (step, ours[step], ref[step])
    if stage == "3":
        _check_export(output / "final", reference / "final")


def test_zero3_with_checkpointing_and_offload_follows_the_ddp_curve(inputs):
    """2 processes, ZeRO-3 + --gradient-checkpointing + --offload optimizer against --deepspeed none: the same curve
    within STAGE_TOLERANCE, and the export (gathered 16-bit weights) reloads with the DDP run's weights."""
    ddp, low = _stage_run(inputs, "none"), _stage_run(inputs, "low-memory")
    ours, ref = losses(low), losses(ddp)
    assert sorted(ours) == sorted(ref)
    for step in ref:
        assert abs(ours[step] - ref[step]) <= STAGE_TOLERANCE * ref[step], (step, ours[step], ref[step])
    config = json.loads((low / "run_config.json").read_text())
    assert (config["offload"], config["gradient_checkpointing"], config["zero_stage"]) == ("optimizer", True, 3)
    _check_export(low / "final", ddp / "final")


def test_two_nodes_rendezvous_and_follow_the_same_curve(inputs, reference):
    """--nnodes/--node-rank/--master-addr/--master-port as the multi-node Job uses them, two 'nodes' on localhost
    (an explicit loopback --master-addr: every node on this host)."""
    model, tok, data, root = inputs
    output = root / "two-nodes"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        node = ["--nproc", "1", "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
        args = two_process_run(model, tok, data, output, *node, "--master-port", port)  # click keeps the last value
        log = (root / f"node{rank}.log").open("w")
        procs.append((subprocess.Popen(job_command(*args), stdout=log, stderr=subprocess.STDOUT, env=_env()), log))
    deadline = time.time() + 600
    while any(proc.poll() is None for proc, _ in procs):  # one node failing leaves the other at the rendezvous
        failed = [rank for rank, (proc, _) in enumerate(procs) if proc.poll() not in (None, 0)]
        if failed or time.time() > deadline:
            for proc, _ in procs:
                if proc.poll() is None:
                    _kill_tree(proc.pid)
            rank = failed[0] if failed else 0
            pytest.fail(f"node {rank} failed or timed out:\n{(root / f'node{rank}.log').read_text()[-3000:]}")
        time.sleep(0.5)
    for rank, (proc, log) in enumerate(procs):
        assert proc.returncode == 0, (root / f"node{rank}.log").read_text()[-3000:]
        log.close()
    # the node rank came from a flag (no launch variable): node 1's launcher names itself node1
    launch_lines = [line for line in (root / "node1.log").read_text().splitlines() if " launch: " in line]
    assert launch_lines and all(" node1 " in line for line in launch_lines), launch_lines
    ours, ref = losses(output), losses(reference)
    assert sorted(ours) == sorted(ref)
    for step in ref:
        assert abs(ours[step] - ref[step]) <= STAGE_TOLERANCE * ref[step], (step, ours[step], ref[step])


def _check_export(final: Path, reference_final: Path) -> None:
    """ZeRO-3 gathers the weights on save: a fresh process reloads full, non-empty tensors and passes smoke."""
    code = (
        "import json,sys; from transformers import AutoModelForCausalLM as M;"
        "m=M.from_pretrained(sys.argv[1]); r=M.from_pretrained(sys.argv[2]);"
        "print(json.dumps({'n': sum(p.numel() for p in m.parameters()),"
        "'ref': sum(p.numel() for p in r.parameters()),"
        "'empty': [k for k,v in m.state_dict().items() if v.numel()==0]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(final), str(reference_final)],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    ).stdout
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["n"] == facts["ref"] > 0 and facts["empty"] == []
    smoke = subprocess.run(job_command("smoke", "--model", str(final)), capture_output=True, text=True, env=_env())
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert json.loads(smoke.stdout)["ok"] is True


def _log_tail(proc: subprocess.Popen) -> str:
    """The end of the run's log (`_start` and `run` write it to a file: `proc.log`), for a failure message."""
    path = getattr(proc, "log", None)
    return path.read_text()[-3000:] if path is not None and path.exists() else "(no log)"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.02) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before the moment awaited:\n{_log_tail(proc)}"
        assert time.time() < deadline, f"timed out waiting:\n{_log_tail(proc)}"
        time.sleep(poll)


def _kill_tree(pid: int) -> None:
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        process.send_signal(signal.SIGKILL)


def _signal(proc: subprocess.Popen, target: str, sig: int) -> None:
    """`launcher`: the CLI alone (Kubernetes signals PID 1); `group`: its process group (a terminal's Ctrl-C,
    GNU timeout); `every`: the launcher, torchrun, the ranks and their DataLoader workers (a node shutdown)."""
    import psutil

    if target == "launcher":
        proc.send_signal(sig)
    elif target == "group":
        os.killpg(proc.pid, sig)  # the run was started in a session of its own, see _start
    else:
        parent = psutil.Process(proc.pid)
        for process in [parent, *parent.children(recursive=True)]:
            process.send_signal(sig)


def _start(args: list[str], log) -> subprocess.Popen:
    proc = subprocess.Popen(
        job_command(*args), stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    proc.log = Path(log.name)
    return proc


def _stopped_cleanly(proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> str:
    """The run ends with 75 and no traceback (no torchrun ChildFailedError either); returns the log."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        pytest.fail(f"still running {timeout} s after the signal:\n{log_path.read_text()[-3000:]}")
    text = log_path.read_text()
    assert code == EXIT_PREEMPTED, text[-3000:]
    for noise in ("Traceback", "ChildFailedError", "SignalException"):
        assert noise not in text, text[-3000:]
    return text


# signal target x moment x DataLoader workers x processes: every value of each axis at least once.
@pytest.mark.parametrize(
    ("target", "sig", "moment", "workers", "nproc"),
    [
        ("launcher", signal.SIGTERM, "step", "2", "2"),  # Kubernetes
        ("group", signal.SIGINT, "step", "4", "2"),  # Ctrl-C in a terminal
        ("group", signal.SIGTERM, "eval", "2", "1"),  # GNU timeout, one process
        ("every", signal.SIGTERM, "save", "0", "2"),  # every process of the node
    ],
)
def test_a_signal_in_training_checkpoints_exits_75_and_resume_continues_the_curve(
    inputs, reference, target, sig, moment, workers, nproc
):
    model, tok, data, root = inputs
    name = f"stop-{target}-{moment}-{workers}-{nproc}"
    output = root / name
    flags = ["--save-steps", "4" if moment == "save" else "100", "--dataloader-workers", workers, "--nproc", nproc]
    if nproc == "1":  # the same global batch as the 2-process reference
        flags += ["--grad-accum", "4"]
    if moment == "eval":  # evaluation after every step takes most of the time: the signal lands in one
        flags += ["--eval-steps", "1", "--eval-batches", "30"]
    args = two_process_run(model, tok, data, output, *flags)
    with (root / f"{name}.log").open("w") as log:
        proc = _start(args, log)
        if moment == "save":  # the Trainer has begun writing checkpoint-4
            _wait_for(lambda: (output / "checkpoint-4").exists(), proc, poll=0.002)
        else:
            _wait_for(lambda: (output / "metrics.jsonl").exists() and len(losses(output)) >= 5, proc)
        _signal(proc, target, sig)
        _stopped_cleanly(proc, root / f"{name}.log")
    stopped = checkpoints.latest_complete(output)
    assert stopped is not None, "no complete checkpoint after the signal"
    step = checkpoints.step_of(stopped)
    assert 5 <= step < STEPS
    if moment == "save":  # that save completed, then one more step and its checkpoint
        assert step == 5 and (output / "checkpoint-4" / checkpoints.MARKER).exists()
    assert not (output / "final").exists()
    if target != "launcher":
        return  # resuming is the same for every way the run was stopped: checked once
    # --save-steps changed on resume is honoured (the Trainer would restore the old value from its state)
    resumed = run([*args, "--resume", "auto", "--save-steps", "4"], root / f"{name}-resume.log")
    assert resumed == 0, (root / f"{name}-resume.log").read_text()[-3000:]
    assert [p.name for p in checkpoints.complete_checkpoints(output)][-2:] == ["checkpoint-8", "checkpoint-12"]
    ours, ref = losses(output), losses(reference)
    tolerance = 1e-5 if nproc == "2" else STAGE_TOLERANCE  # one process: the same sums in another order
    for later in range(step + 1, STEPS + 1):  # exact continuation: same data, optimizer, scheduler and RNG
        assert ours[later] == pytest.approx(ref[later], rel=tolerance, abs=1e-6), (later, ours[later], ref[later])


@pytest.mark.parametrize(("target", "nproc"), [("launcher", "1"), ("group", "2")])
def test_signal_before_training_exits_promptly_and_writes_nothing_to_resume(inputs, target, nproc):
    """During data preparation (1 process) or while the workers load the model (2): 75 within seconds.

    The moment is made, not hoped for: each test has its own cache (so preparation always runs), and the one-process
    case prepares a corpus 40 times the usual (seconds of tokenizing) once its `launch:` line is out: a small
    corpus prepares in well under a second, and under load the signal could land after training had begun."""
    from job.data.corpus import builtin_articles
    from tests.conftest import write_jsonl

    model, tok, data, root = inputs
    name = f"early-{target}-{nproc}"
    output = root / name
    if nproc == "1":
        data = write_jsonl(root / f"{name}.jsonl", builtin_articles()[:400] * 40)
    args = two_process_run(model, tok, data, output, "--nproc", nproc)
    with (root / f"{name}.log").open("w") as log:
        proc = _start(args, log)
        mark = "launching:" if nproc == "2" else " launch: "  # torchrun starts / preparation starts
        _wait_for(lambda: mark in (root / f"{name}.log").read_text(), proc, poll=0.01)
        _signal(proc, target, signal.SIGTERM)
        signalled = time.time()
        text = _stopped_cleanly(proc, root / f"{name}.log", timeout=60)
    assert time.time() - signalled < 30
    assert " resume from scratch" not in text, f"the signal came after training began:\n{text[-3000:]}"
    assert checkpoints.all_checkpoints(output) == [] and not (output / "final").exists()


def test_kill_during_a_save_loses_only_that_save(inputs, reference):
    model, tok, data, root = inputs
    output = root / "killed"
    args = two_process_run(model, tok, data, output)
    for _attempt in range(3):  # the kill must land inside the save of checkpoint-8
        if output.exists():
            import shutil

            shutil.rmtree(output)
        with (root / "killed.log").open("w") as log:
            proc = subprocess.Popen(job_command(*args), stdout=log, stderr=subprocess.STDOUT, env=_env())
            proc.log = root / "killed.log"
            _wait_for(lambda: (output / "checkpoint-8").exists(), proc, poll=0.002)
            _kill_tree(proc.pid)  # as a node failure would: torchrun starts its workers in sessions of their own
            proc.wait()
        if not (output / "checkpoint-8" / checkpoints.MARKER).exists():
            break
    else:
        pytest.fail("could not land a kill inside a save in 3 attempts")
    assert checkpoints.latest_complete(output).name == "checkpoint-4"
    assert run(args, root / "killed-resume.log") == 0, (root / "killed-resume.log").read_text()[-3000:]
    assert [p.name for p in checkpoints.complete_checkpoints(output)] == ["checkpoint-8", "checkpoint-12"]
    ours, ref = losses(output), losses(reference)
    for later in range(5, STEPS + 1):
        assert ours[later] == pytest.approx(ref[later], rel=1e-5, abs=1e-6), (later, ours[later], ref[later])


def test_one_run_per_output_folder_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    from job.run.launch import OutputLock

    output = tmp_path / "out"
    output.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from job.run.launch import OutputLock; from pathlib import Path;"
            "lock = OutputLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(600)",
            str(output),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert holder.stdout.readline().strip() == "held"
    second = subprocess.run(
        job_command("train", "--output-dir", str(output), "--device", "cpu", "--max-steps", "1"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
    assert f"pid {holder.pid} on {os.uname().nodename}" in lines[0]
    assert sorted(p.name for p in output.iterdir()) == ["job.lock"]  # nothing else written
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    OutputLock(output).acquire()  # the kernel dropped the killed holder's lock


def _resume_elsewhere(inputs, source: Path, checkpoint: str, name: str, nproc: str, accum: str, *flags) -> Path:
    """A copy of `source` up to `checkpoint`, resumed on `nproc` processes (the global batch kept)."""
    import shutil

    model, tok, data, root = inputs
    output = root / name
    later = {p.name for p in checkpoints.all_checkpoints(source) if checkpoints.step_of(p) > int(checkpoint)}
    shutil.copytree(source, output, ignore=lambda d, names: {"final", "exit_status.json", "job.lock", *later})
    args = two_process_run(
        model, tok, data, output, "--nproc", nproc, "--grad-accum", accum, "--save-steps", "2", *flags
    )
    assert run(args, root / f"{name}.log") == 0, (root / f"{name}.log").read_text()[-3000:]
    return output


def _continues(output: Path, reference: Path, after: int) -> None:
    ours, ref = losses(output), losses(reference)
    for step in range(after + 1, STEPS + 1):
        assert abs(ours[step] - ref[step]) <= STAGE_TOLERANCE * ref[step], (step, ours[step], ref[step])


def test_zero2_resumes_on_another_number_of_processes(inputs, reference):
    """2 -> 1 -> 2 processes through DeepSpeed's universal checkpoint; the curve continues within STAGE_TOLERANCE."""
    one = _resume_elsewhere(inputs, reference, "8", "elastic-2to1", "1", "4")
    assert "converting it to a universal checkpoint" in (inputs[3] / "elastic-2to1.log").read_text()
    _continues(one, reference, 8)
    assert checkpoints.world_size(one / "checkpoint-10") == 1
    two = _resume_elsewhere(inputs, one, "10", "elastic-1to2", "2", "2")
    _continues(two, reference, 10)


@pytest.mark.parametrize("stage", ["none", "1", "3", "low-memory"])
def test_other_stages_resume_on_fewer_processes(inputs, reference, stage):
    source = _stage_run(inputs, stage)
    output = _resume_elsewhere(inputs, source, "8", f"elastic-{stage}", "1", "4", *_stage_flags(stage))
    converted = "converting it to a universal checkpoint" in (inputs[3] / f"elastic-{stage}.log").read_text()
    assert converted == (stage != "none")  # a DDP checkpoint loads at any world size as it is
    _continues(output, reference, 8)


def test_another_process_count_that_changes_the_global_batch_is_refused(inputs, reference):
    model, tok, data, _ = inputs
    proc = subprocess.run(
        job_command(*two_process_run(model, tok, data, reference, "--nproc", "1", "--max-steps", "20")),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "global batch of 16 rows" in proc.stderr and "pass --grad-accum 4" in proc.stderr


# ----------------------------------------------------------------------------------- every run ends
def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    """When `text` first appeared in the log (the run may not have ended then)."""
    _wait_for(lambda: text in log.read_text(), proc, timeout=timeout, poll=0.05)
    return time.time()


def _alive(pids: list[int]) -> list[int]:
    import psutil

    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("attempt", [1, 2, 3])  # it hung every time before: run it more than once
def test_a_finished_one_process_run_with_dataloader_workers_exits_within_seconds(inputs, attempt):
    """Persistent DataLoader workers ignore SIGTERM; multiprocessing's exit handler SIGTERMs them and then waits:
    the rank must stop them itself, or `done:` is printed and the process never exits."""
    model, tok, data, root = inputs
    output, log_path = root / f"ends-{attempt}", root / f"ends-{attempt}.log"
    args = two_process_run(model, tok, data, output, "--nproc", "1", "--deepspeed", "none", "--dataloader-workers", "2")
    args[args.index("--max-steps") + 1] = "4"
    with log_path.open("w") as log:
        proc = _start(args, log)
        done = _wait_for_line(log_path, "done: model in", proc)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            pytest.fail(f"still running 30 s after `done:`:\n{log_path.read_text()[-3000:]}")
    assert code == 0, log_path.read_text()[-3000:]
    assert time.time() - done < 30
    assert json.loads((output / "exit_status.json").read_text())["code"] == 0


def test_a_failing_one_process_run_with_dataloader_workers_exits(inputs):
    """A run that fails (here: a checkpoint that cannot be written, the file-size limit reached) ends with its
    exit code instead of waiting forever for its DataLoader workers; the workers end with it."""
    import resource

    import psutil

    model, tok, data, root = inputs
    output, log_path = root / "fails", root / "fails.log"
    prepared = root / "fails-prepared"
    assert (
        run(
            [
                "prepare",
                "--tokenizer",
                str(tok),
                "--data",
                str(data),
                "--output",
                str(prepared),
                "--max-length",
                "32",
                "--eval-fraction",
                "0.05",
            ],
            root / "fails-prepare.log",
        )
        == 0
    ), (root / "fails-prepare.log").read_text()[-3000:]
    one_process = ["--nproc", "1", "--deepspeed", "none", "--dataloader-workers", "2"]
    args = two_process_run(model, tok, data, output, *one_process, "--prepared", str(prepared))
    limit = 64 * 1024  # the logs fit, a checkpoint of the model does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            job_command(*args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            preexec_fn=small_files,
            start_new_session=True,
        )
        proc.log = log_path
        workers: list[int] = []

        def loading():
            with contextlib.suppress(psutil.NoSuchProcess):
                workers[:] = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            return len(workers) >= 2

        _wait_for(loading, proc, timeout=300, poll=0.05)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            pytest.fail(f"a failed run did not exit:\n{log_path.read_text()[-3000:]}")
    assert code not in (0, EXIT_PREEMPTED), log_path.read_text()[-3000:]
    assert "File too large" in log_path.read_text()
    deadline = time.time() + 30  # they die with their rank: the kernel may take a moment to reap them
    while _alive(workers) and time.time() < deadline:
        time.sleep(0.05)
    assert _alive(workers) == [], "DataLoader workers outlived their rank"


def test_a_killed_launcher_leaves_nothing_training_and_holds_the_folder_until_all_have_ended(inputs):
    """SIGKILL of the launcher of a 2-process run: torchrun and its ranks end too (after a checkpoint: they are
    told to stop, as on a SIGTERM), and a second run into the folder is refused until the last of them has ended."""
    import psutil

    model, tok, data, root = inputs
    output, log_path = root / "orphan", root / "orphan.log"
    args = two_process_run(model, tok, data, output, "--dataloader-workers", "2")
    args[args.index("--max-steps") + 1] = "5000"  # far more than the test waits: an orphaned run would go on
    with log_path.open("w") as log:
        proc = _start(args, log)
        _wait_for(lambda: (output / "metrics.jsonl").exists() and len(losses(output)) >= 2, proc)
        tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3, tree  # torchrun and two ranks (and their DataLoader workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from job.core.files import FileLock

    lock = FileLock(output / "job.lock")
    holder = lock.held_elsewhere()  # torchrun inherited the launcher's lock: a second run is refused meanwhile
    assert holder is not None or not _alive(tree), "the run's processes are alive but the folder is not locked"
    deadline = time.time() + 120
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.5)
    assert _alive(tree) == [], f"left running after the launcher was killed:\n{log_path.read_text()[-3000:]}"
    assert lock.held_elsewhere() is None  # the last holder is gone: the folder is free again
    assert checkpoints.latest_complete(output) is not None  # they stopped as on a SIGTERM: after a checkpoint


def test_a_rank_killed_as_the_oom_killer_does_leaves_a_verdict_and_ends(inputs, tmp_path):
    """SIGKILL of one rank mid-run (what the kernel's OOM killer sends): the launcher ends within a bounded time with
    a crash verdict in exit_status.json and the termination message, whoever could or could not record it."""
    import psutil

    model, tok, data, root = inputs
    output, log_path, message = root / "oom", root / "oom.log", tmp_path / "termination-log"
    args = two_process_run(model, tok, data, output, "--max-steps", "5000")  # far more than the test waits
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            job_command(*args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**_env(), "JOB_TERMINATION_LOG": str(message)},
            start_new_session=True,
        )
        proc.log = log_path
        _wait_for(lambda: (output / "metrics.jsonl").exists() and len(losses(output)) >= 1, proc)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "worker" in " ".join(c.cmdline()[1:5])]
        assert ranks, "no rank found"
        ranks[-1].send_signal(signal.SIGKILL)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            pytest.fail(f"the run did not end after a rank was killed:\n{log_path.read_text()[-3000:]}")
    status = run_files.recorded_status(output)
    assert code == status["code"] == EXIT_CRASH, log_path.read_text()[-3000:]
    assert message.read_text().splitlines()[:2] == [f"exit 1 ({EXIT_MEANINGS[EXIT_CRASH]})", status["message"]]
