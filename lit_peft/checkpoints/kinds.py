"""What a folder holds, told from its files: the one answer every command uses before it opens one (a base or merged
checkpoint, an adapter, a Low-Rank Clone's projections, a PEFT adapter, a training run's folder)."""

from __future__ import annotations

from pathlib import Path

from lit_peft.checkpoints.adapter import ADAPTER_META, ADAPTER_WEIGHTS
from lit_peft.checkpoints.files import read_json, recover

KINDS = {
    "checkpoint": "a LitGPT checkpoint (model_config.yaml): a base, a merged model or a method=full run's model",
    "adapter": "a lit-peft adapter (adapter.safetensors + adapter_config.json)",
    "lrc": "a Low-Rank Clone's projections (an adapter folder whose record holds 'lrc')",
    "peft": "a Hugging Face PEFT adapter (adapter_config.json without adapter.safetensors)",
    "run_model": "a method=full training run's folder (its model in model/)",
    "run_adapter": "a training run's folder (its adapter in adapter/)",
    "file": "a file, not a folder",
    "missing": "nothing: the path does not exist",
    "other": "a folder of none of these kinds",
}


def folder_kind(folder: str | Path) -> str:
    """One of KINDS for `folder` (a folder a crash left mid-replacement is restored first)."""
    folder = recover(Path(folder))
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "file"
    if (folder / "model_config.yaml").is_file():
        return "checkpoint"
    if (folder / ADAPTER_WEIGHTS).is_file():
        meta = read_json(folder / ADAPTER_META) if (folder / ADAPTER_META).is_file() else {}
        return "lrc" if isinstance(meta, dict) and "lrc" in meta else "adapter"
    if (folder / ADAPTER_META).is_file():
        return "peft"
    if (folder / "model" / "model_config.yaml").is_file():
        return "run_model"
    if (folder / "adapter" / ADAPTER_META).is_file():
        return "run_adapter"
    return "other"
