"""Build a LitGPT model from a checkpoint folder, install a method, and move adapter weights in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from litgpt import GPT, Config

from lit_peft.io import load_adapter
from lit_peft.methods import Method, MethodSettings, build_settings
from lit_peft.quantize import check_mode, quantize_base


class CheckpointNotFound(FileNotFoundError):
    pass


def load_config(checkpoint_dir: str | Path) -> Config:
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "model_config.yaml"
    if not config_file.is_file():
        raise CheckpointNotFound(
            f"no LitGPT checkpoint at {checkpoint_dir} (model_config.yaml missing); get it with "
            f"`python scripts/download.py model=<name>` or `python scripts/download.py --repo-id <org/name>`"
        )
    return Config.from_file(config_file)


def load_base(checkpoint_dir: str | Path, max_seq_length: int | None = None) -> GPT:
    """The frozen-or-not base GPT with its pretrained weights (safetensors-free: lit_model.pth, weights_only)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    weights = checkpoint_dir / "lit_model.pth"
    if not weights.is_file():
        raise CheckpointNotFound(f"no weights at {weights}; re-run `python scripts/download.py` for this model")
    model = GPT(config)
    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("model", state)
    model.load_state_dict(state, strict=True)
    if max_seq_length is not None:
        model.max_seq_length = min(max_seq_length, config.block_size)
    install_architecture(model, read_architecture(checkpoint_dir))
    return model


def read_architecture(folder: str | Path) -> dict[str, Any]:
    """Architecture edits saved beside a checkpoint (lit_peft_arch.json), e.g. {"cqil": {"groups": [...]}}."""
    import json

    from lit_peft.cqil import ARCH_FILE

    path = Path(folder) / ARCH_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def install_architecture(model: GPT, arch: dict[str, Any]) -> None:
    """Apply saved architecture edits (CQIL groups) unless the model already has them."""
    from lit_peft import cqil

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
        raise ValueError(
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


def load_for_inference(
    checkpoint_dir: str | Path | None, adapter_dir: str | Path | None, default_checkpoint: str | Path
) -> tuple[GPT, Path, dict[str, Any]]:
    """The model chat and evaluation use: a base or merged checkpoint, plus an adapter if given, in eval mode.

    Without `checkpoint_dir` the adapter's own base is used, else `default_checkpoint` (the embedded SmolLM2, made
    from its GGUF on first use). Returns the model, the checkpoint folder (tokenizer) and the adapter's metadata.
    """
    import json

    meta: dict[str, Any] = {}
    if adapter_dir is not None:
        config = Path(adapter_dir) / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no adapter at {adapter_dir} (adapter_config.json missing)")
        meta = json.loads(config.read_text())
    checkpoint_dir = Path(checkpoint_dir or meta.get("base_checkpoint") or default_checkpoint)
    if checkpoint_dir == Path(default_checkpoint) and not (checkpoint_dir / "lit_model.pth").is_file():
        from lit_peft.hub import prepare_checkpoint

        prepare_checkpoint({"checkpoint_dir": str(checkpoint_dir), "source": "smollm2-gguf"})
    model = load_base(checkpoint_dir)
    if adapter_dir is not None:
        load_adapter_into(model, adapter_dir)
    return model.eval().requires_grad_(False), checkpoint_dir, meta


def load_adapter_into(model: GPT, adapter_dir: str | Path) -> dict[str, Any]:
    """Install the method saved in `adapter_dir` on `model` and load its weights. Returns the saved metadata."""
    weights, meta = load_adapter(adapter_dir)
    if "lrc" in meta:
        raise ValueError(
            f"{adapter_dir} holds a Low-Rank Clone's projections, not an adapter: fold them into a model with "
            f"`python scripts/convert_lrc.py --clone {adapter_dir} --out <folder>` and use that folder"
        )
    install_architecture(model, meta.get("architecture") or {})
    install_method(model, meta["method"], meta["settings"], quantize=meta.get("quantize"))
    load_exactly(model, weights, set(trainable_state_dict(model)), f"adapter {adapter_dir} does not fit this model")
    return meta


def load_exactly(model: torch.nn.Module, weights: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Load `weights` (a part of the model) when their names are exactly `expected`; else a one-line error."""
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise ValueError(f"{what}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(weights, strict=False)
