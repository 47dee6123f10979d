"""Low-Rank Clone training: the student (models/lrc.py) learns from the data, the teacher's outputs and activations.

loss = ce_weight * CE + kl_weight * KL + aux_scale * sum over layers and clone sites of MSE(student, teacher)

- CE: the student's next-token cross-entropy on the target tokens (every token of text; the replies of chat data).
- KL: KL(teacher_T || student_T) of the next-token distributions softened by `temperature`, without a T^2 factor, as
  the method defines it; `kl_reduction: sequence` sums it over the target tokens and averages over sequences (the
  method's batch mean), `token` averages over target tokens (independent of the sequence length).
- Clone losses, each the mean squared difference over the real (non-padding) positions and the features, per layer,
  summed over layers: attention q, k and v (before RoPE; both have the teacher's width), the attention output in the
  teacher's space, MLP gate and up, and the MLP output in the student's space (the teacher's projected by the down
  projection's P). `clone_sites` names those that count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_peft.data.steps import batch_units, real_positions
from lit_peft.errors import UserError
from lit_peft.methods.quantize import quantize_base
from lit_peft.models.lrc import SITES, LowRankClone, capture, clone_settings
from lit_peft.tasks.base import ExampleLosses, Task, TrainModel, Units
from lit_peft.tasks.chunked_head import final_hidden, head_logits
from lit_peft.tasks.distill import distill_sums_chunked
from lit_peft.tasks.sft import target_counts

KL_REDUCTIONS = ("sequence", "token")


def masked_sse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Sum of (student - teacher)^2 over the masked positions (B, T), averaged over the features (per row: (B,))."""
    squared = (student.float() - teacher.float()).pow(2).mean(-1) * mask  # (B, T)
    return squared.sum(-1) if per_row else squared.sum()


def clone_losses(
    model: LowRankClone,
    student: dict[tuple[str, int], torch.Tensor],
    teacher: dict[tuple[str, int], torch.Tensor],
    mask: torch.Tensor,
    per_row: bool = False,
) -> dict[str, torch.Tensor]:
    """{site: squared error summed over layers and masked positions, averaged over features} (per row: (B,))."""
    losses: dict[str, torch.Tensor] = {}
    for (site, layer), s in student.items():
        t = teacher[(site, layer)]
        if site == "mlp_out":  # compared in the student's space: the teacher's output through the same P
            p = model.student.transformer.h[layer].mlp.proj.proj["all"]
            t = t.float() @ p.float()
        losses[site] = losses.get(site, 0) + masked_sse(s, t, mask, per_row)
    return losses


class LowRankCloneTask(Task):
    data_kinds = ("conversation", "text")
    perplexity = "ce"  # val/ppl is the student's held-out perplexity, not exp(val/loss)

    def __init__(
        self,
        temperature: float = 40.0,
        kl_weight: float = 1.0,
        ce_weight: float = 1.0,
        aux_scale: float = 0.2,
        clone_sites: list[str] | tuple[str, ...] = SITES,
        kl_reduction: str = "sequence",
    ) -> None:
        clone_sites = tuple(clone_sites or ())
        bad = [s for s in clone_sites if s not in SITES]
        if bad:
            raise UserError(f"unknown task.clone_sites entry {bad[0]!r}; valid: {', '.join(SITES)}")
        if kl_reduction not in KL_REDUCTIONS:
            raise UserError(f"unknown task.kl_reduction {kl_reduction!r}; valid: {', '.join(KL_REDUCTIONS)}")
        if not temperature > 0:
            raise UserError(f"task.temperature must be positive, got {temperature}")
        for name, value in (("kl_weight", kl_weight), ("ce_weight", ce_weight), ("aux_scale", aux_scale)):
            if value < 0:
                raise UserError(f"task.{name} must be >= 0, got {value}")
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight
        self.aux_scale, self.clone_sites, self.kl_reduction = aux_scale, clone_sites, kl_reduction

    def build_model(self, base: nn.Module, cfg: Any, compute_dtype: torch.dtype) -> TrainModel:
        """The student cloned from the base (lrc.* settings); the teacher is the base, frozen (4-bit if asked)."""
        settings = clone_settings(cfg)  # checked against the rest of the config
        quantize_base(base, cfg.get("quantize"), compute_dtype)  # checks the mode first
        clone = LowRankClone(base, settings)
        return TrainModel(clone, {"lrc": settings.to_dict()}, full=False, trunk=clone.student)

    def export_name(self, method: str) -> str:
        return "lrc"  # the clone's projections and norms; scripts/convert_lrc.py makes a checkpoint of them

    def setup(self, module, datamodule) -> None:
        if not isinstance(module.model, LowRankClone):
            raise UserError("task=lrc needs the Low-Rank Clone model: set lrc.target_hidden_size")

    @property
    def metric_units(self) -> dict[str, str]:
        kl_unit = "sequences" if self.kl_reduction == "sequence" else "tokens"
        return {"kl": kl_unit, "clone": "positions", **{f"clone_{site}": "positions" for site in SITES}}

    def outputs(self, gpt: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, C): the heads run a chunk of target positions at a time."""
        return final_hidden(gpt, input_ids)

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        totals: Units | None = None,
        examples: ExampleLosses | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        local = batch_units(batch)
        totals = totals if totals is not None else local
        sites = self.clone_sites if self.aux_scale > 0 else ()
        with torch.no_grad(), capture(model.teacher, sites) as teacher_acts:
            teacher = self.outputs(model.teacher, input_ids)
        with capture(model.student, sites) as student_acts:
            student = self.outputs(model.student, input_ids)

        kl_unit = self.metric_units["kl"]
        kl_sum, ce_sum, teacher_ce_sum, kl_rows, ce_rows = distill_sums_chunked(
            model.student,
            student,
            lambda h: head_logits(model.teacher, h),
            teacher,
            labels,
            self.temperature,
            chunk=self.head_chunk,
        )
        teacher_ce = teacher_ce_sum / local["tokens"].clamp(min=1)
        mask = real_positions(labels)
        clones = clone_losses(model, student_acts, teacher_acts, mask) if sites else {}
        clone_sum = sum(clones.values(), torch.zeros((), device=student.device))
        if examples is not None:
            with torch.no_grad():
                clone_rows = clone_losses(model, student_acts, teacher_acts, mask, per_row=True) if sites else {}
            examples.record(
                self.example_losses(ce_rows, kl_rows, sum(clone_rows.values(), torch.zeros_like(ce_rows)), labels),
                target_counts(labels),
            )
        loss = (
            self.ce_weight * ce_sum / totals["tokens"].clamp(min=1)
            + self.kl_weight * kl_sum / totals[kl_unit].clamp(min=1)
            + self.aux_scale * clone_sum / totals["positions"].clamp(min=1)
        )
        metrics: dict[str, Any] = {
            "ce": ce_sum.detach() / local["tokens"].clamp(min=1),
            "kl": kl_sum.detach() / local[kl_unit].clamp(min=1),
            "clone": clone_sum.detach() / local["positions"].clamp(min=1),
            "teacher_ce": teacher_ce,
        }
        metrics.update({f"clone_{s}": v.detach() / local["positions"].clamp(min=1) for s, v in clones.items()})
        return loss, metrics

    def example_losses(
        self, ce: torch.Tensor, kl: torch.Tensor, clone: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Per row (B,): the row's loss as a batch of its own (each part over its own units), times its target tokens
        (the weight of the held-out loss), from the row's sums of CE, KL and clone losses."""
        tokens = target_counts(labels).double()
        kl_units = torch.ones_like(tokens) if self.kl_reduction == "sequence" else tokens
        positions = real_positions(labels).sum(-1).double()
        own = (
            self.ce_weight * ce.double() / tokens.clamp(min=1)
            + self.kl_weight * kl.double() / kl_units.clamp(min=1)
            + self.aux_scale * clone.double() / positions.clamp(min=1)
        )
        return own * tokens
