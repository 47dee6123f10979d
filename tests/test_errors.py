"""One user-error type: what the error path turns into one line, and what it leaves a traceback (a bug)."""

from __future__ import annotations

import errno

import pytest
from conftest import run_cli

from lit_peft.checkpoints.files import CheckpointNotFound
from lit_peft.data.formats import DataError
from lit_peft.errors import ConfigError, UserError, user_error_message
from lit_peft.training.resume import ResumeError
from lit_peft.training.run_folder import FolderInUse


@pytest.mark.parametrize("error", [UserError, ConfigError, DataError, ResumeError, FolderInUse, CheckpointNotFound])
def test_every_user_error_is_one_line(error):
    assert user_error_message(error("data.path=x: no such file\n  detail")) == "data.path=x: no such file; detail"


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback():
    assert user_error_message(ValueError("shape mismatch in matmul")) is None
    assert user_error_message(KeyError("x")) is None


def test_library_errors_about_the_users_files_are_one_line():
    assert user_error_message(OSError(errno.ENOSPC, "No space", "/out")) == (
        "/out: no space left on device; free some space and run the same command again"
    )
    assert user_error_message(FileNotFoundError("no adapter at x")) == "no adapter at x"


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_lit_peft_debug_off_still_gives_one_line(monkeypatch, value):
    monkeypatch.setenv("LIT_PEFT_DEBUG", value)
    res = run_cli("finetune/run.py", "model=tiny-random", "trainer.micro_batch_size=0")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: trainer.micro_batch_size=0")
    assert "Traceback" not in res.stderr


def test_lit_peft_debug_on_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("LIT_PEFT_DEBUG", "1")
    res = run_cli("finetune/run.py", "model=tiny-random", "trainer.micro_batch_size=0")
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr
