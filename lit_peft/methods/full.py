"""Full fine-tuning: every weight trains; there is no adapter, the whole model is what gets saved."""

from __future__ import annotations

import dataclasses

from litgpt import GPT

from lit_peft.methods.base import Method, Settings


@dataclasses.dataclass(frozen=True)
class FullSettings(Settings):
    """None: every weight trains."""


class Full(Method):
    name = "full"
    Settings = FullSettings
    wraps_linears = False

    def apply(self, model: GPT, settings: FullSettings) -> list[str]:
        model.requires_grad_(True)
        return []
