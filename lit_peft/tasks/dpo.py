"""Direct Preference Optimization (and IPO) against a reference that is the model itself before training.

Loss on summed reply log-probabilities (Rafailov et al.), with conservative label smoothing:
    z = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    sigmoid: -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
    ipo:     (z - 1 / (2 beta))^2, on log-probabilities averaged over the reply's tokens (Azar et al.)
The reference is always the model as it was loaded, before training and before any architecture edit (CQIL groups
are undone for it): for adapter methods, the same model with its adapters switched off (no second copy of the
weights); for `full`, its log-probabilities computed once before training (`reference: precompute`; every rank
computes a share of the pairs, the table is summed across ranks and saved in the checkpoint), or a frozen copy taken
before a checkpoint is restored (`reference: copy`, twice the weight memory). The loss is a mean over the pairs of the
optimizer step's global batch. Dropout is switched off in the policy's passes unless `disable_dropout: false` (as
TRL does by default): with it, the policy at step 0 is the reference and the loss starts at log 2.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.steps import batch_units
from lit_peft.data.tokenize import IGNORE_INDEX
from lit_peft.errors import UserError
from lit_peft.methods import adapters
from lit_peft.models import cqil
from lit_peft.models.cqil import original_model
from lit_peft.tasks.base import ExampleLosses, Task, Units
from lit_peft.tasks.chunked_head import compute_dtype, reply_logps_chunked

LOSSES = ("sigmoid", "ipo")
REFERENCES = ("auto", "adapters_off", "precompute", "copy")


def reply_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' log-probabilities, number of target tokens) per row."""
    logits, targets = logits[:, :-1].to(compute_dtype(logits.dtype)), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of every pair (B,) and the metrics, means over the pairs here."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    z = chosen_ratio - rejected_ratio
    if loss == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses, {
        "rewards_chosen": chosen_reward.mean(),
        "rewards_rejected": rejected_reward.mean(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
    }


class DPO(Task):
    data_kinds = ("preference",)
    unit = "pairs"

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss: str = "sigmoid",
        reference: str = "auto",
        disable_dropout: bool = True,
    ) -> None:
        if loss not in LOSSES:
            raise UserError(f"unknown task.loss {loss!r}; valid: {', '.join(LOSSES)}")
        if reference not in REFERENCES:
            raise UserError(f"unknown task.reference {reference!r}; valid: {', '.join(REFERENCES)}")
        if not beta > 0:
            raise UserError(f"task.beta must be positive, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise UserError(f"task.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing, self.loss, self.reference = beta, label_smoothing, loss, reference
        self.disable_dropout = bool(disable_dropout)
        self.mode: str | None = None
        self.table: torch.Tensor | None = None  # (pairs, 2 sides, [sum of log-probs, tokens]) for `precompute`
        self.frozen: nn.Module | None = None

    # ---------------------------------------------------------------- reference

    def resolve_mode(self, model: nn.Module) -> str:
        has_adapters = next(adapters(model), None) is not None
        if self.reference == "auto":
            return "adapters_off" if has_adapters else "precompute"
        if self.reference == "adapters_off" and not has_adapters:
            raise UserError("task.reference=adapters_off needs an adapter method; method=full has no off switch")
        return self.reference

    def attach(self, module) -> None:
        """Before a checkpoint is restored: the frozen copy is of the untrained weights, also on resume."""
        model = module.model
        self.mode = self.resolve_mode(model)
        if self.disable_dropout:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        if self.mode == "copy" and self.frozen is None:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
            cqil.uninstall(self.frozen)  # the copy's rewired forwards would still run the original's blocks

    def setup(self, module, datamodule) -> None:
        """Before the first step, on the device: place the copy, or compute the reference log-probabilities once."""
        model = module.model
        if self.mode is None:
            self.attach(module)
        if self.frozen is not None:  # the same device and dtypes as the model the strategy prepared
            self.frozen.to(module.device)
            for p, q in zip(self.frozen.parameters(), model.parameters(), strict=True):
                p.data = p.data.to(q.device, q.dtype)
        if self.mode == "precompute" and self.table is None:
            strategy = module.trainer.strategy
            self.table = self.precompute(
                model, datamodule, module.device, lambda t: strategy.reduce(t, reduce_op="sum")
            )

    @torch.no_grad()
    def precompute(self, model: nn.Module, datamodule, device: torch.device, reduce=None) -> torch.Tensor:
        """(pairs, 2 sides, [sum of log-probs, tokens]) under the reference, for every pair of the data set.

        The loader shards the pairs by rank (padding the last shard with repeats); each rank fills its rows, and the
        rows and the number of times each was filled are summed across ranks (`reduce`), so every rank holds the
        whole table.
        """
        examples = datamodule.all_examples()
        table = torch.zeros(len(examples), 2, 2, dtype=torch.float64)
        filled = torch.zeros(len(examples), dtype=torch.float64)
        was_training = model.training
        model.eval()
        with original_model(model):
            for batch in datamodule._loader(examples, shuffle=False):
                s, n = self.logps(model, batch["input_ids"].to(device), batch["labels"].to(device))
                index = batch["index"]
                rows = torch.stack([s, n.to(s.dtype)], -1).view(2, len(index), 2).transpose(0, 1).double().cpu()
                table.index_add_(0, index, rows)
                filled.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
        model.train(was_training)
        if reduce is not None:
            table, filled = (reduce(t.to(device)).cpu() for t in (table, filled))
        if (filled == 0).any():
            raise RuntimeError(f"DPO reference: {int((filled == 0).sum())} pairs were not computed on any rank")
        return table / filled.view(-1, 1, 1)

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.mode or self.resolve_mode(model)
        if mode == "precompute":
            if self.table is None:
                raise RuntimeError("DPO reference log-probabilities were not computed before training")
            rows = self.table[batch["index"].cpu()]  # (B, 2, 2)
            sums = torch.cat([rows[:, 0, 0], rows[:, 1, 0]]).to(batch["input_ids"].device, torch.float32)
            counts = torch.cat([rows[:, 0, 1], rows[:, 1, 1]]).to(batch["input_ids"].device).long()
            return sums, counts
        with torch.no_grad():
            if mode == "copy":
                with original_model(self.frozen):
                    return self.logps(self.frozen, batch["input_ids"], batch["labels"])
            with original_model(model):  # adapters off, CQIL undone: the model before training
                return self.logps(model, batch["input_ids"], batch["labels"])

    def logps(
        self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row (sum of the target tokens' log-probabilities, their number); the head a chunk at a time."""
        return reply_logps_chunked(model, input_ids, labels, self.head_chunk)

    # ---------------------------------------------------------------- loss

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        totals: Units | None = None,
        examples: ExampleLosses | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss over the pairs; `examples` gets each pair's loss (weight 1)."""
        totals = totals if totals is not None else batch_units(batch)
        sums, counts = self.logps(model, batch["input_ids"], batch["labels"])
        ref_sums, ref_counts = self.reference_logps(model, batch)
        if self.loss == "ipo":
            sums, ref_sums = sums / counts.clamp(min=1), ref_sums / ref_counts.clamp(min=1)
        policy_chosen, policy_rejected = sums.chunk(2)
        ref_chosen, ref_rejected = ref_sums.chunk(2)
        losses, metrics = dpo_losses(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing, self.loss
        )
        if examples is not None:
            examples.record(losses, torch.ones_like(losses))
        return losses.sum() / totals["pairs"].clamp(min=1), metrics

    # ---------------------------------------------------------------- checkpointed state

    def state_dict(self) -> dict[str, Any]:
        return {"reference_table": self.table} if self.table is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reference_table") is not None:
            self.table = state["reference_table"]
