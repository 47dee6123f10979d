"""Record formats (a raw record -> a conversation, a list of messages), and loading records from files or the hub."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lit_peft.data.templates import Message, instruction_messages

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data set problem, reported with the file, the record index and the field."""


def _field(record: Mapping[str, Any], name: str, source: str, index: int, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{source}: record {index} has no field {name!r} (fields: {', '.join(sorted(record))})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{source}: record {index} field {name!r} is {type(value).__name__}, expected a string")
    return value


def alpaca(record: Mapping[str, Any], source: str, index: int) -> list[Message]:
    """{instruction, input (optional), output}."""
    return instruction_messages(
        _field(record, "instruction", source, index),
        _field(record, "input", source, index, required=False),
        _field(record, "output", source, index),
    )


FORMATS: dict[str, Callable[[Mapping[str, Any], str, int], list[Message]]] = {"alpaca": alpaca}


def get_format(name: str) -> Callable[[Mapping[str, Any], str, int], list[Message]]:
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; valid formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def load_records(path: str, split: str = "train", columns: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Records from a local JSON/JSONL/Parquet/CSV file or folder, or a hub data set name, through `datasets`.

    `columns` renames fields (format field -> field in the file), so files with other names need no code.
    """
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = LOCAL_EXTENSIONS.get(local.suffix)
            if builder is None:
                raise DataError(f"{path}: unsupported file type {local.suffix!r}; valid: {', '.join(LOCAL_EXTENSIONS)}")
            ds = datasets.load_dataset(builder, data_files=str(local), split="train")
        elif local.is_dir():
            ds = datasets.load_dataset(str(local), split=split)
        elif path.startswith((".", "/", "~")) or local.suffix in LOCAL_EXTENSIONS:
            raise DataError(f"data file not found: {path}")
        else:
            ds = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except (ConnectionError, OSError) as e:
        raise DataError(
            f"could not load data set {path!r} ({type(e).__name__}); offline? pass data.path=<local file>"
        ) from e
    except Exception as e:  # datasets wraps JSON parse errors in its own types
        raise DataError(
            f"{path}: could not read data set: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    records = ds.to_list()
    if columns:
        records = [{**r, **{ours: r.get(theirs) for ours, theirs in columns.items()}} for r in records]
    return records
