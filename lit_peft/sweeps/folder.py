"""One sweep per sweep folder, and the same sweep command resumes its unfinished sweep in place.

- `<sweep>/.lit-peft-sweep.json` records the sweep's *command* (its overrides, canonical: order and Hydra's own
  folder settings do not count). A sweep folder holding another command's sweep is refused (`check_reuse`): two
  sweeps never share a folder, and a table never mixes their rows.
- The launching process holds an flock on `<sweep>/.lit-peft-sweep.lock` while it runs (`lock`): a second sweep into
  the same folder, e.g. two sweeps started in one second with the same explicit `hydra.sweep.dir`, is refused.
- `resumable`: rerunning a sweep command whose folder is the dated default (`multirun/<date>/<time>`) continues the
  newest *unfinished* sweep of the same command instead of starting a new folder: finished jobs are reused as they are
  (each job's run says "already finished"), stopped ones resume from their checkpoints (`resume=auto`), the ones never
  started run. `resume=false` starts a new sweep folder instead.

A sweep is finished when its last launching process wrote `sweep_end` with `complete: true` (Hydra's
`on_multirun_end`: every job ran); one stopped by a signal, a crash or a kill is unfinished.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lit_peft.env import host
from lit_peft.errors import UserError
from lit_peft.sweeps.jobs import JOBS_FILE, read_records

SWEEP_FILE = ".lit-peft-sweep.json"
SWEEP_LOCK = ".lit-peft-sweep.lock"
# Overrides that name where a sweep writes (or how its folders are named), not what it runs.
NOT_THE_COMMAND = ("hydra.sweep.dir", "hydra.run.dir", "hydra.output_subdir", "hydra.job.config.override_dirname")


class SweepFolderError(UserError):
    keep_output = True  # the folder is another sweep's: never removed by this one


def sweep_command(overrides: list[str]) -> list[str]:
    """The sweep's identity: its overrides, sorted, without the ones that only place or name its folders."""
    keep = [o for o in overrides if not o.lstrip("+~").split("=", 1)[0].startswith(NOT_THE_COMMAND)]
    return sorted(dict.fromkeys(keep))


def recorded_command(sweep: Path) -> list[str] | None:
    """The command a sweep folder holds: our record, else (a sweep from before it) Hydra's multirun.yaml."""
    try:
        return list(json.loads((sweep / SWEEP_FILE).read_text())["command"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    path = sweep / "multirun.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        try:
            task = OmegaConf.select(OmegaConf.load(path), "hydra.overrides.task", default=None)
        except Exception:
            return None
        return sweep_command([str(o) for o in task]) if task is not None else None
    return None


def holds_jobs(sweep: Path) -> bool:
    return sweep.is_dir() and (
        (sweep / JOBS_FILE).is_file() or any(p.is_dir() and (p / ".hydra").is_dir() for p in sweep.iterdir())
    )


def check_reuse(sweep: Path, command: list[str]) -> None:
    """A folder that holds another command's sweep is refused (SweepFolderError, one line)."""
    if not holds_jobs(sweep):
        return
    recorded = recorded_command(sweep)
    if recorded is None or recorded == command:
        return
    differ = sorted(set(recorded) ^ set(command))
    raise SweepFolderError(
        f"hydra.sweep.dir={sweep} holds another sweep (it ran {' '.join(recorded) or 'the defaults'}; this one differs "
        f"in {', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}); give a new hydra.sweep.dir, or run that "
        "sweep's own command to resume it"
    )


def record_command(sweep: Path, command: list[str]) -> None:
    from lit_peft.checkpoints.files import write_json

    write_json(
        sweep / SWEEP_FILE,
        {"command": command, "pid": os.getpid(), "host": host(), "time": time.time()},
    )


def finished(sweep: Path) -> bool:
    """Whether the sweep's last launching process saw every job run (`sweep_end` with complete: true)."""
    last = None
    for rec in read_records(sweep):
        if rec.get("event") == "sweep":
            last = None
        elif rec.get("event") == "sweep_end" and rec.get("pid") is not None:
            last = rec
    return bool(last and last.get("complete"))


def progress(sweep: Path) -> tuple[int, int | None]:
    """(jobs that ended ok, jobs planned or None when the sweeper plans as it goes)."""
    ok: set[Any] = set()
    planned = None
    for rec in read_records(sweep):
        if rec.get("event") == "sweep" and rec.get("jobs") is not None:
            planned = len(rec["jobs"])
        elif rec.get("event") == "start":
            ok.discard(rec.get("num"))
        elif rec.get("event") == "end" and rec.get("status") == "ok":
            ok.add(rec.get("num"))
    return len(ok), planned


def resumable(default_folder: str, command: list[str]) -> Path | None:
    """The newest unfinished sweep of `command` beside the dated default folder (`multirun/<date>/<time>`): same
    command, not finished, no live sweep holding it. None when there is none."""
    from lit_peft.training.run_folder import lock_is_held

    root = Path(default_folder).parent.parent
    if not root.is_dir():
        return None
    found = []
    for record in root.glob(f"*/*/{SWEEP_FILE}"):
        sweep = record.parent
        if recorded_command(sweep) != command or finished(sweep) or lock_is_held(sweep, SWEEP_LOCK):
            continue
        try:
            found.append((record.stat().st_mtime, str(sweep)))
        except OSError:
            continue
    return Path(max(found)[1]) if found else None


def lock(sweep: Path):
    """This process's lock on the sweep folder, held until it exits (SweepFolderError when another sweep holds it)."""
    from lit_peft.training.run_folder import FolderInUse, RunFolderLock

    try:
        return RunFolderLock(sweep, name=SWEEP_LOCK, what="hydra.sweep.dir", by="sweep").acquire()
    except FolderInUse as e:
        raise SweepFolderError(str(e)) from None
