"""The Hydra callback that keeps a sweep's job records and writes its report (conf/config.yaml `hydra.callbacks`).

In a `-m` sweep it appends to `<sweep dir>/jobs.jsonl` (one JSON object a line, `event` first; job folders relative
to the sweep folder, so a moved or copied sweep reads right):

- `sweep`: the sweep process (pid, host, sweep_dir) and, for the basic sweeper, every planned job (num, overrides);
- `start`: a job began (num, overrides, out_dir, method, task, pid, host);
- `end`: a job ended: its `status` (ok / failed / preempted / killed), its one-line `error`, num, overrides, out_dir;
- `sweep_end`: the sweep process is done; `complete: true` when every job ran (lit_peft.sweeps.folder: a sweep without
  it is unfinished, and the same command resumes it),

and refreshes `report.md`, `report.csv` and the plots (lit_peft/sweeps/report.py) after every job and at the end.

How a job ends (finetune/run.py):

- it fails (a user error, a non-finite step, a crash): the job tells the callback (`job_outcome`) and returns +inf,
  so Hydra goes on with the next job; the row is `failed` with the `error:` line. At the end the sweep prints each
  failure and exits 1 (`SWEEP_EXIT`);
- it is stopped by a signal: recorded as `preempted` at once (the process then exits 3); in a parallel sweep the
  launching process passes the request on to its workers and ends the sweep with status 3 once they stopped;
- the process dies otherwise (SystemExit, Ctrl-C): the callback records the job at interpreter exit (atexit) with the
  `error: ...` line it captured from stderr. A sweep in which no job finished keeps the rule of a failed run: it
  leaves nothing behind (the records and report are removed with the sweep folder the run created).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lit_peft.compat import basic_sweeper, job_exception
from lit_peft.env import host
from lit_peft.errors import last_reported, report_mark

REPORT_FILES = ("jobs.jsonl", "report.md", "report.csv", "loss_curves.png", "loss_vs_params.png", "step_time.png")

_ACTIVE: SweepReport | None = None  # the callback of the job running in this process (a sweep job's own outcome)
SWEEP_EXIT = 0  # the launching process's exit status once the sweep ran every job: 1 when a job failed


def job_outcome(status: str, error: str) -> None:
    """What finetune/run.py's job says of itself: `failed` (the job returns, the sweep goes on) is recorded when Hydra
    ends the job; `preempted` (the process exits 3) is recorded now, with the report, as nothing else runs after it."""
    if _ACTIVE is None:
        return
    if status == "preempted":
        _ACTIVE._end(status, error)
        _ACTIVE._write_report()
    else:
        _ACTIVE._outcome = (status, error)


def _multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _select(config: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(config, key, throw_on_missing=False)
    except Exception:  # an interpolation that does not resolve here
        return None


def planned_jobs(config: DictConfig) -> list[dict[str, Any]] | None:
    """The jobs Hydra's basic sweeper will launch, numbered as it numbers them; None for other sweepers."""
    target = str(_select(config, "hydra.sweeper._target_") or "")
    if not target.endswith(("BasicSweeper", "GroupAwareSweeper")):
        return None
    BasicSweeper = basic_sweeper()  # its own splitting: the same order
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lit_peft.sweeps.sweeper import applicable

    params = _select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(_select(config, "hydra.overrides.task") or [])
    overrides = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(overrides, _select(config, "hydra.sweeper.max_batch_size"))
    jobs = [list(job) for batch in batches for job in batch]
    if target.endswith("GroupAwareSweeper"):
        choices = _select(config, "hydra.runtime.choices") or {}
        jobs = applicable(jobs, default_choices={str(k): str(v) for k, v in choices.items() if v is not None})
    return [{"num": i, "overrides": list(job)} for i, job in enumerate(jobs)]


class SweepReport(Callback):
    """Records each job of a `-m` sweep in `<sweep>/jobs.jsonl` and writes the sweep's report (see module doc)."""

    def __init__(self, enabled: bool = True, plots: bool = True) -> None:
        self.enabled, self.plots = enabled, plots
        self._current: dict[str, Any] | None = None
        self._sweep_dir: Path | None = None
        self._registered = False
        self._outcome: tuple[str, str] | None = None
        self._mark: int | None = None  # errors.report_mark() when this job started

    # ------------------------------------------------------------------------------------------- Hydra's hooks

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_EXIT
        from lit_peft.training.signals import SIGNALS

        SWEEP_EXIT = 0
        # jobs in this machine's other processes (joblib workers, submitit's local jobs): a stop request is passed on
        # to them and waited for (Ctrl-C twice stops waiting); SLURM jobs get their signals from SLURM
        launcher = str(_select(config, "hydra.launcher._target_") or "")
        SIGNALS.forwarding = launcher.endswith(("JoblibLauncher", "LocalLauncher"))
        if not self.enabled:
            return
        sweep = self._sweep(config)
        sweep.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {
            "event": "sweep",
            "pid": os.getpid(),
            "host": host(),
            "time": time.time(),
            "sweep_dir": str(sweep),  # where job folders were (a moved or copied sweep maps its relative paths)
        }
        try:
            planned = planned_jobs(config)
        except Exception:  # the plan is a courtesy (rows for jobs that never ran): never fail the sweep on it
            planned = None
        if planned is not None:
            record["jobs"] = planned
        self._append(sweep, record)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled or not _multirun(config):
            return
        global _ACTIVE
        sweep = self._sweep(config)
        sweep.mkdir(parents=True, exist_ok=True)
        self._outcome = None
        _ACTIVE = self
        self._current = {
            "event": "start",
            "num": _select(config, "hydra.job.num"),
            "overrides": list(_select(config, "hydra.overrides.task") or []),
            "out_dir": _relative(str(_select(config, "hydra.runtime.output_dir") or ""), sweep),
            "method": _select(config, "method.name"),
            "task": _select(config, "task.name"),
            "pid": os.getpid(),
            "host": host(),
            "time": time.time(),
        }
        self._sweep_dir = sweep
        self._append(sweep, self._current)
        self._mark = report_mark()  # an earlier job's error is not this one's
        if not self._registered:
            atexit.register(self._at_exit)
            self._registered = True

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self.enabled or not _multirun(config):
            return
        from hydra.core.utils import JobStatus

        status, error = "ok", ""
        if job_return.status == JobStatus.FAILED:
            status, error = "failed", _error_line(job_exception(job_return))
        elif job_return.status != JobStatus.COMPLETED:
            status = "killed"
        elif self._outcome is not None:  # the job failed and returned (finetune/run.py: +inf), the sweep goes on
            status, error = self._outcome
            error = error or last_reported(self._mark)
        self._outcome = None
        self._end(status, error)
        self._write_report()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_EXIT
        from lit_peft.training.signals import PREEMPTED, SIGNALS

        stopped = SIGNALS.received if SIGNALS.forwarding else None  # its workers stopped their jobs
        SIGNALS.forwarding = False
        if not self.enabled:
            SWEEP_EXIT = PREEMPTED if stopped is not None else 0
            return
        sweep = self._sweep(config)
        record = {"event": "sweep_end", "pid": os.getpid(), "host": host(), "time": time.time()}
        self._append(sweep, {**record, "complete": stopped is None})
        self._sweep_dir = sweep
        md = self._write_report()
        counts, failed = _outcomes(sweep)
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        where = f"; report: {md}" if md is not None else ""
        if stopped is not None:
            print(
                f"sweep preempted by {stopped}: {summary or 'no jobs'}{where}; run the same sweep command to resume "
                f"(it continues {sweep})",
                flush=True,
            )
            SWEEP_EXIT = PREEMPTED
            return
        print(f"sweep done: {summary or 'no jobs'}{where}", flush=True)
        for line in failed:
            print(f"  failed: {line}", flush=True)
        SWEEP_EXIT = 1 if failed else 0

    # -------------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _sweep(config: DictConfig) -> Path:
        return Path(os.path.abspath(str(_select(config, "hydra.sweep.dir"))))

    @staticmethod
    def _append(sweep: Path, record: dict[str, Any]) -> None:
        from lit_peft.sweeps.jobs import append_record

        try:
            append_record(sweep, record)
        except OSError as e:
            print(f"warning: could not record the job in {sweep}/jobs.jsonl: {e}", file=sys.stderr)

    def _end(self, status: str, error: str) -> None:
        if self._current is None or self._sweep_dir is None:
            return
        keep = ("num", "overrides", "out_dir", "method", "task", "pid", "host")
        record = {"event": "end", "status": status, "error": error, **{k: self._current.get(k) for k in keep}}
        record["time"] = time.time()
        self._append(self._sweep_dir, record)
        self._current = None

    def _write_report(self) -> Path | None:
        if self._sweep_dir is None or not self._sweep_dir.is_dir():
            return None
        from lit_peft.sweeps.report import write_report

        try:
            return write_report([self._sweep_dir], plots=self.plots, log=lambda *_: None)
        except Exception as e:  # the report never fails a sweep
            print(f"warning: the sweep report could not be written: {type(e).__name__}: {e}", file=sys.stderr)
            return None

    def _at_exit(self) -> None:
        """A job that never reached on_job_end: SystemExit (a user error, exit 2; a preemption, exit 3) or Ctrl-C."""
        if self._current is None or self._sweep_dir is None:
            return
        error = last_reported(self._mark)
        from lit_peft.training.resume import Preemption

        if error:
            self._end("failed", error)
        elif Preemption.stopped is not None:  # checkpointed; the same command resumes it
            self._end("preempted", f"preempted by {Preemption.stopped}; run the same command to resume")
        else:
            self._end("killed", "")
        sweep = self._sweep_dir
        self._append(sweep, {"event": "sweep_end", "pid": os.getpid(), "host": host(), "time": time.time()})
        if self._nothing_finished(sweep):
            return
        self._write_report()

    @staticmethod
    def _nothing_finished(sweep: Path) -> bool:
        """A sweep folder this run created in which no job finished: removed, as a failed single run's folder."""
        from lit_peft.training.run_folder import HYDRA_FILES, OUTPUTS

        if not OUTPUTS.created(sweep) or not sweep.is_dir():
            return False  # it existed before, or a job finished (OUTPUTS.keep) and made it the user's
        left = {p.name for p in sweep.iterdir() if p.name not in REPORT_FILES}
        if not left <= HYDRA_FILES:
            return False  # a failed job kept its folder (e.g. a run stopped at a non-finite step)
        for name in REPORT_FILES:
            with contextlib.suppress(FileNotFoundError):
                (sweep / name).unlink()
        OUTPUTS.remove_created(sweep)
        return True


def _relative(out_dir: str, sweep: Path) -> str:
    """A job folder relative to its sweep folder (records stay right when the sweep is moved or copied)."""
    if not out_dir:
        return out_dir
    path = os.path.abspath(out_dir)
    rel = os.path.relpath(path, sweep)
    return path if rel.startswith("..") else rel


def _outcomes(sweep: Path) -> tuple[dict[str, int], list[str]]:
    """The last status of each job this sweep ran (from the newest `sweep` record on) and a line per failed job."""
    from lit_peft.sweeps.jobs import read_records

    last: dict[Any, dict[str, Any]] = {}
    for rec in read_records(sweep):
        if rec.get("event") == "sweep":
            last = {}
        elif rec.get("event") == "end":
            last[rec.get("num")] = rec
    counts: dict[str, int] = {}
    failed = []
    for num, rec in sorted(last.items(), key=lambda kv: (kv[0] is None, kv[0] if kv[0] is not None else 0)):
        status = str(rec.get("status") or "failed")
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            where = Path(str(rec.get("out_dir") or f"job {num}")).name  # its folder names what differs
            failed.append(f"{where}: {rec.get('error') or 'see its run.log'}")
    return counts, failed


def _error_line(error: Any) -> str:
    """One line for a failed job's exception: the project's user-error message, else `Type: message`."""
    if not isinstance(error, BaseException):
        return str(error or "failed")
    from lit_peft.errors import one_line, user_error_message

    message = user_error_message(error)
    return message or f"{type(error).__name__}: {one_line(str(error))}"
