"""`scripts/report.py --eval`: lm-eval on every finished job, cached per job by the content of what it evaluated.

A job's results live in `<job>/eval/<tasks>-<limit>[-<settings>].json`: eval/run.py's results.json plus a
`report_key`: the sha256 of the evaluated files (adapter.safetensors and adapter_config.json, or the trained model's
lit_model.pth and model_config.yaml), the tasks, the limit, the extra eval/run.py arguments (few-shot count), the
data folder and the lm-eval version. A file whose key differs from the job's current one is stale: the job is
evaluated again and the file replaced (atomically). Without --eval the report still shows every cached result whose
digest matches the job's current adapter, so the refresh after each job of a sweep keeps the accuracy columns.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lit_peft.sweeps.jobs import EVAL_DIR, EvalValue, Job, ReportError

# what eval/run.py reads for each kind of target, hashed in this order (a file that is absent is left out)
TARGET_FILES = {
    "--adapter": ("adapter.safetensors", "adapter_config.json"),
    "--checkpoint-dir": ("lit_model.pth", "model_config.yaml"),
}
BINOMIAL = {"acc", "acc_norm", "exact_match"}  # means of 0/1 item scores: sqrt(p(1-p)/(n-1)) where lm-eval gave none
_CHUNK = 1 << 20


class EvalFailed(Exception):
    """eval/run.py failed on one job (its one-line error)."""


class EvalFailure(str):
    """A log line saying that a job's evaluation failed (scripts/report.py exits non-zero after the report)."""


def task_names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def _limit(limit: float | int | None) -> int | float | None:
    return None if limit is None else (int(limit) if float(limit).is_integer() else float(limit))


def eval_cache_path(folder: Path, tasks: str, limit: float | int | None, extra_args: Sequence[str] = ()) -> Path:
    """`<job>/eval/<tasks>-<limit>.json`, with a short digest of the extra eval/run.py arguments when there are any."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "+", ",".join(task_names(tasks)))
    lim = "all" if limit is None else str(_limit(limit))
    settings = f"-{hashlib.sha256(json.dumps(list(extra_args)).encode()).hexdigest()[:8]}" if extra_args else ""
    return folder / EVAL_DIR / f"{slug}-{lim}{settings}.json"


def eval_target(folder: Path) -> tuple[str, Path] | None:
    """What eval/run.py evaluates for a job: its adapter, or the model a full fine-tuning run wrote."""
    if (folder / "adapter" / "adapter_config.json").is_file():
        return "--adapter", folder / "adapter"
    if (folder / "model" / "lit_model.pth").is_file():
        return "--checkpoint-dir", folder / "model"
    return None


# ------------------------------------------------------------------------------------------- the cache's key


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _stats(target: tuple[str, Path]) -> dict[str, list[int]]:
    """(size, mtime_ns) of each file of the target that exists."""
    out = {}
    for name in TARGET_FILES[target[0]]:
        try:
            st = os.stat(target[1] / name)
        except FileNotFoundError:
            continue
        out[name] = [st.st_size, st.st_mtime_ns]
    return out


_DIGESTS: dict[str, tuple[dict[str, list[int]], str]] = {}  # target folder -> (stats, digest) hashed in this process


def target_digest(target: tuple[str, Path], known: Sequence[dict[str, Any]] = ()) -> tuple[str, dict[str, list[int]]]:
    """sha256 of the target's files (names and bytes, streamed) and their (size, mtime_ns).

    `known`: report keys of cache files; one recorded for the same sizes and modification times gives the digest
    without reading the files again.
    """
    stats = _stats(target)
    remembered = _DIGESTS.get(str(target[1]))
    if remembered is not None and remembered[0] == stats:
        return remembered[1], stats
    for key in known:
        if key.get("files") == stats and isinstance(key.get("digest"), str):
            _DIGESTS[str(target[1])] = (stats, key["digest"])
            return key["digest"], stats
    h = hashlib.sha256()
    for name in stats:
        h.update(name.encode() + b"\0")
        with open(target[1] / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    digest = h.hexdigest()
    _DIGESTS[str(target[1])] = (stats, digest)
    return digest, stats


def cache_key(
    digest: str, tasks: str, limit: float | int | None, data_dir: Path | None, extra_args: Sequence[str]
) -> dict[str, Any]:
    """What a cached result depends on (its `report_key`, less the files' sizes and modification times)."""
    return {
        "digest": digest,
        "tasks": task_names(tasks),
        "limit": _limit(limit),
        "args": [str(a) for a in extra_args],
        "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None,
        "lm_eval": lm_eval_version(),
    }


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("report_key"), dict) else None


def _same_key(cached: dict[str, Any], key: dict[str, Any]) -> bool:
    return {k: v for k, v in cached.items() if k != "files"} == key


def read_cached_evals(job: Job) -> None:
    """Every cached result of the job's current adapter (or model) into `job.evals`, newer files over older ones."""
    if job.folder is None or not (job.folder / EVAL_DIR).is_dir():
        return
    target = eval_target(job.folder)
    if target is None:
        return
    files = sorted((job.folder / EVAL_DIR).glob("*.json"), key=lambda p: (_mtime(p), p.name))
    cached = [(p, data) for p in files if (data := _read_cache(p)) is not None]
    if not cached:
        return
    try:
        digest, _ = target_digest(target, [data["report_key"] for _, data in cached])
    except OSError:
        return
    for _, data in cached:
        if data["report_key"].get("digest") == digest:
            read_metrics(job, data)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


# ------------------------------------------------------------------------------------------- task names


@functools.cache
def _local_tasks() -> frozenset[str]:
    """Task, group and tag names of eval/tasks/ (read from the YAML files: no lm-eval index needed)."""
    from lit_peft.inference.evaluation import TASKS_DIR

    names = set()
    for path in TASKS_DIR.rglob("*.yaml"):
        names.update(re.findall(r"^(?:task|group|tag):[ \t]*([A-Za-z0-9_.\-]+)[ \t]*$", path.read_text(), re.M))
    return frozenset(names)


@functools.cache
def known_tasks(data_dir: str | None) -> frozenset[str]:
    """Every task, group and tag name lm-eval knows, with the local tasks as eval/run.py registers them."""
    from lit_peft.inference.evaluation import task_manager

    return frozenset(task_manager(data_dir).all_tasks)


def check_eval_tasks(tasks: str, data_dir: str | Path | None = None) -> list[str]:
    """The task names, or ReportError for one lm-eval does not know (with the closest valid names).

    Local names are checked against eval/tasks/ alone; lm-eval's task index (seconds to build) only for the others.
    """
    import difflib

    names = task_names(tasks)
    local = _local_tasks()
    if all(n in local for n in names):
        return names
    known = known_tasks(str(data_dir) if data_dir is not None else None) | local
    unknown = [n for n in names if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=5, cutoff=0.6)
        if close:
            valid = ", ".join(close)
        else:
            plain = sorted(n for n in local if not n.startswith("local_mmlu_"))
            valid = f"{', '.join(plain)}, or any of lm-eval's {len(known)} tasks (`lm_eval ls tasks`)"
        raise ReportError(f"unknown eval task {unknown[0]!r} (valid: {valid})")
    return names


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_jobs(
    jobs: Sequence[Job],
    tasks: str,
    limit: float | int | None,
    data_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    log=print,
    evaluator: Callable[[list[str]], dict[str, Any]] | None = None,
) -> list[Job]:
    """Run eval/run.py (in this process: lm-eval is imported once) on every ok job without a current cached result;
    returns the jobs whose evaluation failed (each also logged as an `EvalFailure` line). `evaluator` is the eval
    command's `main(argv) -> results` (lit_peft.cli.eval.main, which the report command passes in: this package sits
    below the commands and does not import them).

    The task names are checked first: ReportError before any job is evaluated.
    """
    from lit_peft.checkpoints.files import write_json

    check_eval_tasks(tasks, data_dir)
    failed: list[Job] = []

    def failure(job: Job, error: str) -> None:
        job.eval_error = error
        failed.append(job)
        log(EvalFailure(f"evaluation of {job.name} failed: {error}"))

    for job in jobs:
        if job.status != "ok" or job.folder is None:
            continue
        target = eval_target(job.folder)
        if target is None:
            failure(job, "no adapter/ or model/ folder to evaluate")
            continue
        cache = eval_cache_path(job.folder, tasks, limit, extra_args)
        cached = _read_cache(cache) if cache.is_file() else None
        try:
            digest, stats = target_digest(target, [cached["report_key"]] if cached else [])
        except OSError as e:
            failure(job, f"{target[1]} is unreadable: {e}")
            continue
        key = cache_key(digest, tasks, limit, data_dir, extra_args)
        if cached is not None and _same_key(cached["report_key"], key):
            results = cached
        else:
            log(f"evaluating {job.name}: {target[1]} on {tasks} (limit {limit})")
            try:
                results = run_eval_script(target, tasks, limit, data_dir, extra_args, cache.parent, evaluator=evaluator)
            except EvalFailed as e:
                failure(job, str(e))
                continue
            results["report_key"] = {**key, "files": stats}
            write_json(cache, results)  # atomic: a stale file is replaced in one rename
        read_metrics(job, results)
    return failed


def run_eval_script(
    target: tuple[str, Path],
    tasks: str,
    limit: float | int | None,
    data_dir: Path | None,
    extra_args: Sequence[str],
    scratch_parent: Path,
    evaluator: Callable[[list[str]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """eval/run.py's results.json for the target (run in this process, its output in a scratch folder), or
    EvalFailed with its one-line error."""
    import contextlib
    import shutil
    import tempfile

    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".eval-", dir=scratch_parent))
    out = scratch / "out"
    argv = [target[0], str(target[1]), "--tasks", tasks, "--out", str(out), *extra_args]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    errors = io.StringIO()
    try:
        if evaluator is None:
            raise EvalFailed("no evaluator given (the report command passes lit_peft.cli.eval.main)")
        main = evaluator
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except SystemExit as e:
                lines = [ln[len("error: ") :] for ln in errors.getvalue().splitlines() if ln.startswith("error: ")]
                raise EvalFailed(lines[-1] if lines else f"eval/run.py exited with {e.code}") from None
            except Exception as e:
                raise EvalFailed(f"{type(e).__name__}: {e}") from None
        return json.loads((out / "results.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_metrics(job: Job, results: dict[str, Any]) -> None:
    """Every metric lm-eval reported for each task (`<metric>,<filter>` keys) into `job.evals`, with its standard
    error (`<metric>_stderr,<filter>`) and the task's item count."""
    models = results.get("models") or {}
    model = models.get("adapter") or models.get("model") or next(iter(models.values()), {})
    samples = model.get("n-samples") or {}
    for task, metrics in (model.get("results") or {}).items():
        if not isinstance(metrics, dict):
            continue
        n = (samples.get(task) or {}).get("effective")
        n = n if isinstance(n, int) and not isinstance(n, bool) else None
        values: dict[str, EvalValue] = {}
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not _number(value):
                continue
            stderr, source = metrics.get(f"{metric}_stderr,{filt}"), "lm-eval"
            if not (_number(stderr) and math.isfinite(stderr)):
                stderr, source = None, ""
                if metric in BINOMIAL and n is not None and n > 1 and 0 <= value <= 1:
                    stderr, source = math.sqrt(value * (1 - value) / (n - 1)), "binomial"
            name = metric if filt == "none" else key
            values[name] = EvalValue(float(value), None if stderr is None else float(stderr), n, source)
        if values:
            job.evals[task] = values


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
