"""How a global batch splits: processes x micro-batches x accumulation. Light on imports: the config check runs it
before anything heavy is loaded, and the run uses the same answer."""

from __future__ import annotations

from typing import Any

from lit_peft.errors import ConfigError


def world_size(trainer: Any) -> int:
    """Processes that share a step: trainer.devices (a count; 1 otherwise) x trainer.num_nodes."""
    devices = trainer.get("devices", 1)
    count = devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 else 1
    return count * int(trainer.get("num_nodes", 1))


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step; ConfigError when the global batch does not split evenly."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not a multiple of micro_batch_size x devices x "
            f"num_nodes = {per_step}; valid: {', '.join(str(per_step * k) for k in (1, 2, 4, 8))}, ..."
        )
    return global_batch_size // per_step
