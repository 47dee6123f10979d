"""What finetune/run.py needs under Hydra's launchers and sweepers (conf/hydra/, README "Sweeps").

- `job_devices`: with `hydra/launcher=joblib` (parallel local jobs) on a machine with several GPUs, each concurrent
  job gets its own GPUs instead of all of them taking GPU 0. joblib runs the jobs in worker processes it keeps for
  the sweep; the first job a worker runs claims the lowest free *slot* by locking `<sweep dir>/.gpu_slots/slot-<k>.lock`
  (an flock, released when the worker exits, also when it dies) and sets CUDA_VISIBLE_DEVICES to slot k's GPUs:
  the k-th group of `trainer.devices` GPUs among those the sweep sees (CUDA_VISIBLE_DEVICES of the sweep, or all).
  Every later job of that worker runs on the same GPUs (CUDA reads the variable once per process), and two
  concurrent jobs never share one. With more concurrent jobs than slots (hydra.launcher.n_jobs larger than the GPU
  count / trainer.devices), a worker that finds no free slot takes slot `hydra.job.num mod slots` and says so.
  Nothing changes on a machine with fewer than two GPUs, on CPU (trainer.accelerator=cpu), when trainer.devices is
  not a count (auto, a list) or when the jobs run in the launching process itself (n_jobs=1, a thread backend).
  submitit's local executor and SLURM set CUDA_VISIBLE_DEVICES themselves (hydra.launcher.gpus_per_node).
- `final_loss`: the value a job returns to the sweeper (hydra/sweeper=optuna minimizes it): the held-out loss after
  training, else the last train loss, else +inf.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

SWEEP_PID = "LIT_PEFT_SWEEP_PID"  # set by finetune/run.py in the launching process; workers inherit it

# submitit asks SLURM for its preemption signal `signal_delay_s` before the time limit (sbatch --signal) and handles
# it in the job; its default is SIGUSR2, which our runs do not handle. SIGUSR1 is the one they do (and Lightning's
# SLURM convention): during training a run checkpoints its step and requeues on it; outside training submitit's own
# handler requeues (at most max_num_timeout times). Set in the launching process, read by submitit when imported
# there, and inherited by the jobs (sbatch exports the environment).
SUBMITIT_SIGNAL = {"SUBMITIT_PREEMPT_SIGNAL": "USR1"}


def launcher_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """What the launching process sets before Hydra runs (a value the user exported wins)."""
    env[SWEEP_PID] = str(os.getpid())
    for key, value in SUBMITIT_SIGNAL.items():
        env.setdefault(key, value)


class DeviceSlots:
    """One process's claim on a GPU slot of a sweep: held (the lock file kept open) until the process exits."""

    def __init__(self, lock_dir: str | os.PathLike) -> None:
        self.lock_dir = Path(lock_dir)
        self.slot: int | None = None
        self._file: IO[str] | None = None

    def claim(self, n_slots: int) -> int | None:
        """The lowest free slot below n_slots, now held by this object; None when all are held (by others)."""
        if self.slot is not None:
            return self.slot
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n_slots):
            f = open(self.lock_dir / f"slot-{k}.lock", "a")  # noqa: SIM115 - held open: the lock lives with it
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self.slot, self._file = k, f
            return k
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
        self.slot, self._file = None, None


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device the driver reports."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # NVML: does not start CUDA in this process


def slot_gpus(gpus: list[str], per_job: int, slot: int) -> list[str]:
    """Slot k's GPUs: the k-th group of per_job among gpus (slots = len(gpus) // per_job)."""
    return gpus[slot * per_job : (slot + 1) * per_job]


_SLOTS: DeviceSlots | None = None  # this process's claim (a joblib worker keeps it for all its jobs)


def job_devices(
    *,
    launcher_target: str,
    sweep_dir: str | os.PathLike,
    job_num: int,
    devices: Any,
    accelerator: Any,
    env: MutableMapping[str, str] = os.environ,
    slots: DeviceSlots | None = None,
    cuda_started: bool | None = None,
) -> str | None:
    """Give this joblib job its own GPUs (CUDA_VISIBLE_DEVICES in `env`); returns the line to print, or None."""
    global _SLOTS
    if not launcher_target.endswith("JoblibLauncher") or str(accelerator) == "cpu":
        return None
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return None  # auto, -1 or a list: the user chose the devices
    in_worker = env.get(SWEEP_PID) not in (None, str(os.getpid()))
    if not in_worker or threading.current_thread() is not threading.main_thread():
        return None  # the job runs in the launching process (n_jobs=1) or in a thread: one environment for all
    if slots is None:
        if _SLOTS is not None and _SLOTS.slot is not None:
            return None  # this worker's GPUs were set by its first job
        _SLOTS = slots = DeviceSlots(Path(sweep_dir) / ".gpu_slots")
    gpus = visible_gpus(env)
    n_slots = len(gpus) // devices
    if len(gpus) < 2 or n_slots < 1:
        return None
    if cuda_started is None:
        import torch

        cuda_started = torch.cuda.is_initialized()
    if cuda_started:
        return f"sweep job {job_num}: CUDA already started in this process; CUDA_VISIBLE_DEVICES left as it is"
    slot = slots.claim(n_slots)
    shared = slot is None
    if shared:
        slot = job_num % n_slots
    mine = slot_gpus(gpus, devices, slot)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    note = f" (shared: more concurrent jobs than {n_slots} slots; lower hydra.launcher.n_jobs)" if shared else ""
    return f"sweep job {job_num}: GPU {','.join(mine)} (slot {slot} of {n_slots}){note}"


# ------------------------------------------------------------------------------------- sweep folder names

EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"


def job_folder_exclusions(overrides: list[str], path_keys: list[str]) -> list[str]:
    """For a `-m` sweep: the override that leaves out of each job's folder name (hydra.sweep.subdir is
    `<job number>_${hydra.job.override_dirname}`) the path-valued keys (conf/config.yaml's exclude_keys: a
    `data.path=../shared/x.json` would nest folders) and every override that is the same for all jobs, so a job's
    folder names what differs between the jobs (`3_method=ether,optim.lr=0.005`) and stays short. Returns [] when the
    user set exclude_keys or nothing is left to exclude."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(o.lstrip("+~").startswith(EXCLUDE_KEYS) for o in overrides):
        return []
    keys = list(path_keys)
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key.startswith(("hydra.", "hydra/")) or key in keys:
            continue
        if not o.is_sweep_override():
            keys.append(key)
        elif o.is_discrete_sweep() and any("/" in str(v) for v in o.sweep_string_iterator()):
            keys.append(key)  # a value with '/' would nest the job's folder; the job number tells the jobs apart
    if not keys:
        return []
    quoted = ",".join("'" + k.replace("\\", "\\\\").replace("'", "\\'") + "'" for k in keys)
    return [f"{EXCLUDE_KEYS}=[{quoted}]"]


# ------------------------------------------------------------------------------------- what a job returns


def _loss(metrics: Mapping[str, Any] | None, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if metrics and metrics.get(key) is not None:
            return float(metrics[key])
    return None


VAL_LOSS = ("val/loss", "val_loss")
TRAIN_LOSS = ("train/loss", "train_loss")


def last_scalar(log_dir: str | os.PathLike, tags: tuple[str, ...]) -> float | None:
    """The last value logged under the first of `tags` found in the TensorBoard events under log_dir."""
    if not Path(log_dir).is_dir():
        return None
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.WARNING)  # its reader logs "No path found after ..." at INFO for a folder it finished
    try:
        acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    have = set(acc.Tags().get("scalars", []))
    for tag in tags:
        if tag in have:
            events = acc.Scalars(tag)
            if events:
                return float(max(events, key=lambda e: e.step).value)
    return None


def final_loss(result: Mapping[str, Any]) -> float:
    """The job's objective for a sweeper: the held-out loss after training (val/loss), else the held-out loss the
    finished run wrote (metrics.json, for a run resumed after its end), else the last train loss (TensorBoard),
    else +inf (nothing measured: the worst value for a minimizing search)."""
    value = _loss(result.get("final"), VAL_LOSS)
    out_dir = Path(str(result.get("out_dir") or "."))
    if value is None and (out_dir / "metrics.json").is_file():
        try:
            value = _loss(json.loads((out_dir / "metrics.json").read_text()).get("final"), VAL_LOSS)
        except (OSError, ValueError, AttributeError):
            value = None
    if value is None:
        for log_dir in (result.get("log_dir"), out_dir / "tensorboard"):
            if log_dir and value is None:
                value = last_scalar(log_dir, TRAIN_LOSS)
    return math.inf if value is None else value


# ------------------------------------------------------------------------------------- ending with the sweep


def stop_children(wait_s: float = 120.0) -> int:
    """Pass a stop request on to this process's children (training.signals.signal_children: a parallel sweep's
    worker processes, each finishes its optimizer step, checkpoints it and stops) and wait up to `wait_s` for them;
    those left are killed. Returns how many children there were. A sweep that stops never leaves orphaned workers
    training on."""
    from lit_peft.training.signals import signal_children

    children = signal_children()
    if not children:
        return 0
    import psutil

    _, alive = psutil.wait_procs(children, timeout=wait_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return len(children)
