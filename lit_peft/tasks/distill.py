"""Knowledge distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, over target tokens.

The teacher is `self` (the same model with adapters and architecture edits such as CQIL switched off, in eval mode and
without gradients: one copy of the weights, two forwards per step) or a separate LitGPT checkpoint with the same
vocabulary. `kl: reverse` uses KL(student_T || teacher_T). Works on instruction data (targets: the replies) and on
packed text (targets: every token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.steps import batch_units
from lit_peft.data.tokenize import IGNORE_INDEX
from lit_peft.errors import UserError
from lit_peft.tasks.base import ExampleLosses, Task, Units
from lit_peft.tasks.chunked_head import (
    HEAD_CHUNK,
    chunked,
    compute_dtype,
    final_hidden,
    head_logits,
    row_sums,
    target_positions,
)
from lit_peft.tasks.sft import target_counts

DIRECTIONS = ("forward", "reverse")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, direction: str):
    """Per-position KL divergence between the temperature-softened distributions, (B, T)."""
    dtype = compute_dtype(student_logits.dtype)
    s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if direction == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    return (t.exp() * (t - s)).sum(-1)


class DistillSums(NamedTuple):
    """What `distill_sums_chunked` sums over the target tokens: in total, and the KL and student CE per row (B,)."""

    kl: torch.Tensor
    ce: torch.Tensor
    teacher_ce: torch.Tensor
    kl_rows: torch.Tensor
    ce_rows: torch.Tensor


def distill_sums_chunked(
    student: nn.Module,
    student_hidden: torch.Tensor,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    direction: str = "forward",
    chunk: int = HEAD_CHUNK,
) -> DistillSums:
    """(KL sum, student CE sum, teacher CE sum) over the target tokens, from both models' final hidden states (B, T, C),
    the heads a chunk of target positions at a time (tasks/chunked_head.py), and the KL and student CE per row
    (detached). `teacher_head` turns the teacher's hidden states into its logits; it runs without gradients (and again
    in backward, with the student's chunk)."""
    h, targets, rows = target_positions(student_hidden, labels)
    t, _, _ = target_positions(teacher_hidden, labels)
    dtype = compute_dtype(student_hidden.dtype)

    def sums(h: torch.Tensor, t: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = head_logits(student, h).to(dtype)  # (n, V)
        with torch.no_grad():
            tl = teacher_head(t).to(dtype)  # (n, V)
            teacher_ce = tl.logsumexp(-1) - tl.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ce = s.logsumexp(-1) - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        kl = token_kl(s, tl, temperature, direction)
        return kl.sum().view(1), ce.sum().view(1), teacher_ce.sum().view(1), kl.detach(), ce.detach()

    kl, ce, teacher_ce, kl_each, ce_each = chunked(sums, chunk, h, t, targets)  # sums per chunk; per position (N,)
    n = labels.shape[0]
    return DistillSums(kl.sum(), ce.sum(), teacher_ce.sum(), row_sums(kl_each, rows, n), row_sums(ce_each, rows, n))


class Distill(Task):
    data_kinds = ("conversation", "text")
    perplexity = "ce"  # val/loss is the distillation loss; val/ppl is the student's, from its CE

    def __init__(
        self,
        teacher: str = "self",
        alpha: float = 0.5,
        temperature: float = 1.0,
        kl: str = "forward",
        teacher_checkpoint: str | None = None,
    ) -> None:
        if teacher not in ("self", "checkpoint"):
            raise UserError(f"unknown task.teacher {teacher!r}; valid: self, checkpoint (with task.teacher_checkpoint)")
        if teacher == "checkpoint" and not teacher_checkpoint:
            raise UserError("task.teacher=checkpoint needs task.teacher_checkpoint=<LitGPT checkpoint folder>")
        if kl not in DIRECTIONS:
            raise UserError(f"unknown task.kl {kl!r}; valid: {', '.join(DIRECTIONS)}")
        if not 0 <= alpha <= 1:
            raise UserError(f"task.alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise UserError(f"task.temperature must be positive, got {temperature}")
        self.teacher, self.alpha, self.temperature, self.kl = teacher, alpha, temperature, kl
        self.teacher_checkpoint = teacher_checkpoint
        self._teachers: list[nn.Module] = []  # a separate teacher, kept out of the LightningModule's parameters

    def setup(self, module, datamodule) -> None:
        if self.teacher == "self":
            from lit_peft.methods import adapters

            if next(adapters(module.model), None) is None:
                raise UserError(
                    "task.teacher=self needs an adapter method: with method=full the weights the teacher would use "
                    "are the ones being trained; use task.teacher=checkpoint task.teacher_checkpoint=<the base folder>"
                )
            return
        if self._teachers:
            return
        from lit_peft.models.load import load_base

        teacher = load_base(self.teacher_checkpoint)
        if teacher.config.padded_vocab_size != module.model.config.padded_vocab_size:
            raise UserError(
                f"teacher {self.teacher_checkpoint} has vocabulary {teacher.config.padded_vocab_size}, the student "
                f"{module.model.config.padded_vocab_size}: distillation needs the same vocabulary"
            )
        dtype = next(module.model.parameters()).dtype
        self._teachers.append(teacher.to(module.device, dtype).eval().requires_grad_(False))

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        if self._teachers:
            return self._teachers[0](input_ids)
        from lit_peft.models.cqil import original_model

        was_training = model.training
        model.eval()
        try:
            with original_model(model):
                return model(input_ids)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def teacher_hidden(
        self, model: nn.Module, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The teacher's final hidden states (B, T, C) and its head (hidden states -> logits)."""
        if self._teachers:
            teacher = self._teachers[0]
            return final_hidden(teacher, input_ids), lambda h: head_logits(teacher, h)
        from lit_peft.models.cqil import original_model

        def head(h: torch.Tensor) -> torch.Tensor:
            with original_model(model):  # an adapter on the head is off for the teacher
                return head_logits(model, h)

        was_training = model.training
        model.eval()
        try:
            with original_model(model):
                return final_hidden(model, input_ids), head
        finally:
            model.train(was_training)

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        totals: Units | None = None,
        examples: ExampleLosses | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        totals = totals if totals is not None else batch_units(batch)
        return self.chunked_loss(model, batch, totals, examples)

    def combine(self, kd: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """alpha T^2 KD + (1 - alpha) CE, of sums over the same tokens (per row or in total)."""
        loss = self.alpha * self.temperature**2 * kd
        return loss + (1 - self.alpha) * ce if self.alpha < 1 else loss

    def chunked_loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        totals: Units,
        examples: ExampleLosses | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """alpha T^2 KD + (1 - alpha) CE over the target tokens, and its parts, without either model's full logits."""
        labels = batch["labels"]
        teacher, teacher_head = self.teacher_hidden(model, batch["input_ids"])
        student = final_hidden(model, batch["input_ids"])
        kd, ce, teacher_ce, kd_rows, ce_rows = distill_sums_chunked(
            model, student, teacher_head, teacher, labels, self.temperature, self.kl, self.head_chunk
        )
        loss = self.combine(kd, ce)
        if examples is not None:
            examples.record(self.combine(kd_rows, ce_rows), target_counts(labels))
        n = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        metrics = {"kd": kd.detach() / n, "ce": ce.detach() / n, "teacher_ce": teacher_ce / n}
        return loss / totals["tokens"].clamp(min=1), metrics
