"""Fine-tune a LitGPT model: `python finetune/run.py method=lora model=smollm2-135m-instruct data=alpaca`.

Hydra composes conf/config.yaml with the method/, model/, data/, task/ and strategy/ groups; `-m` sweeps.
Every override is composed and checked (lit_peft/cli/validate.py) before Hydra writes anything: a bad one is a one-line
`error: ...` with exit status 2, and a run that fails later removes the folders it created.

`main` returns the run's final held-out loss (lit_peft.cli.launch.final_loss), the value `hydra/sweeper=optuna`
minimizes. Under `hydra/launcher=joblib` each concurrent job on a machine with several GPUs gets its own
(lit_peft.cli.launch.job_devices); conf/hydra/ holds the launcher and sweeper presets.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_peft.training.signals import PREEMPTED, SIGNALS, Preempted

SIGNALS.install()  # first: a stop request is honoured from here to the process's end (lit_peft/training/signals.py)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lit_peft.cli.args import fail  # noqa: E402
from lit_peft.cli.preflight import (  # noqa: E402
    check_group_choices,
    hydra_preflight,
    release_sweep_folders,
    run_dir_follows_out_dir,
    write_hydra_record,
)
from lit_peft.paths import CONF_DIR  # noqa: E402
from lit_peft.sweeps.callback import job_outcome  # noqa: E402
from lit_peft.training.run_folder import OUTPUTS  # noqa: E402


def _run_folders(cfg: DictConfig) -> tuple[str | None, str | None]:
    from hydra.core.hydra_config import HydraConfig

    return cfg.get("out_dir"), (HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None)


def _sweep_job_devices(cfg: DictConfig) -> None:
    """Before anything starts CUDA: a parallel local sweep job's own GPUs (lit_peft.cli.launch.job_devices)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    from lit_peft.cli.launch import job_devices

    hc = HydraConfig.get()
    line = job_devices(
        launcher_target=str(hc.launcher.get("_target_", "")),
        sweep_dir=str(hc.sweep.dir),
        job_num=int(hc.job.num),
        devices=cfg.trainer.get("devices"),
        accelerator=cfg.trainer.get("accelerator"),
    )
    if line:
        print(line, flush=True)


def _failed_trial_goes_on() -> bool:
    """An optuna search that tolerates failed trials (max_failure_rate > 0) records a failed job as a failed trial:
    the job raises an Exception (Hydra's JobReturn holds it, the callback records its message)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    sweeper = HydraConfig.get().sweeper
    return "optuna" in str(sweeper.get("_target_", "")).lower() and float(sweeper.get("max_failure_rate") or 0) > 0


class FailedTrial(RuntimeError):
    pass


def _defaults() -> dict[str, str] | None:
    """The shipped config's comparable settings for this run's group choices (training.resume.check_identity: a key
    a checkpoint predates is equal to unset at its default)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from lit_peft.training.resume import comparable_config

    if not HydraConfig.initialized():
        return None
    choices = HydraConfig.get().runtime.choices
    groups = {p.name for p in (CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra"}
    try:
        cfg = compose("config", overrides=[f"{g}={c}" for g, c in choices.items() if g in groups and c is not None])
    except Exception:  # the run's own config composed; its defaults without overrides always do, but never fail on it
        return None
    return comparable_config(OmegaConf.to_container(cfg, resolve=False))


def _given_out_dir() -> bool:
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return any(str(o).split("=", 1)[0].lstrip("+") == "out_dir" for o in overrides)


def preempted_line(p: Preempted, out_dir: str | None, given_out_dir: bool) -> str:
    """What a stopped run says: the signal, what it saved, and the command that resumes it."""
    from lit_peft.training.resume import Preemption

    if _in_sweep():  # the same sweep command continues this sweep's folder (lit_peft.sweeps.folder)
        from hydra.core.hydra_config import HydraConfig

        again = f"run the same sweep command (it continues {HydraConfig.get().sweep.dir})"
    else:
        again = "run the same command" + ("" if given_out_dir or out_dir is None else f" with out_dir={out_dir}")
    last = Path(out_dir) / "checkpoints" / "last.ckpt" if out_dir else None
    if last is not None and last.exists():
        from lit_peft.training.resume import load_checkpoint

        try:
            step = int(load_checkpoint(last).get("global_step", 0))
        except Exception:
            step = None
        Preemption.stopped = f"{p.signal_name} at step {step}"
        return f"preempted by {p.signal_name} at step {step}: checkpoint {last}; {again} to resume"
    Preemption.stopped = f"{p.signal_name} before the first checkpoint"
    return f"preempted by {p.signal_name} before the first checkpoint: nothing was trained; {again} to start again"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """One run; returns its final held-out loss (the last train loss without one; +inf when nothing was measured).

    In a `-m` sweep a job that fails (a non-finite loss, a bad data file, out of memory) is a failed job, not a failed
    sweep: its one-line error is recorded for the report (lit_peft.sweeps.callback) and it returns +inf, the worst
    value for a minimizing search, so the other jobs run; the sweep exits 1 at its end. (An optuna search with
    max_failure_rate > 0 gets a failed trial instead, with the error.) A stop request always ends the process (3)."""
    from lit_peft.cli.launch import final_loss

    SIGNALS.install()  # also in a sweep's worker process, which did not run this script's top
    if _in_worker() and SIGNALS.received:  # the sweep is stopping: this worker starts no new job
        job_outcome("preempted", f"not started: the sweep was stopped by {SIGNALS.received}")
        return float("inf")
    SIGNALS.reset()
    _sweep_job_devices(cfg)
    out_dir, _ = _run_folders(cfg)
    try:
        with fail.on_user_error(cleanup=lambda: OUTPUTS.remove_created(*_run_folders(cfg))):
            from lit_peft.cli.validate import validate_config

            validate_config(cfg)
            from lit_peft.training.train import train

            result = train(cfg, accepted=lambda: write_hydra_record(cfg.out_dir, cfg), defaults=_defaults())
    except Preempted as p:
        line = preempted_line(p, out_dir, _given_out_dir())
        print(line, flush=True)
        job_outcome("preempted", line)
        if _in_worker():  # the launching process passed the request on and ends the sweep (exit 3) once all stop
            return float("inf")
        if bool(cfg.trainer.get("requeue", True)):
            from lit_peft.training.resume import requeue_slurm_job

            requeue_slurm_job()
        raise SystemExit(PREEMPTED) from None
    except SystemExit as e:
        if not _in_sweep() or e.code in (0, PREEMPTED):
            raise
        return _failed_job(fail.last_message or f"the job exited with status {e.code}")
    except Exception as e:  # a crash of one job (a bug, out of memory): its traceback is printed, the sweep goes on
        if not _in_sweep():
            raise
        import traceback

        traceback.print_exc()
        from lit_peft.errors import one_line

        return _failed_job(f"{type(e).__name__}: {one_line(str(e))}")
    OUTPUTS.keep(*_run_folders(cfg))  # train() logged the summary block: paths of the export, checkpoint and logs
    return final_loss(result)


def _in_worker() -> bool:
    """A sweep job in a process other than the launching one (a joblib worker, a submitit job)."""
    import os

    from lit_peft.cli.launch import SWEEP_PID

    return _in_sweep() and os.environ.get(SWEEP_PID) not in (None, str(os.getpid()))


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _failed_job(error: str) -> float:
    """A sweep job that failed: recorded with its error; +inf for the sweeper (or a failed optuna trial)."""
    job_outcome("failed", error)
    if _failed_trial_goes_on():
        raise FailedTrial(error)
    return float("inf")


if __name__ == "__main__":
    from lit_peft.cli.launch import launcher_environment
    from lit_peft.cli.validate import STAGES

    launcher_environment()  # before submitit is imported: its SLURM signal is SIGUSR1; jobs know their launcher
    check_group_choices(sys.argv[1:], CONF_DIR)
    argv = run_dir_follows_out_dir(sys.argv[1:])
    argv = hydra_preflight(argv, CONF_DIR, "config", STAGES)
    if "-m" in argv or "--multirun" in argv:  # job folders name what differs between the jobs, never a path
        from omegaconf import OmegaConf

        from lit_peft.cli.launch import EXCLUDE_KEYS, job_folder_exclusions
        from lit_peft.cli.preflight import _split_argv

        path_keys = OmegaConf.select(OmegaConf.load(CONF_DIR / "config.yaml"), EXCLUDE_KEYS, default=[])
        argv = [*argv, *job_folder_exclusions(_split_argv(argv)[1], list(path_keys))]
    sys.argv = [sys.argv[0], *argv]
    from lit_peft import sweeps
    from lit_peft.cli.launch import stop_children

    try:
        main()
    except Preempted as p:  # before a job started, between the jobs of a sweep, or while its workers ran them
        stop_children()  # parallel jobs (joblib workers) checkpoint their step and end with the sweep
        print(f"preempted by {p.signal_name} outside a run: nothing of a run was lost; run the same command again")
        sys.exit(PREEMPTED)
    except SystemExit as e:
        if e.code == PREEMPTED:
            stop_children()
        raise
    finally:
        release_sweep_folders()
    sys.exit(sweeps.callback.SWEEP_EXIT)  # 1 when a job of the sweep failed (every job ran; see its report)
