"""Atomic file and folder writes, and the adapter checkpoint format (safetensors + the method's settings)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter_config.json"
MERGE_RECORD = "lit_peft_merge.json"  # beside a merged checkpoint: provenance, dtype, template and system prompt
MODEL_RECORD = "lit_peft.json"  # beside a method=full run's model: the run's metadata (as an adapter's)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename, on error it is removed.

    Works for files and folders, so a reader never sees a half-written checkpoint under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_new_output(out_dir: Path, source_dir: Path, overwrite: bool, source: str, action: str) -> None:
    """--out must not be the checkpoint it is made from, and must be new unless `overwrite` (one-line errors)."""
    if out_dir.resolve() == source_dir.resolve():
        raise ValueError(f"--out {out_dir} is the {source} checkpoint; {action} never overwrites it")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"--out {out_dir} already exists; pick a new folder or pass --overwrite")


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_adapter(out_dir: str | Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write adapter weights and their settings into `out_dir` as one atomic folder."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():  # safetensors writes 0600; checkpoints are meant to be shared
            f.chmod(0o644)
    return out_dir


def load_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter folder written by `save_adapter`: (weights, settings)."""
    adapter_dir = Path(adapter_dir)
    weights_path, meta_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_META
    if not weights_path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"not an adapter checkpoint: {adapter_dir} (expected {ADAPTER_WEIGHTS} and {ADAPTER_META})"
        )
    return load_file(str(weights_path)), with_system_prompt(json.loads(meta_path.read_text()))


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """An adapter's adapter_config.json (with `system_prompt` filled in, see `with_system_prompt`)."""
    path = Path(adapter_dir) / ADAPTER_META
    if not path.is_file():
        raise FileNotFoundError(f"no adapter at {adapter_dir} ({ADAPTER_META} missing)")
    return with_system_prompt(json.loads(path.read_text()))


def with_system_prompt(meta: dict[str, Any]) -> dict[str, Any]:
    """Training metadata with a top-level `system_prompt` when it is known.

    Runs record it (None: trained without a system turn); for those written before, it comes from the resolved
    training config (`config.model.system_prompt`). When neither has it, the key stays absent (unknown).
    """
    if "system_prompt" not in meta:
        model = (meta.get("config") or {}).get("model") or {}
        if isinstance(model, dict) and "system_prompt" in model:
            meta = {**meta, "system_prompt": model["system_prompt"]}
    return meta


def save_lit_checkpoint(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    source_dir: str | Path,
    architecture: dict[str, Any] | None = None,
    config: Any = None,
    records: dict[str, Any] | None = None,
) -> Path:
    """Write a LitGPT checkpoint folder: lit_model.pth plus the config and tokenizer files of `source_dir`.

    `architecture` (e.g. CQIL groups) is written to lit_peft_arch.json so that every loader rebuilds the same model;
    None keeps whatever `source_dir` had. `config` (a LitGPT Config) replaces the source's model config, for a model
    of another shape (the source's Hugging Face config.json is then left out). `records` ({file name: JSON data})
    are written into the same folder, inside the same atomic step, so the folder never exists without them.
    """
    from lit_peft.cqil import ARCH_FILE

    out_dir, source_dir = Path(out_dir), Path(source_dir)
    skip = {"lit_model.pth"} | ({"model_config.yaml", "config.json"} if config is not None else set())
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for f in source_dir.iterdir():
            if f.is_file() and f.name not in skip and not f.name.endswith((".safetensors", ".bin")):
                shutil.copy2(f, tmp / f.name)
        if config is not None:
            from litgpt.utils import save_config

            save_config(config, tmp)
        torch.save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp / "lit_model.pth")
        if architecture is not None:
            (tmp / ARCH_FILE).unlink(missing_ok=True)
            if architecture:
                (tmp / ARCH_FILE).write_text(json.dumps(architecture, indent=2) + "\n")
        for name, data in (records or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    return out_dir
