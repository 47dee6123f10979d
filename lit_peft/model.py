"""Build a LitGPT model from a checkpoint folder, install a method, and move adapter weights in and out."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

import torch
from litgpt import GPT, Config

from lit_peft.io import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    MERGE_RECORD,
    MODEL_RECORD,
    CheckpointNotFound,
    load_adapter,
    load_weights,
    read_adapter_meta,
    read_json,
    recover,
    with_system_prompt,
)
from lit_peft.methods import Method, MethodSettings, build_settings
from lit_peft.quantize import check_mode, quantize_base

MODEL_CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
PLAIN_TEXT_FORMATS = ("text", "tokens")  # data formats without a chat template (pretraining on raw text)


def check_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """The one place a base or merged checkpoint folder is opened: it must hold model_config.yaml.

    A folder that is something else is named for what it is, with the command that makes a checkpoint of it (an
    adapter: merge it; a Low-Rank Clone: fold it; a run folder: its adapter or model); else where to download one.
    A folder a crash left mid-replacement is restored first (`lit_peft.io.recover`).
    """
    checkpoint_dir = recover(Path(checkpoint_dir))
    if (checkpoint_dir / "model_config.yaml").is_file():
        return checkpoint_dir
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise NotADirectoryError(f"checkpoint {checkpoint_dir} is a file; a LitGPT checkpoint is a folder")
    q = shlex.quote
    if (checkpoint_dir / ADAPTER_META).is_file() or (checkpoint_dir / ADAPTER_WEIGHTS).is_file():
        meta_file = checkpoint_dir / ADAPTER_META
        meta = read_json(meta_file) if meta_file.is_file() else {}
        if isinstance(meta, dict) and "lrc" in meta:
            raise ValueError(
                f"{checkpoint_dir} holds a Low-Rank Clone's projections, not a model checkpoint: fold them into one "
                f"first: python scripts/convert_lrc.py --clone {q(str(checkpoint_dir))} "
                f"--out {q(str(checkpoint_dir) + '-student')}"
            )
        raise ValueError(
            f"{checkpoint_dir} is an adapter, not a model checkpoint: merge it into its base first: "
            f"python scripts/merge.py --adapter {q(str(checkpoint_dir))} --out {q(str(checkpoint_dir) + '-merged')}"
        )
    if (checkpoint_dir / "model" / "model_config.yaml").is_file():
        raise ValueError(
            f"{checkpoint_dir} is a training run's folder: its fine-tuned model is {checkpoint_dir / 'model'}"
        )
    if (checkpoint_dir / "adapter" / ADAPTER_META).is_file():
        adapter = checkpoint_dir / "adapter"
        raise ValueError(
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
    """The state dict in `checkpoint_dir`/lit_model.pth (tensors only, memory-mapped); a damaged file is a ValueError
    naming it."""
    weights = check_checkpoint_dir(checkpoint_dir) / "lit_model.pth"
    if not weights.is_file():
        raise CheckpointNotFound(f"no weights at {weights}; re-run `python scripts/download.py` for this model")
    state = load_weights(weights)
    if not isinstance(state, dict):
        raise ValueError(f"{weights} is corrupt or truncated (holds a {type(state).__name__}, not a state dict)")
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
        raise ValueError(
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
        raise ValueError(f"unknown --dtype {dtype!r}; valid: {', '.join(DTYPE_CHOICES)}")
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
    """The dtype a Lightning precision setting computes in (as lit_peft.train)."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0], torch.float32)


def stored_dtype(checkpoint_dir: str | Path) -> torch.dtype:
    """The floating dtype that holds most of the weights in `checkpoint_dir`/lit_model.pth (read memory-mapped)."""
    state = checkpoint_weights(checkpoint_dir)
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if torch.is_tensor(t) and t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


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


def read_architecture(folder: str | Path) -> dict[str, Any]:
    """Architecture edits saved beside a checkpoint (lit_peft_arch.json), e.g. {"cqil": {"groups": [...]}}."""
    from lit_peft.cqil import ARCH_FILE

    path = Path(folder) / ARCH_FILE
    return read_json(path) if path.is_file() else {}


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
        from lit_peft.hub import prepare_checkpoint

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


def load_adapter_into(model: GPT, adapter_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Install the method saved in `adapter_dir` on `model` and load its weights. Returns the saved metadata.

    With `dtype`, the model is cast to it after the method is installed (a 4-bit base computes in it) and the
    adapter's weights stay float32, as during training under a `-true` precision; None leaves dtypes as they are.
    """
    weights, meta = load_adapter(adapter_dir)
    if "lrc" in meta:
        raise ValueError(
            f"{adapter_dir} holds a Low-Rank Clone's projections, not an adapter: fold them into a model with "
            f"`python scripts/convert_lrc.py --clone {adapter_dir} --out <folder>` and use that folder"
        )
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
        raise ValueError(f"{what}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(weights, strict=False)


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
    root = MODEL_CONF_DIR.parents[1]
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
        sources.append((f"model config {conf[0].relative_to(MODEL_CONF_DIR.parents[1])}", conf[1]))

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
