"""Lightning precision plugins that keep trainable parameters in float32 under a half-precision base."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, HalfPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class TrainableFloat32Precision(HalfPrecision):
    """Lightning's `bf16-true` / `16-true`, but parameters that train stay float32 (adapters cast to the activations'
    dtype in their forward), so that small updates are not rounded away.

    The upcast happens where Lightning converts the module, before the strategy moves and wraps it: DDP then registers
    its gradient hooks on the float32 parameters. (Done after wrapping, e.g. in `configure_optimizers`, it would swap
    the parameters' storage under DDP's hooks and their gradients would no longer be all-reduced.)
    """

    def convert_module(self, module: nn.Module) -> nn.Module:
        # The float32 values themselves are kept, not a round trip through half precision: on resume, Lightning has
        # already loaded the checkpoint's float32 adapter weights into the module.
        keep = {p: p.data for p in module.parameters() if p.requires_grad}
        module = super().convert_module(module)
        if getattr(module, "trainable_float32", False):
            for p, data in keep.items():
                p.data = data.float()
        return module


class TrainableFloat32FSDPPrecision(FSDPPrecision):
    """Lightning's FSDP `bf16-true` / `16-true`, but for adapter runs the layout of `TrainableFloat32Precision`:
    frozen weights and buffers in half precision, trainable weights (and so AdamW's state) float32.

    Lightning casts the whole module to half precision and FSDP flattens each unit into one tensor of one dtype, so
    float32 adapters became half precision at the first forward, and AdamW's state with them. Here no FSDP mixed
    precision casts anything (each weight computes in its own dtype, as on one device: adapters in float32) and
    `PeftFSDPStrategy` gives float32 adapters units of their own (`dtype_uniform_units`). Full fine-tuning (no
    `trainable_float32`) is Lightning's own.
    """

    keep_float32 = False

    def convert_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if any(isinstance(m, FSDP) for m in module.modules()):
            return module  # converted before it was sharded, in an earlier trainer.validate or fit
        self.keep_float32 = bool(getattr(module, "trainable_float32", False))
        keep = {p: p.data for p in module.parameters() if p.requires_grad}
        module = super().convert_module(module)
        if self.keep_float32:
            for p, data in keep.items():
                if p.dtype != torch.float32:
                    p.data = data.float()
        return module

    @property
    def mixed_precision_config(self):
        return None if self.keep_float32 else super().mixed_precision_config


def precision_plugin(precision: str, strategy: Any) -> Precision | None:
    """The precision plugin for `-true` half precision (None: Lightning's own from the string; DeepSpeed brings its
    own precision plugin)."""
    if precision not in ("bf16-true", "16-true"):
        return None
    if isinstance(strategy, FSDPStrategy):
        return TrainableFloat32FSDPPrecision(precision)
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if name not in ("auto", "ddp", "DDPStrategy", "SingleDeviceStrategy"):
        return None
    return TrainableFloat32Precision(precision)
