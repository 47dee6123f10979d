"""Atomic file and folder writes, and the adapter checkpoint format (safetensors + the method's settings).

Every published file or folder is written into a hidden staging folder beside it (`.<name>.<host>.<pid>.<random>.tmp`)
and appears under its final name in one rename, with all its files (weights, settings, records). Replacing an
existing folder swaps the two in one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`); where the file system
cannot, the old folder is first renamed to `.<name>.old`, and `recover` (called by every writer and loader) puts it
back if a crash came between the two renames. Staging folders left by killed processes on this host are removed by
the next write beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pickle
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lit_peft.env import host_for_file_names, pid_alive
from lit_peft.errors import UserError

MERGE_RECORD = "lit_peft_merge.json"  # beside a merged checkpoint: provenance, dtype, template and system prompt
MODEL_RECORD = "lit_peft.json"  # beside a method=full run's model: the run's metadata (as an adapter's)
ARCH_FILE = "lit_peft_arch.json"  # architecture edits saved beside a checkpoint's weights
CHECKPOINT_MARKERS = ("lit_model.pth", "model_config.yaml")  # what a LitGPT checkpoint folder holds
TOKENIZER_FILES = (  # what litgpt's Tokenizer (and transformers') reads from a checkpoint folder
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
)
# The files a new checkpoint folder takes from its source folder (`copy_checkpoint_files`): LitGPT's model config and
# prompt style, the tokenizer files, the Hugging Face config and lit-peft's own records. Nothing else of the source is
# copied (a .env, notes, stray files), and never a symbolic link: the copy is meant to be shared.
CHECKPOINT_FILES = (
    "model_config.yaml",
    "prompt_style.yaml",
    "config.json",
    *TOKENIZER_FILES,
    ARCH_FILE,
    MERGE_RECORD,
    MODEL_RECORD,
)

# ---------------------------------------------------------------- renames, staging folders and recovery

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
_renameat2: Any = None
LEGACY_STAGING_AGE_S = 24 * 3600  # staging folders named before the owner was recorded: removed after a day


class CheckpointNotFound(UserError, FileNotFoundError):
    """A model checkpoint folder (or its weights) is missing; the message says which command makes it."""


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):  # not Linux, or a libc older than glibc 2.28
            _renameat2 = False
    return _renameat2


def rename2(src: str | Path, dst: str | Path, flags: int) -> bool:
    """Linux renameat2: atomically exchange (`_RENAME_EXCHANGE`) or rename without replacing (`_RENAME_NOREPLACE`).

    False where this system or file system has no such rename (the caller falls back); OSError for real failures.
    """
    fn = _libc_renameat2()
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(str(src)), _AT_FDCWD, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _old_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(path: str | Path) -> Path:
    """Undo a crash in the middle of a two-rename replacement: `path` missing but `.<name>.old` there -> put it back.

    A `.<name>.old` beside an existing `path` is what a finished replacement had not removed yet: it is removed.
    Returns `path`.
    """
    path = Path(path)
    old = _old_path(path)
    if not (old.exists() or old.is_symlink()):
        return path
    if path.exists() or path.is_symlink():
        _rmtree(old)
    else:
        with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
            os.rename(old, path)
    return path


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the staging folders of `path` that killed processes left behind; returns what was removed.

    Only folders this host's processes made and whose process is gone (so a concurrent writer's, on this host or
    another, is never touched), and unowned ones from older versions once they are a day old.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    owned = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp$")
    removed, host, now = [], host_for_file_names(), time.time()
    for entry in parent.iterdir():
        if not entry.name.startswith(f".{path.name}.") or not entry.is_dir() or entry.is_symlink():
            continue
        m = owned.match(entry.name)
        if m is not None:
            stale = m["host"] == host and not pid_alive(int(m["pid"]))
        else:
            try:
                stale = legacy.match(entry.name) is not None and now - entry.stat().st_mtime > LEGACY_STAGING_AGE_S
            except FileNotFoundError:
                continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_dir(path: str | Path) -> Path:
    """A new hidden staging folder beside `path` (stale ones cleaned first); write into `<it>/<path.name>`.

    The inner name equals the final one, since some tools (litgpt's converter) read meaning from a folder's name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    clean_stale(path)
    prefix = f".{path.name}.{host_for_file_names()}.{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))


def _fsync_tree(root: Path) -> None:
    """Flush what was staged to disk before it is published (a rename is only as durable as the data behind it)."""
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if p.is_symlink():
            continue
        flags = os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0)
        with contextlib.suppress(OSError):
            fd = os.open(p, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish(staged: str | Path, path: str | Path, replace: bool = True) -> Path:
    """Move `staged` (a file or folder) to `path` in one rename.

    replace=True: an existing `path` is swapped out atomically (what was there ends up at `staged`, for the caller
    to delete); replace=False: an existing `path` is never touched (UserError), even one that appeared meanwhile.
    """
    staged, path = Path(staged), Path(path)
    _fsync_tree(staged)
    recover(path)
    if not replace:
        try:
            if not rename2(staged, path, _RENAME_NOREPLACE):
                if path.exists() or path.is_symlink():
                    raise FileExistsError(errno.EEXIST, "exists", str(path))
                os.rename(staged, path)
        except FileExistsError:
            raise UserError(f"{path} already exists (made while this one was written); left untouched") from None
    elif path.exists() or path.is_symlink():
        try:
            exchanged = rename2(staged, path, _RENAME_EXCHANGE)
        except FileNotFoundError:  # `path` vanished meanwhile
            exchanged = False
        if not exchanged:
            if path.is_dir() and not path.is_symlink():
                # Two renames: a crash between them leaves `.<name>.old`, which `recover` puts back.
                old = _old_path(path)
                _rmtree(old)
                os.replace(path, old)
                os.replace(staged, path)
                _rmtree(old)
            else:
                os.replace(staged, path)
    else:
        os.replace(staged, path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it is published as `path` in one rename, on error removed.

    Works for files and folders, so a reader never sees a half-written checkpoint under the final name; an existing
    `path` is replaced atomically (replace=True) or kept (replace=False: UserError if it exists when publishing).
    """
    path = Path(path)
    tmp = staging_dir(path)
    try:
        target = tmp / path.name
        try:
            yield target
            publish(target, path, replace=replace)
        except Exception as e:
            failure = write_failure(e, path)
            if failure is None:
                raise
            raise failure from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOW_SPACE_BYTES = 64 << 20


def write_failure(e: BaseException, path: Path) -> OSError | None:
    """A failed write as an OSError that names `path` and what happened (no space left, read-only, ...), or None
    when `e` is not a write failure. The serializers hide the cause: safetensors reports the OS error inside its own
    message and torch's zip writer says only "file write failed", so a full file system is recognised by its free
    space."""
    if isinstance(e, OSError) and e.errno:
        return e if e.filename else OSError(e.errno, e.strerror, str(path))
    text = str(e)
    code = re.search(r"\bcode: (\d+)", text)  # safetensors: IoError(Os { code: 28, kind: StorageFull, ... })
    if type(e).__name__ == "SafetensorError" and code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    if not ("PytorchStreamWriter failed" in text or "write failed" in text or type(e).__name__ == "SafetensorError"):
        return None
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"write failed ({' '.join(text.split())[:200]})", str(path))


# ---------------------------------------------------------------- output folders that never touch their inputs


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_new_output(
    out_dir: str | Path, inputs: Mapping[str, str | Path | None], overwrite: bool, action: str
) -> None:
    """--out must be none of `inputs` ({what: folder}, e.g. {"base checkpoint": ..., "adapter": ...}), neither inside
    one nor containing one (symlinks resolved), and new unless `overwrite`, which only replaces a checkpoint folder.
    One-line UserErrors."""
    out_dir = Path(out_dir)
    out = _real(out_dir)
    for what, folder in inputs.items():
        if folder is None:
            continue
        src = _real(Path(folder))
        if out == src:
            raise UserError(f"--out {out_dir} is the {what}; {action} never overwrites it")
        if src in out.parents:
            raise UserError(f"--out {out_dir} is inside the {what} {folder}; {action} never writes into an input")
        if out in src.parents:
            raise UserError(
                f"--out {out_dir} contains the {what} {folder}; {action} never replaces a folder holding an input"
            )
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise UserError(f"--out {out_dir} already exists; pick a new folder or pass --overwrite")
        if not is_checkpoint_or_empty(out_dir):
            raise UserError(
                f"--out {out_dir} exists and is not a checkpoint folder (no {' or '.join(CHECKPOINT_MARKERS)}); "
                "--overwrite only replaces a checkpoint: pick a new folder"
            )


def is_checkpoint_or_empty(folder: Path) -> bool:
    """What --overwrite may replace: a LitGPT checkpoint folder or an empty folder (never a user's other files)."""
    return folder.is_dir() and (not any(folder.iterdir()) or any((folder / m).is_file() for m in CHECKPOINT_MARKERS))


# ---------------------------------------------------------------- weight files: written whole, read with clear errors


def corrupt(path: str | Path, error: BaseException) -> UserError:
    """The one-line error for a weight file that does not deserialize."""
    if isinstance(error, pickle.UnpicklingError):
        reason = weights_only_reason(error)
    else:
        reason = " ".join(str(error).split()) or type(error).__name__
    return UserError(f"{path} is corrupt or truncated ({type(error).__name__}: {reason[:200]})")


def weights_only_reason(error: BaseException) -> str:
    """The line of torch's weights_only refusal that names what was refused (e.g. the global a file asks for)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines[1:] if not line.startswith("Check the doc")]
    return (detail[-1:] or lines or [type(error).__name__])[0][:200]


def asks_for_globals(error: BaseException) -> bool:
    """Whether torch's weights_only unpickler refused a global (a crafted or non-weights pickle), rather than bytes
    that are no pickle at all (a damaged file)."""
    return "global" in str(error).lower()


def not_just_tensors(path: str | Path, error: BaseException, note: str = "") -> UserError:
    """The one-line error for a pickle that asks for more than tensors (what a crafted file does): nothing ran."""
    return UserError(f"{path} holds more than tensors, refused{note} (weights_only: {weights_only_reason(error)})")


def load_weights(path: str | Path) -> dict[str, Any]:
    """A torch weight file (lit_model.pth), tensors only (`weights_only`: no code runs), memory-mapped when it can be.

    A file that does not deserialize is a UserError naming it (`corrupt`), not the deserializer's traceback.
    """
    path = Path(path)
    try:
        mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise (not_just_tensors(path, e) if asks_for_globals(e) else corrupt(path, e)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        raise corrupt(path, e) from None


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a damaged one is a UserError naming it (`corrupt`)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise corrupt(path, e) from None


def read_json(path: str | Path) -> Any:
    """A JSON file lit-peft wrote; unreadable JSON is a UserError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(path, e) from None


def unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses tied or overlapping tensors)."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        key = t.untyped_storage().data_ptr() if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t
    return out


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# Top-level keys of adapter_config.json that readers use, with the JSON types each may hold.


def _link_refused(path: Path) -> UserError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return UserError(
        f"{path} is a symbolic link{target}; a checkpoint's files are copied only as regular files, never through a "
        "link (it could lead out of the folder): replace the link with the file itself"
    )


def checkpoint_files(source_dir: str | Path, names: tuple[str, ...] | list[str] = CHECKPOINT_FILES) -> list[Path]:
    """The files of `names` (default `CHECKPOINT_FILES`) that `source_dir` holds: what a copy of its checkpoint takes.

    Anything else in the folder is never copied. A symbolic link under one of these names is refused in one line
    (UserError), whatever it points at: a copy never follows a link, which could carry a file from outside the
    folder into one that is meant to be shared. Something that is neither a file nor a link (a folder) is left out.
    """
    source_dir = Path(source_dir)
    found = []
    for name in names:
        path = source_dir / name
        if path.is_symlink():
            raise _link_refused(path)
        if path.is_file():
            found.append(path)
    return found


def copy_checkpoint_files(
    source_dir: str | Path, dest_dir: str | Path, names: tuple[str, ...] | list[str] = CHECKPOINT_FILES
) -> list[Path]:
    """Copy `checkpoint_files(source_dir, names)` into the folder `dest_dir` (mode and times kept, as `shutil.copy2`);
    returns the copies. Each file is opened without following a link (O_NOFOLLOW), so a file swapped for a link
    meanwhile is refused too, and must be a regular file (not a FIFO or a device)."""
    copies = []
    for src in checkpoint_files(source_dir, names):
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(src, flags)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _link_refused(src) from None
            raise
        with os.fdopen(fd, "rb") as fin:
            st = os.fstat(fin.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{src} is not a regular file; a checkpoint's files are copied only as regular files")
            dst = Path(dest_dir) / src.name
            with open(dst, "xb") as fout:  # a new file in a new folder: never through a link there either
                shutil.copyfileobj(fin, fout, 1 << 20)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        copies.append(dst)
    return copies


def save_lit_checkpoint(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    source_dir: str | Path,
    architecture: dict[str, Any] | None = None,
    config: Any = None,
    records: dict[str, Any] | None = None,
    replace: bool = True,
) -> Path:
    """Write a LitGPT checkpoint folder: lit_model.pth plus the config and tokenizer files of `source_dir` (only the
    known ones, `CHECKPOINT_FILES`, never through a symbolic link: see `copy_checkpoint_files`).

    `architecture` (e.g. CQIL groups) is written to lit_peft_arch.json so that every loader rebuilds the same model;
    None keeps whatever `source_dir` had. `config` (a LitGPT Config) replaces the source's model config, for a model
    of another shape (the source's Hugging Face config.json is then left out). `records` ({file name: JSON data})
    are written into the same folder, inside the same atomic step, so the folder never exists without them.
    replace=False: an existing `out_dir` is never replaced (UserError), even one made while this one was written.
    """
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    skip = {"model_config.yaml", "config.json"} if config is not None else set()
    if records is not None:  # the source's own records describe other weights than these
        skip |= {MERGE_RECORD, MODEL_RECORD}
    names = [n for n in CHECKPOINT_FILES if n not in skip]
    checkpoint_files(source_dir, names)  # a link among them is refused before anything is written
    with atomic_path(out_dir, replace=replace) as tmp:
        tmp.mkdir()
        copy_checkpoint_files(source_dir, tmp, names)
        if config is not None:
            from litgpt.utils import save_config

            save_config(config, tmp)
        torch.save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp / "lit_model.pth")
        if architecture is not None:
            (tmp / ARCH_FILE).unlink(missing_ok=True)
            if architecture:
                (tmp / ARCH_FILE).write_text(json.dumps(architecture, indent=2) + "\n")
        for name, data in (records or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out_dir
