"""`scripts/report.py --eval`: lm-eval on every finished job, cached per job."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_peft.sweeps.jobs import EVAL_DIR, Job


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

    root = Path(__file__).resolve().parents[2]
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
