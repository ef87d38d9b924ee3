"""How a SIGTERM/SIGINT unwinds outside the training loop (also while a process forks), and how a child process
ends with its parent."""

import contextlib
import ctypes
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A SIGTERM/SIGINT where nothing is worth finishing: unwinds at once, `finally` blocks run.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
    """

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


_RECEIVED: list[int] = []  # the stop signals this process has received


def _raise_stopped(signum, frame):
    _RECEIVED.append(signum)
    if _FORKING:  # inside os.fork's hooks, where a raised exception is printed and dropped: raised after them
        _DEFERRED.append(signum)
        return
    raise Stopped(signum)


def raise_if_stopped() -> None:
    """At a stage boundary: a stop signal that a library swallowed on the way (a process pool's clean-up catches
    what it should not) still stops here, before the next stage begins."""
    if _RECEIVED:
        raise Stopped(_RECEIVED[-1])


def stop_at_once() -> None:
    """From now on SIGTERM/SIGINT raise `Stopped` (Python as PID 1 would ignore SIGTERM without a handler).

    Not in forked children (a library's process pool, DataLoader workers before their own init): they get the
    default action back, so a pool terminated by its parent ends quietly instead of printing a `Stopped` traceback.
    """
    global _FORK_HOOKED
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    if not _FORK_HOOKED:
        os.register_at_fork(
            before=_hold_stop_signals, after_in_parent=_release_stop_signals, after_in_child=_default_stop_signals
        )
        _FORK_HOOKED = True


_FORK_HOOKED = False


# A stop signal raised inside an at-fork hook is lost: Python prints "Exception ignored" and goes on (a child would
# keep the parent's handler, and a pool worker that raised `Stopped` there hangs on its queue's lock). So from the
# job's `before` hook to its `after` hooks the handler only records a signal, and the stop signals are blocked: the
# child takes the default action, and the parent raises its signal once its hooks have run. CPython runs `before`
# hooks last-registered first and `after` hooks in registration order, and the job registers at start-up: the window
# holds the fork and the hooks of modules imported before it (the standard library's), not those of libraries
# imported later (torch, datasets), which run outside it.
_FORKING = False
_DEFERRED: list[int] = []


def _hold_stop_signals() -> None:
    global _FORKING
    _FORKING = True
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _release_stop_signals() -> None:
    global _FORKING
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # runs the handler of one that came meanwhile
    _FORKING = False
    if _DEFERRED:
        _send_again(_DEFERRED.pop())
        _DEFERRED.clear()


def _send_again(signum: int) -> None:
    """Deliver `signum` to this process again a moment later, from another thread, so that it is raised in the main
    thread after the fork hooks are done. Should they take longer than that, it is still recorded:
    `raise_if_stopped` raises it at the next stage boundary."""
    import threading

    resend = threading.Timer(0.1, os.kill, (os.getpid(), signum))
    resend.daemon = True
    resend.start()


def _default_stop_signals() -> None:
    global _FORKING
    if signal.getsignal(signal.SIGTERM) is _raise_stopped:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        die_with_parent(signal.SIGTERM)  # a pool worker whose parent died without stopping it (measured: orphans)
    _FORKING = False
    _DEFERRED.clear()  # the parent's, recorded here as well before the fork: the parent raises it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one sent to the child meanwhile now ends it


def ignore_stop_signals(*args) -> None:
    """For DataLoader workers (a `worker_init_fn`): a signal to the process group must not kill them; the
    main process decides when to stop, and its workers end with it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(sig: int, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`): a launcher,
    torchrun or a rank that is SIGKILLed leaves nothing of the run behind. `parent`: the pid that should be the
    parent; if it is gone already (it died before this call), `sig` is raised at once. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def exit_without_teardown(code: int) -> None:
    """End this process now, after flushing the logs and standard streams, without the interpreter's teardown.

    For a rank other than 0 once it has left the process group: objects that still hold the gloo group (the DDP
    wrapper, DeepSpeed's engine) would be destroyed in whatever order finalization takes, with gloo's threads live,
    and `std::terminate` (SIGABRT) makes torchrun report a finished run as failed. Such a rank writes nothing at
    exit (no tracking, no writers: rank 0 owns them)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to say on it
            stream.flush()
    os._exit(code)
