"""One report for a sweep: report.md, report.csv and plots, from what every job wrote.

    python scripts/report.py multirun/2026-12-01/12-00-00
    python scripts/report.py multirun/<sweep> outputs/<a run> multirun/<another sweep> --out reports/compare
    python scripts/report.py multirun/<sweep> --eval local_arc_easy --limit 300 --data-dir ../shared/data

One row per job: the overrides that differ between jobs, method, task, trainable parameters (count and share),
total parameters, optimizer steps, tokens seen, median s/step and tokens/s, peak memory (CUDA max allocated, or
resident memory on CPU), wall time, held-out loss and perplexity before and after, each task's own metrics (DPO
reward accuracy and margin, KD and CE for distillation, clone losses for LRC) and a status: ok, failed (with its
one-line error), running, killed, pending or not run. Plots: held-out loss against step for every job (train loss
smoothed beside it), final held-out loss against trainable parameters, and s/step per job.

Everything is read from the jobs' metrics.json, tensorboard events and the sweep's jobs.jsonl (kept by the Hydra
callback that also writes this report at the end of every `finetune/run.py -m` sweep); nothing is recomputed.
--eval runs eval/run.py on every ok job's adapter (or trained model) and adds a column for every metric lm-eval
reports (acc, acc_norm, ...; ± standard error), cached per job in <job>/eval/<tasks>-<limit>.json and used again
while the adapter's content, the tasks, the limit, the few-shot count, the data folder and lm-eval's version are the
same; the report shows them without --eval too. The task names are checked before any job is evaluated (exit 2);
if a job's evaluation fails, the report says so and the exit status is 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_peft.cli.args import ArgumentParser, existing_dir, fail, non_negative_int, positive_float


def limit_value(text: str) -> float | int:
    """--limit: a whole count of items (>= 1) or a fraction in (0, 1), as eval/run.py takes it."""
    value = positive_float(text)
    if value >= 1 and not value.is_integer():
        import argparse

        raise argparse.ArgumentTypeError(f"{text} is not valid; expected a whole count >= 1 or a fraction in (0, 1)")
    return int(value) if value >= 1 else value


limit_value.__name__ = "a whole count >= 1 or a fraction in (0, 1)"


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(description=__doc__)
    p.add_argument("folders", nargs="+", type=Path, help="sweep folders (multirun/...) and/or run folders")
    p.add_argument("--out", type=existing_dir, help="folder for the report (default: the first folder given)")
    p.add_argument("--eval", metavar="TASKS", help="evaluate every ok job on these lm-eval tasks (comma-separated)")
    p.add_argument("--limit", type=limit_value, help="items per evaluation task (with --eval)")
    p.add_argument("--data-dir", type=existing_dir, help="folder the local evaluation tasks read (../shared/data)")
    p.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples per question (default: the task's)")
    p.add_argument(
        "--stale-after",
        type=positive_float,
        default=15.0,
        metavar="MINUTES",
        help="a job without a process record that wrote nothing for this long is reported as killed (default 15)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--baseline",
        metavar="JOB_OR_GROUP",
        help="the job name or group label (as in report.md) the Δ columns compare against (default: the best row)",
    )
    args = p.parse_args(argv)
    if args.eval is not None and not [t for t in args.eval.split(",") if t.strip()]:
        p.error(f"--eval {args.eval!r} names no task; give comma-separated task names, e.g. local_arc_easy")
    if args.eval is None and (args.limit is not None or args.data_dir is not None or args.num_fewshot is not None):
        p.error("--limit, --data-dir and --num-fewshot apply to --eval; add --eval TASKS")

    from lit_peft.cli.eval import main as eval_main
    from lit_peft.sweeps.evals import EvalFailure, check_eval_tasks
    from lit_peft.sweeps.jobs import ReportError, check_folder
    from lit_peft.sweeps.report import write_report

    try:
        for folder in args.folders:
            check_folder(folder)
    except ReportError as e:
        fail.exit(str(e))
    failures: list[str] = []

    def log(line: str) -> None:
        if isinstance(line, EvalFailure):
            failures.append(line)
            print(f"warning: {line}", file=sys.stderr, flush=True)
        else:
            print(line, flush=True)

    with fail.on_user_error():
        if args.eval is not None:
            check_eval_tasks(args.eval, args.data_dir)  # before any job is read or evaluated
        md = write_report(
            args.folders,
            out_dir=args.out,
            eval_tasks=args.eval,
            evaluator=eval_main,
            limit=args.limit,
            data_dir=args.data_dir,
            eval_args=[] if args.num_fewshot is None else ["--num-fewshot", str(args.num_fewshot)],
            stale_after_s=args.stale_after * 60,
            plots=not args.no_plots,
            baseline=args.baseline,
            log=log,
        )
    print(f"report: {md}\ntable: {md.with_suffix('.csv')}")
    if failures:
        fail.exit(f"the evaluation of {len(failures)} job(s) failed (listed in {md}): {failures[0]}", code=1)
    return md


if __name__ == "__main__":
    main()
