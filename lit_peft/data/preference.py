"""Preference pairs for DPO: a prompt conversation and a chosen and a rejected reply, tokenized with the template.

Each side is the prompt rendered by the chat template plus one assistant reply, tokenized as one text (see
lit_peft.data.tokenize); only that reply (and its end token) is a target, every earlier turn is context. Both sides of
a pair share ONE prompt, token for token. A pair too long for `max_seq_length` is cut as TRL's DPO does (truncation
mode keep_end): the shared prompt loses tokens from the left, down to `prompt_min_share` of `max_seq_length` (or as
few as the longer reply leaves room for, if that is more), then both replies are cut from the right to the room left;
a pair in which a reply keeps no target token is dropped.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import torch
from litgpt import Tokenizer

from lit_peft.console import info
from lit_peft.data.datamodule import SFTDataModule
from lit_peft.data.formats import IDENTICAL_PAIR, PREFERENCE_FORMATS, Preference, check_preference
from lit_peft.data.templates import Message, Template
from lit_peft.data.tokenize import IGNORE_INDEX, collate, encode_marked, special_strings
from lit_peft.errors import UserError

DEFAULT_PROMPT_MIN_SHARE = 0.5  # TRL's DPOConfig defaults: max_prompt_length 512 of max_length 1024


def check_prompt_min_share(share: float) -> float:
    if not 0 <= share < 1:
        raise UserError(
            f"prompt_min_share={share} must be in [0, 1): the share of max_seq_length a cut prompt keeps at least"
        )
    return float(share)


def _side(tokenizer: Tokenizer, template: Template, prompt: list[Message], reply: str) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + reply as one text, and which are targets (only the last reply and its end token)."""
    bos, eos = special_strings(tokenizer)
    segments = template.segments([*prompt, {"role": "assistant", "content": reply}], bos, eos)
    last = max(i for i, (_, target) in enumerate(segments) if target)
    marked = encode_marked(tokenizer, [(text, False) for text, _ in segments[:last]] + [segments[last]])
    return marked.ids, marked.target


def encode_pair(
    tokenizer: Tokenizer,
    template: Template,
    prompt: list[Message],
    chosen: str,
    rejected: str,
    max_seq_length: int,
    prompt_min_share: float = DEFAULT_PROMPT_MIN_SHARE,
    stats: Counter | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(chosen side, rejected side), each {input_ids, labels}, with identical prompt ids; None if the pair is dropped.

    `stats`, when given, counts "dropped", "cut_prompt" (prompt shortened) and "cut_reply" (a reply shortened).
    """
    check_prompt_min_share(prompt_min_share)
    sides = [_side(tokenizer, template, prompt, reply) for reply in (chosen, rejected)]
    # The shared prompt: the tokens both sides have in common before either side's first target token. It is each
    # side's whole context unless a token straddles the prompt/reply boundary differently on the two sides.
    first = [target.index(True) if True in target else len(target) for _, target in sides]
    shared = 0
    while shared < min(first) and sides[0][0][shared] == sides[1][0][shared]:
        shared += 1
    prompt_ids = sides[0][0][:shared]
    rests = [(ids[shared:], target[shared:]) for ids, target in sides]
    longest = max(len(ids) for ids, _ in rests)
    keep, room = shared, longest
    too_long = shared + longest > max_seq_length
    if too_long:
        floor = min(shared, int(prompt_min_share * max_seq_length))
        keep = min(shared, max(max_seq_length - longest, floor, 1), max_seq_length - 1)
        room = max_seq_length - keep
    prompt_ids = prompt_ids[shared - keep :]
    built = [(prompt_ids + ids[:room], [False] * keep + target[:room]) for ids, target in rests]
    if not all(any(target[1:]) for _, target in built):  # position 0 is never a target
        if stats is not None:
            stats["dropped"] += 1
        return None
    if stats is not None and too_long:
        stats["cut_prompt"] += keep < shared
        stats["cut_reply"] += room < longest
    out = []
    for ids, target in built:
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, target, strict=True)]
        out.append({"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)})
    return out[0], out[1]


def collate_pairs(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sides stacked into one (2B, T) batch: rows [0, B) chosen, [B, 2B) rejected."""
    both = collate([x["chosen"] for x in batch] + [x["rejected"] for x in batch], pad_id=pad_id)
    both["index"] = torch.tensor([x["index"] for x in batch], dtype=torch.long)
    return both


class PreferenceDataModule(SFTDataModule):
    """SFTDataModule's loading, shuffling and splitting, with preference records encoded as chosen/rejected pairs."""

    def __init__(self, *args, prompt_min_share: float = DEFAULT_PROMPT_MIN_SHARE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_min_share = check_prompt_min_share(prompt_min_share)

    @staticmethod
    def record_parser(record_format: str):
        if record_format not in PREFERENCE_FORMATS:
            raise UserError(
                f"unknown preference format {record_format!r}; valid: {', '.join(sorted(PREFERENCE_FORMATS))}"
            )
        return PREFERENCE_FORMATS[record_format]

    def encode_example(self, record: dict[str, Any], index: int, stats: Counter | None = None) -> dict[str, Any] | None:
        pair: Preference = check_preference(self.to_messages(record, self.source, index), self.source, index)
        sides = encode_pair(
            self.tokenizer,
            self.template,
            pair.prompt,
            pair.chosen,
            pair.rejected,
            self.max_seq_length,
            self.prompt_min_share,
            stats,
        )
        return None if sides is None else {"chosen": sides[0], "rejected": sides[1]}

    def report_lengths(self, stats: Counter, total: int) -> None:
        length = f"max_seq_length={self.max_seq_length}"
        if stats["dropped"]:
            info(
                f"{self.source}: dropped {stats['dropped']} of {total} pairs: a reply keeps no token in {length} "
                f"(with the prompt kept to at least prompt_min_share={self.prompt_min_share})"
            )
        if stats["cut_prompt"] or stats["cut_reply"]:
            info(
                f"{self.source}: cut {stats['cut_prompt']} of {total} pairs' shared prompts from the left and "
                f"{stats['cut_reply']} pairs' replies from the right at {length}"
            )

    def skipped_note(self) -> str:
        n = self.skipped[IDENTICAL_PAIR]
        return f"; skipped {n} pair{'s' * (n != 1)} whose chosen and rejected replies are identical" if n else ""

    def setup(self, stage: str | None = None) -> None:
        if self.train:
            return
        super().setup(stage)
        for index, example in enumerate(self.all_examples()):
            example["index"] = index  # the pair's id, for reference log-probs computed once before training

    def collate_fn(self):
        pad_id = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        return partial(collate_pairs, pad_id=pad_id)

    def all_examples(self) -> list[dict[str, Any]]:
        return self.val + self.train
