"""The adapter folder: adapter.safetensors + adapter_config.json (method, settings, the run's record), written
atomically and checked where it is read.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lit_peft.checkpoints.files import atomic_path, load_safetensors, read_json, recover, unshared
from lit_peft.errors import UserError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter_config.json"


def save_adapter(out_dir: str | Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write adapter weights and their settings into `out_dir` as one atomic folder."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(unshared(weights), str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():  # safetensors writes 0600; checkpoints are meant to be shared
            f.chmod(0o644)
    return out_dir


def load_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter folder written by `save_adapter`: (weights, settings), the settings checked as
    `read_adapter_meta` checks them."""
    adapter_dir = recover(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    return load_safetensors(adapter_dir / ADAPTER_WEIGHTS), meta


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """An adapter's adapter_config.json (with `system_prompt` filled in, see `with_system_prompt`).

    The one place an adapter folder's settings are read (chat, eval, merge, the PEFT export and the Low-Rank Clone
    fold all come here, through `load_adapter` or directly): the file's shape is checked once (`check_adapter_meta`)
    and the weights file must be beside it; anything else is a one-line UserError naming the file.
    """
    adapter_dir = recover(adapter_dir)
    path, weights = adapter_dir / ADAPTER_META, adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        if weights.is_file():
            raise FileNotFoundError(
                f"no adapter at {adapter_dir} ({ADAPTER_META} missing: {weights} alone does not say which method "
                "and settings it holds)"
            )
        raise FileNotFoundError(
            f"no adapter at {adapter_dir} (expected {ADAPTER_WEIGHTS} and {ADAPTER_META}; e.g. outputs/<run>/adapter)"
        )
    meta = check_adapter_meta(path, read_json(path))
    if not weights.is_file():
        raise UserError(f"{path}: the adapter's weights file {weights} is missing (an incomplete adapter folder)")
    return with_system_prompt(meta)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can be a settings field annotated `hint` (int, float, str, bool, tuple[str, ...], X | None);
    a type not listed here is left to the settings' own checks."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


_ADAPTER_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "base_checkpoint": ((str, type(None)), "a folder path or null"),
    "quantize": ((str, type(None)), "a quantization mode or null"),
    "architecture": ((dict, type(None)), "an object or null"),
    "template": ((str, type(None)), "a template name or null"),
    "system_prompt": ((str, type(None)), "a string or null"),
    "config": ((dict, type(None)), "an object (the run's resolved config) or null"),
}


def check_adapter_meta(path: str | Path, meta: Any) -> dict[str, Any]:
    """`meta` (read from `path`, an adapter_config.json) when it has the shape readers rely on: an object naming a
    registered method with an object of that method's settings (or a Low-Rank Clone's `lrc` object instead), and the
    other known keys of the right JSON types. Else a one-line UserError naming the file and what is wrong."""
    from lit_peft.methods import METHODS, build_settings

    valid = ", ".join(sorted(METHODS))
    if not isinstance(meta, dict):
        raise UserError(
            f"{path} holds {_json_type(meta)}, not a JSON object; expected "
            f'{{"method": <one of {valid}>, "settings": {{...}}, ...}} as finetune/run.py writes it'
        )
    for key, (kinds, what) in _ADAPTER_KEYS.items():
        if key in meta and not isinstance(meta[key], kinds):
            raise UserError(f"{path}: {key!r} is {json.dumps(meta[key])[:80]}; expected {what}")
    if "method" not in meta and "lrc" in meta:  # a Low-Rank Clone's projections (task=lrc), folded by convert_lrc.py
        if not isinstance(meta["lrc"], dict):
            raise UserError(f"{path}: 'lrc' is {json.dumps(meta['lrc'])[:80]}; expected an object of LRC settings")
        return meta
    if "method" not in meta:
        raise UserError(f'{path} has no "method"; valid methods: {valid}')
    method = meta["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"{path}: unknown method {json.dumps(method)[:80]}; valid methods: {valid}")
    settings = meta.get("settings")
    if not isinstance(settings, dict):
        got = "missing" if "settings" not in meta else f"{json.dumps(settings)[:80]} ({_json_type(settings)})"
        raise UserError(f"{path}: 'settings' is {got}; expected an object of method {method}'s settings")
    hints = typing.get_type_hints(METHODS[method].Settings)
    for key, value in settings.items():
        if key in hints and not _fits(value, hints[key]):
            raise UserError(
                f"{path}: settings.{key}={json.dumps(value)[:80]} is not valid for method {method}; "
                f"expected {_describe(hints[key])}"
            )
    try:
        build_settings(method, settings)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {' '.join(str(e).split())}") from None
    return meta


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
