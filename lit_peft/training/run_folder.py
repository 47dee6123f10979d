"""One owner per run folder, and what a run folder holds.

- `RunFolderLock`: a run holds an flock on `<out_dir>/.lit-peft.lock` while it lives (released by the kernel when the
  process ends, also when it is killed); a second run into the same folder is refused in one line naming the owner.
- `run_state`: what of a run a folder holds (checkpoints, exports, metrics, TensorBoard events), so that
  * a failed run never removes a folder that holds a checkpoint or an export (`holds_run_results`);
  * a run is refused a folder that holds another run's results unless it resumes that run (`resume`) or the user
    says to replace it (`overwrite=true`, which clears it first): `claim`.
- `.lit-peft-run.json` records the identity digest of the run that owns the folder, so the same command after a kill
  before the first checkpoint starts again, while another run's partial folder is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lit_peft.checkpoints.files import write_json
from lit_peft.env import host
from lit_peft.errors import UserError

LOCK_FILE = ".lit-peft.lock"
OWNER_FILE = ".lit-peft-run.json"
EXPORT_NAMES = ("adapter", "model", "lrc")  # what ExportAdapter writes (tasks name their export)
KEEP_ON_CLEAR = {LOCK_FILE, "run.log", "tokens"}  # the lock, this process's log (truncated), the content-keyed cache

METRICS_FILE = "metrics.json"
HELDOUT_FILE = "heldout_losses.json"  # {"initial"|"final": {"loss": [per-example mean], "weight": [units]}}

RUN_METRICS_KEYS = {
    "status": "'ok' for a run that finished (the only value a run writes)",
    "initial": "held-out metrics before training, {'val/loss': ..., 'val/loss_se': its standard error, 'val/ppl': ..., "
    "'val/<task metric>': ...}",
    "final": "held-out metrics after the last step, same keys",
    "held_out_examples": "size of the held-out set (examples, or pairs for DPO)",
    "steps": "optimizer steps taken (the trainer's global step)",
    "tokens": "real (non-padding) tokens trained on, all ranks",
    "wall_time_s": "seconds from the start of train() to the end of the run",
    "peak_memory_bytes": "peak memory of the job (reset when it starts: several jobs share a sweep's process)",
    "peak_memory_kind": "'cuda_max_allocated' (torch.cuda.max_memory_allocated since the job started), "
    "'cpu_job_peak_rss' (the kernel's peak resident set, reset at the job's start), 'cpu_job_sampled_rss' (sampled), "
    "or 'cpu_max_rss' (the process's lifetime peak, older runs)",
    "trainable_params": "parameters the optimizer updates",
    "total_params": "all parameters of the trained model (frozen base included)",
    "config_digest": "digest of the run's resolved settings (the resume identity)",
    "method": "method name (lora, ether, ..., full)",
    "task": "task name (sft, dpo, distill, lrc, pretrain)",
}


def write_run_metrics(out_dir: str | Path, **fields: Any) -> Path:
    """Write `<out_dir>/metrics.json` atomically at the end of a run; returns its path.

    The keys the report reads are documented in `RUN_METRICS_KEYS` (status defaults to 'ok'); other keys are kept.
    Numbers must be plain Python/JSON numbers (call float()/int() on tensors first).
    """
    data = {"status": "ok", **fields}
    path = Path(out_dir) / METRICS_FILE
    write_json(path, data)
    return path


class FolderInUse(UserError):
    keep_output = True  # the folder is another process's: never removed by this one


class FolderTaken(UserError):
    keep_output = True  # it holds another run's results


@dataclass
class RunState:
    checkpoints: list[Path] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)
    metrics: bool = False
    events: bool = False

    @property
    def results(self) -> bool:
        """Anything a run produced that would be lost or mixed: checkpoints, exports, metrics, event files."""
        return bool(self.checkpoints or self.exports or self.metrics or self.events)

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            parts.append(f"checkpoint {self.checkpoints[0]}")
        parts += [f"{p.name}/" for p in self.exports]
        if self.metrics:
            parts.append("metrics.json")
        if self.events:
            parts.append("TensorBoard events")
        return ", ".join(parts)


def run_state(out_dir: str | os.PathLike) -> RunState:
    out = Path(out_dir)
    state = RunState()
    if not out.is_dir():
        return state
    ckpt = out / "checkpoints"
    if ckpt.is_dir():
        last = ckpt / "last.ckpt"
        state.checkpoints = ([last] if last.exists() else []) + sorted(
            (p for p in ckpt.iterdir() if p.name.endswith(".ckpt") and p.name != "last.ckpt"), reverse=True
        )
    state.exports = [out / n for n in EXPORT_NAMES if (out / n).is_dir()]
    state.metrics = (out / "metrics.json").is_file()
    tb = out / "tensorboard"
    state.events = tb.is_dir() and any(tb.rglob("events.out.tfevents.*"))
    return state


def holds_run_results(path: str | os.PathLike) -> bool:
    """Whether a failed run must keep this folder: it holds a checkpoint or an export."""
    state = run_state(path)
    return bool(state.checkpoints or state.exports)


class RunFolderLock:
    """An exclusive flock on `<folder>/.lit-peft.lock` (or `name`), held until `release` or the process's end; `what`
    and `by` name the setting and the owner in the refusal (`out_dir ... is in use by another run`)."""

    def __init__(
        self, folder: str | os.PathLike, name: str = LOCK_FILE, what: str = "out_dir", by: str = "run"
    ) -> None:
        self.folder = Path(folder)
        self.name, self.what, self.by = name, what, by
        self._file: IO[str] | None = None

    def acquire(self) -> RunFolderLock:
        if self._file is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.name
        f = open(path, "a+")  # noqa: SIM115 - held open: the lock lives with it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise FolderInUse(
                f"{self.what} {self.folder} is in use by another {self.by} ({owner}); wait for it to end or choose "
                f"another {self.what}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {host()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


_HELD: dict[Path, RunFolderLock] = {}


def locked_by_another(folder: str | os.PathLike) -> bool:
    """Whether another process holds the folder's run lock (this process's own lock does not count)."""
    return not holds_lock(folder) and lock_is_held(folder)


def lock_is_held(folder: str | os.PathLike, name: str = LOCK_FILE) -> bool:
    """Whether a process holds `<folder>/<name>`'s flock (a lock file left by a process that ended is free)."""
    path = Path(folder) / name
    if not path.is_file():
        return False
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    return False


def lock_run_folder(folder: str | os.PathLike) -> RunFolderLock:
    """This process's lock on a run folder (taken once; a sweep's in-process jobs each take their own folder's)."""
    key = Path(os.path.abspath(folder))
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        lock = _HELD[key] = RunFolderLock(key).acquire()
    return lock


def release_run_folder(folder: str | os.PathLike) -> None:
    lock = _HELD.pop(Path(os.path.abspath(folder)), None)
    if lock is not None:
        lock.release()


def holds_lock(folder: str | os.PathLike) -> bool:
    lock = _HELD.get(Path(os.path.abspath(folder)))
    return lock is not None and lock.held


def owner_digest(out_dir: str | os.PathLike) -> str | None:
    try:
        return json.loads((Path(out_dir) / OWNER_FILE).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def record_owner(out_dir: str | os.PathLike, digest: str) -> None:
    from lit_peft.checkpoints.files import write_json

    write_json(Path(out_dir) / OWNER_FILE, {"identity": digest, "pid": os.getpid(), "host": host()})


def clear(out_dir: str | os.PathLike) -> None:
    """Empty a run folder for a new run (overwrite=true): everything but the lock, the token cache and run.log
    (truncated: it is this process's log file from now on)."""
    out = Path(out_dir)
    for child in out.iterdir():
        if child.name in KEEP_ON_CLEAR:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    with contextlib.suppress(OSError):
        os.truncate(out / "run.log", 0)


def claim(out_dir: str | os.PathLike, resume: object, overwrite: bool, identity_digest: str) -> str | None:
    """Decide whether this run may write into `out_dir` (its lock is held); returns a line to print, or None.

    - a checkpoint there and resume (auto/true): the caller checks its identity and resumes;
    - results there but no checkpoint to resume: the same run's earlier attempt (killed before its first checkpoint,
      same identity) is cleared and started again; another run's results are refused unless `overwrite`;
    - resume=false with results there: refused unless `overwrite`;
    - `overwrite`: the folder is cleared first.
    """
    out = Path(out_dir)
    state = run_state(out)
    resuming = resume not in (None, False, "false", "no")
    if overwrite and state.results:
        clear(out)
        line = f"overwrite=true: cleared {out} ({state.describe()})"
    elif resuming and state.checkpoints and (out / "checkpoints" / "last.ckpt").exists():
        line = None  # resume_checkpoint + check_identity decide
    elif isinstance(resume, str) and resume not in ("auto", "true", "last"):
        line = None  # resume=<path>: the folder must still be free of another run's results
        if state.results and owner_digest(out) != identity_digest:
            raise _taken(out, state)
    elif state.results:
        if resume in ("auto", None) and owner_digest(out) == identity_digest and not state.checkpoints:
            clear(out)
            line = f"{out}: this run stopped before its first checkpoint; starting it again"
        else:
            raise _taken(out, state)
    else:
        line = None
    record_owner(out, identity_digest)
    return line


def _taken(out: Path, state: RunState) -> FolderTaken:
    return FolderTaken(
        f"out_dir {out} holds another run's results ({state.describe()}); resume it with resume=auto (the same "
        "settings), replace it with overwrite=true, or choose another out_dir"
    )


HYDRA_FILES = {
    ".hydra",
    "run.log",
    "multirun.yaml",
    ".lit-peft.lock",
    ".lit-peft-run.json",
    ".lit-peft-sweep.lock",
    ".lit-peft-sweep.json",
}


class OutputFolders:
    """Remembers, before anything is written, which output folders exist; a failed run then removes exactly the
    folders it created (and parents it created that are left empty), never one that existed (a resumed out_dir)."""

    def __init__(self) -> None:
        self.existed: dict[Path, bool] = {}
        self.children: dict[Path, set[str]] = {}

    @staticmethod
    def _abs(path: str | os.PathLike) -> Path:
        return Path(os.path.abspath(os.fspath(path)))

    def remember(self, path: str | os.PathLike) -> None:
        p = self._abs(path)
        while p not in self.existed:
            self.existed[p] = p.exists()
            if self.existed[p]:
                if p.is_dir():
                    self.children[p] = {c.name for c in p.iterdir()}
                break
            p = p.parent

    def created(self, path: str | os.PathLike) -> bool:
        """True when `path` did not exist when remembered (nor did an ancestor); False when unknown."""
        p = self._abs(path)
        if p in self.existed:
            return not self.existed[p]
        parent = p.parent
        if parent in self.existed:
            return not self.existed[parent] or (parent in self.children and p.name not in self.children[parent])
        return any(not self.existed.get(a, True) for a in p.parents)

    def keep(self, *paths: str | os.PathLike | None) -> None:
        """What a finished job wrote is the user's from now on (a later job of the sweep failing keeps it)."""
        for path in paths:
            if path is not None:
                p = self._abs(path)
                for folder in (p, *p.parents):
                    if not self.existed.get(folder, False) and folder.is_dir():
                        # what it holds now is kept; a later job's new folder inside it is still that job's
                        self.children[folder] = {c.name for c in folder.iterdir()}
                    self.existed[folder] = True

    def remove_created(self, *paths: str | os.PathLike | None) -> None:
        """Remove the folders this run created, except one that holds a checkpoint or an export (once a run has
        saved something its folder is never removed) and one another live process owns (its lock is held)."""
        for path in paths:
            if path is None or not self.created(path):
                continue
            p = self._abs(path)
            if holds_run_results(p) or locked_by_another(p):
                continue
            shutil.rmtree(p, ignore_errors=True)
            parent = p.parent
            while self.created(parent) and parent.is_dir():
                left = {c.name for c in parent.iterdir()}
                if not left <= HYDRA_FILES:
                    break
                shutil.rmtree(parent, ignore_errors=True)
                parent = parent.parent


OUTPUTS = OutputFolders()
