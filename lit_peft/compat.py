"""Every use of another library's private API, in one place, each for want of a public one; tests/test_compat.py
fails loudly when an upgrade moves one.

- Lightning: whether the current micro-batch ends an optimizer step (`fit_loop._should_accumulate`), for callbacks
  that act once per optimizer step; no public hook says it (on_before_optimizer_step is skipped for a step the
  LightningModule skips).
- torch: a module's compiled call (`nn.Module._compiled_call_impl`): `nn.Module.compile` sets it publicly, but only
  with a new compiled function per module; we share one compiled function across the blocks and need to undo it.
- Hydra: its basic sweeper (`hydra._internal...BasicSweeper`), which our group-aware sweeper extends and whose job
  splitting the report follows; and a failed job's exception (`JobReturn._return_value`): the public
  `return_value` raises it but also prints to stderr.
"""

from __future__ import annotations

from typing import Any


def should_accumulate(trainer: Any) -> bool:
    """True while the current micro-batch does not end an optimizer step (gradients are still accumulating)."""
    return bool(trainer.fit_loop._should_accumulate())


def compiled_call(module: Any) -> Any:
    """What `module(...)` runs instead of its eager forward when compiled, or None."""
    return module._compiled_call_impl


def set_compiled_call(module: Any, call: Any) -> None:
    """Make `module(...)` run `call` (None: eager again); state dicts and parameter names are unchanged."""
    module._compiled_call_impl = call


def basic_sweeper() -> type:
    """Hydra's basic sweeper class."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper


def job_exception(job_return: Any) -> BaseException | Any:
    """The exception a failed Hydra job raised (its return value when it did not fail)."""
    return job_return._return_value
