"""LoRA adapters in Hugging Face PEFT's format, both ways (for transformers + peft, and vLLM's LoRA serving).

Export: a lit-peft LoRA adapter folder -> `adapter_model.safetensors` + `adapter_config.json` naming the modules of
the Hugging Face Llama model that `lit_peft.export.hf.export_hf` writes for the same base (q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj, lm_head). Import: a PEFT LoRA adapter on such a model -> a lit-peft adapter
folder that merge, chat and eval load.

Nothing about names or layouts is written out by hand here:
- which rows of a LitGPT Linear become which Hugging Face module comes from litgpt's own converter
  (`copy_weights_llama`, the function the HF export uses), applied to a column of row indices;
- the PEFT side is PEFT itself: a `LlamaForCausalLM` built on the meta device (no weights), wrapped by
  `peft.get_peft_model` with the `LoraConfig`, filled with `set_peft_model_state_dict` and written with
  `save_pretrained` (export), or read back module by module (import), so PEFT's own key names, target-module
  matching, `rank_pattern`, `layers_to_transform` and shape checks apply.

LitGPT's fused qkv LoRA keeps one B per part (query/key/value) and their A matrices stacked; in the concatenated
layout each part is exactly one of q_proj/k_proj/v_proj. In the interleaved layout (`lit_peft.methods.qkv.qkv_rows`) a
part's rows are spread over several of them: a Hugging Face module then gets the LoRAs of every part that owns some
of its rows, stacked (rank k*r, B zero on the rows a part does not own), written with PEFT's `rank_pattern` and
`alpha_pattern` so that alpha/rank stays the adapter's scaling. The mathematics is unchanged: W + s * B A per row.
The import inverts this (`lora_from_peft`): such a stacked module gives each part its A and its B rows back, so that
whatever `export_peft` writes imports as the adapter it came from (same settings, tensors and merged model).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from litgpt import GPT, Config
from torch import nn

from lit_peft.checkpoints.adapter import ADAPTER_META, ADAPTER_WEIGHTS, load_adapter, read_adapter_meta, save_adapter
from lit_peft.checkpoints.files import (
    atomic_path,
    check_new_output,
    load_safetensors,
    load_weights,
    read_json,
    recover,
    write_json,
)
from lit_peft.checkpoints.kinds import folder_kind
from lit_peft.errors import UserError, one_line
from lit_peft.paths import MODEL_CONF_DIR, project_root

log = logging.getLogger(__name__)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE_WEIGHTS = "adapter_model.bin"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the transformers model's own module names
# Beside an export: the lit-peft LoRA settings it came from, so that an import gives back the very same settings where
# the PEFT files alone allow several (the order of targets, `mlp` or its Linears, the qkv layout of a model with one
# query group). Only a hint: an import uses it when it holds the PEFT weights exactly; PEFT and vLLM ignore the file.
EXPORT_SETTINGS = "lit_peft_lora.json"
TASK_TYPES = (None, "CAUSAL_LM")

# LoraConfig settings whose non-default value changes what the adapter computes in a way lit-peft's LoRA
# (W + alpha/r * B A on Linears, nothing else) cannot hold. Value: the default, and what the setting means.
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "bias": ("none", "trained biases"),
    "lora_bias": (False, "a bias on lora_B"),
    "modules_to_save": (None, "fully trained modules beside the LoRA"),
    "fan_in_fan_out": (False, "transposed (Conv1D) weights"),
    "layer_replication": (None, "replicated layers"),
    "trainable_token_indices": (None, "trained embedding rows"),
    "target_parameters": (None, "LoRA on bare parameters"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "arrow_config": (None, "Arrow routing"),
}
# init_lora_weights values under which PEFT changes the base model's weights too (the adapter then belongs to that
# changed base, unless PEFT converted it on saving, which records init_lora_weights=True).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


# ------------------------------------------------------------------------------------------ LitGPT <-> HF names


def hf_module_rows(config: Config, lit_name: str, out_features: int) -> dict[str, torch.Tensor]:
    """{Hugging Face Llama module name: the output rows of LitGPT Linear `lit_name` it holds, in its own order}.

    Asks litgpt's converter (`copy_weights_llama`, what the HF export uses): a weight whose row i holds i comes back
    renamed, and split where the converter splits (qkv -> q_proj, k_proj, v_proj).
    """
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_llama

    out: dict[str, torch.Tensor] = {}
    copy_weights_llama(config, out, {f"{lit_name}.weight": torch.arange(out_features)[:, None]})
    return {name.removesuffix(".weight"): rows[:, 0] for name, rows in out.items()}


def meta_gpt(config: Config) -> GPT:
    """The LitGPT model's structure without weights (names, shapes, adapter parts)."""
    with torch.device("meta"):
        return GPT(config)


def hf_modules(config: Config) -> dict[str, tuple[str, torch.Tensor]]:
    """{Hugging Face module name: (LitGPT Linear name, its rows)} for every Linear of the model."""
    found = {}
    for name, module in meta_gpt(config).named_modules():
        if isinstance(module, nn.Linear):
            for hf_name, rows in hf_module_rows(config, name, module.out_features).items():
                found[hf_name] = (name, rows)
    return found


def peft_model_on_meta(config: Config, lora_config) -> nn.Module:
    """A `PeftModel` over transformers' `LlamaForCausalLM` for `config`: the base on the meta device (no memory), the
    LoRA weights allocated on the CPU (uninitialised) for `load_peft_state` to fill."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_peft.export.hf import llama_hf_config

    hf_config = LlamaConfig(**llama_hf_config(config))
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    model.name_or_path = lora_config.base_model_name_or_path or ""  # what PEFT records as base_model_name_or_path
    with quiet():
        try:
            peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)
        except ValueError as e:  # e.g. target modules that the model does not have
            raise UserError(f"PEFT cannot apply this LoRA to a Llama model of this shape: {one_line(e)}") from None
    for _, layer in lora_layers(peft_model):
        for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            if hasattr(layer, name):
                getattr(layer, name).to_empty(device="cpu")
    return peft_model


def load_peft_state(peft_model: nn.Module, state: dict[str, torch.Tensor], where: str) -> list[str]:
    """PEFT's `set_peft_model_state_dict`; returns the names of the LoRA weights the state did not fill.

    Keys the model has no place for, and shapes that do not fit, are one-line errors naming `where`.
    """
    from peft import set_peft_model_state_dict

    with quiet():
        try:
            result = set_peft_model_state_dict(peft_model, state)
        except RuntimeError as e:
            raise UserError(f"{where} does not fit this base model ({one_line(e)[:300]})") from None
    if result.unexpected_keys:
        raise UserError(
            f"{where} has weights for modules a Llama model of this shape lacks or that lit-peft cannot represent: "
            f"{result.unexpected_keys[0]}"
        )
    return [k for k in result.missing_keys if ".lora_" in k]


def lora_layers(peft_model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(Hugging Face module name, PEFT LoRA layer) for every module PEFT wrapped."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield name.removeprefix(PEFT_PREFIX), module


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PEFT's and transformers' advice printed or warned while the meta models are built: kept in the DEBUG log."""
    import warnings

    buffer = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buffer):
        warnings.simplefilter("always")
        yield
    for w in caught:
        log.debug("%s", w.message)
    if buffer.getvalue():
        log.debug("%s", buffer.getvalue())


# --------------------------------------------------------------------------------------------------------- export


def read_lora_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A lit-peft adapter folder that holds LoRA: (weights, metadata); other methods are refused in one line."""
    adapter_dir = Path(adapter_dir)
    kind = folder_kind(adapter_dir)
    if kind == "checkpoint":
        raise UserError(
            f"{adapter_dir} is a whole model (method=full), not a LoRA adapter: export it with "
            f"scripts/convert_lit_checkpoint.py --checkpoint-dir {adapter_dir} --out <folder>"
        )
    if kind == "peft":
        raise UserError(f"{adapter_dir} is already a PEFT adapter ({PEFT_WEIGHTS}); import it with import_peft.py")
    if kind not in ("adapter", "lrc") or not (adapter_dir / ADAPTER_META).is_file():
        raise FileNotFoundError(
            f"no adapter at {adapter_dir} (expected {ADAPTER_WEIGHTS} and {ADAPTER_META}; e.g. outputs/<run>/adapter)"
        )
    meta = read_adapter_meta(adapter_dir)  # the one reader: the file's shape is checked there
    if kind == "lrc":
        raise UserError(f"{adapter_dir} holds a Low-Rank Clone's projections, not a LoRA adapter")
    method = meta.get("method")
    if method != "lora":
        raise UserError(
            f"{adapter_dir} is a method={method} adapter; PEFT export supports method=lora only (PEFT's OFT and "
            f"the ETHER family are parametrised differently): merge it instead, python scripts/merge.py --adapter "
            f"{adapter_dir} --out <folder>, then scripts/convert_lit_checkpoint.py"
        )
    init = (meta.get("settings") or {}).get("init", "default")
    if init != "default":
        raise UserError(
            f"{adapter_dir} is a LoRA with init={init}, whose base is the residual its initialisation left, not the "
            f"checkpoint: merge it instead, python scripts/merge.py --adapter {adapter_dir} --out <folder>"
        )
    if (meta.get("architecture") or {}).get("cqil"):
        raise UserError(f"{adapter_dir} was trained on a CQIL-rewired model, which has no Hugging Face equivalent")
    weights, meta = load_adapter(adapter_dir)
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{adapter_dir / ADAPTER_WEIGHTS} holds non-finite values ({bad[0]}); nothing exported")
    return weights, meta


def check_new_folder(out_dir: Path, inputs: dict[str, Path], action: str) -> None:
    """--out is a new folder and none of the inputs (nor inside or around one): `checkpoints.files.check_new_output`,
    without its --overwrite advice (these tools never replace a folder)."""
    try:
        check_new_output(out_dir, inputs, False, action)
    except ValueError as e:
        if "already exists" in str(e):
            raise UserError(f"--out {out_dir} already exists; pick a new folder") from None
        raise


def default_base_model_name(base_dir: Path) -> str:
    """What `base_model_name_or_path` names by default: the hub repository of the conf/model/ entry whose checkpoint
    this is (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), else the base checkpoint's path."""
    from lit_peft.inference.load import model_config_for

    conf = model_config_for(base_dir)
    if conf is not None and conf[1].get("repo_id"):
        return str(conf[1]["repo_id"])
    return str(base_dir.resolve())


def lit_to_peft_state(
    model: GPT, weights: dict[str, torch.Tensor], r: int
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Our LoRA weights on `model` (LoRA installed, meta) -> ({PEFT key: tensor}, {HF module suffix: parts stacked}).

    Each Hugging Face module gets, for every adapter part owning some of its rows, that part's A (r rows) and the
    part's B rows placed at the module rows they belong to (zero elsewhere); stacked along the rank.
    """
    from lit_peft.methods import adapters

    state: dict[str, torch.Tensor] = {}
    stacked: dict[str, int] = {}
    for name, adapter in adapters(model):
        lora_a = weights[f"{name}.lora_A"]
        lora_b = [weights[f"{name}.lora_B.{i}"] for i in range(len(adapter.part_sizes))]
        part_rows = adapter.rows.split(adapter.part_sizes)
        for hf_name, rows in hf_module_rows(model.config, name, adapter.out_features).items():
            a_blocks, b_blocks = [], []
            for i, own in enumerate(part_rows):
                position = torch.full((adapter.out_features,), -1, dtype=torch.long)
                position[own] = torch.arange(len(own))  # fused row -> row of this part's B
                where = position[rows]  # (module rows,): the part's B row, or -1
                if not (where >= 0).any():
                    continue
                block = lora_b[i].new_zeros(len(rows), r)
                block[where >= 0] = lora_b[i][where[where >= 0]]
                a_blocks.append(lora_a[i * r : (i + 1) * r])
                b_blocks.append(block)
            if not a_blocks:
                continue
            suffix = hf_name.rpartition(".")[2]
            if stacked.setdefault(suffix, len(a_blocks)) != len(a_blocks):
                raise UserError(f"the adapter's parts cover {suffix} differently from layer to layer")
            state[f"{PEFT_PREFIX}{hf_name}.lora_A.weight"] = torch.cat(a_blocks).contiguous()
            state[f"{PEFT_PREFIX}{hf_name}.lora_B.weight"] = torch.cat(b_blocks, dim=1).contiguous()
    return state, stacked


def export_peft(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_dir: str | Path | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """A lit-peft LoRA adapter -> a new PEFT LoRA folder for the Hugging Face export of its base. Returns `out_dir`.

    `base_dir`: the LitGPT base checkpoint (default: the one the adapter was trained on); its config gives the
    shapes. `base_model_name_or_path` is recorded for PEFT (default: see `default_base_model_name`).
    """
    from peft import LoraConfig

    from lit_peft.methods import build_settings
    from lit_peft.models.load import check_checkpoint_dir, load_config, trainable_state_dict

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights, meta = read_lora_adapter(adapter_dir)
    if not (base_dir or meta.get("base_checkpoint")):
        raise UserError(f"{adapter_dir / ADAPTER_META} names no base_checkpoint; pass --base <checkpoint>")
    base_dir = Path(base_dir or meta["base_checkpoint"])
    check_new_folder(out_dir, {"base checkpoint": base_dir, "adapter": adapter_dir}, "exporting")
    base_dir = check_checkpoint_dir(base_dir)
    config = load_config(base_dir)
    method, settings = build_settings("lora", meta["settings"])

    model = meta_gpt(config)
    method.apply(model, settings)
    expected = {n: p.shape for n, p in trainable_state_dict(model).items()}
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        raise UserError(
            f"adapter {adapter_dir} does not fit the base {base_dir}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise UserError(
                f"adapter {adapter_dir} does not fit the base {base_dir}: {name} is {tuple(weights[name].shape)}, "
                f"the model needs {tuple(shape)}"
            )

    state, stacked = lit_to_peft_state(model, weights, settings.r)
    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=sorted(stacked),
        rank_pattern={m: k * settings.r for m, k in stacked.items() if k != 1},
        alpha_pattern={m: k * settings.alpha for m, k in stacked.items() if k != 1},
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or default_base_model_name(base_dir),
    )
    peft_model = peft_model_on_meta(config, lora_config)
    empty = load_peft_state(peft_model, state, f"adapter {adapter_dir}")
    if empty:  # every LoRA PEFT made must have got our weights (a mismatch is a bug, not bad input)
        raise RuntimeError(f"PEFT module {empty[0]} received no weights from the adapter")
    with atomic_path(out_dir, replace=False) as stage, quiet():
        # LoRA weights only (PEFT's default adds a copy of lm_head's base weight when lm_head is a target)
        peft_model.save_pretrained(str(stage), safe_serialization=True, save_embedding_layers=False)
        write_json(stage / EXPORT_SETTINGS, {"method": "lora", "settings": settings.to_dict()})
        for f in stage.iterdir():  # safetensors writes 0600; adapters are meant to be shared
            f.chmod(0o644)
    return out_dir


# --------------------------------------------------------------------------------------------------------- import


def read_peft_config(peft_dir: Path):
    """The folder's `LoraConfig` (read by PEFT); what lit-peft's LoRA cannot hold is refused in one line."""
    from peft import LoraConfig, PeftConfig

    config_path = peft_dir / PEFT_CONFIG
    if not config_path.is_file():
        if (peft_dir / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{peft_dir} is a lit-peft adapter, not a PEFT one; export it with export_peft.py")
        raise FileNotFoundError(f"no PEFT adapter at {peft_dir} (expected {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    raw = read_json(config_path)
    peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
    if peft_type != "LORA":
        raise UserError(f"{config_path}: peft_type {peft_type!r} is not supported; valid: LORA")
    with quiet():
        try:
            config = PeftConfig.from_pretrained(str(peft_dir))
        except (TypeError, ValueError) as e:
            raise UserError(f"{config_path} is not a LoRA config PEFT can read ({one_line(e)})") from None
    if not isinstance(config, LoraConfig):
        raise UserError(f"{config_path}: peft_type {config.peft_type} is not supported; valid: LORA")
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type not in TASK_TYPES:
        raise UserError(f"{config_path}: task_type {task_type!r} is not supported; valid: CAUSAL_LM (or none)")
    for key, (default, meaning) in UNSUPPORTED_SETTINGS.items():
        value = getattr(config, key, default)
        if value not in (default, None, False, [], {}, "none"):
            raise UserError(
                f"{config_path}: {key}={value!r} ({meaning}) cannot be represented by lit-peft's LoRA; "
                f"valid: {key}={default!r}"
            )
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise UserError(
            f"{config_path}: init_lora_weights={init!r} belongs to a base model PEFT changed at initialisation; save "
            "it with PEFT's path_initial_model_for_weight_conversion (a plain LoRA), then import that"
        )
    return config


def resolve_base(model: str | Path | None, base_model_name_or_path: str | None) -> Path:
    """The LitGPT checkpoint an imported adapter belongs to: `model` (a checkpoint folder or a conf/model/ name),
    else the PEFT config's `base_model_name_or_path` when that is a LitGPT checkpoint or a conf/model/ repo_id."""
    from omegaconf import OmegaConf

    from lit_peft.checkpoints.hub import prepare_checkpoint
    from lit_peft.models.load import check_checkpoint_dir

    confs = {p.stem: p for p in sorted(MODEL_CONF_DIR.glob("*.yaml"))}

    def from_conf(name: str) -> Path:
        cfg = OmegaConf.to_container(OmegaConf.load(confs[name]))
        folder = Path(cfg["checkpoint_dir"]).expanduser()
        cfg["checkpoint_dir"] = str(folder if folder.is_absolute() else project_root() / folder)
        return prepare_checkpoint(cfg)

    if model is not None:
        if str(model) in confs and not Path(model).exists():
            return from_conf(str(model))
        if not Path(model).is_dir():
            raise UserError(
                f"--model {model}: no such checkpoint folder; valid: a LitGPT checkpoint folder or one of "
                f"{', '.join(confs)}"
            )
        return check_checkpoint_dir(model)
    name = base_model_name_or_path or ""
    if name and (Path(name) / "model_config.yaml").is_file():
        return check_checkpoint_dir(name)
    for key, path in confs.items():
        if name and OmegaConf.load(path).get("repo_id") == name:
            return from_conf(key)
    raise UserError(
        f"the PEFT adapter's base_model_name_or_path {name!r} is not a LitGPT checkpoint lit-peft knows; pass "
        f"--model <LitGPT checkpoint folder> or one of {', '.join(confs)} (convert a Hugging Face folder with "
        "scripts/convert_hf_checkpoint.py)"
    )


def read_peft_weights(peft_dir: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, or adapter_model.bin (tensors only) with `allow_pickle`."""
    if (peft_dir / PEFT_WEIGHTS).is_file():
        return load_safetensors(peft_dir / PEFT_WEIGHTS)
    if (peft_dir / PEFT_PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise UserError(
                f"{peft_dir} has only pickle weights ({PEFT_PICKLE_WEIGHTS}); pass --allow-pickle to read them as "
                "tensors only (torch.load weights_only)"
            )
        state = load_weights(peft_dir / PEFT_PICKLE_WEIGHTS)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{peft_dir / PEFT_PICKLE_WEIGHTS} is not a state dict of tensors")
        return state
    raise FileNotFoundError(f"no PEFT adapter weights in {peft_dir} (expected {PEFT_WEIGHTS})")


def without_base_copies(
    state: dict[str, torch.Tensor], peft_dir: Path, base_dir: Path, config: Config
) -> dict[str, torch.Tensor]:
    """The LoRA weights of a PEFT state, after checking that the base weights PEFT saved beside them (it saves
    lm_head's and embed_tokens' when they are targets) equal the base checkpoint's: different ones (a resized or
    trained embedding) cannot be held by a LoRA adapter and are refused."""
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_llama

    from lit_peft.models.load import checkpoint_weights

    copies = {k: v for k, v in state.items() if ".lora_" not in k}
    if not copies:
        return state
    base: dict[str, torch.Tensor] = {}
    copy_weights_llama(config, base, checkpoint_weights(base_dir))
    for key, value in copies.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        ours = base.get(name)
        if ours is None or ours.shape != value.shape or not torch.equal(ours.to(value.dtype), value):
            raise UserError(
                f"PEFT adapter {peft_dir} carries its own {name} ({key}), not the base checkpoint's {base_dir}: a "
                "resized or trained weight that lit-peft's LoRA cannot hold"
            )
    return {k: v for k, v in state.items() if k not in copies}


class NotExact(UserError):
    """The settings tried cannot hold the PEFT adapter exactly; the message says where."""


def parts_reaching(config: Config, module: tuple[str, torch.Tensor], targets: tuple[str, ...], layout: str) -> int:
    """How many LoRAs of `targets` reach a Hugging Face module (LitGPT Linear, its rows): the parts of q/k/v owning
    some of its rows in `layout` (what `lit_to_peft_state` stacks there), else 1 if its Linear is targeted."""
    from lit_peft.methods.base import MLP_LINEARS
    from lit_peft.methods.qkv import QKV_PARTS, qkv_rows

    lit_name, rows = module
    *_, parent, attr = ("", "", *lit_name.split("."))
    if parent == "attn" and attr == "qkv":
        layout_rows = qkv_rows(config, layout)
        return sum(bool(torch.isin(rows, layout_rows[p]).any()) for p in QKV_PARTS if p in targets)
    return int(
        (parent == "attn" and attr == "proj" and "projection" in targets)
        or (parent == "mlp" and attr in MLP_LINEARS and ("mlp" in targets or f"mlp.{attr}" in targets))
        or (lit_name == "lm_head" and "head" in targets)
    )


def lora_from_peft(
    config: Config,
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    values: dict[str, Any],
    linear_rows: dict[str, dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], Any, list[str]]:
    """Our LoRA with settings `values` holding exactly the PEFT LoRAs `tensors` ({HF module: (A, B)}): (weights,
    settings, the Linears or parts left with a zero LoRA). `NotExact` where these settings cannot.

    The inverse of `lit_to_peft_state`: a Hugging Face module holds, stacked in part order, r rows of A for every part
    owning some of its rows (that part's A, the same in every module it reaches) and B columns that are zero on the
    rows the part does not own. A module the adapter lacks contributes B = 0 for its rows.
    """
    from lit_peft.methods import adapters, build_settings

    method, settings = build_settings("lora", values)
    model = meta_gpt(config)
    method.apply(model, settings)
    r = settings.r
    dtype = next(iter(tensors.values()))[0].dtype
    weights: dict[str, torch.Tensor] = {}
    zero_filled, used = [], set()
    for name, adapter in adapters(model):
        lora_a = torch.zeros(len(adapter.part_sizes) * r, adapter.in_features, dtype=dtype)
        lora_b = [torch.zeros(size, r, dtype=dtype) for size in adapter.part_sizes]
        filled = [False] * len(lora_b)
        positions = []  # per part: fused row -> row of the part's B, or -1
        for own in adapter.rows.split(adapter.part_sizes):
            position = torch.full((adapter.out_features,), -1, dtype=torch.long)
            position[own] = torch.arange(len(own))
            positions.append(position)
        for hf_name, rows in linear_rows[name].items():
            where = [position[rows] for position in positions]
            reaching = [i for i, w in enumerate(where) if (w >= 0).any()]
            if hf_name not in tensors or not reaching:
                continue
            a, b = tensors[hf_name]
            if a.shape[0] != len(reaching) * r:
                raise NotExact(f"{hf_name} has r={a.shape[0]}, not {len(reaching)} x {r}")
            used.add(hf_name)
            for j, i in enumerate(reaching):
                a_j, b_j, own = a[j * r : (j + 1) * r], b[:, j * r : (j + 1) * r], where[i] >= 0
                if b_j[~own].any():
                    raise NotExact(f"{hf_name}'s LoRA {j} has B rows outside {name}:{adapter.part_names[i]}")
                if filled[i] and not torch.equal(lora_a[i * r : (i + 1) * r], a_j.to(dtype)):
                    raise NotExact(f"{name}:{adapter.part_names[i]} has a different A in {hf_name}")
                lora_a[i * r : (i + 1) * r] = a_j
                lora_b[i][where[i][own]] = b_j[own].to(dtype)
                filled[i] = True
        for i, part in enumerate(adapter.part_names):
            weights[f"{name}.lora_B.{i}"] = lora_b[i]
            if not filled[i]:
                zero_filled.append(f"{name}:{part}" if part != "all" else name)
        weights[f"{name}.lora_A"] = lora_a
    outside = sorted(set(tensors) - used)
    if outside:
        raise NotExact(f"{outside[0]} is not among targets {list(settings.targets)}")
    return weights, settings, zero_filled


def export_hint(peft_dir: Path) -> tuple[tuple[str, ...], str] | None:
    """(targets, qkv_layout) recorded by our export beside the PEFT files (`EXPORT_SETTINGS`), if readable."""
    from lit_peft.methods.qkv import QKV_LAYOUTS

    path = peft_dir / EXPORT_SETTINGS
    try:
        settings = read_json(path)["settings"] if path.is_file() else None
        if settings is None:
            return None
        targets, layout = settings["targets"], settings["qkv_layout"]
        if isinstance(targets, list) and all(isinstance(t, str) for t in targets) and layout in QKV_LAYOUTS:
            return tuple(targets), layout
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("ignoring %s: %s", path, e)
    return None


def peft_to_lit(
    peft_dir: Path, base_dir: Path, config: Config, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """A PEFT LoRA folder -> (our adapter weights, our LoRA settings dict, LitGPT Linears filled with a zero LoRA).

    The targets are exactly the Linears PEFT adapts (`mlp` where that is all of the MLP's, else e.g. `mlp.proj` for
    down_proj). A LitGPT Linear of a targeted kind that the PEFT adapter leaves alone (another layer,
    `layers_to_transform`, one of q/k/v only in some layers) gets B = 0: it computes exactly the base, as in PEFT.
    Of the settings that hold the PEFT weights exactly (the concatenated layout, where each of q/k/v_proj is one part;
    the interleaved one, where a module stacks the LoRAs of the parts reaching it, which is how PEFT's `rank_pattern`
    comes out of `export_peft`; and the settings our export recorded beside the files) the one with the fewest
    parameters is taken, the recorded one on a tie. A per-module r no such settings hold is refused in one line.
    """
    lora_config, peft_model = _loaded_peft_model(peft_dir, base_dir, config, allow_pickle)
    ranks, scalings, tensors = _peft_loras(peft_model, peft_dir)
    modules = hf_modules(config)
    parts, others = _lit_targets(config, modules, list(ranks), peft_dir)
    candidates = _candidate_settings(peft_dir, parts, others)
    shaped = _rank_fits(config, modules, ranks, candidates)
    if not shaped:
        raise _different_ranks(peft_dir, ranks)
    scaling = _one_scaling(peft_dir, scalings)
    trials = [_lora_values(lora_config, scaling, targets, layout, r) for targets, layout, r in shaped]
    weights, settings, zero_filled = _fewest_parameters(config, modules, tensors, trials, peft_dir, ranks)
    return weights, settings.to_dict(), zero_filled


def _loaded_peft_model(peft_dir: Path, base_dir: Path, config: Config, allow_pickle: bool) -> tuple[Any, nn.Module]:
    """(PEFT's LoraConfig, a `PeftModel` on the meta device holding the folder's LoRA weights), checked: finite
    values, base weights only where they equal the base's, a weight for every module the config targets."""
    lora_config = read_peft_config(peft_dir)
    state = read_peft_weights(peft_dir, allow_pickle)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{peft_dir} holds non-finite values ({bad[0]}); nothing imported")
    state = without_base_copies(state, peft_dir, base_dir, config)
    peft_model = peft_model_on_meta(config, lora_config)
    empty = load_peft_state(peft_model, state, f"PEFT adapter {peft_dir}")
    if empty:
        module = empty[0].removeprefix(PEFT_PREFIX).partition(".lora_")[0]
        raise UserError(f"PEFT adapter {peft_dir} has no weights for {module}, which its config targets")
    return lora_config, peft_model


def _peft_loras(
    peft_model: nn.Module, peft_dir: Path
) -> tuple[dict[str, int], dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per Hugging Face module PEFT adapts, in model order: its r, its scaling and its (A, B). Only plain LoRA on
    Linear layers: anything else is refused in one line."""
    from peft.tuners.lora import Linear as LoraLinearPeft

    layers = dict(lora_layers(peft_model))
    if not layers:
        raise UserError(f"PEFT adapter {peft_dir} adapts no module of this model")
    ranks, scalings, tensors = {}, {}, {}
    for hf_name, layer in layers.items():
        if not isinstance(layer, LoraLinearPeft):
            raise UserError(
                f"PEFT adapter {peft_dir}: LoRA on {hf_name} ({type(layer).__name__}) cannot be represented; "
                "lit-peft's LoRA adapts Linear layers only"
            )
        if layer.lora_variant.get("default") is not None:
            variant = type(layer.lora_variant["default"]).__name__
            raise UserError(f"PEFT adapter {peft_dir}: {hf_name} uses {variant}, which lit-peft cannot represent")
        ranks[hf_name], scalings[hf_name] = layer.r["default"], float(layer.scaling["default"])
        tensors[hf_name] = (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())
    return ranks, scalings, tensors


def _lit_targets(
    config: Config, modules: dict[str, tuple[str, torch.Tensor]], adapted: list[str], peft_dir: Path
) -> tuple[list[str], list[str]]:
    """The lit-peft targets of the Hugging Face modules `adapted`, from the converter's row map: (the q/k/v parts,
    the other targets). Exactly the Linears PEFT adapts: `mlp` only where every MLP Linear of the model is one."""
    from lit_peft.methods.base import MLP_TARGETS, target_linears
    from lit_peft.methods.qkv import QKV_PARTS, qkv_rows

    probe = meta_gpt(config)
    kinds = ("projection", *MLP_TARGETS, "head")
    kind = {n: t for t in kinds for n, _, _ in target_linears(probe, (t,), "concatenated")}
    concat = qkv_rows(config, "concatenated")
    found = set()
    for hf_name in adapted:
        if hf_name not in modules:
            raise UserError(f"PEFT adapter {peft_dir}: {hf_name} has no LitGPT counterpart")
        lit_name, rows = modules[hf_name]
        part = next((p for p in QKV_PARTS if lit_name.endswith(".qkv") and torch.equal(concat[p], rows)), None)
        target = part or kind.get(lit_name)
        if target is None:
            raise UserError(f"PEFT adapter {peft_dir}: {hf_name} is no Linear lit-peft's LoRA can target")
        found.add(target)

    parts = [p for p in QKV_PARTS if p in found]
    mlp = [t for t in MLP_TARGETS if t in kind.values()]
    others = [t for t in kinds if t in found]
    if mlp and set(mlp) <= found:
        others = [t for t in others if t not in mlp]
        others.insert(int("projection" in found), "mlp")
    return parts, others


def _candidate_settings(peft_dir: Path, parts: list[str], others: list[str]) -> list[tuple[tuple[str, ...], str]]:
    """(targets, qkv_layout) that may hold the adapter: the ones our own export recorded beside it, the concatenated
    layout (each of q/k/v_proj one part), and the interleaved layout with each set of parts (an export of such an
    adapter)."""
    from lit_peft.methods.qkv import QKV_PARTS

    candidates = [c for c in [export_hint(peft_dir)] if c is not None]
    candidates.append((tuple(parts + others), "concatenated"))
    if parts:
        subsets = (s for n in range(1, len(QKV_PARTS) + 1) for s in itertools.combinations(QKV_PARTS, n))
        candidates += [((*subset, *others), "interleaved") for subset in subsets]
    return candidates


def _rank_fits(
    config: Config,
    modules: dict[str, tuple[str, torch.Tensor]],
    ranks: dict[str, int],
    candidates: list[tuple[tuple[str, ...], str]],
) -> list[tuple[tuple[str, ...], str, int]]:
    """(targets, layout, r) of the candidates whose ranks fit: r rows of A for every LoRA reaching a module."""
    first = next(iter(ranks))
    shaped = []
    for targets, layout in candidates:
        reach = {m: parts_reaching(config, modules[m], targets, layout) for m in ranks}
        r = ranks[first] // max(reach[first], 1)
        if all(reach[m] > 0 and ranks[m] == reach[m] * r for m in ranks):
            shaped.append((targets, layout, r))
    return shaped


def _different_ranks(peft_dir: Path, ranks: dict[str, int]) -> UserError:
    """The error for a per-module r (PEFT's rank_pattern) that no settings hold, naming the smallest and largest."""
    (m1, r1), (m2, r2) = sorted(ranks.items(), key=lambda kv: kv[1])[:: len(ranks) - 1]
    return UserError(
        f"PEFT adapter {peft_dir} has a different r per module (rank_pattern: {m1} r={r1}, {m2} r={r2}); "
        "lit-peft's LoRA has one r for all modules"
    )


def _one_scaling(peft_dir: Path, scalings: dict[str, float]) -> float:
    """The adapter's alpha/r, the same for every module (lit-peft's LoRA has one); else a one-line error."""
    if max(scalings.values()) - min(scalings.values()) > 1e-6 * max(map(abs, scalings.values())):
        (m1, s1), (m2, s2) = sorted(scalings.items(), key=lambda kv: kv[1])[:: len(scalings) - 1]
        raise UserError(
            f"PEFT adapter {peft_dir} has a different alpha/r per module (alpha_pattern: {m1} {s1:g}, {m2} {s2:g}); "
            "lit-peft's LoRA has one scaling for all modules"
        )
    return next(iter(scalings.values()))


def _lora_values(lora_config, scaling: float, targets: tuple[str, ...], layout: str, r: int) -> dict[str, Any]:
    """Our LoRA settings for one candidate, with PEFT's dropout and alpha = scaling * r."""
    return {
        "r": r,
        "alpha": _alpha(lora_config, scaling, r),
        "dropout": float(lora_config.lora_dropout),
        "targets": list(targets),
        "qkv_layout": layout,
    }


def _alpha(lora_config, scaling: float, r: int) -> float:
    """alpha = scaling * r: the config's own lora_alpha where that is it (no rounding), else to 12 digits."""
    alpha, rslora = float(lora_config.lora_alpha), lora_config.use_rslora
    if not rslora and lora_config.r == r and math.isclose(alpha / r, scaling, rel_tol=1e-9):
        return alpha
    return float(f"{scaling * r:.12g}")


def _fewest_parameters(
    config: Config,
    modules: dict[str, tuple[str, torch.Tensor]],
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    trials: list[dict[str, Any]],
    peft_dir: Path,
    ranks: dict[str, int],
) -> tuple[dict[str, torch.Tensor], Any, list[str]]:
    """`lora_from_peft` for the settings `trials` that hold the PEFT LoRAs exactly, with the fewest parameters (the
    adapter itself, not one padded with zeros; the first on a tie); a one-line error where none does."""
    linear_rows: dict[str, dict[str, torch.Tensor]] = {}  # LitGPT Linear -> {HF module: its rows}
    for hf_name, (lit_name, rows) in modules.items():
        linear_rows.setdefault(lit_name, {})[hf_name] = rows
    best, reason = None, None
    for values in trials:
        try:
            fitted = lora_from_peft(config, tensors, values, linear_rows)
        except ValueError as e:  # NotExact, or recorded settings this model refuses
            reason = reason or (one_line(e) if values["qkv_layout"] == "concatenated" else None)
            continue
        size = sum(v.numel() for v in fitted[0].values())
        if best is None or size < best[0]:
            best = (size, *fitted)
    if best is None:
        if len(set(ranks.values())) > 1:
            raise _different_ranks(peft_dir, ranks)
        raise UserError(f"PEFT adapter {peft_dir} cannot be represented by lit-peft's LoRA ({reason})")
    return best[1:]


def import_peft(
    peft_dir: str | Path, out_dir: str | Path, model: str | Path | None = None, allow_pickle: bool = False
) -> Path:
    """A PEFT LoRA adapter folder -> a new lit-peft adapter folder over the LitGPT checkpoint `model` (default:
    from the adapter's base_model_name_or_path, see `resolve_base`). Returns `out_dir`."""
    from lit_peft import __version__
    from lit_peft.models.load import load_config

    peft_dir, out_dir = recover(Path(peft_dir)), Path(out_dir)
    if not peft_dir.is_dir():
        raise FileNotFoundError(f"no PEFT adapter at {peft_dir} (expected a folder with {PEFT_CONFIG})")
    lora_config = read_peft_config(peft_dir)
    base_dir = resolve_base(model, lora_config.base_model_name_or_path)
    check_new_folder(out_dir, {"PEFT adapter": peft_dir, "base checkpoint": base_dir}, "importing")
    config = load_config(base_dir)
    weights, settings, zero_filled = peft_to_lit(peft_dir, base_dir, config, allow_pickle)
    meta = {
        "method": "lora",
        "settings": settings,
        "quantize": None,
        "base_checkpoint": str(base_dir.resolve()),
        "lit_peft_version": __version__,
        "imported_from": {
            "format": "peft",
            "path": str(peft_dir.resolve()),
            "base_model_name_or_path": lora_config.base_model_name_or_path,
            "zero_lora": zero_filled,
        },
    }
    with atomic_path(out_dir, replace=False) as stage:
        save_adapter(stage, weights, meta)
    return out_dir


__all__ = [
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "export_peft",
    "hf_module_rows",
    "import_peft",
    "lit_to_peft_state",
    "peft_to_lit",
]
