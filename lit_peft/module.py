"""The LightningModule: a LitGPT GPT with a method installed, trained on a task's loss."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from lit_peft.strategies import plain_name
from lit_peft.tasks import Task
from lit_peft.tasks.sft import COUNTS


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0 to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def clip_sharded_grad_norm_(wrapped: nn.Module, module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of an FSDP-sharded model; returns the norm before clipping.

    FSDP's own `clip_grad_norm_` reduces the shards across ranks but covers only its root's subtree, so it is called
    with an infinite bound on every root (one when the whole model is wrapped) to measure; parameters outside any
    FSDP unit are replicated and counted once. Then every local gradient is scaled by the same factor.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    roots = FSDP.fsdp_modules(wrapped, root_only=True) or FSDP.fsdp_modules(module, root_only=True)
    managed = {id(p) for r in roots for p in r.parameters()}
    with_grad = [p for p in module.parameters() if p.grad is not None]
    grads = [p.grad for p in with_grad]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    squares = [r.clip_grad_norm_(float("inf")).float().to(device) ** 2 for r in roots]
    squares += [p.grad.float().pow(2).sum() for p in with_grad if id(p) not in managed]
    total = torch.stack(squares).sum().sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.device, g.dtype))
    return total


class FineTuneModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        save_full_state: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.optimizer_factory = optimizer
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        # Adapter runs keep only trainable weights in Lightning checkpoints; the frozen base comes from its own folder.
        self.save_full_state = save_full_state
        self.strict_loading = save_full_state
        self._step_start: float | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def on_train_start(self) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)
        self.print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_start is None:
            self._step_start = time.perf_counter()

    def on_fit_start(self) -> None:
        self.task.setup(self, self.trainer.datamodule)

    def on_validation_start(self) -> None:
        self.task.setup(self, self.trainer.datamodule)  # also for a validation before training (idempotent)

    def _log_metrics(self, metrics: dict[str, torch.Tensor], train: bool, batch_size: int = 1) -> None:
        for k, v in metrics.items():
            if k in COUNTS:
                if train:
                    self.log(f"train/{k}", v.float(), on_step=True, on_epoch=False, reduce_fx="sum")
            elif train:
                self.log(f"train/{k}", v.float(), on_step=True, on_epoch=False)
            else:
                self.log(f"val_{k}", v.float(), on_epoch=True, sync_dist=True, batch_size=batch_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.task(self.model, batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self._log_metrics(metrics, train=True)
        self._tokens = getattr(self, "_tokens", 0) + int(batch["input_ids"].numel())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.fit_loop._should_accumulate():
            return
        elapsed = time.perf_counter() - (self._step_start or time.perf_counter())
        tokens = getattr(self, "_tokens", 0) * self.trainer.world_size
        self.log("tokens_per_sec", tokens / max(elapsed, 1e-9), prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        self._step_start, self._tokens = None, 0

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss x tokens, tokens)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.task(self.model, batch)
        weight = metrics.get("target_tokens", metrics.get("pairs", torch.tensor(1))).float()
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, batch_size=int(weight.clamp(min=1)), sync_dist=True)
        self._log_metrics(metrics, train=False, batch_size=int(weight.clamp(min=1)))
        value = metrics[self.task.perplexity] if isinstance(self.task.perplexity, str) else loss
        self._val_sums += torch.stack([value.detach().double() * weight.double(), weight.double()]).to(self.device)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.task.perplexity:
            total = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
            if total[1] > 0:
                self.log("val_ppl", torch.exp(total[0] / total[1]).float(), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the method left no parameter with requires_grad=True")
        if not self.save_full_state:
            # Lightning has already cast the module to the run's precision (e.g. bf16-true); adapters keep float32
            # weights so that small updates are not rounded away, and cast to the activations' dtype in forward.
            for p in params:
                p.data = p.data.float()
        optimizer = self.optimizer_factory(params)
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.warmup_steps, int(max_steps), self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_algorithm != "value":
            # Lightning's FSDP precision plugin refuses norm clipping (found on a GPU run of tests/test_scale.py).
            clip_sharded_grad_norm_(self.trainer.strategy.model, self, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["task_state"] = self.task.state_dict()
        if not self.save_full_state:
            # Only the adapter: the frozen base comes from its own folder. Keys are filtered (not re-read from the
            # parameters), since under FSDP the strategy has already gathered them from the shards.
            keep = {f"model.{plain_name(n)}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if plain_name(k) in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.task.load_state_dict(checkpoint.get("task_state") or {})
