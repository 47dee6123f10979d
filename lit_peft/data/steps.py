"""What an optimizer step averages over: the units of a micro-batch, summed over the step's micro-batches and ranks.

A task's loss is a mean over some unit: target tokens (cross-entropy), preference pairs (DPO), sequences or real
positions (Low-Rank Clone's KL and activation losses). With gradient accumulation and several processes, the mean of
the micro-batch means is not the mean over the global batch: 2 target tokens at loss 1.0 and 30 at loss 3.0 average to
2.0, where the global batch's token mean is 2.875. `StepBatches` wraps a training loader: it reads the micro-batches of
one optimizer step ahead, counts their units, sums the counts across ranks and attaches the totals to every
micro-batch as `step_units`, so each micro-batch's loss can be its share of the global batch's mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import torch

from lit_peft.data.tokenize import IGNORE_INDEX

UNITS = ("tokens", "sequences", "pairs", "positions")


def real_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions up to each row's last target token (right padding after it is not real)."""
    positions = torch.arange(labels.size(1), device=labels.device)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).max(dim=1, keepdim=True).values
    return positions <= last


def batch_units(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch's units: target tokens (labels[:, t+1] predicted at t), rows, preference pairs, real positions."""
    labels = batch["labels"]
    return {
        "tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
        "sequences": torch.tensor(labels.size(0), device=labels.device),
        "pairs": torch.tensor(len(batch["index"]) if "index" in batch else 0, device=labels.device),
        "positions": real_positions(labels).sum(),
    }


def pack_units(units: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(units[u]).double().cpu() for u in UNITS])


def unpack_units(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(zip(UNITS, packed.unbind(-1), strict=True))


class StepBatches:
    """A training loader whose micro-batches carry `step_units`: the units of their optimizer step's global batch.

    `accumulate` micro-batches make one step on each rank (the last step of an epoch may have fewer, as in
    Lightning's loop); `reduce` sums a tensor across ranks (the strategy's all-reduce; identity on one process) and is
    called once per step on every rank, which see the same number of micro-batches (the sampler pads to equal shards).
    `sampler` and `batch_sampler` are the inner loader's, so Lightning sets the epoch of a shuffling sampler.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        accumulate: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.loader, self.accumulate, self.reduce = loader, accumulate, reduce

    @property
    def sampler(self):
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self):
        return getattr(self.loader, "batch_sampler", None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        while window := list(islice(batches, self.accumulate)):
            totals = sum(pack_units(batch_units(b)) for b in window)
            if self.reduce is not None:
                totals = self.reduce(totals)
            for batch in window:
                yield {**batch, "step_units": totals.detach().double().cpu()}
