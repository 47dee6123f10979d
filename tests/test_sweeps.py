"""Sweeps through the real Hydra plugins on the tiny model: the joblib launcher (parallel local jobs), submitit's
local executor, an Optuna search minimizing what finetune/run.py returns; and, as units, the GPU-slot rule of
parallel local jobs, the SLURM preset, job folder names, the value a job returns and each method's learning rate."""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, run_cli
from omegaconf import OmegaConf

from lit_peft.cli.launch import SWEEP_PID, DeviceSlots, final_loss, job_devices, job_folder_exclusions

CONF = ROOT / "lit_peft" / "conf"
# Two optimizer steps, no validation before training: the held-out loss after it is each job's result.
SWEEP = [*TINY_RUN, "trainer.max_steps=2", "trainer.validate_first=false", "hydra.callbacks.sweep_report.enabled=false"]


def sweep(tiny_checkpoint: Path, sweep_dir: Path, *overrides: str, env: dict | None = None):
    res = run_cli(
        "finetune/run.py",
        "-m",
        *SWEEP,
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def job_folders(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def held_out_loss(job: Path) -> float:
    """The job's last logged held-out loss, read from its TensorBoard events (not from what it returned)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(job / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tag = next(t for t in ("val/loss", "val_loss") if t in acc.Tags()["scalars"])
    return float(max(acc.Scalars(tag), key=lambda e: e.step).value)


def assert_trained(job: Path) -> None:
    assert (job / "adapter" / "adapter.safetensors").is_file() and (job / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------------- the plugins, run


def test_joblib_launcher_runs_two_jobs_in_parallel(tiny_checkpoint, tmp_path):
    # Two GPUs as far as the GPU rule can tell (CPU torch trains on the CPU regardless): each worker claims one.
    two_gpus = {"CUDA_VISIBLE_DEVICES": "0,1"}
    args = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,2e-2"]
    res = sweep(tiny_checkpoint, tmp_path, *args, env=two_gpus)
    assert "Joblib.Parallel(n_jobs=2," in res.stdout + res.stderr  # the plugin launched them, two at a time
    claimed = re.findall(r"sweep job \d: GPU (\d) \(slot \d of 2\)", res.stdout)
    assert claimed and len(set(claimed)) == len(claimed)  # a worker's first job claims a GPU no other worker holds
    jobs = job_folders(tmp_path)
    # Job folders name what differs between the jobs; the fixed overrides and the checkpoint path are left out.
    assert [j.name for j in jobs] == ["0_optim.lr=0.001", "1_optim.lr=0.02"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        j.name for j in jobs
    ]  # nothing nested
    for job in jobs:
        assert_trained(job)
    losses = [held_out_loss(j) for j in jobs]
    assert all(math.isfinite(v) for v in losses) and losses[0] != losses[1]


def test_submitit_local_launcher_runs_a_job_and_returns_its_held_out_loss(tiny_checkpoint, tmp_path):
    sweep(tiny_checkpoint, tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "method.r=4")
    (job,) = job_folders(tmp_path)
    assert job.name == "0_"  # one job: no override differs between jobs
    assert_trained(job)
    # submitit ran it in its own process and kept what the job returned: main's float, the final held-out loss.
    (result,) = (tmp_path / ".submitit").glob("*/*_result.pkl")
    with result.open("rb") as f:
        outcome, job_return = pickle.load(f)
    assert outcome == "success"
    assert isinstance(job_return.return_value, float)
    assert job_return.return_value == pytest.approx(held_out_loss(job), rel=1e-6)


def test_optuna_search_minimizes_the_final_held_out_loss(tiny_checkpoint, tmp_path):
    res = sweep(
        tiny_checkpoint,
        tmp_path,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0",
        "optim.lr=tag(log,interval(1e-3,1e-1))",
    )
    jobs = job_folders(tmp_path)
    assert len(jobs) == 3, res.stdout[-2000:]
    for job in jobs:
        assert_trained(job)
    losses = {held_out_loss(j): j for j in jobs}
    assert len(losses) == 3  # three learning rates, three results
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert best.name == "optuna"
    assert best.best_value == pytest.approx(min(losses), rel=1e-6)  # minimized, over the values the jobs logged
    overrides = OmegaConf.load(losses[min(losses)] / ".hydra" / "overrides.yaml")
    assert f"optim.lr={best.best_params['optim.lr']}" in overrides


def test_preflight_checks_a_search_space_at_both_ends(tmp_path, capsys, monkeypatch):
    from lit_peft.cli import preflight as cli_preflight
    from lit_peft.cli.validate import STAGES

    def preflight(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            cli_preflight.hydra_preflight(list(argv), CONF, "config", STAGES, cli_preflight.OutputFolders())
        assert e.value.code == 2
        return capsys.readouterr().err

    err = preflight("-m", "hydra/sweeper=optuna", "optim.lr=tag(log,interval(-1,1e-2))", "model=tiny-random")
    assert "error: optim.lr=-1.0 is not valid; expected a number > 0" in err
    err = preflight("-m", "optim.lr=interval(1e-4,1e-2)", "model=tiny-random")
    assert "the basic sweeper sweeps lists of values only" in err
    good = ["-m", "hydra/sweeper=optuna", "optim.lr=tag(log,interval(1e-4,1e-2))", "method.r=tag(int,interval(2,8))"]
    monkeypatch.chdir(tmp_path)  # the sweep's dated folder is claimed (created) in the working directory
    argv = cli_preflight.hydra_preflight(
        [*good, "model=tiny-random"], CONF, "config", STAGES, cli_preflight.OutputFolders()
    )
    assert argv[-2].startswith("hydra.sweep.dir=") and argv[-1] == "hydra.output_subdir=null"


# --------------------------------------------------------------------------- parallel local jobs: GPU slots


def test_device_slots_are_exclusive_while_held(tmp_path):
    a, b, c = DeviceSlots(tmp_path), DeviceSlots(tmp_path), DeviceSlots(tmp_path)
    assert (a.claim(2), b.claim(2)) == (0, 1)
    assert c.claim(2) is None  # both held (an flock per open file: also within one process)
    assert a.claim(2) == 0  # a holder keeps its slot
    a.release()
    assert c.claim(2) == 0


HELD: list[DeviceSlots] = []  # each test worker's claim lives as long as the worker process would


def joblib_job(tmp_path: Path, env: dict, job_num: int = 0, devices=1, **kw):
    HELD.append(DeviceSlots(tmp_path / ".gpu_slots"))
    return job_devices(
        launcher_target="hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        sweep_dir=tmp_path,
        job_num=job_num,
        devices=devices,
        accelerator=kw.pop("accelerator", "auto"),
        env=env,
        slots=HELD[-1],
        cuda_started=kw.pop("cuda_started", False),
        **kw,
    )


def worker_env(gpus: str) -> dict:
    return {"CUDA_VISIBLE_DEVICES": gpus, SWEEP_PID: str(os.getpid() + 1)}  # launched by another process


def test_each_concurrent_joblib_job_gets_its_own_gpus(tmp_path):
    envs = [worker_env("0,1,2,3") for _ in range(5)]
    lines = [joblib_job(tmp_path, env, job_num=n) for n, env in enumerate(envs)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3", "0"]
    assert lines[1] == "sweep job 1: GPU 1 (slot 1 of 4)"
    assert "shared" in lines[4] and "shared" not in lines[3]  # a fifth concurrent job shares: job 4 mod 4 slots

    two = tmp_path / "two"  # two GPUs per job (trainer.devices=2), among the GPUs the sweep was given
    envs = [worker_env("4,5,6,7") for _ in range(2)]
    for env in envs:
        joblib_job(two, env, devices=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]


@pytest.mark.parametrize(
    "change",
    [
        {"launcher_target": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"},
        {"accelerator": "cpu"},
        {"devices": "auto"},
        {"devices": [0, 1]},
        {"env": {"CUDA_VISIBLE_DEVICES": "0,1", SWEEP_PID: str(os.getpid())}},  # n_jobs=1: the launching process
        {"env": {"CUDA_VISIBLE_DEVICES": "0", SWEEP_PID: "1"}},  # one GPU
        {"env": {"CUDA_VISIBLE_DEVICES": "", SWEEP_PID: "1"}},  # none
    ],
)
def test_the_gpu_rule_leaves_other_jobs_alone(tmp_path, change):
    change = dict(change)
    env = change.pop("env", worker_env("0,1"))
    before = dict(env)
    args = dict(
        launcher_target="hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        sweep_dir=tmp_path,
        job_num=0,
        devices=1,
        accelerator="auto",
        slots=DeviceSlots(tmp_path),
        cuda_started=False,
    )
    assert job_devices(**{**args, **change}, env=env) is None
    assert env == before


def test_the_gpu_rule_does_not_change_a_process_whose_cuda_started(tmp_path):
    env = worker_env("0,1")
    line = joblib_job(tmp_path, env, cuda_started=True)
    assert "CUDA already started" in line and env["CUDA_VISIBLE_DEVICES"] == "0,1"


# ---------------------------------------------------------------------------------------- presets and names


def composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_slurm_preset_composes_with_gpus_per_job_from_trainer_devices():
    from hydra.utils import instantiate

    cfg = composed("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer.devices=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == ("gpu", 2, 2)
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] >= 1 and launcher["timeout_min"] > 0
    assert type(instantiate(cfg.hydra.launcher)).__name__ == "SlurmLauncher"


def test_slurm_launcher_submits_an_array_that_signals_sigusr1_before_the_time_limit(tmp_path):
    """No cluster: a stand-in `sbatch` keeps the script the plugin submits and refuses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$1" {tmp_path / "job.sh"}\necho "sbatch: no cluster here" >&2\nexit 1\n')
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    args = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90", "method.r=2,4"]
    res = run_cli("finetune/run.py", "-m", *SWEEP, f"hydra.sweep.dir={tmp_path / 'sweep'}", *args, env=env)
    assert res.returncode != 0 and "no cluster here" in res.stdout + res.stderr
    script = (tmp_path / "job.sh").read_text()
    for flag in ("--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=90", "--array=0-1%2"):
        assert f"#SBATCH {flag}" in script
    # What our runs checkpoint and requeue on, signal_delay_s before the limit (submitit's own default is SIGUSR2).
    assert "#SBATCH --signal=USR1@120" in script
    assert not list((tmp_path / "sweep").glob("*/adapter"))


def test_run_folders_name_the_task_and_the_method():
    assert composed("task=dpo", "data=hh_rlhf").hydra.run.dir.endswith("_dpo_lora")
    assert composed("method=etherplus").hydra.run.dir.endswith("_sft_etherplus")


def test_job_folders_leave_out_paths_and_what_every_job_shares():
    paths = ["data.path", "model.checkpoint_dir"]
    (override,) = job_folder_exclusions(
        ["model=tiny-random", "+x.y=1", "method=lora,ether", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "optim.lr=tag(log,interval(1e-4,1e-2))", "data.path=a/b.json"],
        paths,
    )  # fmt: skip
    assert (
        override == "hydra.job.config.override_dirname.exclude_keys=['data.path','model.checkpoint_dir','model','x.y']"
    )
    assert job_folder_exclusions(["a=1", "hydra.job.config.override_dirname.exclude_keys=[a]"], paths) == []
    # a swept value holding '/' would split the job's folder: that key is left out (the job number tells them apart)
    (override,) = job_folder_exclusions(["model.template=a/b,c", "method=lora,ether"], paths)
    assert override.endswith("'model.template']") and "'method'" not in override
    keys = set(composed().hydra.job.config.override_dirname.exclude_keys)  # a swept path is left out too
    assert {"data.path", "data.cache_dir", "model.checkpoint_dir", "task.teacher_checkpoint", "out_dir"} <= keys


# ------------------------------------------------------------------------- learning rates and the objective


@pytest.mark.parametrize(
    "method, lr", [("lora", 1e-3), ("qlora", 1e-3), ("oft", 1e-3), ("ether", 5e-3), ("etherplus", 5e-3),
                   ("etherplusHH", 5e-3), ("full", 5e-5)]
)  # fmt: skip
def test_each_method_trains_at_its_own_rate_unless_optim_lr_is_given(method, lr):
    assert composed(f"method={method}").optim.lr == lr
    assert composed(f"method={method}", "optim.lr=3e-4").optim.lr == 3e-4


def test_the_methods_rate_is_not_an_adapter_setting():
    from lit_peft.methods import build_settings

    _, settings = build_settings("ether", {"lr": 5e-3, "nb": 4})
    assert "lr" not in settings.to_dict() and settings.nb == 4
    with pytest.raises(ValueError, match=r"method.lr=-1 is not valid; expected a number > 0"):
        build_settings("lora", {"lr": -1})
    with pytest.raises(ValueError, match="unknown setting 'rank'"):
        build_settings("lora", {"lr": 1e-3, "rank": 4})


def test_a_job_returns_its_final_held_out_loss_else_its_last_train_loss(tmp_path):
    assert final_loss({"final": {"val/loss": 1.5, "val/ppl": 4.5}}) == 1.5
    assert final_loss({"final": {"val_loss": 2.5}}) == 2.5
    done = tmp_path / "done"  # a run resumed after its end: what it wrote when it finished
    done.mkdir()
    (done / "metrics.json").write_text('{"final": {"val/loss": 3.25}}')
    assert final_loss({"out_dir": str(done), "final": {}, "log_dir": None}) == 3.25

    from torch.utils.tensorboard import SummaryWriter

    no_val = tmp_path / "no_val"  # trainer.validate_last=false: the last train loss
    with SummaryWriter(str(no_val / "tensorboard")) as w:
        for step, loss in enumerate([4.0, 3.5, 3.0]):
            w.add_scalar("train/loss", loss, step)
    assert final_loss({"out_dir": str(no_val), "final": {}, "log_dir": str(no_val / "tensorboard")}) == 3.0
    assert final_loss({"out_dir": str(tmp_path / "nothing"), "final": {}}) == math.inf
