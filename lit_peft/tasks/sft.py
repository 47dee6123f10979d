"""Supervised fine-tuning: next-token cross-entropy on the target (response) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.steps import batch_units
from lit_peft.data.tokenize import IGNORE_INDEX
from lit_peft.tasks.chunked_head import HEAD_CHUNK, compute_dtype, cross_entropy_sum_chunked

Units = dict[str, torch.Tensor]


class Task:
    """(model, batch, totals) -> (loss, metrics). `model` is the LitGPT GPT with whatever method is installed.

    The loss is a mean over `unit` (data/steps.py: tokens, sequences, pairs, positions), divided by `totals`: the
    units of the whole optimizer step (all micro-batches and ranks) when training, so that the micro-batches' losses
    add up to the global batch's mean; the batch's own units when `totals` is None. Metrics are means over this batch
    alone, each over its unit in `metric_units` (default `unit`), so the module can weight them exactly.

    `data_kinds`: the data formats' kinds the task trains on ('conversation', 'text', 'preference'). `perplexity`:
    whether val/ppl is logged, as exp of the held-out loss (True) or of the named metric (e.g. "ce").
    `attach(module)` runs before a checkpoint is restored and before the strategy wraps the model (what must be taken
    from the untrained weights); `setup(module, datamodule)` runs on the device before the first step;
    `state_dict()` is saved with Lightning checkpoints. `head_chunk`: target positions per chunk of the output head's
    logits (tasks/chunked_head.py); 0 computes the full (B, T, V) logits, as the model's forward does.
    """

    data_kinds: tuple[str, ...] = ("conversation",)
    perplexity: bool | str = False
    unit: str = "tokens"
    head_chunk: int = HEAD_CHUNK

    @property
    def metric_units(self) -> dict[str, str]:
        return {}

    def attach(self, module) -> None:
        pass

    def setup(self, module, datamodule) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], totals: Units | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of predicting labels[:, t+1] from position t, over unmasked tokens."""
    logits = logits[:, :-1].reshape(-1, logits.size(-1))  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy summed over the target tokens, divided by `tokens` (default: their number in this batch)."""
    if tokens is None:
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    return cross_entropy_sum(logits, labels) / tokens.clamp(min=1)


class SFT(Task):
    data_kinds = ("conversation",)
    perplexity = True

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], totals: Units | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        totals = totals if totals is not None else batch_units(batch)
        if self.head_chunk:
            ce = cross_entropy_sum_chunked(model, batch["input_ids"], batch["labels"], self.head_chunk)
            return ce / totals["tokens"].clamp(min=1), {}
        logits = model(batch["input_ids"])  # (B, T, V)
        return causal_lm_loss(logits, batch["labels"], totals["tokens"]), {}
