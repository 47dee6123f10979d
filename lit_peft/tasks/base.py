"""The task contract: a `Task` turns batches into a loss and per-example losses; `TrainModel` is what it trains."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lit_peft.tasks.chunked_head import HEAD_CHUNK

Units = dict[str, torch.Tensor]  # counts of what a micro-batch trains on: tokens, pairs, sequences, positions


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
    logits (tasks/chunked_head.py): no task materialises the full (B, T, V) logits.
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

        from lit_peft.models import cqil
        from lit_peft.models.load import install_method

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
