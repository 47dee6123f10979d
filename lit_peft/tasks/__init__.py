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


EXAMPLE_DATA = {"conversation": "data=alpaca", "text": "data=text", "preference": "data=hh_rlhf"}


def check_data_kind(task_name: str, task: Task, data_format: str) -> str:
    """The kind of data `data.format` gives (conversation, text or preference); ConfigError when the task does not
    train on that kind."""
    from lit_peft.data.formats import format_kind
    from lit_peft.errors import ConfigError

    kind = format_kind(str(data_format))
    if kind not in task.data_kinds:
        raise ConfigError(
            f"task={task_name} trains on {' or '.join(task.data_kinds)} data; data.format={data_format} is {kind} "
            f"data (pick a data= config of that kind, e.g. {EXAMPLE_DATA[task.data_kinds[0]]})"
        )
    return kind


__all__ = [
    "DPO",
    "SFT",
    "TASKS",
    "Distill",
    "ExampleLosses",
    "LowRankCloneTask",
    "Pretrain",
    "Task",
    "check_data_kind",
    "get_task",
]
