"""torch.compile per transformer block (`trainer.compile`), and undoing it when a job ends."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from lit_peft.compat import compiled_call, set_compiled_call
from lit_peft.errors import UserError

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # trainer.compile=true is inductor; the others debug it


def run_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call `block` as its module call does (hooks, forward, CQIL's and gradient checkpointing's wrappers).

    The frame compile_blocks compiles: dynamo traces from here into the block; started at the block's own call it
    would skip torch.nn's frames and stop at `torch.utils.checkpoint`, which is disabled for dynamo unless traced.
    """
    return block._call_impl(*args, **kwargs)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile every LitGPT transformer block in `model` in place; returns how many were compiled.

    Per block: what a block runs (adapters swapped into its Linears, attention with RoPE, CQIL's rewired forwards,
    gradient checkpointing) is compiled, while embeddings, the head and the loss stay eager. Identical blocks share
    one compiled graph (dynamo lifts their parameters to inputs); the variants (training, validation, adapters off for
    a DPO reference or a distillation teacher) compile once each. The module tree is unchanged, so parameter names,
    state dicts, checkpoints and exports keep their keys (no `_orig_mod.`); a deep copy is eager (torch drops the
    compiled call when a module is copied or pickled).
    """
    from litgpt.model import Block

    if backend not in COMPILE_BACKENDS:
        raise UserError(f"unknown compile backend {backend!r}; valid: {', '.join(COMPILE_BACKENDS)}")
    # Every block and variant shares run_block's code object, whose compiled entries dynamo caps (8 by default, then
    # eager with a warning): training with and without an input gradient, validation, the last short batch, a
    # reference or teacher with adapters off, and CQIL's group leaders can come near that.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(run_block, backend=backend)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        if compiled_call(block) is None:
            set_compiled_call(block, partial(compiled, block))
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    """Undo `compile_blocks`: the blocks run eager again; returns how many were compiled. Each compiled call holds its
    block (a reference cycle), so a job drops them when it ends, and its model goes with its last reference."""
    from litgpt.model import Block

    blocks = [m for m in model.modules() if isinstance(m, Block) and compiled_call(m) is not None]
    for block in blocks:
        set_compiled_call(block, None)
    return len(blocks)
