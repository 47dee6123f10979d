"""Preference pairs for DPO: a prompt conversation and a chosen and a rejected reply, tokenized with the template.

Each side is the prompt rendered by the chat template plus one assistant reply; only that reply (and its end token)
is a target, every earlier turn is context. A pair too long for `max_seq_length` loses prompt tokens from the left
first (the reply is what is scored), then reply tokens from the right; each side keeps at least one reply token.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from litgpt import Tokenizer

from lit_peft.data.formats import PREFERENCE_FORMATS, Preference
from lit_peft.data.module import SFTDataModule
from lit_peft.data.templates import Template
from lit_peft.data.tokenize import IGNORE_INDEX, collate, encode_text, special_strings


def encode_reply(
    tokenizer: Tokenizer, template: Template, prompt: list[dict[str, str]], reply: str, max_seq_length: int
) -> dict[str, torch.Tensor] | None:
    bos, eos = special_strings(tokenizer)
    segments = template.segments([*prompt, {"role": "assistant", "content": reply}], bos, eos)
    last = max(i for i, (_, target) in enumerate(segments) if target)
    context = [t for piece, _ in segments[:last] for t in encode_text(tokenizer, piece)]
    answer = encode_text(tokenizer, segments[last][0])
    if not answer:
        return None
    keep_context = max(1, max_seq_length - len(answer))  # position 0 is never a target: keep one context token
    context = context[-keep_context:] if context else context
    answer = answer[: max_seq_length - len(context)]
    ids = context + answer
    labels = [IGNORE_INDEX] * len(context) + answer
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def collate_pairs(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sides stacked into one (2B, T) batch: rows [0, B) chosen, [B, 2B) rejected."""
    both = collate([x["chosen"] for x in batch] + [x["rejected"] for x in batch], pad_id=pad_id)
    both["index"] = torch.tensor([x["index"] for x in batch], dtype=torch.long)
    return both


class PreferenceDataModule(SFTDataModule):
    """SFTDataModule's loading, shuffling and splitting, with preference records encoded as chosen/rejected pairs."""

    @staticmethod
    def record_parser(record_format: str):
        if record_format not in PREFERENCE_FORMATS:
            raise ValueError(
                f"unknown preference format {record_format!r}; valid: {', '.join(sorted(PREFERENCE_FORMATS))}"
            )
        return PREFERENCE_FORMATS[record_format]

    def encode_example(self, record: dict[str, Any], index: int) -> dict[str, Any] | None:
        pair: Preference = self.to_messages(record, self.source, index)
        sides = [
            encode_reply(self.tokenizer, self.template, pair.prompt, reply, self.max_seq_length)
            for reply in (pair.chosen, pair.rejected)
        ]
        return None if None in sides else {"chosen": sides[0], "rejected": sides[1]}

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
