"""Turn template segments into token ids and labels (-100 where the loss is masked).

A conversation is tokenized as ONE text (the segments joined), exactly as chat and the official chat templates
tokenize it, and the loss mask comes from each token's character span. Tokenizing segment by segment would differ
for SentencePiece-style tokenizers (Llama-2, TinyLlama, Mistral), which put a "▁" in front of every encoded text.

Mask rule: a token is a target when any character it covers lies in a target segment (a token that straddles the
boundary between the prompt and a reply is a target, so the reply's first real token is always the first target
and no reply character goes unlearned). A zero-width token (SentencePiece's dummy "▁" prefix) counts as covering the
character it stands before.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections import Counter

import torch
from litgpt import Tokenizer

from lit_peft.data.templates import Segment

IGNORE_INDEX = -100


def special_strings(tokenizer: Tokenizer) -> tuple[str, str]:
    """The text form of bos and eos, which templates write into their segments."""

    def text(i: int | None) -> str:
        if i is None or i < 0:
            return ""
        if tokenizer.backend == "huggingface":
            return tokenizer.processor.id_to_token(i) or ""
        return tokenizer.processor.id_to_piece(i)

    return text(tokenizer.bos_id), text(tokenizer.eos_id)


def _char_spans(text: str, byte_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """UTF-8 byte spans of `text` -> character spans (a span inside one character covers that character)."""
    char_of = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")] + [len(text)]
    return [(char_of[b], char_of[e - 1] + 1 if e > b else char_of[b]) for b, e in byte_spans]


def _sentencepiece_offsets(processor, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """ids of `processor.encode(text)` with their character spans, from sentencepiece's own alignment."""
    if hasattr(processor, "encode_as_immutable_proto"):  # sentencepiece 0.1.99 - 0.2.1: byte offsets
        pieces = processor.encode_as_immutable_proto(text).pieces
        return [p.id for p in pieces], _char_spans(text, [(p.begin, p.end) for p in pieces])
    encoded = processor.encode(text, out_type="offset_mapping")  # sentencepiece >= 0.2.2: character offsets
    return list(encoded["ids"]), [tuple(span) for span in encoded["offsets"]]


def encode_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode_text(tokenizer, text)` and, for each token, the (start, end) character span of `text` it covers."""
    if tokenizer.backend == "huggingface":
        encoding = tokenizer.processor.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]
    specials = {
        s: i for s, i in zip(special_strings(tokenizer), (tokenizer.bos_id, tokenizer.eos_id), strict=True) if s
    }
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text) if specials else [text]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for piece in pieces:
        if piece in specials:
            ids.append(specials[piece])
            offsets.append((at, at + len(piece)))
        elif piece:
            piece_ids, spans = _sentencepiece_offsets(tokenizer.processor, piece)
            ids += piece_ids
            offsets += [(at + a, at + b) for a, b in spans]
        at += len(piece)
    return ids, offsets


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode text in which bos/eos (and, for HF tokenizers, any added special token) appear literally."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.encode(text, add_special_tokens=False).ids
    return encode_offsets(tokenizer, text)[0]


def encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of raw text, no bos/eos added (special-token strings in the text map to their ids)."""
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.encode(text, add_special_tokens=False).ids
    return list(tokenizer.processor.encode(text))


@dataclasses.dataclass
class Marked:
    """The joined text's token ids, which of them are targets, and where each target segment's tokens end."""

    ids: list[int]
    target: list[bool]
    turn_ends: list[int]  # per target segment: 1 + the index of the last token covering it (0 if none does)


def encode_marked(tokenizer: Tokenizer, segments: list[Segment]) -> Marked:
    """Tokenize the segments joined into one text; mark tokens by the module docstring's rule."""
    text, spans = "", []
    for piece, is_target in segments:
        if is_target and piece:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    ids, offsets = encode_offsets(tokenizer, text)
    span_ends = [b for _, b in spans]
    target, turn_ends = [], [0] * len(spans)
    for t, (lo, hi) in enumerate(offsets):
        hi = max(hi, lo + 1)  # a zero-width token stands for the character at `lo`
        k = bisect.bisect_right(span_ends, lo)  # the first span that ends after the token starts
        hit = False
        while k < len(spans) and spans[k][0] < hi:
            turn_ends[k], hit = t + 1, True
            k += 1
        target.append(hit)
    return Marked(ids, target, turn_ends)


def encode_segments(
    tokenizer: Tokenizer, segments: list[Segment], max_seq_length: int, stats: Counter | None = None
) -> dict[str, torch.Tensor] | None:
    """input_ids and labels for one example; None if no target token fits in `max_seq_length`.

    A conversation too long for `max_seq_length` is cut after the last assistant turn that fits whole (the turn
    boundary); only when even the first reply does not fit is it cut inside that reply. `stats`, when given, counts
    "dropped" (None returned), "cut_reply" (cut inside the first reply) and "cut_turns" (later turns left out).
    """
    marked = encode_marked(tokenizer, segments)
    ids = marked.ids
    labels = [i if is_target else IGNORE_INDEX for i, is_target in zip(ids, marked.target, strict=True)]
    if len(ids) > max_seq_length:
        # labels[t] is the token predicted at position t-1; position 0 is never a target.
        whole = [end for end in marked.turn_ends if 1 < end <= max_seq_length]
        cut = whole[-1] if whole else max_seq_length
        lost_target = any(lab != IGNORE_INDEX for lab in labels[cut:])
        ids, labels = ids[:cut], labels[:cut]
        if stats is not None and lost_target and any(lab != IGNORE_INDEX for lab in labels[1:]):
            stats["cut_turns" if whole else "cut_reply"] += 1
    if all(lab == IGNORE_INDEX for lab in labels[1:]):
        if stats is not None:
            stats["dropped"] += 1
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
