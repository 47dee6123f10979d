"""The report's numbers and tables: one row per job (report.md, report.csv)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lit_peft.sweeps.jobs import CORE_TRAIN, CORE_VAL, PLOTS, STATUSES, Job, canonical


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
