"""Turn template segments into token ids and labels (-100 where the loss is masked)."""

from __future__ import annotations

import re

import torch
from litgpt import Tokenizer

from lit_peft.data.templates import Segment

IGNORE_INDEX = -100


def special_strings(tokenizer: Tokenizer) -> tuple[str, str]:
    """The text form of bos and eos, which templates write into their segments."""

    def text(i: int | None) -> str:
        if i is None:
            return ""
        if tokenizer.backend == "huggingface":
            return tokenizer.processor.id_to_token(i)
        return tokenizer.processor.id_to_piece(i)

    return text(tokenizer.bos_id), text(tokenizer.eos_id)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode text in which bos/eos (and, for HF tokenizers, any added special token) appear literally."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.encode(text, add_special_tokens=False).ids
    bos, eos = special_strings(tokenizer)
    ids: list[int] = []
    for piece in re.split(f"({re.escape(bos)}|{re.escape(eos)})", text):
        if piece == bos:
            ids.append(tokenizer.bos_id)
        elif piece == eos:
            ids.append(tokenizer.eos_id)
        elif piece:
            ids.extend(tokenizer.processor.encode(piece))
    return ids


def encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of raw text, no bos/eos added (special-token strings in the text map to their ids)."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.encode(text, add_special_tokens=False).ids
    return list(tokenizer.processor.encode(text))


def encode_segments(
    tokenizer: Tokenizer, segments: list[Segment], max_seq_length: int
) -> dict[str, torch.Tensor] | None:
    """input_ids and labels for one example; None if no target token fits in `max_seq_length`.

    A conversation too long for `max_seq_length` is cut after the last assistant turn that fits whole (the turn
    boundary); only when even the first reply does not fit is it cut inside that reply.
    """
    ids: list[int] = []
    labels: list[int] = []
    turn_ends: list[int] = []
    for text, target in segments:
        piece = encode_text(tokenizer, text)
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
        if target and piece:
            turn_ends.append(len(ids))
    if len(ids) > max_seq_length:
        # labels[t] is the token predicted at position t-1; position 0 is never a target.
        whole = [end for end in turn_ends if end <= max_seq_length and end > 1]
        cut = whole[-1] if whole else max_seq_length
        ids, labels = ids[:cut], labels[:cut]
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        return None
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into (B, T) tensors; padding is never a target."""
    longest = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        input_ids[i, :n] = x["input_ids"]
        labels[i, :n] = x["labels"]
    return {"input_ids": input_ids, "labels": labels}
