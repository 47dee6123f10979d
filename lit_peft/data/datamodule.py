"""The supervised fine-tuning DataModule: records -> conversations -> template segments -> masked token ids."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from litgpt import Tokenizer
from torchdata.stateful_dataloader import StatefulDataLoader

from lit_peft.console import info
from lit_peft.data.formats import DataError, SkipRecord, check_conversation, get_format, load_records
from lit_peft.data.steps import ResumableSampler, StepBatches
from lit_peft.data.synthetic import synthetic_records
from lit_peft.data.templates import Template
from lit_peft.data.tokenize import collate, encode_segments, special_strings


def split_sizes(n: int, val_size: float | int) -> int:
    """Number of validation examples: a fraction of n (< 1) or a count."""
    n_val = round(n * val_size) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < n_val < n:
        raise DataError(f"val_size={val_size} leaves no train or no validation examples out of {n}")
    return n_val


def report_skipped(skipped: list[SkipRecord], total: int) -> None:
    """One line: how many records were skipped, how many for each reason, and the first one's message."""
    if skipped:
        reasons = Counter(getattr(e, "reason", "unusable") for e in skipped)
        counts = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        info(f"skipped {len(skipped)} of {total} records that cannot be used ({counts}), e.g. {skipped[0]}")


def make_loader(
    data, micro_batch_size: int, shuffle: bool, seed: int, collate_fn, num_workers: int = 0
) -> StatefulDataLoader:
    """One loader for any world size: the (seeded, per-epoch) order is the same on every world size and rank r takes
    examples r, r + W, ... of it, so a run on W processes sees the same global batches as one process with W times
    the gradient accumulation. One process is the W = 1 case of the same sampler, whose epoch Lightning sets.

    The loader is torchdata's StatefulDataLoader over a ResumableSampler: Lightning saves its state in checkpoints and
    restores it on resume, so a resumed run continues with the next unseen micro-batch of the same epoch order. Its
    own seeded generator keeps data loading off the global RNG (dropout's stream is the same with or without resume).
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = ResumableSampler(
        data,
        num_replicas=torch.distributed.get_world_size() if distributed else 1,
        rank=torch.distributed.get_rank() if distributed else 0,
        shuffle=shuffle,
        seed=seed,
    )
    return StatefulDataLoader(
        data,
        batch_size=micro_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),
    )


class SplitDataModule(L.LightningDataModule):
    """Loaders over `self.train` / `self.val` (set by `setup`), batched by the subclass's `collate_fn`."""

    micro_batch_size: int
    seed: int
    num_workers: int
    shuffle: bool

    def collate_fn(self) -> Callable:
        raise NotImplementedError

    def _loader(self, data, shuffle: bool) -> StatefulDataLoader:
        return make_loader(data, self.micro_batch_size, shuffle, self.seed, self.collate_fn(), self.num_workers)

    def train_dataloader(self) -> StatefulDataLoader | StepBatches:
        """The training loader; under a Trainer, its micro-batches carry their optimizer step's units (steps.py)."""
        loader = self._loader(self.train, shuffle=self.shuffle)
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return loader
        strategy = trainer.strategy
        return StepBatches(
            loader,
            trainer.accumulate_grad_batches,
            lambda t: strategy.reduce(t.to(strategy.root_device), reduce_op="sum").cpu(),
        )

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val, shuffle=False)


class SFTDataModule(SplitDataModule):
    def __init__(
        self,
        tokenizer: Tokenizer,
        template: Template,
        load: Callable[[], list[dict[str, Any]]],
        record_format: str,
        source: str,
        max_seq_length: int,
        micro_batch_size: int,
        val_size: float | int,
        seed: int,
        max_examples: int | None = None,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.tokenizer, self.template, self.load = tokenizer, template, load
        self.record_format = record_format
        self.to_messages = self.record_parser(record_format)
        self.source, self.max_seq_length = source, max_seq_length
        self.micro_batch_size, self.val_size, self.seed = micro_batch_size, val_size, seed
        self.max_examples, self.num_workers, self.shuffle = max_examples, num_workers, shuffle
        self.split_seed = split_seed
        self.skipped: Counter = Counter()  # records skipped by encode_records, per reason
        self.train: list[dict[str, torch.Tensor]] = []
        self.val: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def record_parser(record_format: str):
        return get_format(record_format)

    def encode_example(self, record: dict[str, Any], index: int, stats: Counter | None = None) -> dict[str, Any] | None:
        """One record -> a training example (None if no target token fits); may raise SkipRecord or DataError.
        `stats` counts examples dropped or cut for length (see encode_segments)."""
        bos, eos = special_strings(self.tokenizer)
        messages = check_conversation(self.to_messages(record, self.source, index), self.source, index)
        segments = self.template.segments(messages, bos, eos)
        return encode_segments(self.tokenizer, segments, self.max_seq_length, stats)

    def report_lengths(self, stats: Counter, total: int) -> None:
        """One line for the records dropped for length, one for those cut (as report_skipped does for skips)."""
        length = f"max_seq_length={self.max_seq_length}"
        if stats["dropped"]:
            info(f"{self.source}: dropped {stats['dropped']} of {total} records: no target token fits in {length}")
        if stats["cut_reply"] or stats["cut_turns"]:
            info(
                f"{self.source}: cut {stats['cut_reply'] + stats['cut_turns']} of {total} records at {length}: "
                f"{stats['cut_reply']} inside their first reply, {stats['cut_turns']} after the last whole turn "
                "that fits"
            )

    def encode_records(self, records: list[dict[str, Any]], indices: list[int]) -> list[dict[str, Any]]:
        """Encode records[i] for i in `indices` (their positions in the file, which errors name)."""
        examples = []
        skipped: list[SkipRecord] = []
        stats: Counter = Counter()
        for i in indices:
            try:
                example = self.encode_example(records[i], i, stats)
            except SkipRecord as e:
                skipped.append(e)
                continue
            if example is not None:
                example["record"] = i  # its position in the file
                examples.append(example)
        report_skipped(skipped, len(indices))
        self.report_lengths(stats, len(indices))
        self.skipped = Counter(getattr(e, "reason", "unusable") for e in skipped)
        if not examples and not skipped:
            raise DataError(
                f"{self.source}: none of {len(indices)} records gives an example with a target token within "
                f"max_seq_length={self.max_seq_length}"
            )
        if not examples:  # say what became of them, not blame max_seq_length for records that cannot be used
            counts = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            rest = len(indices) - len(skipped)
            too_long = f"; the other {rest} keep no target token within max_seq_length={self.max_seq_length}"
            raise DataError(
                f"{self.source}: none of {len(indices)} records gives a training example (a reply to learn): "
                f"{len(skipped)} cannot be used ({counts}; e.g. {skipped[0]}){too_long if rest else ''}"
            )
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train:
            return
        records = self.load()
        order = list(range(len(records)))
        # The held-out records are drawn with their own seed, from the whole file, before `max_examples` caps the
        # training records: a seed sweep or another max_examples keeps the same held-out set.
        random.Random(self.split_seed).shuffle(order)
        n_val = split_sizes(len(records), self.val_size)
        held, rest = order[:n_val], order[n_val:]
        if self.max_examples:
            rest = rest[: self.max_examples]
        examples = self.encode_records(records, held + rest)  # one pass, one report
        held_set = set(held)
        self.val = [x for x in examples if x["record"] in held_set]
        self.train = [x for x in examples if x["record"] not in held_set]
        if not self.val or not self.train:
            raise DataError(
                f"{self.source}: data.val_size={self.val_size} leaves {len(self.val)} held-out and {len(self.train)} "
                "training examples after records that cannot be used were dropped; both need at least one"
            )
        info(
            f"held-out set: {len(self.val)} examples from {n_val} records (data.val_size={self.val_size}, "
            f"data.split_seed={self.split_seed}); training: {len(self.train)} examples{self.skipped_note()}"
        )

    def skipped_note(self) -> str:
        """What the held-out line adds about skipped records (a subclass names the skips that matter to it)."""
        return ""

    def collate_fn(self) -> Callable:
        pad_id = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        return partial(collate, pad_id=pad_id)


def record_loader(cfg: dict[str, Any], seed: int) -> tuple[Callable[[], list[dict[str, Any]]], str]:
    """(a function returning the raw records, a name for messages) for a data config node."""
    if cfg.get("synthetic"):
        return partial(synthetic_records, int(cfg["synthetic"]["num_examples"]), seed), "synthetic"
    path = cfg.get("path")
    if not path:
        raise DataError("data.path is not set: give a local JSON/JSONL/Parquet file or a hub data set name")
    return partial(load_records, str(path), cfg.get("split", "train"), dict(cfg.get("columns") or {})), str(path)
