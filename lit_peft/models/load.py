"""Build a LitGPT model from a checkpoint folder, install a method, and move adapter weights in and out."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import torch
from litgpt import GPT, Config

from lit_peft.checkpoints.adapter import (
    load_adapter,
)
from lit_peft.checkpoints.files import CheckpointNotFound, load_weights, read_json
from lit_peft.checkpoints.kinds import folder_kind
from lit_peft.errors import UserError
from lit_peft.methods import Method, MethodSettings, build_settings
from lit_peft.methods.quantize import check_mode, quantize_base

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
PLAIN_TEXT_FORMATS = ("text", "tokens")  # data formats without a chat template (pretraining on raw text)


def check_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """The one place a base or merged checkpoint folder is opened: it must hold model_config.yaml.

    A folder that is something else is named for what it is, with the command that makes a checkpoint of it (an
    adapter: merge it; a Low-Rank Clone: fold it; a run folder: its adapter or model); else where to download one.
    A folder a crash left mid-replacement is restored first (`lit_peft.checkpoints.files.recover`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    kind = folder_kind(checkpoint_dir)
    if kind == "checkpoint":
        return checkpoint_dir
    if kind == "file":
        raise NotADirectoryError(f"checkpoint {checkpoint_dir} is a file; a LitGPT checkpoint is a folder")
    q = shlex.quote
    if kind in ("adapter", "lrc", "peft"):
        if kind == "lrc":
            raise UserError(
                f"{checkpoint_dir} holds a Low-Rank Clone's projections, not a model checkpoint: fold them into one "
                f"first: python scripts/convert_lrc.py --clone {q(str(checkpoint_dir))} "
                f"--out {q(str(checkpoint_dir) + '-student')}"
            )
        raise UserError(
            f"{checkpoint_dir} is an adapter, not a model checkpoint: merge it into its base first: "
            f"python scripts/merge.py --adapter {q(str(checkpoint_dir))} --out {q(str(checkpoint_dir) + '-merged')}"
        )
    if kind == "run_model":
        raise UserError(
            f"{checkpoint_dir} is a training run's folder: its fine-tuned model is {checkpoint_dir / 'model'}"
        )
    if kind == "run_adapter":
        adapter = checkpoint_dir / "adapter"
        raise UserError(
            f"{checkpoint_dir} is a training run's folder and {adapter} an adapter, not a model checkpoint: merge it "
            f"into its base first: python scripts/merge.py --adapter {q(str(adapter))} "
            f"--out {q(str(adapter) + '-merged')}"
        )
    raise CheckpointNotFound(
        f"no LitGPT checkpoint at {checkpoint_dir} (model_config.yaml missing); get it with "
        f"`python scripts/download.py model=<name>` or `python scripts/download.py --repo-id <org/name>`"
    )


def load_config(checkpoint_dir: str | Path) -> Config:
    return Config.from_file(check_checkpoint_dir(checkpoint_dir) / "model_config.yaml")


def checkpoint_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `checkpoint_dir`/lit_model.pth (tensors only, memory-mapped); a damaged file is a UserError
    naming it."""
    weights = check_checkpoint_dir(checkpoint_dir) / "lit_model.pth"
    if not weights.is_file():
        raise CheckpointNotFound(f"no weights at {weights}; re-run `python scripts/download.py` for this model")
    state = load_weights(weights)
    if not isinstance(state, dict):
        raise UserError(f"{weights} is corrupt or truncated (holds a {type(state).__name__}, not a state dict)")
    return state.get("model", state)


def load_base(
    checkpoint_dir: str | Path, max_seq_length: int | None = None, dtype: torch.dtype | str | None = None
) -> GPT:
    """The frozen-or-not base GPT with its pretrained weights (safetensors-free: lit_model.pth, weights_only).

    dtype: None keeps float32 (training: Lightning's precision plugin casts the module); "auto" is the dtype stored
    in lit_model.pth; or a torch dtype / its name (float32, bfloat16, float16).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    state = checkpoint_weights(checkpoint_dir)
    model = GPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or other shapes: weights and config disagree
        raise UserError(
            f"{checkpoint_dir / 'lit_model.pth'} does not fit its model_config.yaml ({' '.join(str(e).split())[:300]})"
        ) from None
    if max_seq_length is not None:
        model.max_seq_length = min(max_seq_length, config.block_size)
    install_architecture(model, read_architecture(checkpoint_dir))
    if dtype is not None:
        dtype = stored_dtype(checkpoint_dir) if dtype == "auto" else as_dtype(dtype)
        if dtype != torch.float32:
            model.to(dtype)
    return model


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def check_dtype(name: str | None) -> str:
    """A --dtype value: auto (None) or one of DTYPES; anything else is a one-line error naming the valid choices."""
    name = name or "auto"
    if name != "auto":
        as_dtype(name)
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a Lightning precision setting computes in ("32-true", "bf16-mixed", ...)."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0], torch.float32)


def stored_dtype(checkpoint_dir: str | Path) -> torch.dtype:
    """The floating dtype that holds most of the weights in `checkpoint_dir`/lit_model.pth (read memory-mapped)."""
    state = checkpoint_weights(checkpoint_dir)
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if torch.is_tensor(t) and t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def read_architecture(folder: str | Path) -> dict[str, Any]:
    """Architecture edits saved beside a checkpoint (lit_peft_arch.json), e.g. {"cqil": {"groups": [...]}}."""
    from lit_peft.checkpoints.files import ARCH_FILE

    path = Path(folder) / ARCH_FILE
    return read_json(path) if path.is_file() else {}


def install_architecture(model: GPT, arch: dict[str, Any]) -> None:
    """Apply saved architecture edits (CQIL groups) unless the model already has them."""
    from lit_peft.models import cqil

    if arch.get("cqil") and getattr(model, "cqil", None) is None:
        cqil.install(model, cqil.build_settings(arch["cqil"], model.config.n_layer))


def architecture(model: GPT) -> dict[str, Any]:
    """The model's architecture edits, as saved with adapters and checkpoints."""
    settings = getattr(model, "cqil", None)
    return {"cqil": settings.to_dict()} if settings is not None else {}


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the parameters that train (the adapter), by their names in the model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def install_method(
    model: GPT,
    name: str,
    values: dict[str, Any],
    quantize: str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Method, MethodSettings]:
    """Quantize the base (optional, 4-bit) and install the method; validation happens before anything changes."""
    method, settings = build_settings(name, values)
    check_mode(quantize)
    if quantize is not None and not method.wraps_linears:
        raise UserError(
            f"quantize={quantize} needs an adapter method: method={name} trains the base weights themselves"
        )
    quantize_base(model, quantize, compute_dtype)
    method.apply(model, settings)
    return method, settings


def enable_gradient_checkpointing(model: GPT) -> None:
    """Recompute each transformer block's activations in backward instead of keeping them (less memory, more time)."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def load_adapter_into(model: GPT, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Install the method saved in `adapter_dir` on `model` and load its weights. Returns the saved metadata.

    With `dtype`, the model is cast to it after the method is installed (a 4-bit base computes in it) and the
    adapter's weights stay float32, as during training under a `-true` precision; None leaves dtypes as they are.
    """
    if folder_kind(adapter_dir) == "lrc":
        raise UserError(
            f"{adapter_dir} holds a Low-Rank Clone's projections, not an adapter: fold them into a model with "
            f"`python scripts/convert_lrc.py --clone {adapter_dir} --out <folder>` and use that folder"
        )
    weights, meta = load_adapter(adapter_dir)
    install_architecture(model, meta.get("architecture") or {})
    install_method(model, meta["method"], meta["settings"], quantize=meta.get("quantize"), compute_dtype=dtype)
    expected = set(trainable_state_dict(model))
    if dtype is not None:
        model.to(dtype)
        for name, p in model.named_parameters():
            if name in expected:
                p.data = p.data.float()
    load_exactly(model, weights, expected, f"adapter {adapter_dir} does not fit this model")
    return meta


def load_exactly(model: torch.nn.Module, weights: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Load `weights` (a part of the model) when their names are exactly `expected`; else a one-line error."""
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise UserError(f"{what}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(weights, strict=False)
