"""What the user is told when something they gave is wrong: `UserError`, and the one-line message for it and
for the file-system, weight-file and config errors of the libraries underneath (`user_error_message`).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import zipfile


class UserError(ValueError):
    """Something the user gave is wrong: a setting, a path, a file's content, a combination. The commands report it
    as `error: <one line>` and exit with status 2 (`cli.args.fail.on_user_error`); any other exception is a bug and
    keeps its traceback. Subclasses say where it came from; `keep_output` keeps a failed run's folder."""

    keep_output = False


class ConfigError(UserError):
    """A setting, or a combination of settings, that cannot run; the message names the key, the value and the
    valid choices."""


# --------------------------------------------------------------------------------------------------- the error path

_reported: list[str] = []  # every `error:` line this process printed (cli.args.fail.exit), in order


def remember_reported(message: str) -> str:
    """Note the one-line error the process is about to print; a sweep records it as its failed job's error."""
    _reported.append(message)
    return message


def report_mark() -> int:
    """A mark to ask later for the errors printed since (a sweep job takes one when it starts)."""
    return len(_reported)


def last_reported(since: int | None) -> str:
    """The last one-line error printed since `since` (a report_mark); '' when none, or when there is no mark."""
    return _reported[-1] if since is not None and len(_reported) > since else ""


def one_line(text: str) -> str:
    """A multi-line message as one line: detail and hint lines dropped, the rest joined with '; '."""
    skip = ("full_key:", "object_type=", "reference_type=", "See https://", "Set the environment variable")
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    lines = [line for line in lines if line and not line.startswith(skip) and set(line) != {"^"}]
    return "; ".join(lines).replace(".;", ";")


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
CORRUPT_MARKERS = ("PytorchStreamReader", "zip archive", "unexpected EOF", "invalid load key", "file too short")


def _weight_file(tb) -> str | None:
    """The weight file a loader was reading when it failed: the innermost frame's local naming one that exists."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)):
                name = os.fspath(value)
                if isinstance(name, str) and name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(name):
                    return name
    return None


def _refused_pickle_message(e: BaseException) -> str | None:
    """torch.load(weights_only=True) met a pickle that calls code: one short line naming the file and the global."""
    text = str(e)
    if not (isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text):
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"(?:global|function) ([\w.]+)", text)
    what = f" (it calls {found.group(1)})" if found else ""
    path = _weight_file(e.__traceback__) or "a weight file"
    return f"{path} holds more than tensors{what}; refused: only tensors and plain containers are loaded"


FILE_SYSTEM_ERRORS = {
    errno.ENOSPC: "no space left on device; free some space and run the same command again",
    errno.EDQUOT: "disk quota exceeded; free some space and run the same command again",
    errno.EROFS: "read-only file system; choose a writable folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is in the way (not a directory)",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
    errno.ENOENT: "no such file or directory",
}


def _file_system_message(e: BaseException) -> str | None:
    """An OSError from the file system, by what happened: '<path>: no space left on device; ...'."""
    if not isinstance(e, OSError) or e.errno not in FILE_SYSTEM_ERRORS:
        return None
    what = FILE_SYSTEM_ERRORS[e.errno]
    if e.errno == errno.EIO and e.strerror:
        what = e.strerror
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{what}"


def _corrupt_weights_message(e: BaseException) -> str | None:
    """'corrupt or truncated weight file <path>' for the deserializers' errors (safetensors, torch.load, pickle)."""
    kind = type(e).__name__
    io_error = kind == "SafetensorError" and ("Os {" in str(e) or "os error" in str(e).lower())
    corrupt = isinstance(e, (pickle.UnpicklingError, zipfile.BadZipFile, EOFError)) or (
        kind == "SafetensorError" and not io_error
    )
    if not corrupt and isinstance(e, RuntimeError):
        corrupt = any(marker in str(e) for marker in CORRUPT_MARKERS)
    if not corrupt:
        return None
    path = _weight_file(e.__traceback__)
    reason = f"{kind}: {one_line(str(e))}" if one_line(str(e)) else kind
    return f"{path or 'a weight file'} is corrupt or truncated ({reason}); replace it (download, convert, train again)"


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error caused by what the user gave, or None for a bug (kept as a traceback)."""
    for classify in (_refused_pickle_message, _file_system_message, _corrupt_weights_message):
        message = classify(e)
        if message is not None:
            return message
    if isinstance(e, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return one_line(str(e)) or type(e).__name__
    try:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None
    if "MisconfigurationException" in {c.__name__ for c in type(e).__mro__}:  # Lightning's settings errors
        return one_line(str(e)) or type(e).__name__
    if isinstance(e, (OmegaConfBaseException, HydraException)):
        return one_line(str(e)) or type(e).__name__
    return None
