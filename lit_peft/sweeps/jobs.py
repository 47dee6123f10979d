"""What a sweep's jobs wrote, read back: job folders, `jobs.jsonl` records, metrics.json and TensorBoard scalars.

See lit_peft/sweeps/report.py for what the report reads and how.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lit_peft import env
from lit_peft.env import pid_alive
from lit_peft.errors import UserError
from lit_peft.training.run_folder import METRICS_FILE

JOBS_FILE = "jobs.jsonl"
REPORT_MD, REPORT_CSV = "report.md", "report.csv"
# name: (width, height) in inches at PLOT_DPI: 1200 x 450, 800 x 500 and 800 x 450 pixels
PLOTS = {"loss_curves.png": (12.0, 4.5), "loss_vs_params.png": (8.0, 5.0), "step_time.png": (8.0, 4.5)}
PLOT_DPI = 100
STALE_AFTER_S = 15 * 60  # a job without a process record that wrote nothing for this long counts as killed
EVAL_DIR = "eval"

# the metrics the table reads itself (not task metrics)
IGNORED_TAGS = {"epoch", "hp_metric"}
CORE_TRAIN = {
    "train/loss",
    "train/lr",
    "train/tokens_per_sec",
    "train/step_time_s",
    "train/peak_memory_bytes",
    "train/grad_norm",
    "train/target_tokens",
    "train/pairs",
    "train/sequences",
    "train/positions",
    "train/nonfinite_skipped",
}
CORE_VAL = ("val/loss", "val/ppl")
STATUSES = ("ok", "failed", "running", "preempted", "killed", "pending", "not run")


class ReportError(UserError):
    """A folder given to the report that is neither a sweep nor a run (a user error: one line, exit 2)."""


# ---------------------------------------------------------------------------------------------- what runs write


@dataclass
class Point:
    step: int
    wall_time: float
    value: float


def read_scalars(folder: Path) -> dict[str, list[Point]]:
    """Every scalar of every tensorboard event file under `folder` (names in the canonical scheme), in write order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = sorted({p.parent for p in folder.rglob("events.out.tfevents.*") if not _hidden(p, folder)})
    out: dict[str, list[Point]] = {}
    quiet = logging.getLogger("tensorboard")  # its INFO lines per event file would land in a job's run.log
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for d in dirs:
            acc = EventAccumulator(str(d), size_guidance={"scalars": 0})  # 0: keep every point, not a sample
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                if tag in IGNORED_TAGS:
                    continue
                points = out.setdefault(tag, [])
                points.extend(Point(int(e.step), float(e.wall_time), float(e.value)) for e in acc.Scalars(tag))
    finally:
        quiet.setLevel(level)
    for points in out.values():
        points.sort(key=lambda p: p.wall_time)
    return out


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


# ------------------------------------------------------------------------------------------------ jobs and sweeps


class EvalValue(NamedTuple):
    """One lm-eval metric of one task: its value, standard error and item count; `source` says where the standard
    error came from: 'lm-eval', 'binomial' (sqrt(p(1-p)/(n-1)) where lm-eval reported none for a 0/1 metric) or ''."""

    value: float
    stderr: float | None
    n: int | None
    source: str


@dataclass
class Job:
    name: str
    folder: Path | None  # absolute (resolved), or None for a job whose folder is gone or was never made
    num: int | None = None
    overrides: list[str] = field(default_factory=list)
    status: str = ""
    error: str = ""
    method: str | None = None
    task: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[Point]] = field(default_factory=dict)
    # task -> metric -> value (lm-eval's `<metric>,<filter>` keys; the filter left out where it is 'none')
    evals: dict[str, dict[str, EvalValue]] = field(default_factory=dict)
    eval_error: str = ""
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def override_map(self) -> dict[str, str]:
        pairs = (o.lstrip("+~").partition("=") for o in self.overrides)
        return {k: v for k, _, v in pairs if k and k != "out_dir" and not k.startswith("hydra.")}


def is_run_dir(folder: Path) -> bool:
    return (
        (folder / ".hydra" / "config.yaml").is_file()
        or (folder / METRICS_FILE).is_file()
        or (folder / "tensorboard").is_dir()
    )


def run_dirs(sweep: Path, max_depth: int = 8) -> list[Path]:
    """Job folders under a sweep folder (nested ones too: path-valued overrides make nested folder names)."""
    found: list[Path] = []
    for root, dirs, _ in os.walk(sweep):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != EVAL_DIR)
        if here != sweep and is_run_dir(here):
            found.append(here)
            dirs[:] = []
        elif len(here.relative_to(sweep).parts) >= max_depth:
            dirs[:] = []
    return found


def read_records(sweep: Path) -> list[dict[str, Any]]:
    path = sweep / JOBS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict):
            records.append(record)
    return records


def append_record(sweep: str | Path, record: dict[str, Any]) -> None:
    """One line of `<sweep>/jobs.jsonl`, appended in a single write (concurrent jobs append whole lines).

    After a line cut by a crash (the file does not end in a newline) the record starts on a line of its own.
    """
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(Path(sweep) / JOBS_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
    finally:
        os.close(fd)


def process_alive(pid: Any, host: Any) -> bool | None:
    """Whether process `pid` on `host` runs; None when that cannot be told from here (another host)."""
    if not isinstance(pid, int) or host != env.host():
        return None
    return pid_alive(pid)


def _key(path: Any) -> str:
    return os.path.realpath(str(path))


def _newest_write(folder: Path) -> float | None:
    newest = None
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                mtime = os.stat(os.path.join(root, f)).st_mtime
            except OSError:
                continue
            newest = mtime if newest is None else max(newest, mtime)
    return newest


def _error_in_log(folder: Path) -> str:
    """The last `error: ...` line a run logged (run.log), without the prefix."""
    log = folder / "run.log"
    if not log.is_file():
        return ""
    # a bare line, or one with run.log's "<time> ERROR lit_peft: " prefix
    errors = [m.group(1) for m in re.finditer(r"(?:^|: )error: (.*)$", log.read_text(errors="replace"), re.M)]
    return errors[-1] if errors else ""


def _read_yaml_list(path: Path) -> list[str]:
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:
        return []
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def _config_names(folder: Path) -> tuple[str | None, str | None]:
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return None, None
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None, None
    name = lambda node: (cfg.get(node) or {}).get("name") if isinstance(cfg.get(node), dict) else None  # noqa: E731
    return name("method"), name("task")


def load_job(job: Job, now: float, stale_after_s: float, record: dict[str, Any] | None = None) -> Job:
    """Fill in a job's metrics, scalars and status from its folder (and its jobs.jsonl record, if any)."""
    start, end = (record or {}).get("start"), (record or {}).get("end")
    folder = job.folder
    if folder is not None and folder.is_dir():
        if not job.overrides:
            job.overrides = _read_yaml_list(folder / ".hydra" / "overrides.yaml")
        job.method, job.task = _config_names(folder)
        mpath = folder / METRICS_FILE
        if mpath.is_file():
            try:
                loaded = json.loads(mpath.read_text())
                job.metrics = loaded if isinstance(loaded, dict) else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                job.error = f"{mpath} is unreadable ({type(e).__name__}: {e})"
        try:
            job.scalars = read_scalars(folder)
        except Exception as e:  # a damaged event file is a note on the row, never a crash of the report
            job.error = job.error or f"tensorboard events unreadable: {type(e).__name__}: {e}"
    for rec in (start, end):
        if rec:
            job.method = job.method or rec.get("method")
            job.task = job.task or rec.get("task")
            job.overrides = job.overrides or list(rec.get("overrides") or [])
            job.num = rec.get("num", job.num)
    job.method = job.metrics.get("method") or job.method
    job.task = job.metrics.get("task") or job.task

    if job.metrics and job.metrics.get("status", "ok") == "ok":
        job.status = "ok"
    elif job.metrics:
        job.status, job.error = "failed", job.error or str(job.metrics.get("error") or job.metrics.get("status"))
    elif end:
        job.status = str(end.get("status") or "failed")
        job.error = str(end.get("error") or job.error or "")
        if job.status == "killed" or (job.status != "ok" and not job.error):
            _failed_if_logged(job)  # e.g. a run stopped at a non-finite gradient that the callback saw as killed
    elif start:
        alive = process_alive(start.get("pid"), start.get("host"))
        if alive is None:
            alive = _recent(folder, now, stale_after_s)
        job.status = "running" if alive else "killed"
        if not alive:
            _failed_if_logged(job)
    elif folder is not None and folder.is_dir():
        job.status = "running" if _recent(folder, now, stale_after_s) else "killed"
        _failed_if_logged(job)  # without a record, its error line is the one sign of how it ended
    else:
        job.status = "killed"
    return job


def _failed_if_logged(job: Job) -> None:
    """A job that ended without a result but logged `error: ...` in its run.log failed with that error."""
    logged = _error_in_log(job.folder) if job.folder is not None and job.folder.is_dir() else ""
    if logged:
        job.status, job.error = "failed", logged


def _recent(folder: Path | None, now: float, stale_after_s: float) -> bool:
    newest = _newest_write(folder) if folder is not None and folder.is_dir() else None
    return newest is not None and now - newest < stale_after_s


def _relative(path: Path, base: Path) -> Path | None:
    """`path` relative to `base` when it lies inside it (as written, or once symbolic links are resolved)."""
    for a, b in ((os.path.normpath(path), os.path.normpath(base)), (_key(path), _key(base))):
        rel = os.path.relpath(a, b)
        if rel != ".." and not rel.startswith(".." + os.sep):
            return Path(rel)
    return None


def record_dir(out_dir: str, sweep: Path, origin: str | None, found: dict[str, Path]) -> Path:
    """Where the job folder of a record's `out_dir` is now, inside `sweep` (resolved).

    The callback writes `out_dir` relative to the sweep folder; older records hold absolute paths, of the folder the
    sweep was written in. An absolute path outside `sweep` (the sweep was moved or copied) is mapped into it: by its
    place under `origin` (the `sweep_dir` of the sweep record), else by the longest tail of it that names a job
    folder found in `sweep`, else by its last part. Never the original place: a copy reports its own jobs.
    """
    path = Path(out_dir)
    if not path.is_absolute():
        return sweep / path
    if _relative(path, sweep) is not None:
        return Path(_key(path))
    rel = _relative(path, Path(origin)) if origin else None
    if rel is not None and str(rel) != ".":
        return sweep / rel
    parts = path.parts[1:]
    for i in range(len(parts)):
        candidate = sweep.joinpath(*parts[i:])
        if _key(candidate) in found:
            return candidate
    return sweep / path.name


def collect(folders: Sequence[Path], report_dir: Path, stale_after_s: float = STALE_AFTER_S) -> list[Job]:
    """The jobs of the given sweep and run folders, each loaded (see `load_job`), in sweep order.

    Each job's `folder` is absolute (resolved); ok jobs get the evaluation results cached for their current adapter.
    """
    from lit_peft.sweeps.evals import read_cached_evals

    now = time.time()
    jobs: list[Job] = []
    seen: set[str] = set()
    names = _JobNames(Path(report_dir).resolve(), several=len(folders) > 1)
    for given in folders:
        given = Path(given).resolve()
        if not is_run_dir(given):
            jobs += _sweep_jobs(given, names, seen, now, stale_after_s)
        elif _key(given) not in seen:
            seen.add(_key(given))
            jobs.append(load_job(Job(name=names.name_of(given, given.parent), folder=given), now, stale_after_s))
    for job in jobs:
        if job.status == "ok" and job.folder is not None:
            read_cached_evals(job)
    return jobs


class _JobNames:
    """Job names, each unique in the report: a repeated one gets a count, e.g. `run (2)`."""

    def __init__(self, report_dir: Path, several: bool) -> None:
        self.report_dir, self.several = report_dir, several
        self.taken: set[str] = set()

    def name_of(self, folder: Path, base: Path) -> str:
        """The folder relative to the report's folder; with several inputs, prefixed by the input's name."""
        rel = os.path.relpath(folder, self.report_dir)
        if rel.startswith("..") or rel == ".":
            rel = os.path.relpath(folder, base)
            rel = folder.name if rel.startswith("..") or rel == "." else rel
            if self.several and _key(base) != _key(folder):
                rel = f"{base.name}/{rel}"
        name, i = rel, 1
        while name in self.taken:
            i += 1
            name = f"{rel} ({i})"
        self.taken.add(name)
        return name


class _SweepRecords(NamedTuple):
    """What a sweep's jobs.jsonl says: the latest run of each job folder ({"start": record, "end": record}, keyed
    by `_key`), the jobs the sweep planned, and whether the sweep's process still runs."""

    by_dir: dict[str, dict[str, Any]]
    planned: list[dict[str, Any]]
    alive: bool


def _sweep_records(sweep: Path, found: dict[str, Path]) -> _SweepRecords:
    """The records of `sweep`'s jobs.jsonl, each job's mapped to its folder in `sweep` (see `record_dir`)."""
    by_dir: dict[str, dict[str, Any]] = {}
    planned: list[dict[str, Any]] = []
    alive = False
    origin: str | None = None
    for rec in read_records(sweep):
        event = rec.get("event")
        if event == "sweep":
            planned = [j for j in rec.get("jobs") or [] if isinstance(j, dict)]
            alive = bool(process_alive(rec.get("pid"), rec.get("host")))
            origin = str(rec["sweep_dir"]) if rec.get("sweep_dir") else None
        elif event == "sweep_end":
            alive = False
        elif event in ("start", "end") and rec.get("out_dir"):
            entry = by_dir.setdefault(_key(record_dir(str(rec["out_dir"]), sweep, origin, found)), {})
            if event == "start":
                entry.clear()  # a job run again (same folder) starts over
            entry[event] = rec
    return _SweepRecords(by_dir, planned, alive)


def _sweep_jobs(sweep: Path, names: _JobNames, seen: set[str], now: float, stale_after_s: float) -> list[Job]:
    """The jobs of one sweep folder not in `seen` (which gains them): those with a folder or a record, loaded, in
    job-number order, then the planned ones that never started."""
    found = {_key(f): f for f in run_dirs(sweep)}
    records = _sweep_records(sweep, found)
    jobs: list[Job] = []
    started_nums = set()
    for key in _job_order(records.by_dir, found):
        if key in seen:
            continue
        seen.add(key)
        entry = records.by_dir.get(key, {})
        folder = found.get(key) or (Path(key) if Path(key).is_dir() else None)
        rec = entry.get("start") or entry.get("end") or {}
        if "num" in rec:
            started_nums.add(rec["num"])
        job = Job(name=names.name_of(folder or Path(key), sweep), folder=folder, num=rec.get("num"))
        jobs.append(load_job(job, now, stale_after_s, entry))
    for plan in records.planned:
        if plan.get("num") not in started_nums:
            jobs.append(_planned_job(plan, sweep, names, records.alive))
    return jobs


def _job_order(by_dir: dict[str, dict[str, Any]], found: dict[str, Path]) -> list[str]:
    """The keys of a sweep's recorded and found job folders, by job number (none: last), then by key."""
    order: list[tuple[float, str]] = []
    for key, entry in by_dir.items():
        rec = entry.get("start") or entry.get("end")
        order.append((float(rec.get("num", 1e9)), key))
    for key in found:
        if key not in by_dir:
            order.append((1e9, key))
    return [key for _, key in sorted(order, key=lambda t: (t[0], t[1]))]


def _planned_job(plan: dict[str, Any], sweep: Path, names: _JobNames, sweep_alive: bool) -> Job:
    """A job the sweep planned that never started: pending while the sweep's process runs, else not run."""
    job = Job(
        name=names.name_of(sweep / f"#{plan.get('num')}", sweep),
        folder=None,
        num=plan.get("num"),
        overrides=list(plan.get("overrides") or []),
        status="pending" if sweep_alive else "not run",
    )
    job.method, job.task = job.override_map.get("method"), job.override_map.get("task")
    return job


def check_folder(folder: Path) -> None:
    """A sweep folder or a run folder, else ReportError naming what was expected."""
    if not folder.exists():
        raise ReportError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ReportError(f"{folder} is a file, not a sweep or run folder")
    if is_run_dir(folder) or (folder / "multirun.yaml").is_file() or (folder / JOBS_FILE).is_file():
        return
    if run_dirs(folder, max_depth=3):
        return
    raise ReportError(
        f"{folder} is not a sweep folder (no multirun.yaml, {JOBS_FILE} or job folders) nor a run folder "
        f"(no .hydra/config.yaml, tensorboard/ or {METRICS_FILE}); give the folder `finetune/run.py -m` wrote"
    )
