"""The report's plots (PNG, written atomically)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from lit_peft.sweeps.jobs import PLOT_DPI, PLOTS, Job
from lit_peft.sweeps.table import step_times


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
