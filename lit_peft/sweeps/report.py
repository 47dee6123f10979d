"""One report per sweep: a table (report.md, report.csv) and plots of what every job of a sweep wrote.

    python scripts/report.py multirun/2026-12-01/12-00-00 [more sweep or run folders] [--eval TASKS --limit N]

Every number is read from what a job wrote, never recomputed or guessed:

- `<job>/metrics.json`, written at the end of each run (`training.run_folder.write_run_metrics`, keys in
  `RUN_METRICS_KEYS`): trainable and total parameters, optimizer steps, tokens seen, wall time, peak memory,
  held-out metrics before and after;
- the job's tensorboard events (`EventAccumulator`): the curves of the plots, the median step time and tokens/s, and
  every number above that a killed or still running job has not written to metrics.json yet (parameters, steps,
  peak memory, the latest held-out metrics);
- `<sweep>/jobs.jsonl`, kept by the Hydra callback (`lit_peft.sweeps.callback.SweepReport`): each job's start and end,
  with the one-line error of a failed job (whose folder a failed run removes) and the jobs a sweep never started;
- `<job>/.hydra/config.yaml`, resolved: every setting whose value differs between jobs becomes a column (the effective
  learning rate, method settings, data), not only the command-line overrides; jobs that differ only in `seed` form a
  group (mean ± sd over seeds, n);
- `<job>/heldout_losses.json`: per-example held-out losses, for the standard error of a job's held-out loss and the
  paired standard error of the difference between two jobs on the same held-out examples (each row's Δ to the best,
  ★, or to `--baseline`); `<sweep>/optimization_results.yaml`: an Optuna search's best trial.

A job's status is ok (metrics.json, or the callback saw it finish), failed (with its one-line error), running (its
process is alive, or for a job without a record: something written in the last `stale_after_s` seconds), killed
(neither), pending or not run (a planned job of a sweep that is still running or has stopped). Runs of different
kinds (SFT, DPO, distillation, Low-Rank Clone) share one table: a metric a job did not log is an empty cell.

`--eval TASKS --limit N` runs eval/run.py on every ok job's adapter (`<job>/adapter`) or trained model
(`<job>/model`) and adds a column per metric lm-eval reports (value ± standard error, n); results are cached in
`<job>/eval/`, keyed by the evaluated weights' content digest, the tasks, limit, few-shot setting, data dir and lm-eval
version, so a second report (and each refresh during a sweep) reuses them until the adapter changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lit_peft.sweeps.evals import evaluate_jobs
from lit_peft.sweeps.jobs import REPORT_CSV, REPORT_MD, STALE_AFTER_S, ReportError, check_folder, collect
from lit_peft.sweeps.plots import plot_all
from lit_peft.sweeps.table import REPORT_GROUPS_CSV, csv_text, fill_rows, groups_csv_text, markdown


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
    baseline: str | None = None,
    evaluator=None,
) -> Path:
    """Write report.md, report.csv, report_groups.csv and the plots into `out_dir` (default: the first folder);
    returns report.md. `baseline`: a job name or group label the Δ columns compare against (default: the best);
    `evaluator`: the eval command's main, for `eval_tasks` (sweeps.evals.evaluate_jobs)."""
    from lit_peft.checkpoints.files import atomic_path

    folders = [Path(f) for f in folders]
    if not folders:
        raise ReportError("give at least one sweep or run folder")
    for f in folders:
        check_folder(f)
    report_dir = Path(out_dir) if out_dir is not None else folders[0]
    jobs = collect(folders, report_dir, stale_after_s)
    if eval_tasks and baseline is not None:
        fill_rows(jobs, baseline)  # a baseline that names no job nor group fails before any evaluation
    if eval_tasks:
        evaluate_jobs(
            jobs, eval_tasks, limit, Path(data_dir) if data_dir else None, eval_args, log=log, evaluator=evaluator
        )
    table = fill_rows(jobs, baseline)
    report_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(report_dir / REPORT_CSV) as tmp:
        tmp.write_text(csv_text(jobs))
    with atomic_path(report_dir / REPORT_GROUPS_CSV) as tmp:
        tmp.write_text(groups_csv_text(table))
    written = plot_all(jobs, table, report_dir) if plots else []
    md = report_dir / REPORT_MD
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(jobs, table, folders, report_dir, written))
    return md
