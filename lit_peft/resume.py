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
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_peft.strategies import is_sharded_checkpoint

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
    "strategy",
    "data.num_workers",
    "data.cache_dir",
    "out_dir",
    "resume",
    "logger",
)


class ResumeError(ValueError):
    pass


# ---------------------------------------------------------------- which checkpoint


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The kept step checkpoints (`step-000012.ckpt`), newest first."""
    return sorted(ckpt_dir.glob("step-*.ckpt"), key=lambda p: p.name, reverse=True)


def damaged(path: Path) -> str | None:
    """Why `path` is not a whole torch checkpoint (a zip archive whose members pass their CRC; for a sharded
    checkpoint folder, its metadata file and torch.distributed.checkpoint's index), or None."""
    if path.is_dir():
        from lit_peft.strategies import SHARDED_METADATA

        if not (path / ".metadata").is_file():
            return "a folder without torch.distributed.checkpoint's .metadata"
        path = path / SHARDED_METADATA
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return f"member {bad} fails its checksum" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"


def resume_checkpoint(resume: Any, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start afresh; ResumeError (one line) when it cannot be used."""
    if resume in (None, False, "false", "no"):
        return None
    path = ckpt_dir / "last.ckpt" if resume in (True, "true", "last", "auto") else Path(str(resume))
    if not (path.is_file() or is_sharded_checkpoint(path)):
        if resume == "auto":
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
        from lit_peft.strategies import SHARDED_METADATA

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


def run_identity(config: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the resolved config minus RESUMABLE_CHANGES, and the base."""
    keep = {
        k: v
        for k, v in flatten(config).items()
        if not any(k == c or k.startswith(f"{c}.") for c in RESUMABLE_CHANGES) and not k.startswith("hydra")
    }
    return {"config": {k: repr(v) for k, v in keep.items()}, "base_weights": base_fingerprint(checkpoint_dir)}


def check_identity(saved: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """One-line ResumeError naming the settings that differ from those the checkpoint was trained with."""
    if not saved:
        return  # written before identities were recorded
    before, now = saved.get("config", {}), current["config"]
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    parts = [f"{k}={before.get(k, '<unset>')} there, {now.get(k, '<unset>')} here" for k in differ[:3]]
    if saved.get("base_weights") != current["base_weights"]:
        parts.insert(0, "the base checkpoint's weights differ")
    if parts:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise ResumeError(
            f"checkpoint {path} was trained under other settings: {'; '.join(parts)}{more}; start a new out_dir or "
            f"pass resume=false (settings a resume may change: {', '.join(RESUMABLE_CHANGES[:3])}, ...)"
        )


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
    """SIGTERM / SIGUSR1: finish the current optimizer step, checkpoint it, stop; `signal_name` says what came.

    The decision is taken on every rank at the same step (any rank that got the signal stops all). Under SLURM
    (SLURM_JOB_ID set) with `requeue`, global rank 0 requeues the job after the checkpoint is written, as Lightning's
    SLURM environment does; the requeued job runs the same command, which resumes (resume=auto).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")
    stopped: str | None = None  # "<signal> at step N" once a run in this process stopped for a signal (sweep records)

    def __init__(self, final: FinalCheckpoint, requeue: bool = True) -> None:
        self.final, self.requeue = final, requeue
        self.received: str | None = None
        self.signal_name: str | None = None
        self.step: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's own handlers are installed (at trainer start), so these take precedence.
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        self.signal_name, self.step = self.received or "a signal on another rank", trainer.global_step
        Preemption.stopped = f"{self.signal_name} at step {self.step}"
        self.final.save(trainer)
        trainer.should_stop = True
        # Lightning validates when should_stop is set (for early stopping); a preempted job has seconds left.
        trainer.limit_val_batches = 0
        if self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            subprocess.run(["scontrol", "requeue", f"{job}_{task}" if task else job], check=False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
