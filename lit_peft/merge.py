"""Fold a saved adapter into its base checkpoint: a plain LitGPT checkpoint in a new folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lit_peft.io import ADAPTER_WEIGHTS, atomic_path, check_new_output, save_lit_checkpoint
from lit_peft.methods import merge_adapters
from lit_peft.model import architecture, load_adapter_into, load_base
from lit_peft.quantize import dequantize_base

MERGE_RECORD = "lit_peft_merge.json"


def adapter_digest(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def merge_checkpoint(
    adapter_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """base + adapter -> `out_dir`. Never writes into the base; refuses to merge an adapter a second time."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if (adapter_dir / "lit_model.pth").is_file() and not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{adapter_dir} is a whole model (method=full): there is nothing to merge, use it directly")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no adapter at {adapter_dir} (expected {ADAPTER_WEIGHTS}; e.g. outputs/<run>/adapter)")
    meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_dir = Path(base_dir or meta["base_checkpoint"])
    check_new_output(out_dir, base_dir, overwrite, "base", "merging")
    digest = adapter_digest(adapter_dir)
    record = base_dir / MERGE_RECORD
    if record.is_file() and digest in json.loads(record.read_text()).get("adapter_sha256", []):
        raise ValueError(
            f"adapter {adapter_dir} is already merged into {base_dir}; a second merge is refused "
            f"(merge into the original base instead)"
        )

    model = load_base(base_dir)
    load_adapter_into(model, adapter_dir)  # installs the adapter's architecture edits (CQIL) too
    merge_adapters(model)
    dequantize_base(model)  # a 4-bit base becomes a dense checkpoint (the frozen Linears no adapter touched too)
    previous = json.loads(record.read_text()) if record.is_file() else {"adapter_sha256": [], "adapters": []}
    provenance = {
        "adapter_sha256": [*previous["adapter_sha256"], digest],
        "adapters": [
            *previous["adapters"],
            {"path": str(adapter_dir), "method": meta["method"], "settings": meta["settings"], "base": str(base_dir)},
        ],
    }
    save_lit_checkpoint(out_dir, model.state_dict(), base_dir, architecture=architecture(model))
    with atomic_path(out_dir / MERGE_RECORD) as tmp:
        tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir
