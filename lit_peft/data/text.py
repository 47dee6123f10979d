"""Continued-pretraining data: documents -> token ids with EOS after each document -> fixed-length blocks.

Sources: `.txt` files or folders of them, JSON/JSONL/Parquet/CSV records with a `text` field (format `text`) or
pre-tokenized `input_ids` (format `tokens`), and hub data sets. Every token of the corpus lands in exactly one block;
the final remainder shorter than a block is dropped. The in-memory path keeps the blocks in a list; the streaming
path (`data.streaming=true`) iterates the documents lazily and appends their tokens to a memory-mapped file, so
memory does not grow with the corpus. Both produce the same blocks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litgpt import Tokenizer
from torch.utils.data import Dataset, Subset

from lit_peft.data.formats import COMPRESSIONS, LOCAL_EXTENSIONS, DataError, data_suffix
from lit_peft.data.module import SplitDataModule, split_sizes
from lit_peft.data.tokenize import collate, encode_plain
from lit_peft.io import atomic_path

TEXT_CHUNK_CHARS = 1 << 20  # a .txt document is tokenized in pieces of whole lines up to this size


def _txt_documents(path: Path, separator: str | None) -> Iterator[list[str]]:
    """A .txt file's documents (split at `separator`; the whole file when None), each as a list of text pieces.

    The file is read in chunks and a long document is handed on in pieces cut at line ends, so neither the file
    nor a document is ever held whole; both data paths cut the same pieces, so they tokenize alike.
    """
    pieces: list[str] = []
    buffer = ""
    keep = len(separator or "")
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(TEXT_CHUNK_CHARS):
            buffer += chunk
            if separator:
                *docs, buffer = buffer.split(separator)
                for doc in docs:
                    if any(p.strip() for p in [*pieces, doc]):
                        yield [*pieces, doc]
                    pieces = []
            if len(buffer) > TEXT_CHUNK_CHARS:
                # A partial separator can only sit in the last len(separator) - 1 characters: keep them.
                cut = buffer.rfind("\n", 0, len(buffer) - keep) + 1
                if cut > 0:
                    pieces.append(buffer[:cut])
                    buffer = buffer[cut:]
    if any(p.strip() for p in [*pieces, buffer]):
        yield [*pieces, buffer]


def iter_documents(
    path: str,
    fmt: str = "text",
    split: str = "train",
    columns: dict[str, str] | None = None,
    separator: str | None = None,
    streaming: bool = False,
) -> Iterator[list[str] | list[int]]:
    """Yield documents: for `text`, a list of text pieces (joined, they are the document); for `tokens`, token ids."""
    import datasets

    field = (columns or {}).get("input_ids" if fmt == "tokens" else "text", "input_ids" if fmt == "tokens" else "text")
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and data_suffix(p) in (".txt", *LOCAL_EXTENSIONS))
        if not files:
            raise DataError(f"{path}: no .txt/.json/.jsonl/.parquet/.csv files in this folder")
    elif local.is_file():
        files = [local]
    elif path.startswith((".", "/", "~")) or data_suffix(local) in (".txt", *LOCAL_EXTENSIONS):
        raise DataError(f"data file not found: {path}")
    else:
        files = []

    def records(source: str, rows: Iterable[dict[str, Any]]) -> Iterator[list[str] | list[int]]:
        for i, row in enumerate(rows):
            value = row.get(field)
            if value is None:
                raise DataError(f"{source}: record {i} has no field {field!r} (fields: {', '.join(sorted(row))})")
            if fmt == "tokens":
                if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
                    raise DataError(f"{source}: record {i} field {field!r} is not a list of token ids")
                if value:
                    yield value
            else:
                if not isinstance(value, str):
                    raise DataError(f"{source}: record {i} field {field!r} is {type(value).__name__}, expected text")
                if value.strip():
                    yield [value]

    if not files:  # a hub data set
        try:
            ds = datasets.load_dataset(path, split=split, streaming=streaming)
        except Exception as e:
            raise DataError(f"could not load data set {path!r} ({type(e).__name__}); offline? pass a local path") from e
        yield from records(path, ds)
        return
    for file in files:
        suffix = data_suffix(file)
        if suffix == ".txt":
            if fmt == "tokens":
                raise DataError(f"{file}: data.format=tokens needs records with {field!r}, not a .txt file")
            if file.suffix in COMPRESSIONS:
                raise DataError(f"{file}: compressed .txt is not supported; decompress it or use {{text}} JSONL")
            yield from _txt_documents(file, separator)
        else:
            ds = datasets.load_dataset(
                LOCAL_EXTENSIONS[suffix], data_files=str(file), split="train", streaming=streaming
            )
            yield from records(str(file), ds)


def document_tokens(documents: Iterable[list[str] | list[int]], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids per document, each followed by EOS (kept once if a pre-tokenized document already ends with it)."""
    eos = tokenizer.eos_id
    for doc in documents:
        if doc and isinstance(doc[0], int):
            ids = list(doc)
        else:
            ids = [t for piece in doc for t in encode_plain(tokenizer, piece)]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        yield ids


def pack(token_lists: Iterable[list[int]], block_size: int) -> Iterator[list[int]]:
    """Consecutive blocks of exactly `block_size` tokens from the concatenated stream; the remainder is dropped."""
    buffer: list[int] = []
    for ids in token_lists:
        buffer.extend(ids)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            del buffer[:block_size]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_token_file(token_lists: Iterable[list[int]], path: Path, dtype: np.dtype) -> int:
    """Append every document's tokens to a flat binary file (atomically published); returns the token count."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        for ids in token_lists:
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            count += len(ids)
    return count


class TokenBlocks(Dataset):
    """Blocks of a memory-mapped token file: block i is tokens [i * block_size, (i + 1) * block_size)."""

    def __init__(self, path: str | Path, block_size: int, dtype: np.dtype) -> None:
        self.path, self.block_size, self.dtype = Path(path), block_size, np.dtype(dtype)
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = torch.from_numpy(self.tokens[i * self.block_size : (i + 1) * self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class ListBlocks(Dataset):
    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.blocks[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


def split_blocks(dataset: Dataset, val_size: float | int, seed: int) -> tuple[Subset, Subset]:
    """A seeded random choice of held-out blocks; the rest train, in their order."""
    n = len(dataset)
    n_val = split_sizes(n, val_size)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return Subset(dataset, [i for i in range(n) if i not in held]), Subset(dataset, sorted(held))


class TextDataModule(SplitDataModule):
    def __init__(
        self,
        tokenizer: Tokenizer,
        path: str,
        fmt: str,
        max_seq_length: int,
        micro_batch_size: int,
        val_size: float | int,
        seed: int,
        split: str = "train",
        columns: dict[str, str] | None = None,
        separator: str | None = None,
        streaming: bool = False,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if not path:
            raise DataError(
                "data.path is not set: give a .txt file or folder, a {text} or {input_ids} file, or a hub name"
            )
        if streaming and cache_dir is None:
            raise DataError("data.streaming=true needs data.cache_dir for the token file")
        self.tokenizer, self.path, self.fmt = tokenizer, path, fmt
        self.block_size, self.micro_batch_size = max_seq_length, micro_batch_size
        self.val_size, self.seed, self.split = val_size, seed, split
        self.columns, self.separator, self.streaming = dict(columns or {}), separator, streaming
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.num_workers, self.shuffle = num_workers, shuffle
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.train: Dataset | None = None
        self.val: Dataset | None = None

    def documents(self) -> Iterator[list[int]]:
        docs = iter_documents(self.path, self.fmt, self.split, self.columns, self.separator, self.streaming)
        return document_tokens(docs, self.tokenizer)

    def token_file(self) -> Path:
        """The cache file for this corpus and tokenizer (a new one when any of them changes)."""
        key = json.dumps(
            [
                str(Path(self.path).expanduser().resolve()) if Path(self.path).expanduser().exists() else self.path,
                self.fmt,
                self.split,
                self.columns,
                self.separator,
                self.tokenizer.vocab_size,
                str(self.dtype),
                self.tokenizer.eos_id,
            ],
            sort_keys=True,
        )
        assert self.cache_dir is not None
        return self.cache_dir / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"

    def prepare_data(self) -> None:
        if self.streaming and not self.token_file().is_file():
            print(f"tokenizing {self.path} into {self.token_file()} (streaming)", flush=True)
            write_token_file(self.documents(), self.token_file(), self.dtype)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if self.streaming:
            self.prepare_data()
            blocks: Dataset = TokenBlocks(self.token_file(), self.block_size, self.dtype)
        else:
            blocks = ListBlocks(list(pack(self.documents(), self.block_size)))
        if len(blocks) < 2:
            raise DataError(
                f"{self.path}: the corpus fills {len(blocks)} block(s) of max_seq_length={self.block_size} tokens; "
                "it needs at least 2 (one to train, one held out)"
            )
        self.train, self.val = split_blocks(blocks, self.val_size, self.seed)

    def collate_fn(self):
        return partial(collate, pad_id=0)  # blocks are all max_seq_length long: nothing is padded
