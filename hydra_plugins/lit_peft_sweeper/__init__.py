"""Hydra loads sweepers only from the `hydra_plugins` namespace: the project's default sweeper lives here
(the rule it applies is lit_peft.sweeps.sweeper.applicable)."""

from __future__ import annotations

from lit_peft.compat import basic_sweeper
from lit_peft.sweeps.sweeper import applicable

BasicSweeper = basic_sweeper()


class GroupAwareSweeper(BasicSweeper):
    """Hydra's basic sweeper (same order, batches and folders) with `applicable` applied to its job list: a setting
    swept beside a group (method.nb beside method=lora,ether) applies to the choices that have it."""

    def split_arguments(self, overrides, max_batch_size):  # type: ignore[override] - an instance method here
        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        jobs = applicable([list(job) for batch in batches for job in batch], default_choices=self._choices())
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

    def _choices(self) -> dict[str, str]:
        choices = {}
        if self.config is not None:
            runtime = self.config.hydra.runtime.get("choices") or {}
            choices = {str(k): str(v) for k, v in runtime.items() if v is not None and "/" not in str(k)}
        return choices
