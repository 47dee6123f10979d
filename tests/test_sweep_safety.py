"""A sweep's bookkeeping cannot mix or lose runs: one sweep per folder, the same command resumes its unfinished sweep in
place, a stop request at any moment ends in checkpoints and a non-zero exit (workers included), and a diverged job is
a failed row while the other jobs run. Real sweeps of finetune/run.py on the tiny model, as a user starts them."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN

from lit_peft.cli import preflight as cli_preflight
from lit_peft.cli.validate import STAGES
from lit_peft.sweeps import folder as sweeps

CONF = ROOT / "lit_peft" / "conf"
FAST = [*TINY_RUN, "trainer.validate_first=false", "hydra.callbacks.sweep_report.plots=false"]


def launch(cwd: Path, tiny: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "finetune" / "run.py"), "-m", *FAST, f"model.checkpoint_dir={tiny}", *overrides],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def finish(proc: subprocess.Popen, stop_at: str | None = None, timeout: float = 300) -> tuple[int, str]:
    """Read the sweep's output to its end; SIGTERM it when a line holding `stop_at` appears."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_at is not None and stop_at in line:
            proc.send_signal(signal.SIGTERM)
            stop_at = None
    return proc.wait(timeout=timeout), "".join(lines)


def records(sweep: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]


def ends(sweep: Path) -> dict[str, dict]:
    """Each job folder's last `end` record."""
    return {r["out_dir"]: r for r in records(sweep) if r["event"] == "end"}


def sweep_folders(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in cwd.glob(f"multirun/*/*/{sweeps.SWEEP_FILE}"))


# ------------------------------------------------------------------------------------------------ one sweep per folder


def test_two_sweeps_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    import datetime

    import hydra.core.utils

    class Frozen(datetime.datetime):  # Hydra's `now` resolver reads this: both sweeps start in the same second
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 1, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_preflight, "_SWEEP_LOCKS", [])
    argv = ["-m", "model=tiny-random", "method=lora,ether"]
    try:
        first = cli_preflight.hydra_preflight(argv, CONF, "config", STAGES, cli_preflight.OutputFolders())
        second = cli_preflight.hydra_preflight(argv, CONF, "config", STAGES, cli_preflight.OutputFolders())
    finally:
        cli_preflight.release_sweep_folders()
    dirs = [next(a for a in argv if a.startswith("hydra.sweep.dir=")).split("=", 1)[1] for argv in (first, second)]
    assert dirs == ["multirun/2026-12-01/12-00-00", "multirun/2026-12-01/12-00-00-2"]  # each its own folder
    assert all((tmp_path / d / sweeps.SWEEP_FILE).is_file() for d in dirs)


def test_a_sweep_folder_in_use_or_holding_another_sweep_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_preflight, "_SWEEP_LOCKS", [])
    folder = tmp_path / "sweep"
    argv = ["-m", "model=tiny-random", "method=lora,ether", f"hydra.sweep.dir={folder}"]
    try:
        cli_preflight.hydra_preflight(argv, CONF, "config", STAGES)  # holds the folder's lock while it "runs"
        with pytest.raises(SystemExit) as e:  # a second sweep into it, same command, same time
            cli_preflight.hydra_preflight(argv, CONF, "config", STAGES, cli_preflight.OutputFolders())
        assert e.value.code == 2
        assert "is in use by another sweep" in capsys.readouterr().err
    finally:
        cli_preflight.release_sweep_folders()
    (folder / "0_method=lora" / ".hydra").mkdir(parents=True)  # it ran a job
    with pytest.raises(SystemExit) as e:  # another command into the same folder: its rows would mix
        cli_preflight.hydra_preflight(
            [*argv[:2], "method=lora,dora", argv[3]], CONF, "config", STAGES, cli_preflight.OutputFolders()
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds another sweep" in err and "method=lora,dora" in err
    # the same command may come back to it (resume in place)
    again = cli_preflight.hydra_preflight(argv, CONF, "config", STAGES, cli_preflight.OutputFolders())
    cli_preflight.release_sweep_folders()
    assert f"hydra.sweep.dir={folder}" in again


# ------------------------------------------------------------------------------------------- failures and signals


def test_a_diverged_job_is_a_failed_row_with_its_error_and_the_other_jobs_finish(tiny_checkpoint, tmp_path):
    """joblib: the NaN job used to exit its worker and kill the pool (exit 2, jobs never run)."""
    sweep = tmp_path / "sweep"
    proc = launch(
        tmp_path,
        tiny_checkpoint,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optim.lr=1e12,1e-3,2e-3",
        f"hydra.sweep.dir={sweep}",
    )
    code, out = finish(proc)
    assert code == 1, out[-3000:]  # every job ran; one failed: not a success for a scheduler
    done = ends(sweep)
    assert {k: v["status"] for k, v in done.items()} == {
        "0_optim.lr=1000000000000.0": "failed",
        "1_optim.lr=0.001": "ok",
        "2_optim.lr=0.002": "ok",
    }
    assert done["0_optim.lr=1000000000000.0"]["error"].startswith("non-finite")  # the `error:` line reached the row
    assert "1 failed" in out and "0_optim.lr=1000000000000.0: non-finite" in out
    assert [r.get("complete") for r in records(sweep) if r["event"] == "sweep_end"] == [True]
    report = (sweep / "report.md").read_text()
    assert "non-finite" in report


def test_sigterm_after_training_stops_the_sweep_with_status_3_and_the_same_command_resumes_in_place(
    tiny_checkpoint, tmp_path
):
    """During job 0's final validation (outside the training loop): exit 3 with its checkpoint, not exit 0; the
    same command then continues that sweep folder (job 0 completed from its checkpoint, job 1 run)."""
    args = ("optim.lr=1e-3,2e-3",)
    code, out = finish(launch(tmp_path, tiny_checkpoint, *args), stop_at="`Trainer.fit` stopped")
    assert code == 3, out[-3000:]
    (sweep,) = sweep_folders(tmp_path)
    assert "preempted by SIGTERM at step 4" in out and "run the same sweep command" in out
    assert {k: v["status"] for k, v in ends(sweep).items()} == {"0_optim.lr=0.001": "preempted"}
    assert (sweep / "0_optim.lr=0.001" / "checkpoints" / "last.ckpt").is_file()

    code, out = finish(launch(tmp_path, tiny_checkpoint, *args))
    assert code == 0, out[-3000:]
    assert sweep_folders(tmp_path) == [sweep]  # no second sweep folder
    assert f"resuming the unfinished sweep {sweep.relative_to(tmp_path)}" in out
    assert "finished at step 4; completing what its run did not write" in out  # job 0 was not trained again
    assert {k: v["status"] for k, v in ends(sweep).items()} == {"0_optim.lr=0.001": "ok", "1_optim.lr=0.002": "ok"}
    assert sweeps.finished(sweep)
    # once finished, the same command starts a new sweep
    assert sweeps.resumable(str(sweep), sorted(sweeps.recorded_command(sweep))) is None


def test_sigterm_as_a_job_starts_is_not_swallowed(tiny_checkpoint, tmp_path):
    code, out = finish(
        launch(tmp_path, tiny_checkpoint, "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path / 's'}"),
        stop_at="held-out set:",
    )
    assert code == 3, out[-3000:]
    assert "preempted by SIGTERM before the first checkpoint" in out
    assert "steps: 4" not in out  # it did not train on


def test_sigterm_to_a_parallel_sweep_checkpoints_every_running_job_and_leaves_no_worker(tiny_checkpoint, tmp_path):
    mark = f"lit-peft-test-{uuid.uuid4().hex}"
    sweep = tmp_path / "sweep"
    proc = launch(
        tmp_path,
        tiny_checkpoint,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optim.lr=1e-3,2e-3,3e-3,4e-3",
        "trainer.max_steps=400",
        "trainer.val_check_interval=null",
        "trainer.save_every_n_steps=1000",
        f"hydra.sweep.dir={sweep}",
        env={"LIT_PEFT_TEST_MARK": mark},
    )
    code, out = finish(proc, stop_at="parameters:")
    assert code == 3, out[-3000:]
    assert "sweep preempted by SIGTERM" in out and "run the same sweep command" in out
    status = {k: v["status"] for k, v in ends(sweep).items()}
    assert "preempted" in status.values() and "failed" not in status.values()
    for job, state in status.items():
        if state == "preempted" and "not started" not in ends(sweep)[job]["error"]:
            assert (sweep / job / "checkpoints" / "last.ckpt").is_file()  # its step was saved
    assert [r.get("complete") for r in records(sweep) if r["event"] == "sweep_end"] == [False]
    assert not _processes_marked(mark)  # no orphaned worker trains on


def _processes_marked(mark: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("LIT_PEFT_TEST_MARK") == mark:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_a_failed_optuna_trial_keeps_its_reason_and_the_study_goes_on(tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch(
        tmp_path,
        tiny_checkpoint,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0",
        "optim.lr=choice(1e12,1e-3)",
        f"hydra.sweep.dir={sweep}",
    )
    code, out = finish(proc)
    assert code == 1, out[-3000:]  # a job failed; the study still finished
    from omegaconf import OmegaConf

    best = OmegaConf.load(sweep / "optimization_results.yaml")  # default max_failure_rate=0: written all the same
    assert math.isfinite(best.best_value) and best.best_params["optim.lr"] == 1e-3
    failed = [r for r in records(sweep) if r["event"] == "end" and r["status"] == "failed"]
    assert failed and all(r["error"].startswith("non-finite") for r in failed)


# ------------------------------------------------------------------------------- settings swept beside a group


def test_a_setting_swept_beside_methods_applies_to_the_methods_that_have_it(capsys):
    """The README's `-m method=lora,ether,etherplus method.nb=1,32`: lora once, each ETHER variant at each nb."""
    from lit_peft.sweeps.sweeper import applicable

    combos = cli_preflight._sweep_combinations(["method=lora,ether,etherplus", "method.nb=1,32", "optim.lr=1e-3"], {})
    assert combos == [
        ["method=lora", "optim.lr=1e-3"],
        ["method=ether", "method.nb=1", "optim.lr=1e-3"],
        ["method=ether", "method.nb=32", "optim.lr=1e-3"],
        ["method=etherplus", "method.nb=1", "optim.lr=1e-3"],
        ["method=etherplus", "method.nb=32", "optim.lr=1e-3"],
    ]
    # a group's default choice counts when a job names none; qlora inherits lora's keys (its defaults list)
    assert applicable([["method.r=4"], ["method=ether", "method.r=4"]], default_choices={"method": "lora"}) == [
        ["method.r=4"],
        ["method=ether"],
    ]
    assert applicable([["method=qlora", "method.r=4"], ["method=oft", "method.r=4"]]) == [
        ["method=qlora", "method.r=4"],
        ["method=oft"],
    ]
    # what no method has is kept, so a misspelt setting is still refused in one line before anything runs
    with pytest.raises(SystemExit) as e:
        cli_preflight.hydra_preflight(
            ["-m", "method=lora,ether", "method.nbb=1,2"], CONF, "config", STAGES, cli_preflight.OutputFolders()
        )
    assert e.value.code == 2 and "unknown key method.nbb" in capsys.readouterr().err


def readme_sweeps() -> list[list[str]]:
    """Every `python finetune/run.py -m ...` command of the README's code blocks, as its argv (comments dropped)."""
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and line.startswith("python finetune/run.py -m "):
            commands.append(shlex.split(line, comments=True)[2:])
    return commands


@pytest.mark.parametrize("argv", readme_sweeps(), ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_sweep_passes_the_check_of_all_its_jobs(argv, tmp_path, monkeypatch):
    """Each sweep the README shows is composed and checked job by job (settings, method shapes against the model)
    as finetune/run.py does before the first job starts; nothing runs."""
    if any("../shared/data" in a for a in argv) and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent: the example reads a file from it")
    monkeypatch.setattr(cli_preflight, "_SWEEP_LOCKS", [])
    try:
        out = cli_preflight.hydra_preflight([*argv, f"hydra.sweep.dir={tmp_path / 'sweep'}"], CONF, "config", STAGES)
    finally:
        cli_preflight.release_sweep_folders()
    assert out[: len(argv)] == argv  # accepted as written


@pytest.mark.parametrize(
    "launcher, forwards",
    [
        ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", True),
        ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", True),
        ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", False),  # SLURM signals its jobs
        ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", False),  # the jobs run in this process
    ],
)
def test_a_sweep_passes_stop_requests_on_only_to_jobs_it_runs_on_this_machine(launcher, forwards, monkeypatch):
    from omegaconf import OmegaConf

    from lit_peft.sweeps.callback import SweepReport
    from lit_peft.training import signals
    from lit_peft.training.signals import SIGNALS, Preempted

    passed_on = []
    monkeypatch.setattr(signals, "signal_children", lambda sig=signal.SIGTERM: passed_on.append(sig))
    monkeypatch.setattr(SIGNALS, "received", None)
    monkeypatch.setattr(SIGNALS, "forwarding", False)
    SweepReport(enabled=False).on_multirun_start(OmegaConf.create({"hydra": {"launcher": {"_target_": launcher}}}))
    assert SIGNALS.forwarding is forwards
    if forwards:  # noted and passed on; Ctrl-C twice stops waiting for the workers
        SIGNALS.handler(signal.SIGINT, None)
        assert SIGNALS.received == "SIGINT" and passed_on == [signal.SIGTERM]
        with pytest.raises(Preempted):
            SIGNALS.handler(signal.SIGINT, None)
