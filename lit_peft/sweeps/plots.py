"""The report's plots (PNG, written atomically): one colour per job, or per group of seeds, in every plot; jobs that
stopped before their end dashed, with an x where they stopped; legends beside the data, never over it."""

from __future__ import annotations

import math
import re
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lit_peft.sweeps.jobs import PLOT_DPI, PLOTS, Job
from lit_peft.sweeps.table import (
    LOSS,
    OWN_COLUMNS,
    SEED,
    UNFINISHED,
    Table,
    representative,
    same,
    step_times,
    val_points,
)

METRIC_VS = "metric_vs_{}.png"
METRIC_VS_SIZE = (8.0, 5.0)
LEGEND_FONT = 8
MARKERS = "osD^vP*Xh<>p"


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    from lit_peft.checkpoints.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PLOT_DPI)
    return path


def wrap(text: str, width: int = 36) -> str:
    """A label over several lines, never cut: the value that differs stays readable."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def smoothed(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's debiased exponential moving average (its smoothing slider), for the train-loss panel."""
    out, last = [], 0.0
    for n, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


class Style:
    """Colours assigned once, in job order (failed jobs included): per group of seeds where there are such groups,
    else per job; and the label each job and group carries in every plot."""

    def __init__(self, jobs: Sequence[Job], table: Table) -> None:
        self.table = table
        keys = list(dict.fromkeys(self.key(job) for job in jobs))
        palette = _palette(len(keys))
        self.colours = {k: palette[i] for i, k in enumerate(keys)}

    def key(self, job: Job) -> str:
        return self.table.group_of[job.name].label if self.table.seeded else job.name

    def colour(self, job: Job) -> Any:
        return self.colours[self.key(job)]

    def label(self, job: Job) -> str:
        text = self.table.labels[job.name]
        return f"{text} ({job.status})" if job.status in UNFINISHED or job.status == "running" else text


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def plot_all(jobs: Sequence[Job], table: Table, report_dir: Path) -> list[Path]:
    """loss_curves.png, loss_vs_params.png, step_time.png and metric_vs_<setting>.png for each numeric setting that
    differs; returns the paths written (an earlier report's metric_vs_*.png that no longer applies is removed)."""
    style = Style(jobs, table)
    written = [loss_curves(jobs, table, style, report_dir), loss_vs_params(jobs, table, style, report_dir)]
    written.append(step_time(jobs, style, report_dir))
    scored = {p.job.name for p in scores(jobs, table, style)}  # a plot without a point would say nothing
    keys = [k for k in numeric_settings(jobs, table) if any(k in table.settings[name] for name in scored)]
    written += [metric_vs(key, jobs, table, style, report_dir) for key in keys]
    for old in report_dir.glob(METRIC_VS.format("*")):
        if old not in written:
            old.unlink(missing_ok=True)
    return written


def _legend(fig, axes, empty: str = "nothing logged") -> None:
    """One legend for all panels, right of them (constrained layout keeps it off the data)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
        if not ax.has_data():
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    if handles:  # one column: `_size` makes the figure tall enough for it
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=LEGEND_FONT, frameon=False)


def _size(name: str, entries: int) -> tuple[float, float]:
    """The plot's size; taller where its legend or its bars need it."""
    w, h = PLOTS.get(name, METRIC_VS_SIZE)
    return w, max(h, 0.16 * entries + 1.0)


# ------------------------------------------------------------------------------------------------------ the plots


def loss_curves(jobs: Sequence[Job], table: Table, style: Style, report_dir: Path) -> Path:
    """Held-out loss at the optimizer steps it was taken and the smoothed train loss, per job; groups of seeds as
    their mean ± sd (band) over the seeds, each seed faint beside it."""
    from matplotlib.ticker import MaxNLocator

    shown = [job for job in jobs if job.scalars]
    lines = sum(wrap(style.label(j)).count("\n") + 1 for j in shown)
    fig = _figure(_size("loss_curves.png", lines))  # at most one legend line per job's label line
    ax_val, ax_train = fig.subplots(1, 2)
    for ax, curve in ((ax_val, val_points), (ax_train, _train_curve)):
        for group in table.groups:
            members = [job for job in group.jobs if job.scalars]
            if table.seeded and len(group.jobs) > 1:
                _group_curves(ax, members, curve, style, group.label, marker=ax is ax_val)
            else:
                for job in members:
                    _job_curve(ax, job, curve(job), style, faint=False, marker=ax is ax_val)
    ax_val.set(title="held-out loss", xlabel="optimizer steps done", ylabel=LOSS)
    ax_train.set(title="train loss (smoothed 0.6, as TensorBoard)", xlabel="optimizer steps done", ylabel="train/loss")
    for ax in (ax_val, ax_train):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    _legend(fig, (ax_val, ax_train))
    return _save(fig, report_dir / "loss_curves.png")


def _train_curve(job: Job) -> list[tuple[int, float]]:
    """(optimizer steps done, smoothed loss): a step's loss is logged at its index, counted from 0."""
    points = [p for p in job.scalars.get("train/loss", []) if math.isfinite(p.value)]
    return list(zip([p.step + 1 for p in points], smoothed([p.value for p in points]), strict=True))


def _job_curve(ax, job: Job, points, style: Style, faint: bool, marker: bool, label: str | None = None) -> None:
    if not points:
        return
    stopped = job.status in UNFINISHED
    xs, ys = [s for s, _ in points], [v for _, v in points]
    kwargs = dict(color=style.colour(job), linestyle="--" if stopped else "-")
    text = wrap(style.label(job)) if label is None else label
    if faint:  # a seed beside its group's mean; one that stopped early stays visible
        kwargs.update(alpha=0.7 if stopped else 0.35, linewidth=0.9)
    ax.plot(xs, ys, marker="o" if marker and not faint else None, markersize=4, label=text, **kwargs)
    if stopped:
        ax.plot(xs[-1:], ys[-1:], marker="x", markersize=9, markeredgewidth=2, color=style.colour(job))


def _group_curves(ax, members: Sequence[Job], curve, style: Style, label: str, marker: bool) -> None:
    """A group's seeds faint, their mean as a line and ± sd as a band where two or more seeds have the step."""
    finished = [job for job in members if job.status not in UNFINISHED]
    at: dict[int, list[float]] = {}
    for job in members:
        points = curve(job)
        stopped = job.status in UNFINISHED
        _job_curve(ax, job, points, style, faint=True, marker=False, label=wrap(style.label(job)) if stopped else "")
        if job in finished:
            for step, value in points:
                at.setdefault(step, []).append(value)
    if not at:
        return
    steps = sorted(at)
    means = [statistics.fmean(at[s]) for s in steps]
    colour = style.colour(members[0])
    n = len(finished)
    ax.plot(
        steps,
        means,
        color=colour,
        linewidth=2,
        marker="o" if marker else None,
        markersize=4,
        label=wrap(f"{label} (n={n}, mean ± sd)" if n > 1 else f"{label} (n=1)"),
    )
    band = [(s, statistics.fmean(at[s]), statistics.stdev(at[s])) for s in steps if len(at[s]) > 1]
    if band:
        xs, mu, sd = zip(*band, strict=True)
        ax.fill_between(
            xs,
            [m - d for m, d in zip(mu, sd, strict=True)],
            [m + d for m, d in zip(mu, sd, strict=True)],
            color=colour,
            alpha=0.2,
            linewidth=0,
        )


class Score(NamedTuple):
    """One point of a metric plot: the held-out loss after training of a job, or of a group of seeds."""

    job: Job  # its colour and settings (a group's: a member whose whole config was read)
    label: str
    loss: float
    spread: float | None  # sd over seeds, or the held-out SE
    params: int | None  # trainable parameters


def scores(jobs: Sequence[Job], table: Table, style: Style) -> list[Score]:
    """A group's mean ± sd over its finished seeds (± the held-out SE for a group of one), or each finished job's
    value ± its SE."""
    after = f"{LOSS} after"
    out = []
    if table.seeded:
        for group in table.groups:
            r = group.row
            if r.get(f"{after} mean") is None:
                continue
            n = r.get(f"{after} n") or 0
            spread = r.get(f"{after} sd") if n > 1 else r.get(f"{after} se")
            label = wrap(f"{group.label} (n={n})")
            out.append(Score(representative(group, table), label, r[f"{after} mean"], spread, r["trainable_params"]))
    else:
        for job in jobs:
            if job.status == "ok" and job.row.get(after) is not None:
                r = job.row
                out.append(Score(job, wrap(style.label(job)), r[after], r.get(f"{after} se"), r["trainable_params"]))
    return out


def _lines(points: Sequence[Score]) -> int:
    return sum(p.label.count("\n") + 1 for p in points)


def loss_vs_params(jobs: Sequence[Job], table: Table, style: Style, report_dir: Path) -> Path:
    points = [p for p in scores(jobs, table, style) if p.params]
    fig = _figure(_size("loss_vs_params.png", _lines(points)))
    ax = fig.subplots()
    for p in points:
        err = None if p.spread is None else [p.spread]
        ax.errorbar([p.params], [p.loss], yerr=err, fmt="o", color=style.colour(p.job), capsize=3, label=p.label)
    xs = [p.params for p in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    if points:
        ax.margins(x=0.15, y=0.15)
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("held-out loss after training against trainable parameters", fontsize=10)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{LOSS} after training")
    ax.grid(alpha=0.3, which="both")
    _legend(fig, [ax], empty="no finished job with a held-out loss")
    return _save(fig, report_dir / "loss_vs_params.png")


def step_time(jobs: Sequence[Job], style: Style, report_dir: Path) -> Path:
    timed = [(job, t) for job in jobs if (t := step_times(job))]
    fig = _figure(_size("step_time.png", int(2.2 * len(timed))))
    ax = fig.subplots()
    if timed:
        medians = [statistics.median(t) for _, t in timed]
        low = [m - _quantile(t, 0.25) for m, (_, t) in zip(medians, timed, strict=True)]
        high = [_quantile(t, 0.75) - m for m, (_, t) in zip(medians, timed, strict=True)]
        ys = list(range(len(timed)))
        bars = ax.barh(ys, medians, xerr=[low, high], capsize=3, color=[style.colour(j) for j, _ in timed], alpha=0.85)
        for bar, (job, _) in zip(bars, timed, strict=True):
            if job.status in UNFINISHED:
                bar.set_hatch("//")
        ax.set_yticks(ys, [wrap(style.label(job), 40) for job, _ in timed], fontsize=LEGEND_FONT)
        ax.invert_yaxis()  # the first job on top, as in the table
    else:
        ax.text(0.5, 0.5, "no step times logged", ha="center", va="center", transform=ax.transAxes)
    hatched = any(job.status in UNFINISHED for job, _ in timed)
    ax.set(title="seconds per optimizer step", xlabel="s/step: median, whiskers: quartiles")
    if hatched:
        ax.set_xlabel(ax.get_xlabel() + "; hatched: stopped before the end")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, report_dir / "step_time.png")


def numeric_settings(jobs: Sequence[Job], table: Table) -> list[str]:
    """The settings a label names that are numbers and take two or more values (learning rate, rank, ...)."""
    out = []
    for key in table.label_keys:
        if key in OWN_COLUMNS or key == SEED:
            continue
        values = [table.settings[j.name][key] for j in jobs if key in table.settings[j.name]]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if values and numbers and len({same(v) for v in values}) > 1:
            out.append(key)
    return out


def metric_vs(key: str, jobs: Sequence[Job], table: Table, style: Style, report_dir: Path) -> Path:
    """The held-out loss after training against one setting: one series (marker, grey line) per combination of the
    other settings a label names; error bars: sd over seeds, or the held-out SE."""
    from matplotlib.ticker import NullLocator

    others = [k for k in table.label_keys if k != key]
    points = [p for p in scores(jobs, table, style) if key in table.settings[p.job.name]]
    fig = _figure(_size(METRIC_VS.format(key), _lines(points) + len(points)))
    ax = fig.subplots()
    series: dict[tuple, list[tuple[float, float]]] = {}
    for p in points:
        settings = table.settings[p.job.name]
        combo = tuple(table.fmt(k, settings[k]) if k in settings else "—" for k in others)
        series.setdefault(combo, []).append((settings[key], p.loss))
        marker = MARKERS[list(series).index(combo) % len(MARKERS)]
        err = None if p.spread is None else [p.spread]
        x, colour = settings[key], style.colour(p.job)
        ax.errorbar([x], [p.loss], yerr=err, fmt=marker, color=colour, capsize=3, label=p.label, zorder=3)
    for pts in series.values():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], color="0.6", linewidth=1, zorder=2)
    xs = [table.settings[p.job.name][key] for p in points]
    log = bool(xs) and min(xs) > 0 and (key.rsplit(".", 1)[-1] == "lr" or max(xs) / min(xs) > 10)
    if log:
        ax.set_xscale("log")
    if points:
        ax.margins(x=0.1, y=0.15)
        ax.ticklabel_format(axis="y", useOffset=False)
    values = sorted(set(xs))
    if 1 < len(values) <= 12:  # the swept values themselves as ticks
        ax.set_xticks(values, [table.fmt(key, v) for v in values])
        ax.xaxis.set_minor_locator(NullLocator())
    spread = "sd over seeds" if table.seeded else "held-out SE"
    ax.set_title(f"held-out loss after training against {key}\n(error bars: {spread})", fontsize=10)
    ax.set(xlabel=f"{key}{' (log scale)' if log else ''}", ylabel=f"{LOSS} after training")
    ax.grid(alpha=0.3, which="both")
    _legend(fig, [ax], empty="no finished job with a held-out loss")
    name = METRIC_VS.format(re.sub(r"[^A-Za-z0-9._-]+", "_", key))
    return _save(fig, report_dir / name)


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
