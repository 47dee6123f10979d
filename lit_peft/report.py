"""One report per sweep: a table (report.md, report.csv) and plots of what every job of a sweep wrote.

    python scripts/report.py multirun/2026-12-01/12-00-00 [more sweep or run folders] [--eval TASKS --limit N]

Every number is read from what a job wrote, never recomputed or guessed:

- `<job>/metrics.json`, written at the end of each run (`write_run_metrics`, keys in `RUN_METRICS_KEYS`): trainable
  and total parameters, optimizer steps, tokens seen, wall time, peak memory, held-out metrics before and after;
- the job's tensorboard events (`EventAccumulator`): the curves of the plots, the median step time and tokens/s, and
  every number above that a killed or still running job has not written to metrics.json yet (parameters, steps,
  peak memory, the latest held-out metrics); metric names of both schemes (`val_loss`, `val/loss`) are read;
- `<sweep>/jobs.jsonl`, kept by the Hydra callback (`lit_peft.sweep_callback.SweepReport`): each job's start and end,
  with the one-line error of a failed job (whose folder a failed run removes) and the jobs a sweep never started;
- `<job>/.hydra/overrides.yaml`: the overrides that differ between jobs become columns.

A job's status is ok (metrics.json, or the callback saw it finish), failed (with its one-line error), running (its
process is alive, or for a job without a record: something written in the last `stale_after_s` seconds), killed
(neither), pending or not run (a planned job of a sweep that is still running or has stopped). Runs of different
kinds (SFT, DPO, distillation, Low-Rank Clone) share one table: a metric a job did not log is an empty cell.

`--eval TASKS --limit N` runs eval/run.py on every ok job's adapter (`<job>/adapter`) or trained model
(`<job>/model`) and adds accuracy columns (value ± standard error); results are cached in
`<job>/eval/<tasks>-<limit>.json`, so a second report does not evaluate again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import socket
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
JOBS_FILE = "jobs.jsonl"
REPORT_MD, REPORT_CSV = "report.md", "report.csv"
# name: (width, height) in inches at PLOT_DPI: 1200 x 450, 800 x 500 and 800 x 450 pixels
PLOTS = {"loss_curves.png": (12.0, 4.5), "loss_vs_params.png": (8.0, 5.0), "step_time.png": (8.0, 4.5)}
PLOT_DPI = 100
STALE_AFTER_S = 15 * 60  # a job without a process record that wrote nothing for this long counts as killed
EVAL_DIR = "eval"

RUN_METRICS_KEYS = {
    "status": "'ok' for a run that finished (the only value train.py writes today)",
    "initial": "held-out metrics before training, {'val/loss': ..., 'val/ppl': ..., 'val/<task metric>': ...}",
    "final": "held-out metrics after the last step, same keys",
    "held_out_examples": "size of the held-out set (examples, or pairs for DPO)",
    "steps": "optimizer steps taken (the trainer's global step)",
    "tokens": "real (non-padding) tokens trained on, all ranks",
    "wall_time_s": "seconds from the start of train() to the end of the run",
    "peak_memory_bytes": "peak memory of the run",
    "peak_memory_kind": "'cuda_max_allocated' (torch.cuda.max_memory_allocated) or 'cpu_max_rss' (peak resident)",
    "trainable_params": "parameters the optimizer updates",
    "total_params": "all parameters of the trained model (frozen base included)",
    "config_digest": "digest of the run's resolved settings (the resume identity)",
    "method": "method name (lora, ether, ..., full)",
    "task": "task name (sft, dpo, distill, lrc, pretrain)",
}

# Metric names before the `train/...`, `val/...` scheme, and the ones the table reads itself (not task metrics).
ALIASES = {"train_loss": "train/loss", "lr": "train/lr", "tokens_per_sec": "train/tokens_per_sec"}
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


class ReportError(ValueError):
    """A folder given to the report that is neither a sweep nor a run (a user error: one line, exit 2)."""


# ---------------------------------------------------------------------------------------------- what runs write


def write_run_metrics(out_dir: str | Path, **fields: Any) -> Path:
    """Write `<out_dir>/metrics.json` atomically at the end of a run; returns its path.

    The keys the report reads are documented in `RUN_METRICS_KEYS` (status defaults to 'ok'); other keys are kept.
    Numbers must be plain Python/JSON numbers (call float()/int() on tensors first).
    """
    from lit_peft.io import write_json

    data = {"status": "ok", **fields}
    for name in ("initial", "final"):
        if name in data and data[name] is not None:
            data[name] = {canonical(str(k)): float(v) for k, v in dict(data[name]).items()}
    path = Path(out_dir) / METRICS_FILE
    write_json(path, data)
    return path


def canonical(tag: str) -> str:
    """A metric name in the `train/...`, `val/...` scheme (older runs logged val_loss, train_loss, lr)."""
    if tag in ALIASES:
        return ALIASES[tag]
    if tag.startswith("val_"):
        return "val/" + tag[4:]
    return tag


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
                points = out.setdefault(canonical(tag), [])
                points.extend(Point(int(e.step), float(e.wall_time), float(e.value)) for e in acc.Scalars(tag))
    finally:
        quiet.setLevel(level)
    for points in out.values():
        points.sort(key=lambda p: p.wall_time)
    return out


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


# ------------------------------------------------------------------------------------------------ jobs and sweeps


@dataclass
class Job:
    name: str
    folder: Path | None
    num: int | None = None
    overrides: list[str] = field(default_factory=list)
    status: str = ""
    error: str = ""
    method: str | None = None
    task: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[Point]] = field(default_factory=dict)
    evals: dict[str, tuple[float, float | None, int | None, str]] = field(default_factory=dict)  # acc, se, n, se from
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
    """One line of `<sweep>/jobs.jsonl`, appended in a single write (concurrent jobs append whole lines)."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(Path(sweep) / JOBS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _host() -> str:
    return socket.gethostname()


def process_alive(pid: Any, host: Any) -> bool | None:
    """Whether process `pid` on `host` runs; None when that cannot be told from here (another host)."""
    from lit_peft.io import pid_alive

    if not isinstance(pid, int) or host != _host():
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
    elif start:
        alive = process_alive(start.get("pid"), start.get("host"))
        if alive is None:
            alive = _recent(folder, now, stale_after_s)
        job.status = "running" if alive else "killed"
    elif folder is not None and folder.is_dir():
        logged = _error_in_log(folder)
        if logged:
            job.status, job.error = "failed", logged
        else:
            job.status = "running" if _recent(folder, now, stale_after_s) else "killed"
    else:
        job.status = "killed"
    return job


def _recent(folder: Path | None, now: float, stale_after_s: float) -> bool:
    newest = _newest_write(folder) if folder is not None and folder.is_dir() else None
    return newest is not None and now - newest < stale_after_s


def collect(folders: Sequence[Path], report_dir: Path, stale_after_s: float = STALE_AFTER_S) -> list[Job]:
    """The jobs of the given sweep and run folders, each loaded (see `load_job`), in sweep order."""
    now = time.time()
    jobs: list[Job] = []
    seen: set[str] = set()

    several = len(folders) > 1
    names: set[str] = set()

    def name_of(folder: Path, base: Path) -> str:
        """The folder relative to the report's folder; with several inputs, prefixed by the input's name."""
        rel = os.path.relpath(folder, report_dir)
        if rel.startswith("..") or rel == ".":
            rel = os.path.relpath(folder, base)
            rel = folder.name if rel.startswith("..") or rel == "." else rel
            if several and _key(base) != _key(folder):
                rel = f"{base.name}/{rel}"
        name, i = rel, 1
        while name in names:
            i += 1
            name = f"{rel} ({i})"
        names.add(name)
        return name

    for given in folders:
        given = Path(given)
        if is_run_dir(given):
            if _key(given) not in seen:
                seen.add(_key(given))
                name = name_of(given, given.parent)
                jobs.append(load_job(Job(name=name, folder=given), now, stale_after_s))
            continue
        records = read_records(given)
        by_dir: dict[str, dict[str, Any]] = {}
        planned: list[dict[str, Any]] = []
        sweep_alive = False
        for rec in records:
            event = rec.get("event")
            if event == "sweep":
                planned = [j for j in rec.get("jobs") or [] if isinstance(j, dict)]
                sweep_alive = bool(process_alive(rec.get("pid"), rec.get("host")))
            elif event == "sweep_end":
                sweep_alive = False
            elif event in ("start", "end") and rec.get("out_dir"):
                entry = by_dir.setdefault(_key(rec["out_dir"]), {})
                if event == "start":
                    entry.clear()  # a job run again (same folder) starts over
                entry[event] = rec
        found = {_key(f): f for f in run_dirs(given)}
        order: list[tuple[float, str]] = []
        for key, entry in by_dir.items():
            rec = entry.get("start") or entry.get("end")
            order.append((float(rec.get("num", 1e9)), key))
        for key in found:
            if key not in by_dir:
                order.append((1e9, key))
        started_nums = set()
        for _, key in sorted(order, key=lambda t: (t[0], t[1])):
            if key in seen:
                continue
            seen.add(key)
            entry = by_dir.get(key, {})
            folder = found.get(key) or (Path(key) if Path(key).is_dir() else None)
            rec = entry.get("start") or entry.get("end") or {}
            if "num" in rec:
                started_nums.add(rec["num"])
            path = folder or Path(key)
            job = Job(name=name_of(path, given), folder=folder, num=rec.get("num"))
            jobs.append(load_job(job, now, stale_after_s, entry))
        for plan in planned:
            if plan.get("num") in started_nums:
                continue
            status = "pending" if sweep_alive else "not run"
            job = Job(
                name=name_of(given / f"#{plan.get('num')}", given),
                folder=None,
                num=plan.get("num"),
                overrides=list(plan.get("overrides") or []),
                status=status,
            )
            job.method, job.task = job.override_map.get("method"), job.override_map.get("task")
            jobs.append(job)
    return jobs


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


# -------------------------------------------------------------------------------------------------- the numbers


def _values(job: Job, tag: str) -> list[float]:
    return [p.value for p in job.scalars.get(tag, []) if math.isfinite(p.value)]


def _first(job: Job, tag: str) -> float | None:
    v = _values(job, tag)
    return v[0] if v else None


def _last(job: Job, tag: str) -> float | None:
    v = _values(job, tag)
    return v[-1] if v else None


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def step_times(job: Job) -> list[float]:
    """Seconds per optimizer step as the job logged them (train/step_time_s), else the gaps between the event
    timestamps of consecutive train-loss points divided by their step gap."""
    logged = _values(job, "train/step_time_s")
    if logged:
        return logged
    points = job.scalars.get("train/loss", [])
    gaps = []
    for a, b in zip(points, points[1:], strict=False):
        if b.step > a.step:
            gaps.append((b.wall_time - a.wall_time) / (b.step - a.step))
    return gaps


def val_names(jobs: Sequence[Job]) -> list[str]:
    names: dict[str, None] = {}
    for job in jobs:
        initial, final = job.metrics.get("initial") or {}, job.metrics.get("final") or {}
        for key in (*initial, *final, *job.scalars):
            if canonical(key).startswith("val/"):
                names[canonical(key)] = None
    rest = sorted(n for n in names if n not in CORE_VAL)
    return [*CORE_VAL, *rest]


def train_names(jobs: Sequence[Job]) -> list[str]:
    names = {t for job in jobs for t in job.scalars if t.startswith("train/") and t not in CORE_TRAIN}
    return sorted(names)


def _held_out(job: Job, name: str, when: str) -> float | None:
    """Held-out metric `name` before ('initial') or after ('final') training: metrics.json, else the events (the
    first point if logged at step 0, the latest point for 'final')."""
    saved = job.metrics.get(when)
    if isinstance(saved, dict):
        for key, value in saved.items():
            if canonical(str(key)) == name and isinstance(value, (int, float)):
                return float(value)
        if job.metrics:
            return None
    points = [p for p in job.scalars.get(name, []) if math.isfinite(p.value)]
    if not points:
        return None
    if when == "initial":
        return points[0].value if points[0].step == 0 else None
    return points[-1].value


def _num(job: Job, key: str, tag: str | None = None, reduce=None) -> float | int | None:
    value = job.metrics.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if tag is None:
        return None
    values = _values(job, tag)
    if not values:
        return None
    return reduce(values) if reduce else values[0]


def _as_int(value: float | int | None) -> int | None:
    return None if value is None else int(round(value))


def fill_rows(jobs: Sequence[Job]) -> tuple[list[str], list[str], list[str]]:
    """Each job's row (job.row, raw values) and the column groups: overrides, held-out metrics, train metrics."""
    keys: dict[str, None] = {}
    for job in jobs:
        keys.update(dict.fromkeys(job.override_map))
    shown = ("method", "task")  # columns of their own
    differing = [k for k in keys if k not in shown and len({_same(job.override_map.get(k)) for job in jobs}) > 1]
    vals, trains = val_names(jobs), train_names(jobs)
    for job in jobs:
        trainable = _as_int(_num(job, "trainable_params", "params/trainable"))
        total = _as_int(_num(job, "total_params", "params/total"))
        steps = _num(job, "steps")
        if steps is None and job.scalars:
            steps = max(p.step for points in job.scalars.values() for p in points)
        times = step_times(job)
        row: dict[str, Any] = {
            "job": job.name,
            "status": job.status,
            "error": job.error,
            **{k: job.override_map.get(k) for k in differing},
            "method": job.method,
            "task": job.task,
            "trainable_params": trainable,
            "trainable_share": trainable / total if trainable is not None and total else None,
            "total_params": total,
            "steps": _as_int(steps),
            "tokens": _as_int(_num(job, "tokens")),
            "s_per_step": _median(times),
            "tokens_per_s": _median(_values(job, "train/tokens_per_sec")),
            "peak_memory_bytes": _as_int(_num(job, "peak_memory_bytes", "train/peak_memory_bytes", max)),
            "peak_memory_kind": job.metrics.get("peak_memory_kind"),
            "wall_time_s": _num(job, "wall_time_s"),
            "held_out_examples": _as_int(_num(job, "held_out_examples")),
        }
        for name in vals:
            row[f"{name} before"] = _held_out(job, name, "initial")
            row[f"{name} after"] = _held_out(job, name, "final")
        for name in trains:
            row[f"{name} last"] = _last(job, name)
        for task, (acc, stderr, n, _) in job.evals.items():
            row[f"eval/{task} acc"] = acc
            row[f"eval/{task} acc_stderr"] = stderr
            row[f"eval/{task} n"] = n
        if job.eval_error:
            row["eval error"] = job.eval_error
        row["folder"] = str(job.folder) if job.folder is not None else ""
        job.row = row
    return differing, vals, trains


def _same(value: str | None) -> Any:
    """An override's value as parsed (False and false, 1e-3 and 0.001 are the same setting)."""
    if value is None:
        return None
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return json.dumps(parsed, sort_keys=True, default=str)


def columns(jobs: Sequence[Job]) -> list[str]:
    cols: dict[str, None] = {}
    for job in jobs:
        cols.update(dict.fromkeys(job.row))
    tail = [c for c in cols if c.startswith("eval")] + ["folder"]
    return [c for c in cols if c not in tail] + [c for c in tail if c in cols]


# ------------------------------------------------------------------------------------------------------- tables


def _fmt_count(v: Any) -> str:
    return f"{int(v):,}"


def _fmt_float(digits: int):
    return lambda v: f"{v:.{digits}f}"


def _fmt_sig(v: float) -> str:
    return f"{v:.3g}"


def _fmt_bytes(v: Any) -> str:
    v = float(v)
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def _fmt_duration(v: float) -> str:
    if v >= 3600:
        return f"{v / 3600:.2f} h"
    return f"{v / 60:.1f} min" if v >= 120 else f"{v:.1f} s"


def _fmt_metric(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


MD_FORMATS = {
    "trainable_params": ("Trainable", _fmt_count),
    "trainable_share": ("Share", lambda v: f"{100 * v:.3f}%"),
    "total_params": ("Total", _fmt_count),
    "steps": ("Steps", _fmt_count),
    "tokens": ("Tokens", _fmt_count),
    "s_per_step": ("s/step (median)", _fmt_sig),
    "tokens_per_s": ("tokens/s (median)", lambda v: f"{v:,.0f}"),
    "peak_memory_bytes": ("Peak memory", _fmt_bytes),
    "wall_time_s": ("Wall time", _fmt_duration),
    "held_out_examples": ("Held-out n", _fmt_count),
    "job": ("Job", str),
    "status": ("Status", str),
    "method": ("Method", str),
    "task": ("Task", str),
}
MEMORY_KINDS = {"cuda_max_allocated": "CUDA", "cpu_max_rss": "RSS"}


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(jobs: Sequence[Job], differing: list[str], folders: Sequence[Path], report_dir: Path) -> str:
    cols = [c for c in columns(jobs) if c not in ("error", "folder", "peak_memory_kind", "eval error")]
    cols = [c for c in cols if not (c.startswith("eval/") and not c.endswith(" acc"))]
    failures: list[str] = []
    lines_rows: list[list[str]] = []
    for job in jobs:
        cells = []
        for c in cols:
            v = job.row.get(c)
            if c == "status" and job.error:
                failures.append(f"{job.name}: {job.error}")
                cells.append(f"{v} [{len(failures)}]")
                continue
            if c.startswith("eval/") and c.endswith(" acc"):
                task = c[len("eval/") : -len(" acc")]
                cells.append(_eval_cell(job, task))
                continue
            if v is None or v == "":
                cells.append("")
            elif c in MD_FORMATS:
                text = MD_FORMATS[c][1](v)
                if c == "peak_memory_bytes" and job.row.get("peak_memory_kind") in MEMORY_KINDS:
                    text += f" ({MEMORY_KINDS[job.row['peak_memory_kind']]})"
                cells.append(text)
            elif isinstance(v, float):
                cells.append(_fmt_metric(v))
            else:
                cells.append(str(v))
        lines_rows.append(cells)
    keep = [i for i, c in enumerate(cols) if c in ("job", "status") or any(r[i] for r in lines_rows)]
    headers = [_header(cols[i], differing) for i in keep]
    out = [f"# Sweep report: {report_dir.name}", ""]
    counts = {s: sum(job.status == s for job in jobs) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    out.append(f"{len(jobs)} jobs ({summary}) from {', '.join(str(f) for f in folders)}; written {_now()}.")
    out.append("")
    out.append("| " + " | ".join(_md_escape(h) for h in headers) + " |")
    out.append("|" + "|".join("---:" if _numeric(cols[i]) else "---" for i in keep) + "|")
    for cells in lines_rows:
        out.append("| " + " | ".join(_md_escape(cells[i]) for i in keep) + " |")
    out.append("")
    if failures:
        out += [f"[{i}] {_md_escape(text)}  " for i, text in enumerate(failures, 1)]
        out.append("")
    out.append(
        "Read from each job's metrics.json and tensorboard events (nothing recomputed): parameters, steps, tokens, "
        "wall time and peak memory from metrics.json (peak memory and parameters from the events for jobs that "
        "have none); s/step and tokens/s are medians of the logged train/step_time_s and train/tokens_per_sec. "
        "'before' is the validation before the first step, 'after' the one after the last (for running or killed "
        "jobs: the latest logged). 'last' is the last logged training value. Empty cells: a metric that job did "
        "not log."
    )
    if any(job.evals for job in jobs):
        out.append("")
        out.append(
            "Accuracies: lm-eval's acc ± acc_stderr over n items (eval/run.py); where lm-eval reported no standard "
            "error, the binomial one, sqrt(p(1-p)/(n-1)), marked *."
        )
    if any(job.eval_error for job in jobs):
        out.append("")
        out += [f"- evaluation of {job.name} failed: {_md_escape(job.eval_error)}" for job in jobs if job.eval_error]
    out += ["", "## Plots", ""]
    out += [f"![{name[:-4].replace('_', ' ')}]({name})" for name in PLOTS]
    return "\n".join(out) + "\n"


def _eval_cell(job: Job, task: str) -> str:
    if task not in job.evals:
        return ""
    acc, stderr, _, source = job.evals[task]
    if stderr is None:
        return f"{acc:.3f}"
    mark = "*" if source == "binomial" else ""
    return f"{acc:.3f} ± {stderr:.3f}{mark}"


def _numeric(col: str) -> bool:
    return col not in ("job", "status", "method", "task") and not col.startswith("eval error")


def _header(col: str, differing: list[str]) -> str:
    if col in MD_FORMATS:
        return MD_FORMATS[col][0]
    if col in differing:
        return col
    if col.startswith("eval/"):
        return col[len("eval/") :]
    return col


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def csv_text(jobs: Sequence[Job]) -> str:
    cols = columns(jobs)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for job in jobs:
        writer.writerow(["" if job.row.get(c) is None else _csv_value(job.row.get(c)) for c in cols])
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v


# -------------------------------------------------------------------------------------------------------- plots


def _figure(name: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOTS[name], dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    from lit_peft.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PLOT_DPI)


def _label(job: Job, differing: list[str]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1] if k.count('.') > 1 else k}={job.override_map.get(k)}" for k in differing]
    parts = [p for p in parts if not p.endswith("=None")]
    text = f"{job.name}: {', '.join(parts)}" if parts else job.name
    return text if len(text) <= 48 else text[:45] + "..."


def smoothed(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's debiased exponential moving average (its smoothing slider), for the train-loss panel."""
    out, last = [], 0.0
    for n, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def plot_all(jobs: Sequence[Job], differing: list[str], report_dir: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    written = []
    shown = [job for job in jobs if job.scalars]

    fig = _figure("loss_curves.png")
    ax_val, ax_train = fig.subplots(1, 2)
    for job in shown:
        label = _label(job, differing)
        val = [p for p in job.scalars.get("val/loss", []) if math.isfinite(p.value)]
        if val:
            ax_val.plot([p.step for p in val], [p.value for p in val], marker="o", label=label)
        train = [p for p in job.scalars.get("train/loss", []) if math.isfinite(p.value)]
        if train:
            ax_train.plot([p.step for p in train], smoothed([p.value for p in train]), label=label)
    ax_val.set(title="held-out loss", xlabel="optimizer step", ylabel="val/loss")
    ax_train.set(title="train loss (smoothed 0.6, as TensorBoard)", xlabel="optimizer step", ylabel="train/loss")
    for ax in (ax_val, ax_train):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, report_dir / "loss_curves.png")
    written.append(report_dir / "loss_curves.png")

    fig = _figure("loss_vs_params.png")
    ax = fig.subplots()
    points = [
        (job.row.get("trainable_params"), job.row.get("val/loss after"), job)
        for job in jobs
        if job.status == "ok" and job.row.get("trainable_params") and job.row.get("val/loss after") is not None
    ]
    for x, y, job in points:
        ax.scatter([x], [y], s=30)
        ax.annotate(_label(job, differing), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if points:
        ax.set_xscale("log")
        ax.margins(x=0.2, y=0.15)
        ax.ticklabel_format(axis="y", useOffset=False)
    else:
        ax.text(0.5, 0.5, "no finished job with a held-out loss", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="final held-out loss against trainable parameters", xlabel="trainable parameters (log)")
    ax.set_ylabel("val/loss after training")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, report_dir / "loss_vs_params.png")
    written.append(report_dir / "loss_vs_params.png")

    fig = _figure("step_time.png")
    ax = fig.subplots()
    timed = [(job, step_times(job)) for job in jobs]
    timed = [(job, t) for job, t in timed if t]
    if timed:
        medians = [statistics.median(t) for _, t in timed]
        low = [m - _quantile(t, 0.25) for m, (_, t) in zip(medians, timed, strict=True)]
        high = [_quantile(t, 0.75) - m for m, (_, t) in zip(medians, timed, strict=True)]
        xs = range(len(timed))
        ax.bar(xs, medians, yerr=[low, high], capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(list(xs), [_label(job, differing) for job, _ in timed], rotation=30, ha="right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no step times logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="seconds per optimizer step (median, bars: quartiles)", ylabel="s/step")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, report_dir / "step_time.png")
    written.append(report_dir / "step_time.png")
    return written


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------------- evaluation


def eval_cache_path(folder: Path, tasks: str, limit: float | int | None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "+", ",".join(t.strip() for t in tasks.split(",") if t.strip()))
    lim = "all" if limit is None else (str(int(limit)) if float(limit).is_integer() else str(limit))
    return folder / EVAL_DIR / f"{slug}-{lim}.json"


def eval_target(folder: Path) -> tuple[str, Path] | None:
    """What eval/run.py evaluates for a job: its adapter, or the model a full fine-tuning run wrote."""
    if (folder / "adapter" / "adapter_config.json").is_file():
        return "--adapter", folder / "adapter"
    if (folder / "model" / "lit_model.pth").is_file():
        return "--checkpoint-dir", folder / "model"
    return None


def evaluate_jobs(
    jobs: Sequence[Job],
    tasks: str,
    limit: float | int | None,
    data_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    log=print,
) -> None:
    """Run eval/run.py (in this process: lm-eval is imported once) on every ok job without a cached result."""
    for job in jobs:
        if job.status != "ok" or job.folder is None:
            continue
        target = eval_target(job.folder)
        if target is None:
            job.eval_error = "no adapter/ or model/ folder to evaluate"
            continue
        cache = eval_cache_path(job.folder, tasks, limit)
        if not cache.is_file():
            log(f"evaluating {job.name}: {target[1]} on {tasks} (limit {limit})")
            try:
                results = _run_eval(target, tasks, limit, data_dir, extra_args, cache)
            except _EvalFailed as e:
                job.eval_error = str(e)
                continue
        else:
            try:
                results = json.loads(cache.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                job.eval_error = f"{cache} is unreadable; delete it to evaluate again"
                continue
        _read_accuracies(job, results)


class _EvalFailed(Exception):
    pass


def _run_eval(
    target: tuple[str, Path],
    tasks: str,
    limit: float | int | None,
    data_dir: Path | None,
    extra_args: Sequence[str],
    cache: Path,
) -> dict[str, Any]:
    import contextlib
    import runpy
    import shutil
    import tempfile

    from lit_peft.io import write_json

    root = Path(__file__).resolve().parents[1]
    cache.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=cache.parent))
    out = scratch / "out"
    argv = [target[0], str(target[1]), "--tasks", tasks, "--out", str(out), *extra_args]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    errors = io.StringIO()
    try:
        main = runpy.run_path(str(root / "eval" / "run.py"), run_name="lit_peft_report_eval")["main"]
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            try:
                report = main(argv)
            except SystemExit as e:
                lines = [ln for ln in errors.getvalue().splitlines() if ln.startswith("error: ")]
                raise _EvalFailed(
                    lines[-1][len("error: ") :] if lines else f"eval/run.py exited with {e.code}"
                ) from None
            except Exception as e:
                raise _EvalFailed(f"{type(e).__name__}: {e}") from None
        data = json.loads((out / "results.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del report
    data["report_key"] = {"tasks": tasks, "limit": limit, "data_dir": str(data_dir) if data_dir else None}
    write_json(cache, data)
    return data


def _read_accuracies(job: Job, results: dict[str, Any]) -> None:
    models = results.get("models") or {}
    model = models.get("adapter") or models.get("model") or next(iter(models.values()), {})
    samples = model.get("n-samples") or {}
    for task, metrics in (model.get("results") or {}).items():
        acc = metrics.get("acc,none")
        if not isinstance(acc, (int, float)):
            continue
        n = (samples.get(task) or {}).get("effective")
        stderr = metrics.get("acc_stderr,none")
        source = "lm-eval"
        if not (isinstance(stderr, (int, float)) and math.isfinite(stderr)):
            stderr, source = None, ""
            if isinstance(n, int) and n > 1:
                stderr, source = math.sqrt(acc * (1 - acc) / (n - 1)), "binomial"  # lm-eval's mean_stderr, 0/1 items
        job.evals[task] = (float(acc), stderr, n if isinstance(n, int) else None, source)


# ------------------------------------------------------------------------------------------------------- report


def write_report(
    folders: Sequence[str | Path],
    out_dir: str | Path | None = None,
    eval_tasks: str | None = None,
    limit: float | int | None = None,
    data_dir: str | Path | None = None,
    eval_args: Sequence[str] = (),
    stale_after_s: float = STALE_AFTER_S,
    plots: bool = True,
    log=print,
) -> Path:
    """Write report.md, report.csv and the plots into `out_dir` (default: the first folder); returns report.md."""
    from lit_peft.io import atomic_path

    folders = [Path(f) for f in folders]
    if not folders:
        raise ReportError("give at least one sweep or run folder")
    for f in folders:
        check_folder(f)
    report_dir = Path(out_dir) if out_dir is not None else folders[0]
    jobs = collect(folders, report_dir, stale_after_s)
    if eval_tasks:
        evaluate_jobs(jobs, eval_tasks, limit, Path(data_dir) if data_dir else None, eval_args, log=log)
    differing, _, _ = fill_rows(jobs)
    report_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(report_dir / REPORT_CSV) as tmp:
        tmp.write_text(csv_text(jobs))
    if plots:
        plot_all(jobs, differing, report_dir)
    md = report_dir / REPORT_MD
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(jobs, differing, folders, report_dir))
    return md
