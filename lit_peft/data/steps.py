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
from torch.utils.data import DistributedSampler

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
        self._window: list[dict[str, Any]] | None = None  # the current step's micro-batches
        self._window_state: dict[str, Any] | None = None  # the loader's state before them
        self._offset = 0  # how many of them were handed out
        self._skip = 0  # how many to skip after a restore (a checkpoint written inside a step)

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
        skip, self._skip = self._skip, 0
        while True:
            self._window_state = self._loader_state()
            window = list(islice(batches, self.accumulate))
            if not window:
                self._window, self._offset = None, 0
                return
            totals = sum(pack_units(batch_units(b)) for b in window)
            if self.reduce is not None:
                totals = self.reduce(totals)
            self._window, self._offset = window, skip
            for batch in window[skip:]:
                self._offset += 1
                yield {**batch, "step_units": totals.detach().double().cpu()}
            skip = 0

    # The loader's position, for Lightning to save in its checkpoint and restore on resume (a stateful loader).

    def _loader_state(self) -> dict[str, Any] | None:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else None

    def state_dict(self) -> dict[str, Any]:
        """The inner loader's state where the current step's window began, and how many of its micro-batches ran
        (0 at a step boundary, where checkpoints are written: then the loader's state after the window)."""
        if self._window is not None and self._offset < len(self._window):
            return {"loader": self._window_state, "offset": self._offset}
        return {"loader": self._loader_state(), "offset": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state["loader"])
        self._skip = int(state.get("offset", 0))


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (the seeded order of an epoch, rank r taking positions r, r + W, ...) whose state,
    the epoch and how far into it the run is, is saved with the loader (torchdata's StatefulDataLoader asks a sampler
    for `state_dict`), so a resumed run continues with the next unseen example in the uninterrupted run's order.

    The position is kept in global samples (this rank's count x W), so a checkpoint resumes on another world size.
    """

    def __init__(self, data, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0  # local position to begin the next iteration at (set by load_state_dict)
        self.yielded = 0  # local samples yielded in the current epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning; the restored one where it was left
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        self.yielded = start
        for index in indices[start:]:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.yielded * self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.start = self.yielded = int(state["consumed"]) // self.num_replicas
