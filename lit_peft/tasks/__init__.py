"""Tasks turn a batch into a loss and metrics. A task never knows which method is installed."""

from __future__ import annotations

from lit_peft.tasks.sft import SFT, Task

TASKS: dict[str, type[Task]] = {"sft": SFT}


def get_task(name: str, **settings) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**settings)


__all__ = ["SFT", "TASKS", "Task", "get_task"]
