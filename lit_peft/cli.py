"""Command-line front matter shared by the scripts: early validation of config-group choices and one-line errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


def group_choices(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Fail fast, in one line, on `group=value` overrides that name no conf/<group>/<value>.yaml.

    Hydra reports these too, but over several lines and after start-up; sweeps (`a,b`) are checked value by value.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or key not in groups or "(" in value or "$" in value:
            continue
        for choice in value.split(","):
            if choice and not (conf_dir / key / f"{choice}.yaml").is_file():
                fail.exit(f"unknown {key} {choice!r}; valid choices: {', '.join(group_choices(conf_dir, key))}")


class fail:  # noqa: N801 - a namespace of two helpers
    @staticmethod
    def exit(message: str, code: int = 2) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)

    @staticmethod
    @contextlib.contextmanager
    def on_user_error(cleanup: Callable[[], None] | None = None) -> Iterator[None]:
        """Turn configuration, data and checkpoint errors into `error: <one line>` and exit status 2.

        `cleanup` runs first (to remove what the failed run began). LIT_PEFT_DEBUG=1 shows the traceback instead.
        """
        try:
            yield
        except (ValueError, FileNotFoundError, NotADirectoryError) as e:
            if cleanup is not None:
                cleanup()
            if os.environ.get("LIT_PEFT_DEBUG"):
                raise
            fail.exit(" ".join(str(e).split()) or type(e).__name__)


def run_dir_follows_out_dir(argv: list[str]) -> list[str]:
    """`out_dir=X` also puts Hydra's own files (.hydra/, run.log) in X, unless hydra.run.dir is given."""
    out = [a.partition("=")[2] for a in argv if a.startswith("out_dir=")]
    multirun = "-m" in argv or "--multirun" in argv
    if out and not multirun and not any(a.startswith("hydra.run.dir=") for a in argv):
        return [*argv, f"hydra.run.dir={out[-1]}"]
    return argv


def remove_if_only_hydra_files(out_dir: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's bookkeeping, so a failed run leaves no output behind."""
    if out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {".hydra", "run.log"}:
        shutil.rmtree(out_dir, ignore_errors=True)
