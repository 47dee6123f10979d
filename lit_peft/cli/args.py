"""Argument helpers for the commands: one-line `error:` exits (`fail`) and argparse types that name the valid range."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from lit_peft.env import debug_enabled
from lit_peft.errors import one_line, remember_reported, user_error_message


class fail:  # noqa: N801 - a namespace of two helpers
    last_message: str | None = None  # the last `error:` line printed (a sweep records it as the job's error)

    @staticmethod
    def exit(message: str, code: int = 2) -> NoReturn:
        fail.last_message = remember_reported(one_line(message))
        print(f"error: {fail.last_message}", file=sys.stderr)
        sys.exit(code)

    @staticmethod
    @contextlib.contextmanager
    def on_user_error(cleanup: Callable[[], None] | None = None) -> Iterator[None]:
        """Turn configuration, data, path and weight-file errors into `error: <one line>` and exit status 2.

        `cleanup` runs first (to remove what the failed run created). LIT_PEFT_DEBUG=1 shows the traceback instead.
        """
        try:
            yield
        except Exception as e:
            message = user_error_message(e)
            if message is None:
                raise
            if cleanup is not None and not getattr(e, "keep_output", False):  # e.g. a run stopped at a NaN keeps
                cleanup()  # its folder: it holds the last good checkpoint
            if debug_enabled():
                raise
            fail.exit(message)


# ------------------------------------------------------------------------------------------- argparse: one line


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: `error: <message>` in one line (no usage block), exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if "prog" not in kwargs and sys.argv and sys.argv[0]:  # chat/base.py rather than base.py
            prog = os.path.relpath(os.path.abspath(sys.argv[0]))
            kwargs["prog"] = prog if not prog.startswith("..") else os.path.basename(sys.argv[0])
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail.exit(f"{message} (see {self.prog} --help)")


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _ranged(kind: type, test: Callable[[Any], bool], valid: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _number(text, kind)
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; valid: {valid}")
        return value

    parse.__name__ = valid  # argparse names the type in "invalid <name> value" messages
    return parse


def existing_dir(text: str) -> Path:
    """A folder that must exist (named as a path when it does not)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def repo_id(text: str) -> str:
    """A Hugging Face hub repository id: org/name."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", text) or ".." in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hub repository id; expected org/name")
    return text


def choice_of(choices: Iterable[str], what: str = "value") -> Callable[[str], str]:
    """A string from a fixed set; the error lists the set."""
    valid = sorted(choices)

    def parse(text: str) -> str:
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid: {', '.join(valid)}")
        return text

    parse.__name__ = what
    return parse


positive_int = _ranged(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _ranged(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _ranged(float, lambda v: v > 0, "a number > 0")
non_negative_float = _ranged(float, lambda v: v >= 0, "a number >= 0")
unit_interval = _ranged(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
seed_int = _ranged(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)")
