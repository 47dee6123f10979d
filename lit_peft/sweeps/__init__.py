"""Sweeps: the Hydra callback that keeps each job's record (callback.py) and the report built from what the jobs
wrote: jobs.py reads the folders and records, table.py makes the rows, plots.py the figures, evals.py runs lm-eval
on each finished job, report.py writes report.md, report.csv and the plots."""
