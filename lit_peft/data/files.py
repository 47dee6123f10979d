"""Reading local data files through `datasets`, with every failure turned into one line naming the file.

`load_local` and `local_rows` are the one place a local JSON/JSONL/CSV/Parquet file is read (the record formats'
`load_records` and the text corpora's `iter_documents` both use them). Whatever goes wrong while `datasets` reads or
decodes a file (a parse error wrapped in its DatasetGenerationError, a UnicodeDecodeError raised later, when a row
is decoded, a StopIteration for an empty file) becomes a DataError from `file_error`, which reads the file again
itself to say where: `<file>: line N (byte B): not valid UTF-8 ...`, `<file>: line N: invalid JSON: ...`,
`<file>: the file is empty`. `.txt` corpora are read by text.py and use `file_problem` the same way.

A CSV file's columns are read as text (a column of numbers keeps its exact text: 007 stays 007), and the progress
bars `datasets` draws while it prepares a file go to run.log, not the console (console.quiet_stdout).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import json
import logging
import lzma
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from lit_peft.console import quiet_stdout
from lit_peft.data.formats import COMPRESSIONS, DataError, data_suffix


def _open_binary(path: Path) -> IO[bytes] | None:
    """The file's bytes, decompressed; None for a compression this machine cannot read (zstd without zstandard)."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix)
    if opener is not None:
        return opener(path, "rb")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            return None
        return zstandard.open(path, "rb")
    return path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset of the line's start, the line's bytes) of the decompressed file."""
    f = _open_binary(path)
    if f is None:
        return
    offset = 0
    with f:
        for n, line in enumerate(f, start=1):
            yield n, offset, line
            offset += len(line)


def _decode(path: Path, n: int, offset: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte {offset + e.start}{' of the decompressed data' if path.suffix in COMPRESSIONS else ''}"
        raise DataError(
            f"{path}: line {n} ({where}): not valid UTF-8 (byte 0x{line[e.start]:02x}: {e.reason}); "
            "data files must be UTF-8 text: convert it (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def empty_file_error(path: Path, blank: bool = False) -> DataError:
    what = "holds only blank lines" if blank else "is empty"
    return DataError(f"{path}: the file {what}; expected {_expected(path)}")


def _expected(path: Path) -> str:
    return {
        ".jsonl": "one JSON record per line",
        ".json": "a JSON list of records (or one JSON record per line)",
        ".csv": "a header line and one record per line",
        ".parquet": "a Parquet table",
        ".txt": "text",
    }.get(data_suffix(path), "records")


def _json_problem(path: Path, text_lines: list[tuple[int, str]], lines_format: bool) -> str | None:
    """Where a JSON or JSON Lines text fails to parse, or None."""
    if not lines_format:
        whole = "".join(line for _, line in text_lines)
        try:
            value = json.loads(whole)
        except json.JSONDecodeError as e:
            first = next((line for _, line in text_lines if line.strip()), "")
            try:  # a .json file may hold JSON Lines too, as `datasets` reads it
                lines_format = isinstance(json.loads(first), dict) and len(text_lines) > 1
            except json.JSONDecodeError:
                lines_format = False
            if not lines_format:
                return f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"
        else:
            if isinstance(value, list):
                bad = next((i for i, r in enumerate(value) if not isinstance(r, dict)), None)
                if bad is not None:
                    kind = type(value[bad]).__name__
                    return f"{path}: item {bad} of the JSON list is {kind}, expected a record {{field: value, ...}}"
            return None
    for n, line in text_lines:
        line = line.rstrip("\r\n")  # the parser's column is then on this line
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}: line {n}: invalid JSON: {e.msg} (column {e.colno}): {line.strip()[:80]!r}"
        if not isinstance(value, dict):
            return f"{path}: line {n} is a JSON {type(value).__name__}, expected a record {{field: value, ...}}"
    return None


def file_problem(path: Path) -> str | None:
    """What is wrong with a local data file, read by ourselves: empty, not UTF-8 (line and byte), not valid JSON /
    JSON Lines (line and the parser's message); None when none of these (then the reader's own message is used)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return str(empty_file_error(path))
    suffix = data_suffix(path)
    if suffix == ".parquet":
        return None
    text_lines: list[tuple[int, str]] = []
    try:
        for n, offset, line in _lines(path):
            text = _decode(path, n, offset, line)
            if suffix in (".json", ".jsonl"):
                text_lines.append((n, text))
            elif len(text_lines) < 2 and text.strip():
                text_lines.append((n, text))  # something there: not empty (a CSV: more than its header)
    except DataError as e:
        return str(e)
    except (OSError, EOFError, lzma.LZMAError) as e:  # a corrupt .gz/.bz2/.xz
        return f"{path}: cannot be decompressed ({type(e).__name__}: {e})"
    if not any(line.strip() for _, line in text_lines):
        return str(empty_file_error(path, blank=True))
    if suffix in (".json", ".jsonl"):
        return _json_problem(path, text_lines, suffix == ".jsonl")
    if suffix == ".csv" and len(text_lines) < 2:
        return f"{path}: the file holds a header line and no records; expected {_expected(path)}"
    return None


def _first_line(error: BaseException) -> str:
    """The error's first line; for `datasets`' DatasetGenerationError, the first line of the error it wraps."""
    while type(error).__name__ == "DatasetGenerationError" and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def file_error(files: Iterable[Path], error: BaseException, name: str) -> DataError:
    """A DataError for a failure reading `files` (named `name` in the message when no file shows the problem)."""
    for file in files:
        try:
            problem = file_problem(file)
        except OSError:
            problem = None
        if problem is not None:
            return DataError(problem)
    return DataError(f"{name}: could not read data set: {_first_line(error)}")


def _csv_header(path: Path) -> list[str] | None:
    f = _open_binary(path)
    if f is None:
        return None
    with f, io.TextIOWrapper(f, encoding="utf-8-sig", errors="strict", newline="") as text:
        try:
            return next(csv.reader(text), None)
        except (UnicodeDecodeError, csv.Error):
            return None


def builder_kwargs(builder: str, path: Path) -> dict[str, Any]:
    """`load_dataset` arguments for one local file: a CSV's columns are read as text (pandas would read a column of
    numbers as int or float: 007 -> 7, 1.50 -> 1.5, and as 7.0 with an empty cell)."""
    if builder != "csv":
        return {}
    import datasets

    header = _csv_header(path)
    if not header or len(set(header)) != len(header) or not all(name.strip() for name in header):
        return {}  # pandas' own names (Unnamed: 0, a.1): left to its inference
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """What `datasets` shows while it loads (its progress bars, and the lines its own stderr handler logs, such as
    'Failed to load JSON ...' before the one-line error) goes to run.log, not the console (console.quiet_stdout)."""
    import datasets  # noqa: F401 - configures the "datasets" logger's handler

    logger = logging.getLogger("datasets")
    handlers = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    propagate = logger.propagate
    # Logged as "lit_peft.datasets": the "datasets" logger drops INFO records.
    with quiet_stdout("lit_peft.datasets", stderr=True):
        saved = [(h, h.stream) for h in handlers]
        for h in handlers:
            h.setStream(sys.stderr)  # the captured stderr: its lines reach run.log once, through quiet_stdout
        logger.propagate = not handlers
        try:
            yield
        finally:
            logger.propagate = propagate
            for h, stream in saved:
                h.setStream(stream)


def load_local(builder: str, path: Path, streaming: bool = False):
    """`datasets.load_dataset(builder, data_files=path)`'s train split, its failures as file_error's one line."""
    import datasets

    path = Path(path)
    if path.stat().st_size == 0:
        raise empty_file_error(path)
    try:
        with quiet_datasets():
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", streaming=streaming, **builder_kwargs(builder, path)
            )
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - every reader failure is reported against the file
        raise file_error([path], e, str(path)) from e


def local_rows(rows: Iterable[dict[str, Any]], files: list[Path], name: str) -> Iterator[dict[str, Any]]:
    """The rows of a loaded data set, with a failure to decode one (invalid UTF-8 is found only then, and a streamed
    file's parse errors) reported by file_error."""
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise file_error(files, e, name) from e
        yield row
