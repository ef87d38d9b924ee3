"""Stop signals around forks: a signal that lands while a process forks is neither lost nor printed and dropped; how a
rank ends without the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

# A process that forks once, with a SIGTERM sent from inside the fork: in the parent (from an at-fork hook that runs
# before the fork) or in the child (from one that runs first in the child). The test's hooks are registered before
# the job's, so they run inside the window the job's hooks guard (before-hooks run in reverse order of registration,
# after-hooks in order).
FORK_WITH_A_SIGNAL = textwrap.dedent(
    """
    import os, signal, sys, time
    from job.core import signals

    side = sys.argv[1]
    if side == "parent-threaded":  # another thread takes the signal, and the main thread runs its handler inside
        import threading  # another library's hook (one that runs Python code after the fork, as logging's does)

        def busy():  # long enough for the other thread to take the signal meanwhile
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                pass

        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        os.register_at_fork(after_in_parent=busy)
        side = "parent"
    if side == "parent":
        os.register_at_fork(before=lambda: os.kill(os.getpid(), signal.SIGTERM))
    else:
        os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
    signals.stop_at_once()
    pid = None
    try:
        pid = os.fork()
        if pid == 0:
            time.sleep(10)
            os._exit(0)
        time.sleep(10 if side == "parent" else 0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    except signals.Stopped as stop:
        print("stopped", stop.signal_name)
        if pid:
            os.kill(pid, signal.SIGKILL)
    """
)


@pytest.mark.parametrize(
    ("side", "expected"),
    [
        ("parent", "stopped SIGTERM"),  # raised in the main code right after the fork, not dropped in a hook
        ("parent-threaded", "stopped SIGTERM"),
        ("child", "child -15"),  # the child ends by the default action, without the parent's handler's traceback
    ],
)
def test_a_stop_signal_during_a_fork_is_neither_lost_nor_printed_and_dropped(side, expected):
    result = subprocess.run(
        [sys.executable, "-c", FORK_WITH_A_SIGNAL, side], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == expected, result.stdout + result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_exit_without_teardown_flushes_the_logs_and_skips_what_teardown_would_wait_for(tmp_path):
    """A rank's last act: its log lines and output reach their files, and nothing left alive (here a thread that
    never ends, which the interpreter's exit would join forever) holds the process."""
    log_file = tmp_path / "rank.log"
    script = (
        "import logging, sys, threading\n"
        "from job.core.signals import exit_without_teardown\n"
        f"logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)\n"
        "logging.getLogger('job').info('rank 1 done')\n"
        "print('last words', end='')\n"
        "threading.Thread(target=threading.Event().wait).start()\n"
        "exit_without_teardown(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "last words"
    assert "rank 1 done" in log_file.read_text()
