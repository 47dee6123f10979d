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


def target_counts(labels: torch.Tensor) -> torch.Tensor:
    """Target tokens per row (B,): the labels[:, t+1] predicted at t that are not masked."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


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
        # `cross_entropy_sum_chunked`, keeping the rows for the per-example sums
        logps, rows = target_logprobs(model, final_hidden(model, batch["input_ids"]), labels, self.head_chunk)
        if examples is not None:
            examples.record(-row_sums(logps, rows, labels.shape[0]), target_counts(labels))
        return -logps.sum() / totals["tokens"].clamp(min=1), {}
