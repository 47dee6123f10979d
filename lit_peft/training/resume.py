"""Runs that survive a kill: which checkpoint to resume, whether it belongs to this run, preemption, the final step.

The position in the data, the RNG streams, the optimizer and schedule are in every Lightning checkpoint (the loader
is stateful, data/steps.py; the module saves the RNG states). This module decides *whether and from where* to resume:
- `resume_checkpoint`: `resume=auto|true|false|<path>`; a truncated or corrupt file is a one-line error naming the
  newest older checkpoint that is whole; a checkpoint of a finished run is reported and nothing is changed.
- `run_identity` / `check_identity`: a checkpoint records what identifies its run (base checkpoint, method and its
  settings, task, data, optimizer, schedule, seed, precision); resuming under other values is refused, naming the keys.
- `Preemption`: SIGTERM, and SIGUSR1 as SLURM sends before a time limit, write a checkpoint at the current optimizer
  step and stop; with SLURM, the job is requeued.
- `FinalCheckpoint`: the last step is always checkpointed, so a finished run is recognisable and resumable.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_peft.compat import should_accumulate
from lit_peft.errors import UserError
from lit_peft.training.fsdp import is_sharded_checkpoint

# Settings a resumed run may change: how long to train, how to report, where and how to run.
RESUMABLE_CHANGES = (
    "trainer.max_steps",
    "method.lr",  # the rate a method recommends; optim.lr, the rate used, is checked
    "trainer.max_epochs",
    "trainer.save_every_n_steps",
    "trainer.keep_last_checkpoints",
    "trainer.max_nonfinite_skips",
    "trainer.log_every_n_steps",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.validate_first",
    "trainer.validate_last",
    "trainer.progress_bar",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.micro_batch_size",
    "trainer.deterministic",
    "trainer.compile",  # compiled blocks compute the same function; keys are the eager ones
    "trainer.requeue",
    "trainer.gradient_checkpointing",  # recomputes the same activations
    "strategy",
    "data.num_workers",
    "data.cache_dir",
    "data.path",  # the data's content is compared instead (data_fingerprint): a moved file is the same data
    "model.checkpoint_dir",  # the base weights are compared instead (base_fingerprint)
    "model.source",
    "model.repo_id",
    "out_dir",
    "resume",
    "overwrite",
    "verbose",
    "logger",
)


class ResumeError(UserError):
    pass


# ---------------------------------------------------------------- which checkpoint


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The kept step checkpoints (`step-000012.ckpt`), newest first."""
    return sorted(ckpt_dir.glob("step-*.ckpt"), key=lambda p: p.name, reverse=True)


def damaged(path: Path) -> str | None:
    """Why `path` is not a whole torch checkpoint (a zip archive whose members pass their CRC; for a sharded
    checkpoint folder, its metadata file and torch.distributed.checkpoint's index), or None."""
    if path.is_dir():
        from lit_peft.training.fsdp import SHARDED_METADATA

        if not (path / ".metadata").is_file():
            return "a folder without torch.distributed.checkpoint's .metadata"
        path = path / SHARDED_METADATA
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"member {bad} fails its checksum" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"


RESUME_KEYWORDS = {None: "off", False: "off", "false": "off", "no": "off", True: "last", "true": "last", "last": "last"}
RESUME_KEYWORDS["auto"] = "auto"
RESUME_VALID = "auto | true | false | the path of a .ckpt file"


def resume_mode(resume: Any) -> str:
    """What `resume=` asks for: 'off', 'last' (<out_dir>/checkpoints/last.ckpt, which must exist), 'auto' (last.ckpt
    when there is one, else a fresh start) or 'path' (a checkpoint file). Keywords match by type too (1 is no True)."""
    for keyword, mode in RESUME_KEYWORDS.items():
        if resume == keyword and type(resume) is type(keyword):
            return mode
    return "path"


def checkpoint_path(resume: Any, ckpt_dir: Path) -> Path | None:
    """The checkpoint `resume` names (last.ckpt for auto/true), whether or not it exists; None for resume=false."""
    mode = resume_mode(resume)
    if mode == "off":
        return None
    return ckpt_dir / "last.ckpt" if mode in ("last", "auto") else Path(str(resume))


def resume_checkpoint(resume: Any, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start afresh; ResumeError (one line) when it cannot be used."""
    path = checkpoint_path(resume, ckpt_dir)
    if path is None:
        return None
    if not (path.is_file() or is_sharded_checkpoint(path)):
        if resume_mode(resume) == "auto":
            return None
        raise ResumeError(f"resume={resume}: no checkpoint at {path}")
    reason = damaged(path)
    if reason:
        whole = [p for p in step_checkpoints(path.parent) if p != path and not damaged(p)]
        hint = f"resume from the previous one: resume={whole[0]}" if whole else "no older whole checkpoint is kept"
        raise ResumeError(f"checkpoint {path} is truncated or corrupt ({reason}); {hint}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents without reading its tensors into memory (memory-mapped); of a sharded checkpoint
    folder, everything but the weights and optimizer state."""
    if is_sharded_checkpoint(path):
        from lit_peft.training.fsdp import SHARDED_METADATA

        path = Path(path) / SHARDED_METADATA
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def finished(checkpoint: dict[str, Any], max_steps: int | None, max_epochs: int | None) -> bool:
    """Whether the run that wrote `checkpoint` already reached this run's end."""
    if max_steps is not None and max_steps > 0:
        return int(checkpoint.get("global_step", 0)) >= max_steps
    if max_epochs is not None:
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        return int(epochs.get("current", {}).get("completed", 0)) >= max_epochs
    return False


# ---------------------------------------------------------------- whose checkpoint


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def base_fingerprint(checkpoint_dir: Path) -> str:
    """Identifies a base checkpoint's weights without reading them all: size and the first and last MiB."""
    weights = Path(checkpoint_dir) / "lit_model.pth"
    h = hashlib.sha256()
    size = weights.stat().st_size
    h.update(str(size).encode())
    with weights.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    for name in ("model_config.yaml", "lit_peft_arch.json"):
        if (Path(checkpoint_dir) / name).is_file():
            h.update((Path(checkpoint_dir) / name).read_bytes())
    return h.hexdigest()[:16]


DIGEST_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:32]


def data_fingerprint(data: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the training data by content: for a local `data.path` (a file, or every file under a folder)
    each file's size, mtime and SHA-256; a hub name stands for itself. A file whose size and mtime equal those the
    checkpoint recorded keeps the recorded digest (not read again); any other is read and hashed."""
    source = data.get("path")
    if not source:
        return {"source": None, "files": {}}
    root = Path(str(source)).expanduser()
    if not root.exists():
        return {"source": str(source), "files": {}}  # a hub data set: its name
    before = ((previous or {}).get("data") or {}).get("files") or {}
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    out: dict[str, Any] = {}
    for f in files:
        name = f.relative_to(root).as_posix() if root.is_dir() else f.name
        st = f.stat()
        known = before.get(name) or {}
        same = known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns and known.get("sha256")
        out[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": known["sha256"] if same else None}
        if not same:
            out[name]["sha256"] = _file_digest(f)
    return {"source": "local", "files": out}


def run_identity(config: dict[str, Any], checkpoint_dir: Path, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the resolved config minus RESUMABLE_CHANGES, the base weights and
    the training data's content."""
    return {
        "config": comparable_config(config),
        "base_weights": base_fingerprint(checkpoint_dir),
        "data": data if data is not None else data_fingerprint(config.get("data") or {}),
    }


def may_change(key: str) -> bool:
    """Whether a resumed run may change this flattened setting (it or a node above it is in RESUMABLE_CHANGES)."""
    return any(key == c or key.startswith(f"{c}.") for c in RESUMABLE_CHANGES)


def comparable_config(config: dict[str, Any]) -> dict[str, str]:
    """The flattened config's settings that change a run's result (all but RESUMABLE_CHANGES), as reprs."""
    keep = {k: v for k, v in flatten(config).items() if not may_change(k) and not k.startswith("hydra")}
    return {k: repr(v) for k, v in keep.items()}


def identity_key(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity without what does not change the run (file times): what digests and comparisons use."""
    data = identity.get("data") or {}
    files = {n: {"size": f.get("size"), "sha256": f.get("sha256")} for n, f in (data.get("files") or {}).items()}
    return {**identity, "data": {"source": data.get("source"), "files": files}}


def _data_changes(before: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    if before is None:
        return []  # recorded before data identities were
    b, n = before.get("files") or {}, (now or {}).get("files") or {}
    if before.get("source") != (now or {}).get("source") and not (b and n):
        return [f"the data source differs ({before.get('source')} there, {(now or {}).get('source')} here)"]
    changes = []
    for name in sorted(set(b) | set(n)):
        if name not in n:
            changes.append(f"data file {name} is gone")
        elif name not in b:
            changes.append(f"data file {name} is new")
        elif b[name].get("sha256") != n[name].get("sha256"):
            size = b[name].get("size"), n[name].get("size")
            how = f"{size[0]} -> {size[1]} bytes" if size[0] != size[1] else "same size, other content"
            changes.append(f"data file {name} changed since the checkpoint ({how})")
    return changes


def check_identity(
    saved: dict[str, Any] | None, current: dict[str, Any], path: Path, defaults: dict[str, str] | None = None
) -> None:
    """One-line ResumeError naming what differs from what the checkpoint was trained with: settings (a key the
    checkpoint predates is equal to unset when it is at its shipped default, `defaults`), base weights, data."""
    if not saved:
        return  # written before identities were recorded
    before, now, defaults = saved.get("config", {}), current["config"], defaults or {}

    def differs(k: str) -> bool:
        if may_change(k):
            return False  # a checkpoint written when this key was still compared
        if k not in before:
            return k not in defaults or defaults[k] != now.get(k)
        return before.get(k) != now.get(k)

    differ = sorted(k for k in set(before) | set(now) if differs(k))
    parts = [f"{k}={before.get(k, '<unset>')} there, {now.get(k, '<unset>')} here" for k in differ[:3]]
    if saved.get("base_weights") != current["base_weights"]:
        parts.insert(0, "the base checkpoint's weights differ")
    data = _data_changes(identity_key(saved).get("data") if "data" in saved else None, current.get("data"))
    parts = data[:3] + parts
    if parts:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise ResumeError(
            f"checkpoint {path} was trained under other settings: {'; '.join(parts)}{more}; start a new out_dir, "
            f"or pass overwrite=true to replace that run (settings a resume may change: "
            f"{', '.join(RESUMABLE_CHANGES[:3])}, ...)"
        )


def export_step(target: Path) -> int | None:
    """The step an export folder (adapter/, model/, lrc/) was written at, from its record; None when absent."""
    import json

    for name in ("adapter_config.json", "lit_peft.json"):
        try:
            step = json.loads((Path(target) / name).read_text()).get("step")
            return int(step) if step is not None else None
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return None


def missing_outputs(out_dir: Path, export_name: str, step: int) -> list[str]:
    """What a finished run at `step` has not written (a stop between its checkpoint and its end): the export at that
    step, metrics.json."""
    import json

    missing = []
    if export_step(out_dir / export_name) != step:
        missing.append(f"{export_name}/ at step {step}")
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
        if metrics.get("status") != "ok" or metrics.get("steps") != step:
            missing.append("metrics.json")
    except (OSError, ValueError, AttributeError):
        missing.append("metrics.json and the summary")
    return missing


class RunIdentity(L.Callback):
    """Write the run's identity into every checkpoint."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_peft_run"] = self.identity


# ---------------------------------------------------------------- preemption and the final step


class FinalCheckpoint(L.Callback):
    """Checkpoint the last optimizer step (when the periodic checkpoints did not), so `last.ckpt` is the run's end."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.saved_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.saved_step = trainer.global_step

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)


class RunRecord(L.Callback):
    """What a resumed run carries over from its earlier segments: the held-out metrics before the first step (not
    measured again on resume, so the loss curve has one step 0) and the wall time spent so far."""

    def __init__(self, started: float, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {}
        self.started = started
        self.initial: dict[str, float] = dict(saved.get("initial_held_out") or {})
        self.earlier_s = float(saved.get("wall_time_s") or 0.0)

    def wall_time_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["initial_held_out"] = self.initial
        checkpoint["wall_time_s"] = self.wall_time_s()


class Preemption(L.Callback):
    """In the training loop, a stop request (training.signals: SIGTERM, SIGUSR1, SIGHUP, SIGINT) is honoured at the
    end of the optimizer step: that step is checkpointed and training stops; `signal_name` and `step` say what came.

    The decision is taken on every rank at the same step (any rank that got the signal stops all). The process-wide
    policy is installed at process start; this callback only switches it to deferred while training runs and puts
    its handlers back over Lightning's whenever a stage starts (Lightning's SIGTERM handler would turn a signal during
    validation into exit 0). Outside the loop the policy raises `Preempted` at once; the entry point exits 3.
    """

    stopped: str | None = None  # "<signal> at step N" once a run in this process stopped for a signal (sweep records)

    def __init__(self, final: FinalCheckpoint) -> None:
        self.final = final
        self.signal_name: str | None = None
        self.step: int | None = None

    @staticmethod
    def _ours() -> None:
        from lit_peft.training.signals import SIGNALS

        SIGNALS.install()  # over the handlers Lightning registered for this stage (it restores ours at teardown)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._ours()

    def on_train_start(self, trainer, pl_module) -> None:
        from lit_peft.training.signals import SIGNALS

        self._ours()
        SIGNALS.start_deferring()

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        from lit_peft.training.signals import SIGNALS

        if should_accumulate(trainer):
            return
        received = SIGNALS.received
        if not trainer.strategy.reduce_boolean_decision(received is not None, all=False):
            return
        self.signal_name, self.step = received or "a signal on another rank", trainer.global_step
        SIGNALS.received = self.signal_name
        Preemption.stopped = f"{self.signal_name} at step {self.step}"
        self.final.save(trainer)
        trainer.should_stop = True
        # Lightning validates when should_stop is set (for early stopping); a preempted job has seconds left.
        trainer.limit_val_batches = 0

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lit_peft.training.signals import SIGNALS

        SIGNALS.deferred = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        from lit_peft.training.signals import SIGNALS

        SIGNALS.deferred = False  # after on_train_end (the final checkpoint and export ran deferred); a request
        # noted meanwhile is honoured by the caller (lit_peft.training.train: SIGNALS.honour() after fit)


def requeue_slurm_job() -> bool:
    """Under SLURM, requeue this job (the requeued job runs the same command, which resumes); True if asked."""
    if not os.environ.get("SLURM_JOB_ID"):
        return False
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return subprocess.run(["scontrol", "requeue", f"{job}_{task}" if task else job], check=False).returncode == 0
