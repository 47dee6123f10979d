"""The output head a chunk of target positions at a time: the (B, T, V) logits are never materialised.

With SmolLM2's 49k vocabulary the logits of a 4 x 1024-token micro-batch take 768 MiB in float32, and a
cross-entropy keeps about three such tensors alive (the logits, their float32 copy, the softmax for backward): more
than the whole 135M model's activations. Here the model runs up to its final norm (`final_hidden`), the positions
that have a target are gathered, and every chunk of `chunk` of them goes through the head and its loss inside
`torch.utils.checkpoint`: forward keeps only the chunk's hidden states, backward recomputes the chunk's logits, so
at most one chunk's logits exist at a time, at the cost of one more head forward per step (none when the targets fit
in one chunk). Only target positions are computed at all (an SFT prompt's positions never reach the head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_peft.data.tokenize import IGNORE_INDEX

# Target positions per chunk of logits: 1024 x 49152 float32 logits are 192 MiB (SmolLM2). 0 computes the full logits.
HEAD_CHUNK = 1024


def final_hidden(model: nn.Module, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The final norm's output (B, T, C): the model's own forward (blocks, CQIL, compiled blocks and all; `args` and
    `kwargs` go to it, e.g. KV-cache positions) without the head. A hook keeps `ln_f`'s output and hands the head zero
    positions, so no logits are computed."""
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        kept.append(out)
        return out[:, :0]  # (B, 0, C): the head and any softcapping run on nothing

    handle = model.transformer.ln_f.register_forward_hook(keep)
    try:
        model(input_ids, *args, **kwargs)
    finally:
        handle.remove()
    return kept[0]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's forward makes of `hidden` (..., C) after its final norm: the head and the logit softcapping."""
    logits = model.lm_head(hidden)
    cap = model.config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are computed in float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def target_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states (N, C) of the N positions t whose next label labels[:, t+1] is a target, those labels (N,),
    their rows (N,)) in row-major order."""
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    return hidden[:, :-1][mask], targets[mask], rows


def chunked(fn: Callable[..., tuple[torch.Tensor, ...]], chunk: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn over chunks of `chunk` rows of `inputs`, the outputs concatenated. When autograd records, every chunk but
    the last is checkpointed (its logits recomputed in backward instead of kept); backward starts with the last one,
    so keeping its logits costs no more memory than recomputing them would."""
    n = inputs[0].shape[0]
    outputs = []
    for start in range(0, n, chunk):
        part = [x[start : start + chunk] for x in inputs]
        if torch.is_grad_enabled() and start + chunk < n:
            outputs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outputs.append(fn(*part))
    if not outputs:  # no target position: empty outputs of the right kind, still attached to the graph
        return tuple(fn(*(x[:0] for x in inputs)))
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def target_logprobs(
    model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of every target token (N,), its row (N,)), from the final hidden states, chunk by chunk."""
    h, targets, rows = target_positions(hidden, labels)
    dtype = compute_dtype(hidden.dtype)

    def logprobs(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor]:
        logits = head_logits(model, h).to(dtype)  # (n, V)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (picked - logits.logsumexp(-1),)

    (logps,) = chunked(logprobs, chunk, h, targets)
    return logps, rows


def row_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-position values (N,) summed per row (n_rows,), rows (N,) as `target_positions` gives them."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def cross_entropy_sum_chunked(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK
) -> torch.Tensor:
    """`cross_entropy_sum(model(input_ids), labels)` without the full logits."""
    logps, _ = target_logprobs(model, final_hidden(model, input_ids), labels, chunk)
    return -logps.sum()


def reply_logps_chunked(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reply_logps(model(input_ids), labels)` without the full logits: per row, (sum of the target tokens'
    log-probabilities, number of target tokens)."""
    logps, rows = target_logprobs(model, final_hidden(model, input_ids), labels, chunk)
    return row_sums(logps, rows, labels.shape[0]), (labels[:, 1:] != IGNORE_INDEX).sum(-1)
