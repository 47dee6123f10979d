"""Tasks turn a batch into a loss and metrics. A task never knows which method is installed."""

from __future__ import annotations

from lit_peft.errors import UserError
from lit_peft.tasks.base import ExampleLosses, Task
from lit_peft.tasks.distill import Distill
from lit_peft.tasks.dpo import DPO
from lit_peft.tasks.lrc import LowRankCloneTask
from lit_peft.tasks.pretrain import Pretrain
from lit_peft.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {
    "sft": SFT,
    "pretrain": Pretrain,
    "dpo": DPO,
    "distill": Distill,
    "lrc": LowRankCloneTask,
}


def get_task(name: str, **settings) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**settings)


__all__ = ["DPO", "SFT", "TASKS", "Distill", "ExampleLosses", "LowRankCloneTask", "Pretrain", "Task", "get_task"]
