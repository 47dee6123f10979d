"""Long runs: a killed or preempted run resumes exactly; non-finite steps stop it; checkpoints are checked on resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN, run_cli
from safetensors.torch import load_file

# A few seconds on the tiny model: 20 training examples = 5 steps per epoch, so 8 steps cross an epoch boundary;
# LoRA dropout on, so the RNG streams must continue too.
BASE = [
    *TINY_RUN,
    "data.val_size=4",
    "trainer.max_steps=8",
    "trainer.val_check_interval=100",
    "trainer.validate_first=false",
    "trainer.validate_last=false",
    "trainer.deterministic=true",
    "trainer.keep_last_checkpoints=8",
]
SFT = ["data.synthetic.num_examples=24", "method.dropout=0.1"]
RUN = [*BASE, *SFT]


def losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def export(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter/adapter.safetensors" if (out / "adapter").is_dir() else "lrc/adapter.safetensors"
    return load_file(str(out / name))


def assert_same_run(resumed: Path, full: Path, first_step: int = 0) -> None:
    """Per-step training losses and the exported weights equal, bitwise (CPU, deterministic)."""
    a, b = losses(full), losses(resumed)
    assert sorted(a) == list(range(len(a))) and sorted(b) == list(range(first_step, len(a)))
    assert {k: v for k, v in b.items() if k >= first_step} == {k: v for k, v in a.items() if k >= first_step}
    wa, wb = export(full), export(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "finetune/run.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_after(args: list[str], out: Path, checkpoint: str, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start a run and send it `sig` as soon as `checkpoint` exists (a kill right after a checkpoint was written)."""
    proc = start([*args, f"out_dir={out}"])
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (out / "checkpoints" / checkpoint).is_file() and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, tmp_path_factory) -> tuple[list[str], Path]:
    args = [*RUN, f"model.checkpoint_dir={tiny_checkpoint}"]
    out = tmp_path_factory.mktemp("resume") / "full"
    res = run_cli("finetune/run.py", *args, f"out_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    return args, out


def test_a_run_killed_mid_epoch_after_a_checkpoint_resumes_exactly(full_run, tmp_path):
    args, full = full_run
    out = tmp_path / "killed"
    killed = stop_after(args, out, "step-000004.ckpt", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists() or losses(out) != losses(full)  # it really stopped early
    res = run_cli("finetune/run.py", *args, f"out_dir={out}")  # the same command: resume=auto
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(out, full)


def test_sigterm_in_the_next_epoch_checkpoints_the_step_says_how_to_resume_and_resumes_exactly(full_run, tmp_path):
    args, full = full_run
    out = tmp_path / "preempted"
    stopped = stop_after(args, out, "step-000006.ckpt", signal.SIGTERM)  # 5 steps per epoch
    assert stopped.returncode == 3, stopped.stdout[-3000:]
    line = stopped.stdout.strip().splitlines()[-1]
    assert line.startswith("preempted by SIGTERM at step ") and "run the same command to resume" in line
    step = int(line.split("at step ")[1].split(":")[0])
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    res = run_cli("finetune/run.py", *args, f"out_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(out, full)


def test_ddp_on_two_ranks_resumes_exactly(tiny_checkpoint, tmp_path):
    args = [
        *RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        "strategy=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.global_batch_size=8",
    ]
    full = tmp_path / "full"
    assert run_cli("finetune/run.py", *args, f"out_dir={full}").returncode == 0
    # What a kill after step 4 leaves: that checkpoint; both ranks resume from it.
    out = tmp_path / "resumed"
    res = run_cli("finetune/run.py", *args, f"out_dir={out}", f"resume={full / 'checkpoints' / 'step-000004.ckpt'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(out, full, first_step=4)


# ---------------------------------------------------------------- in-process runs: every task, precisions, checks


def train_in_process(tiny_checkpoint, out: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from lit_peft.training.train import train

    with initialize_config_dir(config_dir=str(ROOT / "lit_peft" / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*BASE, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out}", *overrides]
        )
    return train(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    import json

    root = tmp_path_factory.mktemp("corpus")
    text = root / "docs.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"document {i} says " + "words " * (i % 7 + 5)}) + "\n" for i in range(60))
    )
    pairs = root / "pairs.jsonl"
    rows = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"No {w}."} for w in "abcdefghijklmnopqrstuvwx"]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"text": text, "pairs": pairs}


TASKS = {
    "pretrain-streaming": lambda c: ["task=pretrain", "data=text", f"data.path={c['text']}", "data.streaming=true"],
    "dpo": lambda c: ["task=dpo", "data=pairs", f"data.path={c['pairs']}"],
    "distill": lambda c: ["task=distill", *SFT],
    "lrc": lambda c: ["task=lrc", "lrc.target_hidden_size=16", "method=full", "data.synthetic.num_examples=24"],
    "sft-bf16-true": lambda c: ["precision=bf16-true", *SFT],
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_resumes_exactly_from_a_step_checkpoint(tiny_checkpoint, tmp_path, corpus, task):
    """A run resumed from the uninterrupted run's step-3 checkpoint (what a kill after it leaves) ends the same."""
    extra = [*TASKS[task](corpus), "trainer.max_steps=6", "trainer.save_every_n_steps=3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_in_process(tiny_checkpoint, full, *extra)
    train_in_process(tiny_checkpoint, resumed, *extra, f"resume={full / 'checkpoints' / 'step-000003.ckpt'}")
    assert_same_run(resumed, full, first_step=3)


def test_resume_refuses_other_settings_and_a_finished_run_changes_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=3", "trainer.save_every_n_steps=2")
    # the last step is checkpointed although 3 is not a multiple of 2, and no last-v1.ckpt appears
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    adapter = (out / "adapter" / "adapter.safetensors").read_bytes()
    result = train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=3", "trainer.save_every_n_steps=2")
    assert result["final"] == {} and (out / "adapter" / "adapter.safetensors").read_bytes() == adapter
    with pytest.raises(ValueError, match=r"trained under other settings: method.alpha=16.0 there, 8 here"):
        train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=5", "method.alpha=8")
    with pytest.raises(ValueError, match=r"optim.lr=0.001 there, 0.01 here"):
        train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=5", "optim.lr=0.01")
    train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=4", "trainer.save_every_n_steps=2")  # may change
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step-000002.ckpt",
        "step-000004.ckpt",
    ]


def test_a_truncated_checkpoint_names_the_previous_one(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=4", "trainer.save_every_n_steps=2")
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4000])
    with pytest.raises(ValueError, match=r"last.ckpt is truncated or corrupt .*resume=.*step-000004.ckpt"):
        train_in_process(tiny_checkpoint, out, *SFT, "trainer.max_steps=6")


@pytest.mark.parametrize("skips", [0, 1])
def test_a_non_finite_step_stops_the_run_and_leaves_finite_files(tiny_checkpoint, tmp_path, skips):
    """SGD at lr 1e12: the first step makes the weights huge, the next step's gradients overflow."""
    out = tmp_path / "nan"
    args = ["optim._target_=torch.optim.SGD", "~optim.betas", "optim.lr=1e12", "trainer.save_every_n_steps=1"]
    with pytest.raises(ValueError, match=r"non-finite (gradient|loss).* at step \d+, nothing of it was saved") as e:
        train_in_process(tiny_checkpoint, out, *SFT, *args, f"trainer.max_nonfinite_skips={skips}")
    assert "the last good checkpoint is" in str(e.value) and getattr(e.value, "keep_output", False)
    if skips:
        assert "after 1 skipped step(s)" in str(e.value)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in export(out).values())


def test_a_run_stopped_at_a_non_finite_step_keeps_its_new_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "new" / "nan"
    bad = ["optim._target_=torch.optim.SGD", "~optim.betas", "optim.lr=1e12", "trainer.save_every_n_steps=1"]
    res = run_cli("finetune/run.py", *RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out}", *bad)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite") and "the last good checkpoint is" in line, res.stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()  # the failure does not remove what was trained


def test_a_signal_checkpoints_and_stops_without_a_validation_pass(tmp_path):
    """Lightning validates when should_stop is set (early stopping); a preempted job has seconds, not a val pass."""
    import os

    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lit_peft.training.resume import FinalCheckpoint, Preemption

    class Signalled(BoringModel):
        validations = 0

        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by Preemption: flag, then stop after this step
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            type(self).validations += 1
            return super().validation_step(batch, batch_idx)

    final = FinalCheckpoint(tmp_path / "last.ckpt")
    preemption = Preemption(final)
    trainer = L.Trainer(
        max_steps=10,
        val_check_interval=8,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=[final, preemption],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Signalled())
    assert preemption.signal_name == "SIGTERM" and preemption.step == 3 and trainer.global_step == 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    assert Signalled.validations == 0
    from lit_peft.training.signals import SIGNALS

    assert SIGNALS.received == "SIGTERM" and not SIGNALS.deferred  # noted in the loop, honoured at the step's end
    assert signal.getsignal(signal.SIGTERM) is not SIGNALS.handler  # Lightning put back what was there before fit
    SIGNALS.reset()
