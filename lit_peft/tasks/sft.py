"""Supervised fine-tuning: next-token cross-entropy on the target (response) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.tokenize import IGNORE_INDEX


class Task:
    """batch -> (loss, metrics). `model` is the LitGPT GPT with whatever method is installed.

    `data_kinds`: the data formats' kinds the task trains on ('conversation', 'text', 'preference'). `perplexity`:
    whether val_ppl is logged, as exp of the held-out loss (True) or of the named metric (e.g. "ce"). Metrics named
    in COUNTS are summed over a step; the others are averaged, and logged as train/<name> and val_<name>.
    `setup(module, datamodule)` runs before the first step; `state_dict()` is saved with Lightning checkpoints.
    """

    data_kinds: tuple[str, ...] = ("conversation",)
    perplexity: bool | str = False

    def setup(self, module, datamodule) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from position t, over unmasked tokens."""
    logits = logits[:, :-1].reshape(-1, logits.size(-1))  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


COUNTS = ("target_tokens", "pairs")


class SFT(Task):
    data_kinds = ("conversation",)
    perplexity = True

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["input_ids"])  # (B, T, V)
        loss = causal_lm_loss(logits, batch["labels"])
        n_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return loss, {"target_tokens": n_targets}
