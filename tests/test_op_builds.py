"""DeepSpeed's JIT op builds (job/run/op_builds.py): a process killed while it holds torch's build lock does not hang
every later start; a lock the job did not take is named in one line and left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.core.errors import JobError
from job.run.op_builds import BUILD_LOCK, BUILDING, TORCH_LOCK, build_lock
from tests.conftest import REPO

# The op every distributed run on a CPU loads (about 30 s to build on 2 cores), in a process of its own.
LOAD_SHM_OP = """
import logging, sys
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
{guard}
from deepspeed.accelerator import get_accelerator
print("loaded", get_accelerator().create_op_builder("ShareMemCommBuilder").load().__file__, flush=True)
"""
GUARDED = LOAD_SHM_OP.format(guard="from job.run.op_builds import guard_op_builds; guard_op_builds()")
UNGUARDED = LOAD_SHM_OP.format(guard="")
OP = "deepspeed_shm_comm"


def load(script: str, extensions, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_a_build_killed_inside_torchs_lock_neither_hangs_nor_fails_the_next_start(tmp_path):
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    building = subprocess.Popen(
        [sys.executable, "-c", GUARDED], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    torch_lock = extensions / OP / TORCH_LOCK
    deadline = time.time() + 120
    while not torch_lock.exists():
        assert building.poll() is None and time.time() < deadline, "the build never took torch's lock"
        time.sleep(0.05)
    os.killpg(building.pid, signal.SIGKILL)  # the builder and its compilers, as the OOM killer or a preemption does
    building.wait()
    assert torch_lock.exists() and (extensions / OP / BUILD_LOCK).read_text().startswith(BUILDING)

    # The state is the fault: torch's own load waits for that file forever.
    with pytest.raises(subprocess.TimeoutExpired):
        load(UNGUARDED, extensions, timeout=15)

    loaded = load(GUARDED, extensions, timeout=400)
    assert loaded.returncode == 0, loaded.stdout[-2000:] + loaded.stderr[-2000:]
    assert f"loaded {extensions / OP / OP}.so" in loaded.stdout
    assert f"{torch_lock} was left by a process killed while it built DeepSpeed's {OP} op" in loaded.stdout
    assert not torch_lock.exists() and (extensions / OP / BUILD_LOCK).read_text() == ""

    # And the next start loads the build as it is, without a word about locks.
    again = load(GUARDED, extensions, timeout=120)
    assert again.returncode == 0 and "loaded" in again.stdout and "left by" not in again.stdout


def test_a_lock_no_job_process_recorded_is_named_in_one_line_and_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    foreign = tmp_path / "some_op" / TORCH_LOCK
    foreign.parent.mkdir()
    foreign.touch()
    with pytest.raises(JobError) as refused, build_lock("some_op"):
        pytest.fail("the build ran beside another program's lock")
    assert str(foreign) in refused.value.cause and "no job process is building DeepSpeed's some_op op" in (
        refused.value.cause
    )
    assert f"remove {foreign}" in refused.value.fix and foreign.exists()


def blocked_on_flock(pid: int) -> bool:
    """Whether `pid` waits for a flock another process holds (/proc/locks lists waiters after `->`)."""
    waiting = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" in line]
    return any(fields[2:4] == ["FLOCK", "ADVISORY"] and fields[5] == str(pid) for fields in waiting)


def test_a_job_process_waits_for_anothers_build_and_takes_over_when_it_dies(tmp_path):
    """Two processes, one build: the second waits on the kernel lock while the first lives, and gets it the moment
    the first is killed (no polling of a file that a dead process left)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    take_and_hold = (
        "from job.run.op_builds import build_lock\n"
        "import time\n"
        "print('waiting', flush=True)\n"
        "with build_lock('some_op'):\n"
        "    print('took', flush=True); time.sleep(600)\n"
    )

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", take_and_hold], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "waiting"
        return process

    holder = start()
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "took"
        waiter = start()
        deadline = time.time() + 60
        while not blocked_on_flock(waiter.pid):  # the kernel lists it as waiting for the holder's lock
            assert waiter.poll() is None and time.time() < deadline, "the second process did not wait"
            time.sleep(0.05)
        holder.kill()
        assert waiter.stdout.readline().strip() == "took"
    finally:
        for process in (holder, waiter):
            if process:
                process.kill()
                process.wait()
