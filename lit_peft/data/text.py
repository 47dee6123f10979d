"""Continued-pretraining data: documents -> token ids with a separator after each document -> fixed-length blocks.

Sources: `.txt` files or folders of them, JSON/JSONL/Parquet/CSV records with a `text` field (format `text`) or
pre-tokenized `input_ids` (format `tokens`), and hub data sets. Documents are joined with the tokenizer's document
separator (`<|endoftext|>` where it has one, else its end token; `data.document_separator` overrides it).

Held-out data (`data.val_split`): `block` holds out a seeded choice of `val_size` blocks (a fraction < 1 of the
blocks, or a count) of the one stream; `document` holds out whole documents, in a seeded random order until they
fill that many blocks, and packs the training and the held-out documents as two separate streams, so no validation
block shares a document with a training block; `auto` (the default) splits by document unless the documents are too
few or too long for it (the held-out ones would fill over MAX_VAL_OVERSHOOT times the blocks asked for and over
MAX_VAL_SHARE of all blocks, or leave no training block), then by block with a one-line note.
Every token of a stream lands in exactly one block; each stream's final remainder shorter than a block is dropped.

The in-memory path keeps the documents' tokens in memory; the streaming path (`data.streaming=true`) iterates the
documents lazily and appends their tokens to a memory-mapped file, with a sidecar index of where each document
ends, so memory does not grow with the corpus (only with the number of documents). Both produce the same blocks.
The token file is keyed by the corpus's content (every file's relative path, size and modification time; a hub
set's resolved revision) and the tokenizer's identity, so an edited corpus or another tokenizer gets a new one.
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

from lit_peft.checkpoints.files import atomic_path
from lit_peft.console import info
from lit_peft.data.datamodule import SplitDataModule, split_sizes
from lit_peft.data.files import empty_file_error, file_error, load_local, local_rows, quiet_datasets
from lit_peft.data.formats import COMPRESSIONS, LOCAL_EXTENSIONS, DataError, as_text, data_suffix
from lit_peft.data.tokenize import collate, encode_plain

TEXT_CHUNK_CHARS = 1 << 20  # a .txt document is tokenized in pieces of whole lines up to this size
VAL_SPLITS = ("auto", "document", "block")
# Tokens that separate documents in pretraining corpora (GPT-2/SmolLM2/Qwen, Llama-3, Llama-2/Mistral, Gemma), in the
# order they are looked for among a tokenizer's special tokens when its end token is not one of them.
DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
# val_split=auto splits by document unless the held-out documents fill more than this many times the blocks asked
# for and more than this share of all blocks (whole documents rarely fill exactly val_size blocks).
MAX_VAL_OVERSHOOT, MAX_VAL_SHARE = 2, 0.1


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


def local_files(path: str) -> list[Path] | None:
    """The data files `path` names (a file, or a folder's files in sorted order); None for a hub data set name."""
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and data_suffix(p) in (".txt", *LOCAL_EXTENSIONS))
        if not files:
            raise DataError(f"{path}: no .txt/.json/.jsonl/.parquet/.csv files in this folder")
        return files
    if local.is_file():
        return [local]
    if path.startswith((".", "/", "~")) or data_suffix(local) in (".txt", *LOCAL_EXTENSIONS):
        raise DataError(f"data file not found: {path}")
    return None


def _hub_error(path: str, e: Exception) -> DataError:
    return DataError(f"could not load data set {path!r} ({type(e).__name__}); offline? pass a local path")


def iter_documents(
    path: str,
    fmt: str = "text",
    split: str = "train",
    columns: dict[str, str] | None = None,
    separator: str | None = None,
    streaming: bool = False,
    vocab_size: int | None = None,
) -> Iterator[list[str] | list[int]]:
    """Yield documents: for `text`, a list of text pieces (joined, they are the document); for `tokens`, token ids.

    With `vocab_size`, pre-tokenized ids must lie in [0, vocab_size).
    """
    import datasets

    field = (columns or {}).get("input_ids" if fmt == "tokens" else "text", "input_ids" if fmt == "tokens" else "text")
    files = local_files(path)

    def records(source: str, rows: Iterable[dict[str, Any]]) -> Iterator[list[str] | list[int]]:
        for i, row in enumerate(rows):
            value = row.get(field)
            if value is None:
                raise DataError(f"{source}: record {i} has no field {field!r} (fields: {', '.join(sorted(row))})")
            if fmt == "tokens":
                if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
                    raise DataError(f"{source}: record {i} field {field!r} is not a list of token ids")
                if value and vocab_size is not None and not (min(value) >= 0 and max(value) < vocab_size):
                    bad = next(t for t in value if not 0 <= t < vocab_size)
                    raise DataError(
                        f"{source}: record {i} field {field!r} holds token id {bad}, outside the tokenizer's "
                        f"vocabulary (valid ids: 0 to {vocab_size - 1})"
                    )
                if value:
                    yield value
            else:
                text = as_text(value)  # a number is its text
                if text is None:
                    raise DataError(f"{source}: record {i} field {field!r} is {type(value).__name__}, expected text")
                if text.strip():
                    yield [text]

    if files is None:  # a hub data set
        try:
            with quiet_datasets():
                ds = datasets.load_dataset(path, split=split, streaming=streaming)
        except Exception as e:
            raise _hub_error(path, e) from e
        yield from records(path, ds)
        return
    for file in files:
        suffix = data_suffix(file)
        if suffix == ".txt":
            if fmt == "tokens":
                raise DataError(f"{file}: data.format=tokens needs records with {field!r}, not a .txt file")
            if file.suffix in COMPRESSIONS:
                raise DataError(f"{file}: compressed .txt is not supported; decompress it or use {{text}} JSONL")
            if file.stat().st_size == 0:
                raise empty_file_error(file)
            try:
                yield from _txt_documents(file, separator)
            except UnicodeDecodeError as e:  # names the file, the line and the byte
                raise file_error([file], e, str(file)) from e
        else:
            ds = load_local(LOCAL_EXTENSIONS[suffix], file, streaming=streaming)
            yield from records(str(file), local_rows(ds, [file], str(file)))


def source_fingerprint(path: str, split: str = "train") -> list[Any]:
    """What identifies the corpus's content: every file's relative path, size and modification time (ns), or for a
    hub data set its resolved revision (the commit the `datasets` library loads)."""
    files = local_files(path)
    if files is None:
        import datasets

        try:
            revision = datasets.load_dataset_builder(path).hash
        except Exception as e:
            raise _hub_error(path, e) from e
        if not revision:
            raise DataError(f"data set {path!r} has no revision to key the streaming token cache by; pass a local path")
        return ["hub", path, split, str(revision)]
    local = Path(path).expanduser()
    entries = []
    for file in files:
        stat = file.stat()  # of the file itself where it is a link
        name = file.relative_to(local).as_posix() if local.is_dir() else file.name
        entries.append([name, stat.st_size, stat.st_mtime_ns])
    return ["local", str(local.resolve()), entries]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer's full serialized form (vocabulary, merges, normalizer, added tokens) and bos/eos."""
    h = hashlib.sha256()
    if tokenizer.backend == "huggingface":
        h.update(tokenizer.processor.to_str().encode())
    else:
        h.update(tokenizer.processor.serialized_model_proto())
    h.update(json.dumps([tokenizer.backend, tokenizer.bos_id, tokenizer.eos_id]).encode())
    return h.hexdigest()


def vocabulary_size(tokenizer: Tokenizer) -> int:
    """Number of token ids the tokenizer can produce, added tokens included (litgpt's vocab_size leaves them out)."""
    if tokenizer.backend == "huggingface":
        return max(tokenizer.processor.get_vocab_size(with_added_tokens=True), tokenizer.vocab_size)
    return tokenizer.vocab_size


def token_text(tokenizer: Tokenizer, i: int) -> str | None:
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.id_to_token(i)
    return tokenizer.processor.id_to_piece(i)


def special_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens (HF: its added tokens; SentencePiece: its control and unknown pieces)."""
    if tokenizer.backend == "huggingface":
        return {t.content: i for i, t in sorted(tokenizer.processor.get_added_tokens_decoder().items())}
    sp = tokenizer.processor
    return {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}


def document_separator_id(tokenizer: Tokenizer, token: str | None = None) -> int | None:
    """The id joined after every document: `token` if given (it must be a single token of the vocabulary), else the
    tokenizer's document separator (its end token when that is one of DOCUMENT_SEPARATORS, else the first of them
    among its special tokens), else its end token."""
    specials = special_tokens(tokenizer)
    if token is not None:
        if tokenizer.backend == "huggingface":
            i = tokenizer.processor.token_to_id(token)
        else:
            i = tokenizer.processor.piece_to_id(token)
            i = i if token_text(tokenizer, i) == token else None  # SentencePiece maps unknown pieces to <unk>
        if i is None:
            raise DataError(
                f"data.document_separator={token!r} is not a token of the tokenizer; valid choices include its "
                f"special tokens: {', '.join(specials)}"
            )
        return i
    eos = tokenizer.eos_id
    if eos is not None and token_text(tokenizer, eos) in DOCUMENT_SEPARATORS:
        return eos
    for name in DOCUMENT_SEPARATORS:
        if name in specials:
            return specials[name]
    return eos


def document_tokens(
    documents: Iterable[list[str] | list[int]], tokenizer: Tokenizer, separator_id: int | None = None
) -> Iterator[list[int]]:
    """Token ids per document, each followed by `separator_id` (default: the tokenizer's document separator), kept
    once if a pre-tokenized document already ends with it."""
    sep = document_separator_id(tokenizer) if separator_id is None else separator_id
    for doc in documents:
        if doc and isinstance(doc[0], int):
            ids = list(doc)
        else:
            ids = [t for piece in doc for t in encode_plain(tokenizer, piece)]
        if sep is not None and (not ids or ids[-1] != sep):
            ids.append(sep)
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


def index_file(token_file: Path) -> Path:
    """The sidecar of a token file: where each document ends (uint64 token offsets, cumulative)."""
    return token_file.with_suffix(".idx")


def write_token_file(token_lists: Iterable[list[int]], path: Path, dtype: np.dtype, flush_every: int = 1 << 16) -> int:
    """Append every document's tokens to a flat binary file and each document's end offset to its index file (both
    published atomically, the tokens last); returns the token count. Memory holds one document at a time."""
    count = 0
    ends: list[int] = []
    with (
        atomic_path(path) as tmp,
        atomic_path(index_file(path)) as tmp_index,
        tmp.open("wb") as f,
        tmp_index.open("wb") as g,
    ):
        for ids in token_lists:
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            count += len(ids)
            ends.append(count)
            if len(ends) >= flush_every:
                g.write(np.asarray(ends, dtype=np.uint64).tobytes())
                ends.clear()
        g.write(np.asarray(ends, dtype=np.uint64).tobytes())
    return count


class _MappedTokens(Dataset):
    """A token file opened read-only on first use (and again in each loader worker, never pickled)."""

    def __init__(self, path: str | Path, dtype: np.dtype) -> None:
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = (
                np.memmap(self.path, dtype=self.dtype, mode="r")
                if self.path.stat().st_size
                else np.zeros(0, self.dtype)
            )
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


def _example(ids: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    return {"input_ids": t, "labels": t.clone()}


class TokenBlocks(_MappedTokens):
    """Blocks of a memory-mapped token file: block i is tokens [i * block_size, (i + 1) * block_size)."""

    def __init__(self, path: str | Path, block_size: int, dtype: np.dtype) -> None:
        super().__init__(path, dtype)
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return _example(self.tokens[i * self.block_size : (i + 1) * self.block_size])


class DocumentBlocks(_MappedTokens):
    """Blocks of the stream formed by some documents of a token file (in file order), read without copying it."""

    def __init__(self, path: str | Path, ends: np.ndarray, documents: np.ndarray, block_size: int, dtype) -> None:
        super().__init__(path, dtype)
        self.block_size = block_size
        ends = np.asarray(ends, dtype=np.int64)
        starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
        self.starts = starts[documents]
        self.offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(ends[documents] - self.starts)])

    def __len__(self) -> int:
        return int(self.offsets[-1]) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        pos, stop = i * self.block_size, (i + 1) * self.block_size
        d = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        pieces = []
        while pos < stop:
            take = min(stop, int(self.offsets[d + 1])) - pos
            start = int(self.starts[d]) + pos - int(self.offsets[d])
            pieces.append(self.tokens[start : start + take])
            pos, d = pos + take, d + 1
        return _example(np.concatenate(pieces))


class ListBlocks(Dataset):
    """Blocks held in memory: a list of token lists or an (n, block_size) array."""

    def __init__(self, blocks: list[list[int]] | np.ndarray) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _example(np.asarray(self.blocks[i]))


def stream_blocks(documents: list[np.ndarray], block_size: int) -> ListBlocks:
    """The documents concatenated in order and cut into whole blocks (the remainder dropped)."""
    stream = np.concatenate(documents) if documents else np.zeros(0, np.int64)
    n = len(stream) // block_size
    return ListBlocks(stream[: n * block_size].reshape(n, block_size))


def split_blocks(dataset: Dataset, val_size: float | int, seed: int) -> tuple[Subset, Subset]:
    """A seeded random choice of held-out blocks; the rest train, in their order."""
    n = len(dataset)
    n_val = split_sizes(n, val_size)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return Subset(dataset, [i for i in range(n) if i not in held]), Subset(dataset, sorted(held))


def held_out_documents(lengths: np.ndarray, block_size: int, val_size: float | int, seed: int) -> np.ndarray:
    """Whole documents to hold out, as a boolean mask: documents in a seeded random order until they fill the
    `val_size` blocks (a fraction < 1 of the corpus's blocks, or a count) that the block split would hold out."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_val = split_sizes(int(lengths.sum()) // block_size, val_size)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).numpy()
    k = int(np.searchsorted(np.cumsum(lengths[order]), n_val * block_size)) + 1
    held = np.zeros(len(lengths), dtype=bool)
    held[order[:k]] = True
    return held


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
        split_seed: int = 0,
        val_split: str = "auto",
        document_separator: str | None = None,
    ) -> None:
        super().__init__()
        if not path:
            raise DataError(
                "data.path is not set: give a .txt file or folder, a {text} or {input_ids} file, or a hub name"
            )
        if streaming and cache_dir is None:
            raise DataError("data.streaming=true needs data.cache_dir for the token file")
        if val_split not in VAL_SPLITS:
            raise DataError(f"data.val_split={val_split!r} is not a split; valid choices: {', '.join(VAL_SPLITS)}")
        self.tokenizer, self.path, self.fmt = tokenizer, path, fmt
        self.block_size, self.micro_batch_size = max_seq_length, micro_batch_size
        self.val_size, self.seed, self.split = val_size, seed, split
        self.split_seed = split_seed
        self.columns, self.separator, self.streaming = dict(columns or {}), separator, streaming
        self.val_split = val_split
        self.separator_id = document_separator_id(tokenizer, document_separator)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.num_workers, self.shuffle = num_workers, shuffle
        self.vocab_size = vocabulary_size(tokenizer)
        self.dtype = token_dtype(self.vocab_size)
        self._tokenizer_key: str | None = None
        self._hub_key: list[Any] | None = None
        self.train: Dataset | None = None
        self.val: Dataset | None = None

    def documents(self) -> Iterator[list[int]]:
        docs = iter_documents(
            self.path, self.fmt, self.split, self.columns, self.separator, self.streaming, self.vocab_size
        )
        return document_tokens(docs, self.tokenizer, self.separator_id)

    def token_file(self) -> Path:
        """The cache file for this corpus's content and this tokenizer (a new one when either changes)."""
        if self._tokenizer_key is None:
            self._tokenizer_key = tokenizer_fingerprint(self.tokenizer)
        source = self._hub_key or source_fingerprint(self.path, self.split)
        if source[0] == "hub":  # resolved once per run; local files are looked at on every call
            self._hub_key = source
        key = json.dumps(
            [
                source,
                self.fmt,
                self.columns,
                self.separator,
                self._tokenizer_key,
                self.separator_id,
                str(self.dtype),
            ],
            sort_keys=True,
        )
        assert self.cache_dir is not None
        return self.cache_dir / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"

    def prepare_data(self) -> None:
        if self.streaming:
            path = self.token_file()
            if not (path.is_file() and index_file(path).is_file()):
                info(f"tokenizing {self.path} into {path} (streaming)")
                write_token_file(self.documents(), path, self.dtype)

    def _document_split(self, lengths: np.ndarray) -> np.ndarray | None:
        """The held-out document mask for these document lengths, or None to split by block."""
        if self.val_split == "block":
            return None
        n_docs, problem = len(lengths), None
        try:
            held = held_out_documents(lengths, self.block_size, self.val_size, self.split_seed)
        except DataError as e:
            held, problem = None, str(e)
        if held is not None:
            n_blocks = int(lengths.sum()) // self.block_size
            n_val = split_sizes(n_blocks, self.val_size)
            val_blocks = int(lengths[held].sum()) // self.block_size
            train_blocks = int(lengths[~held].sum()) // self.block_size
            figures = f"{int(held.sum())} of {n_docs} documents fill {val_blocks} validation block(s)"
            if not train_blocks:
                problem = f"{figures} and leave {train_blocks} to train"
            elif self.val_split == "auto" and val_blocks > max(MAX_VAL_OVERSHOOT * n_val, MAX_VAL_SHARE * n_blocks):
                problem = (
                    f"{figures}, over {MAX_VAL_OVERSHOOT}x the {n_val} of val_size={self.val_size} and over "
                    f"{MAX_VAL_SHARE:.0%} of all {n_blocks}"
                )
        if problem is None:
            return held
        if self.val_split == "document":
            raise DataError(
                f"{self.path}: data.val_split=document: {problem}; use data.val_split=block or more documents"
            )
        info(
            f"data.val_split=auto: {self.path} has {n_docs} document(s), too few or too long to hold out whole ones "
            f"({problem}); holding out random blocks instead"
        )
        return None

    def _report(self, held: np.ndarray) -> None:
        info(
            f"held out {int(held.sum())} of {len(held)} documents: {len(self.val)} validation and {len(self.train)} "
            f"training blocks of {self.block_size} tokens"
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        if self.streaming:
            self.prepare_data()
            path = self.token_file()
            ends = np.fromfile(index_file(path), dtype=np.uint64).astype(np.int64)
            lengths = np.diff(ends, prepend=0)
            held = self._document_split(lengths)
            if held is not None:
                self.train = DocumentBlocks(path, ends, np.flatnonzero(~held), self.block_size, self.dtype)
                self.val = DocumentBlocks(path, ends, np.flatnonzero(held), self.block_size, self.dtype)
                return self._report(held)
            blocks: Dataset = TokenBlocks(path, self.block_size, self.dtype)
        else:
            docs = [np.asarray(ids, dtype=self.dtype) for ids in self.documents()]
            held = self._document_split(np.array([len(d) for d in docs], dtype=np.int64))
            if held is not None:
                self.train = stream_blocks([d for d, h in zip(docs, held, strict=True) if not h], self.block_size)
                self.val = stream_blocks([d for d, h in zip(docs, held, strict=True) if h], self.block_size)
                return self._report(held)
            blocks = stream_blocks(docs, self.block_size)
        if len(blocks) < 2:
            raise DataError(
                f"{self.path}: the corpus fills {len(blocks)} block(s) of max_seq_length={self.block_size} tokens; "
                "it needs at least 2 (one to train, one held out)"
            )
        self.train, self.val = split_blocks(blocks, self.val_size, self.split_seed)

    def collate_fn(self):
        return partial(collate, pad_id=0)  # blocks are all max_seq_length long: nothing is padded
