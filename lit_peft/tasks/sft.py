"""Supervised fine-tuning: next-token cross-entropy on the target (response) tokens only."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.steps import batch_units
from lit_peft.data.tokenize import IGNORE_INDEX
from lit_peft.tasks.chunked_head import HEAD_CHUNK, compute_dtype, final_hidden, row_sums, target_logprobs

Units = dict[str, torch.Tensor]


@dataclasses.dataclass
class ExampleLosses:
    """The per-example output a task records when it is passed one (validation does; training does not).

    `loss` (B,): each example's loss summed over its units, `weight` (B,): its units (target tokens; 1 per DPO pair),
    so that example i's loss is loss[i] / weight[i] and the batch's loss (totals=None) is loss.sum() / weight.sum().
    A task whose loss adds means over different units (lrc) records each example's loss as a batch of its own,
    times its weight.
    """

    loss: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def record(self, loss: torch.Tensor, weight: torch.Tensor) -> None:
        self.loss, self.weight = loss.detach().double(), weight.detach().double()


@dataclasses.dataclass
class TrainModel:
    """What a task trains, built from the loaded base model (Task.build_model).

    `meta`: what the export records about it (the method and its settings); `full`: every weight trains and the
    export is the whole model; `trunk`: the GPT whose blocks gradient checkpointing wraps.
    """

    model: nn.Module
    meta: dict[str, Any]
    full: bool
    trunk: nn.Module

    @property
    def settings(self) -> dict[str, Any]:
        """What the run summary shows of it: the method's settings (or the task's own model's)."""
        return next((v for v in self.meta.values() if isinstance(v, dict)), {})


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
    `examples`: when given, the task records every example's loss sum and weight in it (`ExampleLosses`), for the
    held-out loss's standard error and per-example comparisons between runs.
    """

    data_kinds: tuple[str, ...] = ("conversation",)
    perplexity: bool | str = False
    unit: str = "tokens"
    head_chunk: int = HEAD_CHUNK

    @property
    def metric_units(self) -> dict[str, str]:
        return {}

    def build_model(self, base: nn.Module, cfg: Any, compute_dtype: torch.dtype) -> TrainModel:
        """The model this task trains: the base with the configured CQIL groups and method installed (4-bit base
        when `quantize` is set). A task that trains something else (task=lrc: a student cloned from the base)
        overrides this and `export_name`."""
        from omegaconf import OmegaConf

        from lit_peft import cqil
        from lit_peft.model import install_method

        cqil.install(base, cqil.build_settings(cfg.get("cqil"), base.config.n_layer))  # before the method
        values = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
        method, settings = install_method(base, cfg.method.name, values, cfg.get("quantize"), compute_dtype)
        full = not method.wraps_linears and cfg.method.name == "full"
        return TrainModel(base, {"method": cfg.method.name, "settings": settings.to_dict()}, full=full, trunk=base)

    def export_name(self, method: str) -> str:
        """The run's export folder under out_dir: the whole model for method=full, else the adapter."""
        return "model" if method == "full" else "adapter"

    def attach(self, module) -> None:
        pass

    def setup(self, module, datamodule) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        totals: Units | None = None,
        examples: ExampleLosses | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


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
