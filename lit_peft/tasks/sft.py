"""Supervised fine-tuning: next-token cross-entropy on the target (response) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.steps import batch_units
from lit_peft.data.tokenize import IGNORE_INDEX
from lit_peft.tasks.base import ExampleLosses, Task, Units
from lit_peft.tasks.chunked_head import compute_dtype, final_hidden, row_sums, target_logprobs


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of predicting labels[:, t+1] from position t, over unmasked tokens."""
    logits = logits[:, :-1].reshape(-1, logits.size(-1))  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row (B,): the sum of the cross-entropies over its unmasked tokens (`cross_entropy_sum` row by row)."""
    b, t, v = logits.shape
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).to(compute_dtype(logits.dtype)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # (B*(T-1),), 0 where ignored
    return per_token.view(b, t - 1).sum(-1)


def target_counts(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens per row (B,): the labels[:, t+1] predicted at t that are not masked."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy summed over the target tokens, divided by `tokens` (default: their number in this batch)."""
    if tokens is None:
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    return cross_entropy_sum(logits, labels) / tokens.clamp(min=1)


class SFT(Task):
    data_kinds = ("conversation",)
    perplexity = True

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        totals: Units | None = None,
        examples: ExampleLosses | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        totals = totals if totals is not None else batch_units(batch)
        labels = batch["labels"]
        if self.head_chunk:  # `cross_entropy_sum_chunked`, keeping the rows for the per-example sums
            logps, rows = target_logprobs(model, final_hidden(model, batch["input_ids"]), labels, self.head_chunk)
            if examples is not None:
                examples.record(-row_sums(logps, rows, labels.shape[0]), target_counts(labels))
            return -logps.sum() / totals["tokens"].clamp(min=1), {}
        logits = model(batch["input_ids"])  # (B, T, V)
        if examples is not None:
            examples.record(cross_entropy_rows(logits, labels), target_counts(labels))
        return causal_lm_loss(logits, labels, totals["tokens"]), {}
