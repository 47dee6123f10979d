"""Continued pretraining: next-token cross-entropy on every token of packed text blocks."""

from __future__ import annotations

from lit_peft.tasks.sft import SFT


class Pretrain(SFT):
    """The SFT loss on blocks whose labels are the inputs themselves; held-out perplexity is logged as val/ppl."""

    data_kinds = ("text",)
