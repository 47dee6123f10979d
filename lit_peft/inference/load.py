"""A checkpoint (base, merged or full-run) plus an optional adapter, ready for generation or evaluation: its dtype
and the prompt format it was trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from litgpt import GPT

from lit_peft.checkpoints.adapter import read_adapter_meta, with_system_prompt
from lit_peft.checkpoints.files import MERGE_RECORD, MODEL_RECORD, read_json
from lit_peft.models.load import (
    DTYPES,
    PLAIN_TEXT_FORMATS,
    as_dtype,
    check_checkpoint_dir,
    check_dtype,
    load_adapter_into,
    load_base,
    precision_dtype,
    stored_dtype,
)
from lit_peft.paths import MODEL_CONF_DIR, project_root


def inference_dtype(requested: str | None, checkpoint_dir: str | Path, meta: dict[str, Any]) -> tuple[torch.dtype, str]:
    """The dtype chat, eval and merge compute in, and where that choice came from.

    --dtype wins; a 4-bit (QLoRA) adapter computes in the dtype it trained with (its recorded precision); otherwise
    the base checkpoint's stored dtype (a bf16 checkpoint stays bf16; a float32 one, such as SmolLM2, stays float32).
    """
    name = check_dtype(requested)
    if name != "auto":
        return DTYPES[name], f"--dtype {name}"
    precision = (meta.get("config") or {}).get("precision")
    if meta.get("quantize") and precision is not None:
        return precision_dtype(precision), f"the 4-bit adapter's training precision {precision}"
    return stored_dtype(checkpoint_dir), f"stored in {Path(checkpoint_dir) / 'lit_model.pth'}"


def inference_source(
    checkpoint_dir: str | Path | None, adapter_dir: str | Path | None, default_checkpoint: str | Path
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder chat and evaluation load, and the adapter's metadata ({} without an adapter).

    Without `checkpoint_dir` the adapter's own base is used, else `default_checkpoint` (the embedded SmolLM2, made
    from its GGUF on first use).
    """
    meta: dict[str, Any] = read_adapter_meta(adapter_dir) if adapter_dir is not None else {}
    checkpoint_dir = Path(checkpoint_dir or meta.get("base_checkpoint") or default_checkpoint)
    if checkpoint_dir == Path(default_checkpoint) and not (checkpoint_dir / "lit_model.pth").is_file():
        from lit_peft.checkpoints.hub import prepare_checkpoint

        prepare_checkpoint({"checkpoint_dir": str(checkpoint_dir), "source": "smollm2-gguf"})
    return check_checkpoint_dir(checkpoint_dir), meta


def load_for_inference(
    checkpoint_dir: str | Path | None,
    adapter_dir: str | Path | None,
    default_checkpoint: str | Path,
    dtype: torch.dtype | str | None = "auto",
) -> tuple[GPT, Path, dict[str, Any]]:
    """The model chat and evaluation use: a base or merged checkpoint, plus an adapter if given, in eval mode.

    Without `checkpoint_dir` the adapter's own base is used, else `default_checkpoint`. `dtype`: "auto" (see
    `inference_dtype`), a dtype or its name, or None for float32. The model is built as training builds it: float32
    weights, quantized (for a 4-bit adapter) and then cast, with the adapter's own weights kept in float32.
    Returns the model, the checkpoint folder (tokenizer) and the adapter's metadata.
    """
    checkpoint_dir, meta = inference_source(checkpoint_dir, adapter_dir, default_checkpoint)
    if dtype == "auto":
        dtype = inference_dtype("auto", checkpoint_dir, meta)[0]
    dtype = torch.float32 if dtype is None else as_dtype(dtype)
    model = load_base(checkpoint_dir)
    if adapter_dir is not None:
        load_adapter_into(model, adapter_dir, dtype=dtype)
    elif dtype != torch.float32:
        model.to(dtype)
    return model.eval().requires_grad_(False), checkpoint_dir, meta


# ---------------------------------------------------------------- the prompt format training used


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """The chat template and system prompt a model is used with, and where each came from."""

    template: str | None  # None: no chat template (eval's --template none)
    system_prompt: str | None  # None: no system turn
    template_from: str
    system_from: str
    instruction_tuned: bool | None = None  # trained on conversations (None: not recorded)
    instruction_from: str = ""

    def describe(self) -> str:
        template = f"template {self.template}" if self.template else "no chat template"
        system = f"system prompt {self.system_prompt!r}" if self.system_prompt is not None else "no system prompt"
        if self.template_from == self.system_from:
            return f"{template}, {system} ({self.template_from})"
        return f"{template} ({self.template_from}), {system} ({self.system_from})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def checkpoint_record(checkpoint_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The lit-peft record beside a checkpoint: a merged model's lit_peft_merge.json, or a method=full run's
    lit_peft.json. None for a plain (downloaded or converted) checkpoint."""
    for name in (MERGE_RECORD, MODEL_RECORD):
        path = Path(checkpoint_dir) / name
        if path.is_file():
            return path, with_system_prompt(read_json(path))
    return None


def model_config_for(checkpoint_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The conf/model/*.yaml whose checkpoint_dir is this folder (its template and system prompt), if any."""
    import yaml

    target = Path(checkpoint_dir).resolve()
    root = project_root()
    for path in sorted(MODEL_CONF_DIR.glob("*.yaml")):
        conf = yaml.safe_load(path.read_text()) or {}
        folder = conf.get("checkpoint_dir")
        if folder and (root / folder).resolve() == target:
            return path, conf
    return None


def instruction_tuned(meta: dict[str, Any]) -> bool | None:
    """Whether training metadata describes conversations (a chat template rendered the data): None if unknown."""
    if meta.get("instruction_tuned") is not None:
        return bool(meta["instruction_tuned"])
    config = meta.get("config") or {}
    if (config.get("task") or {}).get("name") in ("pretrain", "lrc"):
        return False
    data_format = (config.get("data") or {}).get("format")
    return None if data_format is None else data_format not in PLAIN_TEXT_FORMATS


def prompt_format(
    checkpoint_dir: str | Path,
    meta: dict[str, Any] | None = None,
    adapter_dir: str | Path | None = None,
    template: str | None = None,
    system: str | None = None,
) -> PromptFormat:
    """The template and system prompt training used: flags (--template, --system; '' = no system turn) override
    the adapter's record, then the checkpoint's record (merged or full model), then conf/model/*.yaml for this
    folder; the template is guessed from the tokenizer when none of them has it."""
    from lit_peft.data.templates import guess_template

    sources: list[tuple[str, dict[str, Any]]] = []
    if adapter_dir is not None:
        sources.append((f"adapter {adapter_dir}", meta or {}))
    record = checkpoint_record(checkpoint_dir)
    if record is not None:
        kind = "merged record" if record[0].name == MERGE_RECORD else "model record"
        sources.append((f"{kind} {record[0]}", record[1]))
    conf = model_config_for(checkpoint_dir)
    if conf is not None:
        sources.append((f"model config {conf[0].relative_to(MODEL_CONF_DIR.parents[2])}", conf[1]))

    if template is not None:
        template_name, template_from = template, "flag --template"
    else:
        found = next(((where, m["template"]) for where, m in sources if m.get("template")), None)
        if found is not None:
            template_from, template_name = found
        else:
            template_name, template_from = guess_template(checkpoint_dir), "guessed from the tokenizer"
    if system is not None:
        system_prompt, system_from = (system or None), "flag --system"
    else:
        found = next(((where, m["system_prompt"]) for where, m in sources if "system_prompt" in m), None)
        system_prompt, system_from = (found[1], found[0]) if found is not None else (None, "none recorded")
    tuned = next(((where, v) for where, m in sources[:2] if (v := instruction_tuned(m)) is not None), None)
    return PromptFormat(
        template=template_name,
        system_prompt=system_prompt,
        template_from=template_from,
        system_from=system_from,
        instruction_tuned=tuned[1] if tuned else None,
        instruction_from=tuned[0] if tuned else "",
    )
