"""Knowledge distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, over target tokens.

The teacher is `self` (the same model with adapters and architecture edits such as CQIL switched off, in eval mode and
without gradients: one copy of the weights, two forwards per step) or a separate LitGPT checkpoint with the same
vocabulary. `kl: reverse` uses KL(student_T || teacher_T). Works on instruction data (targets: the replies) and on
packed text (targets: every token).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_peft.data.steps import batch_units
from lit_peft.data.tokenize import IGNORE_INDEX
from lit_peft.tasks.sft import Task, Units, causal_lm_loss, cross_entropy_sum

DIRECTIONS = ("forward", "reverse")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, direction: str):
    """Per-position KL divergence between the temperature-softened distributions, (B, T)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    return (t.exp() * (t - s)).sum(-1)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    direction: str = "forward",
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss over the target tokens (labels[:, 1:] != -100), summed and divided by `tokens` (default: their
    number here); its parts `kd` and `ce` are means over this batch's target tokens."""
    targets = labels[:, 1:] != IGNORE_INDEX
    n = targets.sum().clamp(min=1)
    tokens = n if tokens is None else tokens.clamp(min=1)
    kl = token_kl(student_logits[:, :-1], teacher_logits[:, :-1], temperature, direction)
    kd = (kl * targets).sum()
    ce = cross_entropy_sum(student_logits, labels) if alpha < 1 else torch.zeros((), device=kd.device)
    loss = (alpha * temperature**2 * kd + (1 - alpha) * ce) / tokens
    return loss, {"kd": kd.detach() / n, "ce": ce.detach() / n}


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
            raise ValueError(
                f"unknown task.teacher {teacher!r}; valid: self, checkpoint (with task.teacher_checkpoint)"
            )
        if teacher == "checkpoint" and not teacher_checkpoint:
            raise ValueError("task.teacher=checkpoint needs task.teacher_checkpoint=<LitGPT checkpoint folder>")
        if kl not in DIRECTIONS:
            raise ValueError(f"unknown task.kl {kl!r}; valid: {', '.join(DIRECTIONS)}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"task.alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"task.temperature must be positive, got {temperature}")
        self.teacher, self.alpha, self.temperature, self.kl = teacher, alpha, temperature, kl
        self.teacher_checkpoint = teacher_checkpoint
        self._teachers: list[nn.Module] = []  # a separate teacher, kept out of the LightningModule's parameters

    def setup(self, module, datamodule) -> None:
        if self.teacher == "self":
            from lit_peft.methods import adapters

            if next(adapters(module.model), None) is None:
                raise ValueError(
                    "task.teacher=self needs an adapter method: with method=full the weights the teacher would use "
                    "are the ones being trained; use task.teacher=checkpoint task.teacher_checkpoint=<the base folder>"
                )
            return
        if self._teachers:
            return
        from lit_peft.model import load_base

        teacher = load_base(self.teacher_checkpoint)
        if teacher.config.padded_vocab_size != module.model.config.padded_vocab_size:
            raise ValueError(
                f"teacher {self.teacher_checkpoint} has vocabulary {teacher.config.padded_vocab_size}, the student "
                f"{module.model.config.padded_vocab_size}: distillation needs the same vocabulary"
            )
        dtype = next(module.model.parameters()).dtype
        self._teachers.append(teacher.to(module.device, dtype).eval().requires_grad_(False))

    @torch.no_grad()
    def teacher_logits(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        if self._teachers:
            return self._teachers[0](input_ids)
        from lit_peft.cqil import original_model

        was_training = model.training
        model.eval()
        try:
            with original_model(model):
                return model(input_ids)
        finally:
            model.train(was_training)

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], totals: Units | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        totals = totals if totals is not None else batch_units(batch)
        teacher = self.teacher_logits(model, batch["input_ids"])
        student = model(batch["input_ids"])
        loss, metrics = distill_loss(
            student, teacher, batch["labels"], self.alpha, self.temperature, self.kl, totals["tokens"]
        )
        if self.alpha == 1:  # CE is not part of the loss: still report the student's
            metrics["ce"] = causal_lm_loss(student.detach(), batch["labels"])
        metrics["teacher_ce"] = causal_lm_loss(teacher, batch["labels"])  # the same tokens under the teacher
        return loss, metrics
