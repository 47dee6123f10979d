"""Lightning plumbing: atomic checkpoint writes and the export of the adapter (or full model) for other tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_peft.checkpoints.adapter import save_adapter
from lit_peft.checkpoints.files import MODEL_RECORD, atomic_path, save_lit_checkpoint
from lit_peft.models.load import architecture
from lit_peft.training.fsdp import gathered_parameters


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but written to a temporary file and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        # Lightning checkpoints hold optimizer state and hyperparameters (plain containers), so weights_only holds.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class ExportAdapter(L.Callback):
    """Write `<out_dir>/adapter` (adapter weights + method settings) or `<out_dir>/model` (full fine-tuning); `name`
    picks another folder for other trainable parts (`lrc`: a Low-Rank Clone's projections and norms).

    Exported every `every_n_steps` optimizer steps and at the end of training, atomically, on global rank 0 only.
    """

    def __init__(
        self,
        out_dir: str | Path,
        meta: dict[str, Any],
        base_dir: str | Path,
        full: bool,
        every_n_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        self.out_dir, self.meta, self.base_dir, self.full = Path(out_dir), meta, Path(base_dir), full
        self.every_n_steps, self.name = every_n_steps, name

    @property
    def target(self) -> Path:
        return self.out_dir / (self.name or ("model" if self.full else "adapter"))

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Collective under FSDP (every rank gathers the shards), then compared across ranks.
        weights = gathered_parameters(trainer.strategy, pl_module.model, trainable_only=not self.full)
        digests = rank_digests(weights)
        if not trainer.is_global_zero:
            return
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks hold different adapter weights at step {trainer.global_step}: {digests}")
        arch = architecture(pl_module.model)
        meta = {
            **self.meta,
            "architecture": arch,
            "step": trainer.global_step,
            "rank_digests": digests,
        }
        if self.full:  # the model and its metadata appear together, in one rename
            save_lit_checkpoint(self.target, weights, self.base_dir, architecture=arch, records={MODEL_RECORD: meta})
        else:
            save_adapter(self.target, weights, meta)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != getattr(self, "_last", -1):
            self._last = step
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)


def rank_digests(weights: dict) -> list[str]:
    """SHA-256 of the trainable weights on every rank (one entry per rank), to prove the ranks agree."""
    import hashlib

    import torch.distributed as dist

    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().numpy().tobytes())
    digest = h.hexdigest()
    if not (dist.is_available() and dist.is_initialized()):
        return [digest]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return gathered
