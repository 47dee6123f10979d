"""Never lose a run: folders kept once they hold results, one owner per run folder, stop requests honoured at every
moment with exit 3, write errors classed by what happened, the run's record written only once it is accepted,
resume identity by content, and the run's RNG untouched by creating the tiny model."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, run_cli
from conftest import _run_in_process as run_in_process

RUN = [*TINY_RUN, "data.val_size=8", "data.synthetic.num_examples=24", "trainer.val_check_interval=100"]


def finetune(ckpt: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """finetune/run.py in this process (patched callables apply; a second or two instead of a new interpreter)."""
    return run_in_process("finetune/run.py", [*RUN, f"model.checkpoint_dir={ckpt}", f"out_dir={out}", *overrides], None)


def error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[-1]


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, mmap=True)["global_step"])


# ------------------------------------------------------------------------------------------- signals at every moment


def _kill_on(monkeypatch, target: str, name: str, when, sig: signal.Signals) -> None:
    """Patch `target.name` so that its first call meeting `when` sends `sig` to this process first."""
    import importlib

    try:
        owner = importlib.import_module(target)
    except ImportError:  # a class: module.Class
        module_name, _, attr = target.rpartition(".")
        owner = getattr(importlib.import_module(module_name), attr)
    original = getattr(owner, name)
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(True)
            os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _in_validation(at_step: int):
    def when(module, *args, **kwargs) -> bool:
        return not module.trainer.training and module.trainer.global_step == at_step

    return when


MOMENTS = {
    # moment: (patched callable, its condition) -- the signal arrives as that code starts
    "loading the model": ("lit_peft.training.train", "load_base", lambda *a, **k: True),
    "setting up the data": ("lit_peft.training.train", "build_datamodule", lambda *a, **k: True),
    "the first validation": ("lit_peft.training.lit_module.FineTuneModule", "validation_step", _in_validation(0)),
    "the final validation": ("lit_peft.training.lit_module.FineTuneModule", "validation_step", _in_validation(4)),
    "between the checkpoint and the export": (
        "lit_peft.training.callbacks.ExportAdapter",
        "on_train_end",
        lambda *a: True,
    ),
    "the export": ("lit_peft.training.callbacks", "save_adapter", lambda out, weights, meta: meta.get("step") == 4),
}


@pytest.mark.parametrize(
    "moment, sig",
    [
        ("loading the model", signal.SIGTERM),
        ("setting up the data", signal.SIGHUP),
        ("the first validation", signal.SIGTERM),
        ("the first validation", signal.SIGUSR1),
        ("the final validation", signal.SIGTERM),
        ("the final validation", signal.SIGINT),
        ("between the checkpoint and the export", signal.SIGTERM),
        ("the export", signal.SIGUSR1),
    ],
)
def test_a_stop_request_at_any_moment_exits_3_and_the_same_command_completes_the_run(
    tiny_checkpoint, tmp_path, monkeypatch, moment, sig
):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_on(m, *MOMENTS[moment], sig)
        stopped = finetune(tiny_checkpoint, out)
    assert stopped.returncode == 3, (moment, stopped.stdout[-2000:], stopped.stderr[-2000:])
    line = stopped.stdout.strip().splitlines()[-1]
    assert line.startswith(f"preempted by {sig.name}") and "run the same command" in line, line
    trained = (out / "checkpoints" / "last.ckpt").exists()
    assert trained == ("at step 4" in line)
    if not trained:
        assert "nothing was trained" in line
    assert out.is_dir()  # a stopped run's folder is kept (the same command uses it)
    assert not (out / "metrics.json").exists()
    res = finetune(tiny_checkpoint, out)  # the same command completes what is missing
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["steps"] == 4 and "val/loss" in metrics["final"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["step"] == 4
    assert step_of(out / "checkpoints" / "last.ckpt") == 4
    assert "summary" in res.stdout + res.stderr


def test_a_real_sigterm_during_the_first_validation_exits_3_not_0(tiny_checkpoint, tmp_path):
    """A separate process, signalled from outside while it validates before training (Lightning alone exits 0)."""
    out = tmp_path / "run"
    args = [*RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out}", "trainer.limit_val_batches=null"]
    args += ["data.val_size=400", "data.synthetic.num_examples=420", "trainer.micro_batch_size=1"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "finetune/run.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.monotonic() + 300
    log = out / "run.log"
    while proc.poll() is None and time.monotonic() < deadline:
        if log.is_file() and "held-out set" in log.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, stdout[-3000:]
    assert "preempted by SIGTERM before the first checkpoint: nothing was trained" in stdout


# ------------------------------------------------------------------------------------------------- data loss


def test_a_run_failing_after_its_first_checkpoint_keeps_its_folder_and_says_the_disk_is_full(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from safetensors import SafetensorError

    import lit_peft.checkpoints.adapter as io

    original = io.save_file

    def full(tensors, filename, *args, **kwargs):
        if filename.endswith("adapter.safetensors"):
            calls.append(filename)
            if len(calls) == 2:  # the export at step 4; the one at step 2 was written
                raise SafetensorError(
                    "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                    '"No space left on device" })'
                )
        return original(tensors, filename, *args, **kwargs)

    calls: list[str] = []
    monkeypatch.setattr(io, "save_file", full)
    out = tmp_path / "new" / "run"  # created by this run
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=6")
    line = error_line(res)
    assert res.returncode == 2
    assert "no space left on device" in line and "corrupt" not in line, line
    assert step_of(out / "checkpoints" / "last.ckpt") == 2  # the export at step 4 failed: step 2's checkpoint stays


def test_a_failed_step_checkpoint_write_is_one_line_and_the_last_checkpoint_stays(
    tiny_checkpoint, tmp_path, monkeypatch
):
    import shutil

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    original = TorchCheckpointIO.save_checkpoint
    calls: list[int] = []  # noqa: F841

    def failing(self, checkpoint, path, storage_options=None):
        calls.append(1)
        if checkpoint["global_step"] == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", failing)
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=1024))
    out = tmp_path / "run"
    res = finetune(tiny_checkpoint, out)
    line = error_line(res)
    assert res.returncode == 2 and "no space left on device" in line, line
    assert step_of(out / "checkpoints" / "last.ckpt") == 2
    assert not list((out / "checkpoints").glob(".*.tmp"))  # no half-written file left
    monkeypatch.undo()
    res = finetune(tiny_checkpoint, out)  # space freed: the same command finishes the run
    assert res.returncode == 0, res.stderr[-3000:]
    assert step_of(out / "checkpoints" / "last.ckpt") == 4


def test_max_seq_length_above_the_models_context_is_cut_and_said(tiny_checkpoint, tmp_path):
    res = finetune(tiny_checkpoint, tmp_path / "run", "data.max_seq_length=1024", "trainer.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data.max_seq_length=1024 is above the model's context of 128 tokens" in res.stdout + res.stderr


def test_a_sweep_with_one_fixed_out_dir_is_refused_before_it_starts(tiny_checkpoint, tmp_path):
    out = tmp_path / "shared"
    res = run_cli(
        "finetune/run.py", "-m", *RUN, f"model.checkpoint_dir={tiny_checkpoint}", "trainer.max_steps=2,3",
        f"out_dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert res.returncode == 2 and "is the same for jobs 0 and 1" in error_line(res)
    assert not out.exists() and not (tmp_path / "sweep").exists()


def test_a_folder_holding_another_runs_results_is_refused_unless_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert finetune(tiny_checkpoint, out, "trainer.max_steps=2").returncode == 0
    before = (out / "adapter" / "adapter.safetensors").read_bytes()
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=2", "resume=false", "seed=7")
    assert res.returncode == 2 and "holds another run's results" in error_line(res)
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == before  # untouched
    events = {p.name for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=2", "resume=false", "seed=7", "overwrite=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "overwrite=true: cleared" in res.stdout + res.stderr
    assert not events & {p.name for p in (out / "tensorboard").rglob("events.out.tfevents.*")}  # one run's events
    assert "seed: 7" in (out / ".hydra" / "config.yaml").read_text()


def test_a_folder_in_use_by_a_live_run_is_refused_and_kept(tiny_checkpoint, tmp_path):
    from lit_peft.training.run_folder import RunFolderLock

    out = tmp_path / "run"
    held = subprocess.Popen(  # another process holds the folder's run lock
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r});"
         "from lit_peft.training.run_folder import RunFolderLock; "
         f"lock = RunFolderLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert held.stdout.readline().strip() == "held"
        res = finetune(tiny_checkpoint, out)
        line = error_line(res)
        assert res.returncode == 2 and f"out_dir {out} is in use by another run (pid {held.pid}" in line, line
        assert out.is_dir() and (out / ".lit-peft.lock").is_file()  # the other run's folder is not removed
    finally:
        held.kill()
        held.wait()
    RunFolderLock(out).acquire().release()  # the lock went with the process


@pytest.mark.parametrize(
    "value, message",
    [("''", "is empty"), ("FILE", "a file is in the way"), ("FILE/sub", "is a file, not a folder")],
)
def test_unusable_out_dirs_are_one_line_errors(tiny_checkpoint, tmp_path, value, message):
    (tmp_path / "a-file").write_text("x")
    value = value.replace("FILE", str(tmp_path / "a-file"))
    res = run_cli("finetune/run.py", *RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={value}")
    assert res.returncode == 2 and message in error_line(res)
    assert not (ROOT / ".hydra").exists()


def test_an_out_dir_on_a_read_only_file_system_is_refused(monkeypatch, tmp_path):
    from lit_peft.cli import preflight as cli_preflight

    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            return os.ST_RDONLY if name == "f_flag" else getattr(self.st, name)

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)))
    with pytest.raises(ValueError, match=r"out_dir=.*/x: .* is on a read-only file system; choose a writable folder"):
        cli_preflight.check_output_folder("out_dir", str(tmp_path / "x"))


def test_two_default_folders_started_in_one_second_differ(tmp_path):
    from lit_peft.cli.preflight import claim_new_folder

    first, second = (
        claim_new_folder(str(tmp_path / "12-00-00_sft_lora")),
        claim_new_folder(str(tmp_path / "12-00-00_sft_lora")),
    )
    assert first != second and Path(first).is_dir() and Path(second).is_dir() and second.endswith("-2")


# ------------------------------------------------------------------------------------------------ wrong results


def test_a_refused_resume_and_a_finished_rerun_leave_the_runs_record_untouched(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert finetune(tiny_checkpoint, out, "trainer.max_steps=2").returncode == 0
    record = {p.name: p.read_text() for p in (out / ".hydra").iterdir()}
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=3", "method.alpha=8")
    assert res.returncode == 2 and "method.alpha=16.0 there, 8 here" in error_line(res)
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=2", "verbose=true")  # a harmless difference
    assert res.returncode == 0 and "already finished" in res.stdout + res.stderr
    assert {p.name: p.read_text() for p in (out / ".hydra").iterdir()} == record


def test_resume_is_keyed_by_the_datas_content(tiny_checkpoint, tmp_path):
    records = [{"instruction": f"Say {i}", "input": "", "output": f"{i} " * (i % 5 + 1)} for i in range(40)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    args = ["data=alpaca", f"data.path={data}", "data.max_seq_length=96"]

    def finetune(ckpt, out, *overrides):  # RUN without its synthetic data's settings
        run = [o for o in RUN if not o.startswith("data.synthetic")]
        return run_in_process(
            "finetune/run.py", [*run, f"model.checkpoint_dir={ckpt}", f"out_dir={out}", *overrides], None
        )

    res = finetune(tiny_checkpoint, out, *args, "trainer.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content: resumes
    res = finetune(tiny_checkpoint, out, *args, "trainer.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    data.write_text(json.dumps(records[:30]))  # edited under the same name: refused, naming the file
    line = error_line(finetune(tiny_checkpoint, out, *args, "trainer.max_steps=4"))
    assert "data file data.json changed since the checkpoint" in line, line


def test_a_key_a_checkpoint_predates_is_equal_to_unset_at_its_default(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert finetune(tiny_checkpoint, out, "trainer.max_steps=2").returncode == 0
    path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["lit_peft_run"]["config"]["data.shuffle"]  # as if written before data.shuffle existed
    torch.save(ckpt, path)
    assert finetune(tiny_checkpoint, out, "trainer.max_steps=3").returncode == 0  # at its default: resumes
    ckpt = torch.load(path, weights_only=True)
    del ckpt["lit_peft_run"]["config"]["data.shuffle"]
    torch.save(ckpt, path)
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=4", "data.shuffle=false")  # not at its default: refused
    assert res.returncode == 2 and "data.shuffle=<unset> there, False here" in error_line(res)


def test_creating_the_tiny_model_leaves_the_global_rng_alone(tmp_path):
    from conftest import TINY

    from lit_peft.checkpoints.hub import create_tiny_checkpoint

    torch.manual_seed(123)
    create_tiny_checkpoint(tmp_path / "tiny-random", TINY, seed=0)
    after_creation = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after_creation, torch.rand(4))


# --------------------------------------------------------------------------------------------- one-line errors


def test_a_pickle_that_calls_code_is_refused_in_one_short_line(tmp_path):
    import pickle

    from lit_peft.errors import user_error_message

    class Exec:
        def __reduce__(self):
            return (exec, ("print('pwned')",))

    messages = []
    for protocol in (2, 4):  # torch names the global it refused for protocol 2, only an opcode for 4
        path = tmp_path / f"p{protocol}" / "lit_model.pth"
        path.parent.mkdir()
        with path.open("wb") as f:
            pickle.dump({"w": Exec()}, f, protocol=protocol)
        try:
            torch.load(str(path), weights_only=True)
        except Exception as e:  # noqa: BLE001 - what torch raises is the input here
            messages.append(user_error_message(e))
    tail = "refused: only tensors and plain containers are loaded"
    assert messages[0] == f"{tmp_path / 'p2' / 'lit_model.pth'} holds more than tensors (it calls exec); {tail}"
    assert messages[1] == f"{tmp_path / 'p4' / 'lit_model.pth'} holds more than tensors; {tail}"
    message = messages[0]  # fmt: skip
    assert "\x1b" not in message and "weights_only=False" not in message


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.devices=-1", "on CPU, devices is a process count"),
        ("model.source=ftp", "model.source=ftp is not valid"),
    ],
)
def test_settings_checked_up_front(tiny_checkpoint, tmp_path, override, message):
    out = tmp_path / "run"
    res = finetune(tiny_checkpoint, out, "trainer.accelerator=cpu", override)
    assert res.returncode == 2 and message in error_line(res)
    assert not out.exists()


def test_write_failures_are_classed_by_what_happened(tmp_path):
    from lit_peft.checkpoints.files import atomic_path
    from lit_peft.errors import user_error_message

    with pytest.raises(OSError) as e, atomic_path(tmp_path / "x.json"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert user_error_message(e.value) == f"{tmp_path / 'x.json'}: read-only file system; choose a writable folder"
    assert not list(tmp_path.iterdir())  # nothing half-written left


def test_a_relative_default_checkpoint_means_the_projects_from_any_directory(tmp_path, monkeypatch):
    from lit_peft.checkpoints.hub import resolve_checkpoint_dir
    from lit_peft.paths import project_root

    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint_dir("checkpoints/tiny-random") == project_root() / "checkpoints" / "tiny-random"
    (tmp_path / "checkpoints" / "mine").mkdir(parents=True)
    assert resolve_checkpoint_dir("checkpoints/mine") == Path("checkpoints/mine")  # one here is the user's
    assert resolve_checkpoint_dir(tmp_path / "x") == tmp_path / "x"


def test_a_finished_run_killed_before_its_last_export_gets_it_from_the_same_command(tiny_checkpoint, tmp_path):
    import shutil

    out = tmp_path / "run"
    assert finetune(tiny_checkpoint, out).returncode == 0
    exported = (out / "adapter" / "adapter.safetensors").read_bytes()
    shutil.rmtree(out / "adapter")  # what a SIGKILL between the last checkpoint and the export leaves
    (out / "metrics.json").unlink()
    res = finetune(tiny_checkpoint, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "completing what its run did not write: adapter/ at step 4, metrics.json" in res.stdout + res.stderr
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == exported  # the checkpoint's weights
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
