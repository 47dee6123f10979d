"""Fold a saved adapter into its base checkpoint: a plain LitGPT checkpoint in a new folder.

The merged folder's lit_peft_merge.json records where the weights came from (every adapter merged so far), the
dtype they were written in, and the chat template and system prompt the adapter was trained with, so that chat and
eval over the merged model use the same prompt format as over base + adapter.

Of the base folder, only the known checkpoint files are copied (`checkpoints.files.CHECKPOINT_FILES`: model_config.yaml,
prompt_style.yaml, config.json, the tokenizer files and lit-peft's records), never anything else in it (a .env, notes)
and never through a symbolic link: a base whose known file is a link is refused in one line, before any work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from lit_peft.checkpoints.adapter import ADAPTER_META, ADAPTER_WEIGHTS, read_adapter_meta
from lit_peft.checkpoints.files import (
    MERGE_RECORD,
    check_new_output,
    checkpoint_files,
    read_json,
    recover,
    save_lit_checkpoint,
)
from lit_peft.errors import UserError
from lit_peft.inference.load import inference_dtype, prompt_format
from lit_peft.methods import merge_adapters
from lit_peft.methods.quantize import dequantize_base
from lit_peft.models.load import (
    architecture,
    check_checkpoint_dir,
    check_dtype,
    dtype_name,
    load_adapter_into,
    load_base,
)

__all__ = ["MERGE_RECORD", "adapter_digest", "merge_checkpoint"]


def adapter_digest(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def merge_checkpoint(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = "auto",
    template: str | None = None,
    system: str | None = None,
    report: Callable[[str], None] | None = None,
) -> Path:
    """base + adapter -> `out_dir`. Never writes into (or replaces a folder holding) the base or the adapter;
    refuses to merge an adapter a second time. The merged folder appears whole, with its record, in one rename.

    dtype: auto (the base's stored dtype; a 4-bit adapter's training precision) or float32 / bfloat16 / float16.
    template / system: override what the adapter recorded (system '' = no system turn). `report` receives one
    line each for the dtype and for the prompt format, as they are decided.
    """
    from lit_peft.data.templates import get_template

    adapter_dir, out_dir = recover(adapter_dir), Path(out_dir)
    check_dtype(dtype)
    if template is not None:
        get_template(template)  # an unknown name is a one-line error, before anything is read
    if (adapter_dir / "lit_model.pth").is_file() and not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{adapter_dir} is a whole model (method=full): there is nothing to merge, use it directly")
    meta = read_adapter_meta(adapter_dir)  # checked there: an object with a known method and its settings, weights
    if "method" not in meta:  # a Low-Rank Clone's projections (the reader accepts them for convert_lrc.py)
        raise UserError(
            f"{adapter_dir} holds a Low-Rank Clone's projections, not an adapter: fold them into a model with "
            f"`python scripts/convert_lrc.py --clone {adapter_dir} --out <folder>`"
        )
    if not (base_dir or meta.get("base_checkpoint")):
        raise UserError(f"{adapter_dir / ADAPTER_META} names no base_checkpoint; pass --base <checkpoint>")
    base_dir = Path(base_dir or meta["base_checkpoint"])
    check_new_output(out_dir, {"base checkpoint": base_dir, "adapter": adapter_dir}, overwrite, "merging")
    base_dir = check_checkpoint_dir(base_dir)
    checkpoint_files(base_dir)  # only the known files are copied, never through a link: refused here, before work
    digest = adapter_digest(adapter_dir)
    record = base_dir / MERGE_RECORD
    previous = read_json(record) if record.is_file() else {"adapter_sha256": [], "adapters": []}
    if not (
        isinstance(previous, dict)
        and isinstance(previous.get("adapter_sha256"), list)
        and isinstance(previous.get("adapters"), list)
    ):
        raise UserError(f"{record} is not a merge record (expected an object with adapter_sha256 and adapters lists)")
    if digest in previous["adapter_sha256"]:
        raise UserError(
            f"adapter {adapter_dir} is already merged into {base_dir}; a second merge is refused "
            f"(merge into the original base instead)"
        )
    torch_dtype, dtype_from = inference_dtype(dtype, base_dir, meta)
    fmt = prompt_format(base_dir, meta, adapter_dir, template, system)
    if report is not None:
        report(f"dtype: {dtype_name(torch_dtype)} ({dtype_from})")
        report(f"prompt format: {fmt.describe()}")

    model = load_base(base_dir)
    load_adapter_into(model, adapter_dir, dtype=torch_dtype)  # installs the adapter's architecture edits (CQIL) too
    merge_adapters(model)  # each merged weight is computed in float64 and written in the base Linear's dtype
    dequantize_base(model)  # a 4-bit base becomes a dense checkpoint (the frozen Linears no adapter touched too)
    model.to(torch_dtype)
    provenance = {
        "adapter_sha256": [*previous["adapter_sha256"], digest],
        "adapters": [
            *previous["adapters"],
            {"path": str(adapter_dir), "method": meta["method"], "settings": meta["settings"], "base": str(base_dir)},
        ],
        "dtype": dtype_name(torch_dtype),
        "template": fmt.template,
        "system_prompt": fmt.system_prompt,
        "instruction_tuned": fmt.instruction_tuned,
        "sources": {"dtype": dtype_from, "template": fmt.template_from, "system_prompt": fmt.system_from},
    }
    save_lit_checkpoint(
        out_dir,
        model.state_dict(),
        base_dir,
        architecture=architecture(model),
        records={MERGE_RECORD: provenance},
        replace=overwrite,
    )
    return out_dir
