"""Low-Rank Clone (LRC): a narrower student whose every weight is a frozen teacher weight times a trained projection.

The student keeps the teacher's depth, heads, head size and MLP width; only the hidden size shrinks from d_t to
d_s = `target_hidden_size`. Each weight site owns a projection P of shape (d_t, d_s):

- input side (the weight reads the residual stream): W_s = W_t @ P for attention q, k and v (one P each, inside
  LitGPT's fused qkv), MLP gate and up, and the output head; the embedding table is E_s = E_t @ P;
- output side (the weight writes the residual stream): W_s = P^T @ W_t (bias P^T @ b_t) for the attention output
  and the MLP down projection.

The student's norms (size d_s) are its own parameters. Projections and norms are the only things that train; the
student's weights are generated from the teacher's in each forward (dequantized first when the teacher is 4-bit), so
the teacher is held once and nothing else is copied. The student itself is a LitGPT `GPT` of the student config in
which every Linear and the embedding are replaced by projected modules, so its forward is LitGPT's own code.
`fold()` computes the generated weights once: a plain LitGPT checkpoint of the student.

`SITES` are the activations the clone losses compare (tasks/lrc.py): q, k, v before RoPE, the attention output in
the teacher's space (before the output projection P), MLP gate and up, and the MLP output in the student's space
(the teacher's projected by the down projection's P).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from litgpt import GPT, Config
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lit_peft.checkpoints.kinds import folder_kind
from lit_peft.errors import UserError
from lit_peft.methods.base import Part, settings_from_dict
from lit_peft.methods.qkv import QKV_PARTS, qkv_rows
from lit_peft.methods.quantize import dense_weight

SITES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_out")
INITS = ("random", "identity")
# Linears that read the residual stream (projected on their input side); everything else writes it.
INPUT_SIDE = ("qkv", "fc_1", "fc_2", "fc", "lm_head")


@dataclasses.dataclass(frozen=True)
class LRCSettings:
    """The student's shape and how its projections start.

    init: `random` draws every projection from N(0, init_std^2) and sets student norms to one (the method's
    reference); `identity` starts from the truncated teacher (P = the first d_s columns of the identity, norms =
    the teacher's first d_s weights), which at d_s = d_t is the teacher itself.
    """

    target_hidden_size: int
    tie_embedding_projection: bool = True
    init: str = "random"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.target_hidden_size, int) or self.target_hidden_size < 1:
            raise UserError(f"lrc.target_hidden_size must be a positive integer, got {self.target_hidden_size!r}")
        if self.init not in INITS:
            raise UserError(f"unknown lrc.init {self.init!r}; valid: {', '.join(INITS)}")
        if not self.init_std > 0:
            raise UserError(f"lrc.init_std must be positive, got {self.init_std}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LRCSettings:
        return settings_from_dict(cls, values, "under lrc")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def student_config(teacher: Config, hidden_size: int) -> Config:
    """The teacher's config with hidden size `hidden_size`; head size and MLP width stay the teacher's."""
    values = {k: v for k, v in teacher.__dict__.items() if not k.startswith("_")}
    values.pop("rope_n_elem", None)  # derived from head_size in Config.__post_init__
    values.update(
        name=f"{teacher.name}-lrc{hidden_size}",
        n_embd=hidden_size,
        head_size=teacher.head_size,
        intermediate_size=teacher.intermediate_size,
    )
    config = Config(**{k: v for k, v in values.items() if k in Config.__dataclass_fields__})
    assert config.head_size == teacher.head_size and config.rope_n_elem == teacher.rope_n_elem
    return config


def check_teacher(config: Config) -> None:
    unsupported = []
    if config.n_expert:
        unsupported.append(f"n_expert={config.n_expert}")
    if config.latent_attention:
        unsupported.append("latent attention")
    if unsupported:
        raise UserError(
            f"Low-Rank Clone supports dense attention + MLP models; {config.name!r} has {', '.join(unsupported)}"
        )


def as_slice(rows: torch.Tensor) -> slice | torch.Tensor:
    """A contiguous run of indices as a slice (views instead of copies, forward and backward), else the indices."""
    start = int(rows[0]) if len(rows) else 0
    return slice(start, start + len(rows)) if torch.equal(rows, torch.arange(start, start + len(rows))) else rows


def factored_route_is_cheaper(side: str, tokens: int, o: int, i: int, d_s: int, n_proj: int, train: bool) -> bool:
    """Whether a ProjectedLinear goes through the teacher's width (factored) rather than generating the student's
    weight first, by multiply-adds (a count, not a fitted model: the same on every device).

    `side`: "in" (W_s = W_t P, (o, d_s)) or "out" (W_s = P^T W_t, (d_s, i)); the teacher weight is (o, i); `n_proj`:
    projections on the input side (one per fused qkv part). Counted for forward + backward when the projections train
    (the backward of a generated weight pays its generation again for dP and two token-sized matmuls; the factored
    route pays no weight gradient for the frozen W_t), for the forward alone otherwise. Small batches and wide outputs
    (the vocabulary head) favour the factored route, long batches the generated weight; ties go to the factored route
    (no weight materialised).
    """
    twice, thrice = (2, 3) if train else (1, 1)
    if side == "in":
        generated = twice * o * i * d_s + thrice * tokens * d_s * o
        factored = thrice * n_proj * tokens * d_s * i + twice * tokens * i * o
    else:
        generated = twice * d_s * o * i + thrice * tokens * i * d_s
        factored = twice * tokens * i * o + thrice * tokens * o * d_s
    return factored <= generated


class ProjectedLinear(nn.Module):
    """A student Linear generated from a frozen teacher Linear and trainable projections (d_t, d_s).

    side `in`: W_s = W_t @ P (one P per part: q, k and v of a fused qkv); side `out`: W_s = P^T @ W_t, b_s = P^T @ b_t.
    The forward either generates W_s or goes through the teacher's width (x @ P^T @ W_t^T on the input side,
    (x @ W_t^T + b_t) @ P on the output side), whichever costs fewer multiply-adds for the batch at hand. With
    `record` set, an output-side layer always takes the second route and keeps the teacher-space output in `recorded`
    (the attention-output clone loss compares it).
    """

    def __init__(self, teacher: nn.Module, side: str, parts: list[Part], student_width: int) -> None:
        super().__init__()
        self._teacher = (teacher,)  # a reference, not a submodule: the teacher's weights are registered once
        self.side = side
        teacher_width = teacher.in_features if side == "in" else teacher.out_features
        self.proj = nn.ParameterDict({p.name: nn.Parameter(torch.empty(teacher_width, student_width)) for p in parts})
        order = torch.cat([p.rows for p in parts])
        self.parts = [(p.name, as_slice(p.rows)) for p in parts]  # in row order (ParameterDict sorts its keys)
        self.natural_order = bool((order == torch.arange(len(order))).all())
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        self.in_features = student_width if side == "in" else teacher.in_features
        self.out_features = teacher.out_features if side == "in" else student_width
        self.compute = "auto"  # or "generated" / "factored" (see factored_is_cheaper)
        self.record = False
        self.recorded: torch.Tensor | None = None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def teacher_weight(self) -> torch.Tensor:
        return dense_weight(self.teacher)

    def generated(
        self, dtype: torch.dtype | None = None, teacher_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's (weight, bias), in `dtype` (default: the teacher weight's). `teacher_weight`: the dense W_t
        when the caller has it already (a 4-bit teacher is dequantized once per forward, not twice)."""
        w = self.teacher_weight() if teacher_weight is None else teacher_weight
        w = w.to(dtype or w.dtype)
        b = None if self.teacher.bias is None else self.teacher.bias.to(w.dtype)
        if self.side == "out":
            p = self.proj["all"].to(w.dtype)
            return p.T @ w, None if b is None else b @ p
        blocks = [w[rows] @ self.proj[name].to(w.dtype) for name, rows in self.parts]
        weight = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        if not self.natural_order:
            weight = weight[self.inverse]
        return weight, b

    @property
    def weight(self) -> torch.Tensor:  # some LitGPT code paths read `.weight` of Linears
        return self.generated()[0]

    def factored_is_cheaper(self, tokens: int) -> bool:
        """The route for `tokens` rows: `compute` when set, else `factored_route_is_cheaper` for this layer's shapes."""
        if self.compute != "auto":
            return self.compute == "factored"
        train = torch.is_grad_enabled() and any(p.requires_grad for p in self.proj.values())
        d_s = self.in_features if self.side == "in" else self.out_features
        o, i = self.teacher.out_features, self.teacher.in_features
        return factored_route_is_cheaper(self.side, tokens, o, i, d_s, len(self.proj), train)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.size(-1)
        w, b = self.teacher_weight(), self.teacher.bias
        if self.side == "out" and (self.record or self.factored_is_cheaper(tokens)):
            y = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
            if self.record:
                self.recorded = y  # the teacher-space output, for the attention-output clone loss
            return y @ self.proj["all"].to(y.dtype)
        if self.side == "in" and self.factored_is_cheaper(tokens):
            # x @ [P_q | P_k | P_v]^T in one matmul, then each part through its teacher rows
            p = torch.cat([self.proj[name] for name, _ in self.parts]) if len(self.parts) > 1 else self.proj["all"]
            wide = (x @ p.to(x.dtype).T).split(self.teacher.in_features, dim=-1)
            pieces = [F.linear(h, w[rows].to(x.dtype)) for h, (_, rows) in zip(wide, self.parts, strict=True)]
            y = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
            if not self.natural_order:
                y = y[..., self.inverse]
            return y if b is None else y + b.to(y.dtype)
        weight, bias = self.generated(teacher_weight=w)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class ProjectedEmbedding(nn.Module):
    """The student's token embedding E_t @ P: only the looked-up rows are projected."""

    def __init__(self, teacher: nn.Embedding, student_width: int) -> None:
        super().__init__()
        self._teacher = (teacher,)
        self.proj = nn.Parameter(torch.empty(teacher.embedding_dim, student_width))

    @property
    def teacher(self) -> nn.Embedding:
        return self._teacher[0]

    def generated(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The student's embedding table E_t @ P, in `dtype` (default: the teacher's)."""
        e = self.teacher.weight.to(dtype or self.teacher.weight.dtype)
        return e @ self.proj.to(e.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.generated()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.teacher(idx)
        return rows @ self.proj.to(rows.dtype)


class Shared(nn.Module):
    """A teacher module the student uses as it is (e.g. per-head q/k norms), held by reference, frozen."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._inner = (module,)

    @property
    def inner(self) -> nn.Module:
        return self._inner[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class LowRankClone(nn.Module):
    """The frozen teacher GPT and the student GPT whose weights are generated from it. forward = the student's."""

    def __init__(self, teacher: GPT, settings: LRCSettings) -> None:
        super().__init__()
        check_teacher(teacher.config)
        d_t, d_s = teacher.config.n_embd, settings.target_hidden_size
        if d_s > d_t:
            raise UserError(f"lrc.target_hidden_size={d_s} is larger than the teacher's hidden size {d_t}")
        self.settings = settings
        self.teacher = teacher.requires_grad_(False).eval()
        with torch.device("meta"):
            student = GPT(student_config(teacher.config, d_s))
        device = teacher.lm_head.weight.device
        rows = qkv_rows(teacher.config)
        teacher_modules = dict(teacher.named_modules())
        for name, module in list(student.named_modules()):
            if not list(module.parameters(recurse=False)):
                continue  # containers and parameter-free modules (nn.Identity)
            source, leaf = teacher_modules[name], name.rpartition(".")[2]
            if isinstance(module, nn.Embedding):
                new: nn.Module = ProjectedEmbedding(source, d_s)
            elif isinstance(module, nn.Linear):
                side = "in" if leaf in INPUT_SIDE else "out"
                width = source.out_features if side == "in" else source.in_features
                parts = [Part(p, rows[p]) for p in QKV_PARTS] if leaf == "qkv" else [Part("all", torch.arange(width))]
                new = ProjectedLinear(source, side, parts, d_s)
            elif leaf in ("norm_q", "norm_k"):
                new = Shared(source)  # per-head q/k norms work in the head size: the teacher's, frozen
            else:
                new = module.to_empty(device=device)  # a norm of the residual stream: the student's own
            parent, _, attr = name.rpartition(".")
            setattr(student.get_submodule(parent) if parent else student, attr, new.to(device))
        student._max_seq_length = teacher.max_seq_length
        student.cos, student.sin = student.rope_cache(device=device)
        if settings.tie_embedding_projection:
            student.lm_head.proj["all"] = student.transformer.wte.proj
        self.student = student
        self.reset_parameters()

    @property
    def config(self) -> Config:
        return self.student.config

    @property
    def max_seq_length(self) -> int:
        return self.student.max_seq_length

    def projected_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.student.named_modules():
            if isinstance(module, (ProjectedLinear, ProjectedEmbedding)):
                yield name, module

    def norm_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The student's norm weights (and biases), by their LitGPT names."""
        projected = {id(p) for _, m in self.projected_modules() for p in m.parameters()}
        for name, param in self.student.named_parameters():
            if id(param) not in projected:
                yield name, param

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d_s = self.settings.target_hidden_size
        for _, module in self.projected_modules():
            for p in module.parameters():
                if self.settings.init == "identity":
                    p.copy_(torch.eye(p.shape[0], d_s, dtype=p.dtype, device=p.device))
                else:
                    p.normal_(0.0, self.settings.init_std)
        for name, param in self.norm_parameters():
            if self.settings.init == "identity":
                param.copy_(self.teacher.get_parameter(name)[..., :d_s])
            else:
                param.copy_(torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param))
        self.student.requires_grad_(True)  # its own parameters only: projections and norms

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.student(idx)

    def train(self, mode: bool = True) -> LowRankClone:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def fold(self) -> dict[str, torch.Tensor]:
        """The student as a plain LitGPT state dict (LitGPT's names, float32 on CPU)."""
        state: dict[str, torch.Tensor] = {}
        for name, module in self.student.named_modules():
            if isinstance(module, ProjectedLinear):
                weight, bias = module.generated(torch.float32)
                state[f"{name}.weight"] = weight
                if bias is not None:
                    state[f"{name}.bias"] = bias
            elif isinstance(module, ProjectedEmbedding):
                state[f"{name}.weight"] = module.generated(torch.float32)
            elif isinstance(module, Shared):
                state.update({f"{name}.{k}": v for k, v in module.inner.state_dict().items()})
        state.update(dict(self.norm_parameters()))
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def trainable_names(model: LowRankClone) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def load_clone_weights(model: LowRankClone, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load saved projections and norms; every trainable name must be there and nothing else."""
    from lit_peft.models.load import load_exactly

    load_exactly(model, weights, trainable_names(model), f"{source} does not fit this teacher and these lrc settings")


@contextlib.contextmanager
def capture(model: GPT, sites: tuple[str, ...] | list[str]) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Record the clone-loss activations of a teacher or student GPT during forwards inside the block.

    Yields {(site, layer): tensor}. q, k and v are the fused qkv output's rows; `attn_o` is the attention output in
    the teacher's hidden space (for a student: before its output projection); `mlp_out` is the MLP's output.
    """
    found: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    recorders: list[ProjectedLinear] = []
    rows = qkv_rows(model.config)
    for i, block in enumerate(model.transformer.h):
        mlp = block.mlp

        def keep(site: str, layer: int = i):
            return lambda module, args, out: found.__setitem__((site, layer), out)

        if any(s in sites for s in ("attn_q", "attn_k", "attn_v")):

            def split(module, args, out, layer: int = i):
                for part, site in zip(QKV_PARTS, ("attn_q", "attn_k", "attn_v"), strict=True):
                    if site in sites:
                        found[(site, layer)] = out[..., as_slice(rows[part])]

            handles.append(block.attn.qkv.register_forward_hook(split))
        if "attn_o" in sites:
            if isinstance(block.attn.proj, ProjectedLinear):
                block.attn.proj.record = True
                recorders.append(block.attn.proj)

                def recorded(module, args, out, layer: int = i):
                    found[("attn_o", layer)] = module.recorded

                handles.append(block.attn.proj.register_forward_hook(recorded))
            else:
                handles.append(block.attn.proj.register_forward_hook(keep("attn_o")))
        gate, up = (mlp.fc_1, mlp.fc_2) if hasattr(mlp, "fc_1") else (None, getattr(mlp, "fc", None))
        if "mlp_gate" in sites and gate is not None:
            handles.append(gate.register_forward_hook(keep("mlp_gate")))
        if "mlp_up" in sites and up is not None:
            handles.append(up.register_forward_hook(keep("mlp_up")))
        if "mlp_out" in sites:
            handles.append(mlp.register_forward_hook(keep("mlp_out")))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
        for r in recorders:
            r.record, r.recorded = False, None


def convert(
    clone_dir: str | Path, out_dir: str | Path, teacher_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Fold a trained clone (`<run>/lrc`) into a standalone LitGPT checkpoint of the student, written atomically.

    The teacher is the run's (`base_checkpoint` in its metadata) unless `teacher_dir` is given; a 4-bit teacher is
    quantized the same way again, so the folded weights are the ones the student trained with.
    """
    from lit_peft.checkpoints.adapter import load_adapter
    from lit_peft.checkpoints.files import check_new_output, save_lit_checkpoint
    from lit_peft.methods.quantize import quantize_base
    from lit_peft.models.load import load_base

    kind = folder_kind(clone_dir)
    if kind not in ("lrc", "adapter"):
        load_adapter(clone_dir)  # names the file that is missing
    if kind != "lrc":
        raise UserError(f"{clone_dir} is not a Low-Rank Clone export (no 'lrc' settings in its adapter_config.json)")
    weights, meta = load_adapter(clone_dir)
    teacher_dir, out_dir = Path(teacher_dir or meta["base_checkpoint"]), Path(out_dir)
    check_new_output(out_dir, {"teacher checkpoint": teacher_dir, "clone": clone_dir}, overwrite, "converting")
    teacher = load_base(teacher_dir)
    quantize_base(teacher, meta.get("quantize"))
    model = LowRankClone(teacher, LRCSettings.from_dict(meta["lrc"]))
    load_clone_weights(model, weights, str(clone_dir))
    return save_lit_checkpoint(out_dir, model.fold(), teacher_dir, architecture={}, config=model.config)


def truncate(teacher_dir: str | Path, width: int, out_dir: str | Path, overwrite: bool = False) -> Path:
    """The teacher cut to its first `width` hidden dimensions, as a standalone checkpoint (no training).

    The same shape as a clone of that width: the starting point of `lrc.init=identity`, and a baseline student.
    """
    from lit_peft.checkpoints.files import check_new_output, save_lit_checkpoint
    from lit_peft.models.load import load_base

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    check_new_output(out_dir, {"teacher checkpoint": teacher_dir}, overwrite, "converting")
    model = LowRankClone(load_base(teacher_dir), LRCSettings(width, init="identity", tie_embedding_projection=False))
    return save_lit_checkpoint(out_dir, model.fold(), teacher_dir, architecture={}, config=model.config)


def clone_settings(cfg: DictConfig) -> LRCSettings | None:
    """The Low-Rank Clone settings for task=lrc (checked against the rest of the config), else None."""
    lrc = OmegaConf.to_container(cfg.get("lrc") or {}, resolve=True)
    width = lrc.get("target_hidden_size")
    if cfg.task.name != "lrc":
        if width is not None:
            raise UserError(f"lrc.target_hidden_size={width} applies to task=lrc, not task={cfg.task.name}")
        return None
    if width is None:
        raise UserError("task=lrc needs lrc.target_hidden_size=<the student's hidden size>, e.g. 384 for SmolLM2-135M")
    if cfg.method.name != "full":
        raise UserError(
            f"task=lrc trains the student's projections and norms itself; method={cfg.method.name} does not apply "
            "(use method=full, as experiment=lrc_smollm2 does; adapters can be trained on the converted student)"
        )
    if (cfg.get("cqil") or {}).get("groups"):
        raise UserError("task=lrc clones the teacher as it is; cqil.groups must be null")
    compile_mode = (cfg.get("trainer") or {}).get("compile")
    if compile_mode:
        raise UserError(
            f"trainer.compile={compile_mode} does not apply to task=lrc: its activation captures and projected "
            "Linears make torch.compile recompile every step (then run eager); use trainer.compile=false"
        )
    target = str(cfg.strategy.get("_target_", cfg.strategy.get("name", "")))
    if "fsdp" in target.lower() or cfg.strategy.get("stage") == 3:
        raise UserError(
            f"task=lrc runs on one device or with strategy=ddp/deepspeed (stage 1-2); strategy {target} shards the "
            "teacher whose weights the student is generated from"
        )
    return LRCSettings.from_dict(lrc)
