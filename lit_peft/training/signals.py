"""One signal policy for the whole life of a run's process: a stop request is honoured at every moment.

SIGTERM, SIGUSR1 (SLURM's warning before a time limit), SIGHUP (the terminal went away) and SIGINT (Ctrl-C) are
*stop requests*. The handlers are installed when the process starts (`install`, before Hydra runs) and stay until it
exits, so what happens does not depend on which library happens to be running:

- inside the training loop (`deferred`, entered by `lit_peft.training.resume.Preemption` when training starts) the
  request is only noted; the loop finishes the optimizer step, writes its checkpoint and stops (a second Ctrl-C
  stops at once);
- everywhere else (loading the model, data, the validation before or after training, the export, between the jobs
  of a sweep) the handler raises `Preempted` at once;
- in the launching process of a sweep whose jobs run in other processes (joblib workers, submitit's local jobs:
  `forwarding`) the request is passed on to them as SIGTERM and noted; each running job checkpoints its step, the
  workers start no new job, and the sweep ends with status 3 once they are done (lit_peft.sweeps.callback).

Either way the process ends with exit status 3 (`PREEMPTED`) and one line saying what was saved and that the same
command resumes (finetune/run.py), never with status 0: a scheduler requeues it. Lightning's own SIGTERM handling
(which turns SIGTERM during validation into exit 0) is kept out by re-installing these handlers whenever a trainer
starts a stage (`reinstall`). Only the standard library is imported at the top (`install` runs before anything
heavy); psutil only when a parallel sweep passes a request on.
"""

from __future__ import annotations

import contextlib
import signal
import threading

PREEMPTED = 3  # exit status of a run stopped by a signal; its folder holds whatever it had saved
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGHUP", "SIGINT")


class Preempted(BaseException):  # noqa: N818 - not an error: a stop request (BaseException: no `except Exception` eats it)
    """Raised where a stop request is honoured; `signal_name` says which signal came."""

    def __init__(self, signal_name: str, where: str = "") -> None:
        super().__init__(f"{signal_name}{' ' + where if where else ''}")
        self.signal_name, self.where = signal_name, where


class _Policy:
    def __init__(self) -> None:
        self.received: str | None = None  # the first stop request not yet honoured
        self.deferred = False
        self.installed = False
        self.forwarding = False  # the launching process of a parallel sweep (lit_peft.sweeps.callback)

    def handler(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.forwarding and not (name == "SIGINT" and self.received == "SIGINT"):
            self.received = self.received or name  # a sweep whose jobs run in worker processes: they stop, this
            signal_children()  # process waits for them
            return
        if self.deferred and not (name == "SIGINT" and self.received == "SIGINT"):
            self.received = self.received or name
            return
        self.received = self.received or name
        raise Preempted(self.received)

    def install(self) -> None:
        """Install the handlers (main thread only; a no-op elsewhere, e.g. in a threaded sweep launcher)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, self.handler)
        self.installed = True

    def reset(self) -> None:
        """A new job starts (a sweep runs several in one process): no request pending, not deferred."""
        self.received, self.deferred = None, False

    def start_deferring(self) -> None:
        self.deferred = True

    def honour(self) -> None:
        """Leave the deferred mode; a request noted meanwhile is raised now."""
        self.deferred = False
        if self.received is not None:
            raise Preempted(self.received)


def signal_children(sig: int = signal.SIGTERM) -> list:
    """Send `sig` to this process's children (a parallel sweep's workers), without waiting; returns them (psutil
    processes) for a caller that waits. SIGTERM by default: a worker that already got a SIGINT from the terminal would
    stop at once on a second one, before checkpointing its step."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # psutil missing or the process table unreadable: nothing to pass on
        return []
    for child in children:
        with contextlib.suppress(Exception):
            child.send_signal(sig)
    return children


SIGNALS = _Policy()
