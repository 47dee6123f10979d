"""CQIL, "concurrent computation of quasi-independent layers": groups of consecutive blocks read the same input.

In a group every member reads the group's input h, and the group's output is h plus the sum of the members'
residual updates: h + sum_i (f_i(h) - h). With `bypass` d > 0, member i's MLP input also receives the attention
outputs of the d members before it in the group (its residual stream does not):

    a_i = post_attn_norm(attn_i(norm_1(h)));   x_i = h + a_i
    f_i(h) = x_i + post_mlp_norm(mlp_i(norm_2(x_i + a_{i-1} + ... + a_{i-d})))

The rewiring is installed on a loaded LitGPT model without touching its parameters or their names (each member
block's forward is replaced: the first member runs the group, the others pass their input through), so adapters,
checkpoints and merging work unchanged, and `cqil_disabled(model)` switches back to the original model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lit_peft.errors import UserError


@dataclasses.dataclass(frozen=True)
class CQILSettings:
    groups: tuple[tuple[int, ...], ...]
    bypass: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [list(g) for g in self.groups], "bypass": self.bypass}


PRESET = re.compile(r"^(pairs|triples|size(\d+)):(\d+)-(\d+)$")


def parse_groups(spec: Any) -> list[list[int]]:
    """Explicit groups ([[12, 13], [14, 15]]) or a preset: 'pairs:12-27', 'triples:12-26', 'size4:12-27'
    (consecutive groups of that size from the first layer to the last, both included)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        m = PRESET.match(spec.strip())
        if not m:
            raise UserError(
                f"cqil.groups={spec!r} is not a preset; valid: 'pairs:<first>-<last>', 'triples:<first>-<last>', "
                "'size<k>:<first>-<last>', or explicit groups such as [[12,13],[14,15]]"
            )
        size = {"pairs": 2, "triples": 3}.get(m.group(1)) or int(m.group(2))
        first, last = int(m.group(3)), int(m.group(4))
        if (last - first + 1) % size:
            raise UserError(
                f"cqil.groups={spec!r}: layers {first}..{last} ({last - first + 1}) are not groups of {size}"
            )
        return [list(range(s, s + size)) for s in range(first, last + 1, size)]
    try:
        return [[int(i) for i in g] for g in spec]
    except (TypeError, ValueError):
        raise UserError(
            f"cqil.groups={spec!r} must be a list of layer lists or a preset such as 'pairs:12-27'"
        ) from None


def build_settings(cfg: Any, n_layer: int) -> CQILSettings | None:
    """CQILSettings from a config node or dict ({groups, bypass}); None when no groups are given."""
    if not cfg:
        return None
    cfg = dict(cfg)
    groups = parse_groups(cfg.get("groups"))
    if not groups:
        return None
    bypass = int(cfg.get("bypass") or 0)
    check(groups, bypass, n_layer)
    return CQILSettings(tuple(tuple(g) for g in groups), bypass)


def check(groups: list[list[int]], bypass: int, n_layer: int) -> None:
    seen: set[int] = set()
    for g in groups:
        if len(g) < 2:
            raise UserError(f"cqil group {g} has {len(g)} layer; a group needs at least 2")
        if g != list(range(g[0], g[0] + len(g))):
            raise UserError(f"cqil group {g} is not consecutive layers (e.g. {list(range(g[0], g[0] + len(g)))})")
        if g[0] < 0 or g[-1] >= n_layer:
            raise UserError(f"cqil group {g} is out of range: the model has layers 0..{n_layer - 1}")
        if seen & set(g):
            raise UserError(f"cqil group {g} overlaps another group at layer {min(seen & set(g))}")
        seen |= set(g)
    if bypass < 0 or bypass >= max(len(g) for g in groups):
        raise UserError(f"cqil.bypass={bypass} must be in 0..{max(len(g) for g in groups) - 1} (members before each)")


def attention_output(block: nn.Module, h: torch.Tensor, rope: tuple) -> torch.Tensor:
    return block.post_attention_norm(block.attn(block.norm_1(h), *rope))


def run_group(members: list[nn.Module], bypass: int, h: torch.Tensor, rope: tuple) -> torch.Tensor:
    """h + sum of the members' updates, every member reading h. Dispatches on the model's inference mode."""
    mode = members[0]._cqil_mode
    if mode == "distributed":
        return _run_distributed(members, bypass, h, rope)
    if mode == "batched" and not bypass and members[0]._cqil_stacked is not None and not torch.is_grad_enabled():
        decoding = len(rope) > 3 and rope[3] is not None  # input_pos: KV-cache decoding, caches are per member
        if not decoding:
            return _run_batched(members, h, rope)
    return h + sum(_updates(members, range(len(members)), bypass, h, rope, attns=None))


def _updates(members, indices, bypass, h, rope, attns):
    """The residual updates f_i(h) - h of members `indices`; `attns` holds every member's attention output when
    bypass is on (computed here for the simulated path)."""
    if not bypass:
        return [members[i]._cqil_original(h, *rope) - h for i in indices]
    if attns is None:
        attns = [attention_output(block, h, rope) for block in members]
    updates = []
    for i in indices:
        block = members[i]
        earlier = attns[max(0, i - bypass) : i]
        extra = sum(earlier[1:], earlier[0]) if earlier else torch.zeros_like(h)
        x = h + attns[i]
        updates.append(x + block.post_mlp_norm(block.mlp(block.norm_2(x + extra))) - h)
    return updates


def _run_distributed(members, bypass, h, rope):
    """Rank r computes members r, r + W, ...; the updates are summed across ranks with one all-reduce (and, with
    bypass, the members' attention outputs are shared with one all-gather first)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(members), world))
    attns = None
    if bypass:
        local = {i: attention_output(members[i], h, rope) for i in mine}
        attns = []
        for i in range(len(members)):  # member i's attention output comes from rank i % world
            t = local[i] if i in local else torch.empty_like(h)
            dist.broadcast(t, src=i % world)
            attns.append(t)
    total = sum(_updates(members, mine, bypass, h, rope, attns), torch.zeros_like(h))
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return h + total


def _run_batched(members, h, rope):
    """All members in one pass: their weights stacked, the block's forward vmapped over the stack."""
    from torch.func import functional_call, vmap

    template, params, buffers = members[0]._cqil_stacked
    cos, sin, *rest = rope
    mask = rest[0] if rest else None

    def one(p, b):
        return functional_call(template, (p, b), (h, cos, sin, mask))

    outputs = vmap(one)(params, buffers)  # (members, B, T, C)
    return h + (outputs - h).sum(0)


def set_mode(model: nn.Module, mode: str) -> None:
    """How groups run: 'simulated' (members one after another, the default and the training path), 'batched' (one
    vmapped pass over stacked weights; inference without KV cache, bypass 0) or 'distributed' (members on different
    ranks of torch.distributed, updates summed by all-reduce; each rank holds the model)."""
    import copy

    from torch.func import stack_module_state

    if mode not in MODES:
        raise UserError(f"unknown CQIL mode {mode!r}; valid: {', '.join(MODES)}")
    if getattr(model, "cqil", None) is None:
        raise UserError("this model has no CQIL groups")
    if mode == "distributed":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise UserError("CQIL mode 'distributed' needs torch.distributed initialized (gloo on CPU, NCCL on GPU)")
    blocks = model.transformer.h
    for group in model.cqil.groups:
        members = [blocks[i] for i in group]
        stacked = None
        for block in members:
            block._cqil_stacked = None
        if mode == "batched":
            params, buffers = stack_module_state(members)  # copies: the stacked weights are frozen for inference
            template = copy.deepcopy(members[0]).to("meta")
            for attr in ("forward", "_cqil_original", "_cqil_mode", "_cqil_stacked"):
                template.__dict__.pop(attr, None)  # the plain Block forward, not the group's
            stacked = (template, params, buffers)
        for block in members:
            block._cqil_mode = mode
            block._cqil_stacked = stacked if block is members[0] else None


MODES = ("simulated", "batched", "distributed")


def install(model: nn.Module, settings: CQILSettings | None) -> None:
    """Rewire `model` (a LitGPT GPT) in place. Installing on a model that already has CQIL is refused."""
    if settings is None:
        return
    if getattr(model, "cqil", None) is not None:
        raise UserError("this model already has CQIL groups installed")
    blocks = model.transformer.h
    check([list(g) for g in settings.groups], settings.bypass, len(blocks))
    if settings.bypass and model.config.parallel_residual:
        raise UserError("cqil.bypass > 0 needs a non-parallel-residual model (LLaMA-style blocks)")
    model.cqil = settings
    model.cqil_enabled = True
    for group in settings.groups:
        members = [blocks[i] for i in group]
        for block in members:
            block._cqil_original = block.forward  # bound method (or a gradient-checkpointing wrapper)
            block._cqil_mode, block._cqil_stacked = "simulated", None
        leader, rest = members[0], members[1:]
        leader.forward = _leader_forward(model, leader, members, settings.bypass)
        for block in rest:
            block.forward = _follower_forward(model, block)


def uninstall(model: nn.Module) -> None:
    """Undo `install` in place: every block runs its own forward again (a no-op on models without CQIL).

    For copies: `copy.deepcopy` copies the blocks but not the rewired forwards, closures over the original model."""
    if getattr(model, "cqil", None) is None:
        return
    for block in model.transformer.h:
        if "_cqil_original" in vars(block):
            block.forward = block._cqil_original
            for name in ("_cqil_original", "_cqil_mode", "_cqil_stacked"):
                vars(block).pop(name, None)
    model.cqil = None
    vars(model).pop("cqil_enabled", None)


def _leader_forward(model, leader, members, bypass):
    def forward(x, *rope, **kwargs):
        if not model.cqil_enabled:
            return leader._cqil_original(x, *rope, **kwargs)
        return run_group(members, bypass, x, (*rope, *kwargs.values()))

    return forward


def _follower_forward(model, block):
    def forward(x, *rope, **kwargs):
        if not model.cqil_enabled:
            return block._cqil_original(x, *rope, **kwargs)
        return x  # its update was added by the group's first member

    return forward


@contextlib.contextmanager
def cqil_disabled(model: nn.Module) -> Iterator[None]:
    """Run the original (sequential) model for the duration; a no-op on models without CQIL."""
    previous = getattr(model, "cqil_enabled", None)
    if previous is None:
        yield
        return
    model.cqil_enabled = False
    try:
        yield
    finally:
        model.cqil_enabled = previous


@contextlib.contextmanager
def original_model(model: nn.Module) -> Iterator[None]:
    """The model before any change this framework made: adapters off and architecture edits (CQIL) undone.

    The teacher of self-distillation, the reference of DPO: the same weights, no second copy.
    """
    from lit_peft.methods import adapters_disabled

    with adapters_disabled(model), cqil_disabled(model):
        yield
