"""One validation layer for a composed run config: every setting a user can type, checked before anything is written.

`validate_config(cfg)` raises ConfigError (a UserError) with one line naming `key=value` and what is valid. It runs
in two stages:

1. `RULES`, a table of key -> rule (types and ranges of the numeric, boolean and choice settings), and the checks
   that tie several settings together (batch sizes, resume). Cheap: nothing heavy is imported.
2. The settings whose owners already check them are built once, without a model: the method's settings dataclass,
   the task's constructor, the quantize mode, CQIL groups, the Low-Rank Clone settings, the data format against the
   task, and the `_target_` of optim/logger/strategy with their keyword arguments.

3. The method's shapes against the model's (`check_method_shapes`), from the model's config alone (no weights): a
   block count (OFT's and the ETHER family's nb or block_size) must fit every width it transforms.

Settings that only the data can check (a file's records) fail later, in the same error path
(`lit_peft.cli.args.fail.on_user_error`), which removes the run folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lit_peft.errors import ConfigError

_ABSENT = object()


def show(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (value == "" or value != value.strip() or value.lower() in ("null", "true", "false")):
        return repr(value)
    return str(value)


# ------------------------------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """A predicate on one setting's value and the words for what it accepts."""

    test: Callable[[Any], bool]
    valid: str

    def __or__(self, other: Rule) -> Rule:
        return Rule(lambda v: self.test(v) or other.test(v), f"{self.valid} or {other.valid}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _bound(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[Callable[[Any], bool], str]:
    def within(v: Any) -> bool:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    if lo is not None and hi is not None:
        text = f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f" {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        text = f" {'<' if hi_open else '<='} {hi}"
    else:
        text = ""
    return within, text


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    within, text = _bound(lo, hi, False, False)
    return Rule(lambda v: _is_int(v) and within(v), f"an integer{text}")


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    within, text = _bound(lo, hi, lo_open, hi_open)
    return Rule(lambda v: _is_number(v) and within(v), f"a number{text}")


def fraction(lo_open: bool = True, hi_open: bool = False) -> Rule:
    """A float share in (0, 1] (the edges as asked); an int is a count, not a fraction."""
    within, text = _bound(0, 1, lo_open, hi_open)
    return Rule(lambda v: isinstance(v, float) and within(v), f"a fraction{text}")


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: any(v == c and type(v) is type(c) for c in choices), " | ".join(show(c) for c in choices))


NULL = Rule(lambda v: v is None, "null")
BOOL = Rule(lambda v: isinstance(v, bool), "true | false")
TEXT = Rule(lambda v: isinstance(v, str), "a string")
PATH = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a path")
MAPPING = Rule(lambda v: isinstance(v, Mapping), "a mapping of settings")
STRINGS = Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), "a list of names")
BETAS = Rule(
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
    "a pair [beta1,beta2] of numbers in [0, 1)",
)
DEVICES = (
    integer(1)
    | one_of(-1, "auto")
    | Rule(
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(d) and d >= 0 for d in v),
        "a list of device indices",
    )
    | Rule(lambda v: isinstance(v, str) and all(p.strip().isdigit() for p in v.split(",")), "'0,1'")
)

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

# key -> rule; a key that is absent from the config is skipped (a group that does not have it).
# Method and task settings whose owners check their ranges get type rules here only.
RULES: dict[str, Rule] = {
    "seed": integer(0, 2**32 - 1),
    "verbose": BOOL,
    "overwrite": BOOL,
    "precision": one_of(*PRECISIONS),
    "quantize": NULL | TEXT,
    "trainer": MAPPING,
    "trainer.accelerator": one_of(*ACCELERATORS),
    "trainer.devices": DEVICES,
    "trainer.num_nodes": integer(1),
    "trainer.max_steps": NULL | one_of(-1) | integer(1),
    "trainer.max_epochs": NULL | one_of(-1) | integer(1),
    "trainer.global_batch_size": integer(1),
    "trainer.micro_batch_size": integer(1),
    "trainer.gradient_clip_val": NULL | number(0),
    "trainer.log_every_n_steps": integer(1),
    "trainer.val_check_interval": NULL | integer(1) | fraction(),
    "trainer.limit_val_batches": NULL | integer(0) | fraction(lo_open=False),
    "trainer.save_every_n_steps": NULL | integer(1),
    "trainer.keep_last_checkpoints": integer(0),
    "trainer.max_nonfinite_skips": integer(0),
    "trainer.requeue": BOOL,
    "trainer.validate_first": BOOL,
    "trainer.validate_last": BOOL,
    "trainer.gradient_checkpointing": BOOL,
    "trainer.compile": BOOL | one_of("inductor", "aot_eager", "eager"),  # module.COMPILE_BACKENDS
    "trainer.progress_bar": BOOL,
    "trainer.deterministic": BOOL | one_of("warn"),
    "optim": MAPPING,
    "optim.lr": number(0, lo_open=True),
    "optim.weight_decay": number(0),
    "optim.betas": BETAS,
    "optim.eps": number(0, lo_open=True),
    "optim.momentum": number(0),
    "schedule": MAPPING,
    "schedule.warmup_steps": integer(0),
    "schedule.min_lr_ratio": number(0, 1),
    "data": MAPPING,
    "data.format": TEXT,
    "data.path": NULL | PATH,
    "data.split": TEXT,
    "data.columns": NULL | MAPPING,
    "data.max_seq_length": integer(2),
    "data.val_size": integer(1) | fraction(hi_open=True),
    "data.val_split": one_of("auto", "document", "block"),
    "data.split_seed": integer(0, 2**32 - 1),
    "data.max_examples": NULL | integer(1),
    "data.num_workers": integer(0),
    "data.shuffle": BOOL,
    "data.streaming": BOOL,
    "data.prompt_min_share": number(0, 1),
    "data.separator": NULL | TEXT,
    "data.document_separator": NULL | TEXT,
    "data.cache_dir": NULL | PATH,
    "data.synthetic": NULL | MAPPING,
    "data.synthetic.num_examples": integer(1),
    "model": MAPPING,
    "model.checkpoint_dir": PATH,
    "model.source": one_of("smollm2-gguf", "hub", "tiny"),  # lit_peft.checkpoints.hub.SOURCES
    "model.template": TEXT,
    "model.system_prompt": NULL | TEXT,
    "model.repo_id": NULL | TEXT,
    "model.seed": integer(0, 2**32 - 1),
    "method": MAPPING,
    "method.name": TEXT,
    "method.r": integer(1),
    "method.alpha": number(0, lo_open=True),
    "method.nb": integer(1) | NULL,
    "method.block_size": integer(1) | NULL,
    "method.dropout": number(0, 1, hi_open=True),
    "method.flip_side": BOOL,
    "method.targets": STRINGS,
    "task": MAPPING,
    "task.name": TEXT,
    "task.beta": number(),
    "task.label_smoothing": number(),
    "task.alpha": number(),
    "task.temperature": number(),
    "task.kl_weight": number(),
    "task.ce_weight": number(),
    "task.aux_scale": number(),
    "task.disable_dropout": BOOL,
    "task.clone_sites": STRINGS,
    "task.teacher_checkpoint": NULL | PATH,
    "cqil": NULL | MAPPING,
    "cqil.bypass": NULL | integer(0),
    "lrc": NULL | MAPPING,
    "lrc.target_hidden_size": NULL | integer(1),
    "lrc.tie_embedding_projection": BOOL,
    "lrc.init_std": number(0, lo_open=True),
    "strategy": MAPPING,
    "logger": NULL | MAPPING,
}


def _value(cfg: DictConfig, key: str) -> Any:
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
        return value
    except OmegaConfBaseException as e:  # an interpolation that does not resolve, a '???' value
        where = getattr(e, "full_key", None) or key
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in str(where).split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{where}={show(raw)}: {reason[0].lower()}{reason[1:]}") from None


def bad(key: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)} is not valid; expected {valid}")


def check_rules(cfg: DictConfig, rules: Mapping[str, Rule] = RULES) -> None:
    for key, rule in rules.items():
        value = _value(cfg, key)
        if value is _ABSENT:
            continue
        if not rule.test(value):
            raise bad(key, value, rule.valid)


def _checkpoint_at(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder (strategy.state_dict_type=sharded: shards and meta.pt)."""
    return path.is_file() or (path / "meta.pt").is_file()


def check_resume(cfg: DictConfig) -> None:
    from lit_peft.training.resume import RESUME_VALID as valid
    from lit_peft.training.resume import resume_mode

    resume = _value(cfg, "resume")
    if resume is _ABSENT or resume_mode(resume) != "path":
        if resume is not _ABSENT and resume_mode(resume) == "last":
            out_dir = _value(cfg, "out_dir")
            if isinstance(out_dir, str) and not _checkpoint_at(Path(out_dir) / "checkpoints" / "last.ckpt"):
                raise ConfigError(
                    f"resume={show(resume)}: no checkpoint at {Path(out_dir) / 'checkpoints' / 'last.ckpt'}; "
                    "resume=auto starts fresh when there is none"
                )
        return
    if not isinstance(resume, str):
        raise bad("resume", resume, valid)
    if not _checkpoint_at(Path(resume)):
        what = "a folder, not a checkpoint file" if Path(resume).is_dir() else "no such checkpoint file"
        raise ConfigError(f"resume={resume}: {what}; expected {valid}")


def check_batches(cfg: DictConfig) -> None:
    from lit_peft.training.batches import accumulation_steps, world_size

    t = cfg.trainer
    accumulation_steps(int(t.global_batch_size), int(t.micro_batch_size), world_size(t))


# ---------------------------------------------------------------------------------------- owners' own checks


def _target_kwargs(node_key: str, node: Mapping[str, Any]) -> None:
    """`_target_` must import, and every other key must be one of its keyword arguments."""
    target = node.get("_target_")
    if target is None:
        return
    obj = _locate(str(target))
    if obj is None:
        raise ConfigError(f"{node_key}._target_={target}: cannot import it; expected a class or function path")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    for key in node:
        if not str(key).startswith("_") and key not in names:
            valid = ", ".join(names)
            raise ConfigError(f"unknown key {node_key}.{key} for {target}; valid keys of {node_key}: {valid}")


def _locate(path: str) -> Any:
    """The object at a dotted import path, or None."""
    import importlib

    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        try:
            for attr in parts[n:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _constructor_kwargs(owner: str, cls: type, values: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters
    names = [n for n in params if n != "self"]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"unknown key {owner}.{unknown[0]}; valid keys of {owner}: name, {', '.join(names)}")


def _n_layer(model: Mapping[str, Any]) -> int | None:
    if isinstance(model.get("config"), Mapping) and "n_layer" in model["config"]:
        return int(model["config"]["n_layer"])
    from lit_peft.checkpoints.hub import resolve_checkpoint_dir

    path = resolve_checkpoint_dir(str(model.get("checkpoint_dir", ""))) / "model_config.yaml"
    if path.is_file():
        value = OmegaConf.load(path).get("n_layer")
        return int(value) if value is not None else None
    return None


def check_devices(cfg: DictConfig) -> None:
    """trainer.accelerator and trainer.devices against this machine (Lightning would fail with a traceback)."""
    import torch

    t = cfg.trainer
    accelerator, devices = str(t.get("accelerator", "auto")), _value(cfg, "trainer.devices")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not cuda and not (accelerator == "gpu" and mps):
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no GPU; valid here: auto, cpu")
    if accelerator == "mps" and not mps:
        raise ConfigError("trainer.accelerator=mps: MPS is not available here; valid here: auto, cpu")
    target = _value(cfg, "strategy._target_")
    target = target if isinstance(target, str) else ""
    if "deepspeed" in target.lower():
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]' (or strategy=ddp)")
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and cuda > 0)
    if accelerator == "cpu" or (accelerator == "auto" and not cuda and not mps):
        if not (_is_int(devices) and devices > 0) and devices != "auto":
            raise ConfigError(
                f"trainer.devices={show(devices)}: on CPU, devices is a process count (an integer >= 1) or auto"
            )
    elif on_cuda:
        if isinstance(devices, str) and devices != "auto":
            devices = [int(d) for d in devices.split(",")]
        wanted = max(devices) + 1 if isinstance(devices, list) else devices if _is_int(devices) else 0
        if wanted > cuda:
            raise ConfigError(f"trainer.devices={show(devices)}: this machine has {cuda} CUDA device(s)")


def check_owners(cfg: DictConfig) -> None:
    from lit_peft.data.templates import get_template

    get_template(str(cfg.model.template))

    from lit_peft.methods import build_settings
    from lit_peft.methods.quantize import check_mode
    from lit_peft.models import cqil
    from lit_peft.tasks import TASKS, check_data_kind, get_task

    check_mode(cfg.get("quantize"))
    method = {k: v for k, v in _value(cfg, "method").items() if k != "name"}
    build_settings(str(cfg.method.name), method)
    task = {k: v for k, v in _value(cfg, "task").items() if k != "name"}
    name = str(cfg.task.name)
    if name in TASKS:
        _constructor_kwargs("task", TASKS[name], task)
    check_data_kind(name, get_task(name, **task), str(cfg.data.format))
    groups = _value(cfg, "cqil")
    if groups not in (_ABSENT, None) and groups.get("groups"):
        cqil.build_settings(groups, _n_layer(_value(cfg, "model")) or 10**6)
    if name == "lrc" or _value(cfg, "lrc.target_hidden_size") not in (_ABSENT, None):
        from lit_peft.models.lrc import clone_settings

        clone_settings(cfg)
    for key in ("optim", "logger", "strategy"):
        node = _value(cfg, key)
        if isinstance(node, Mapping):
            _target_kwargs(key, node)
    strategy = _value(cfg, "strategy")
    if isinstance(strategy, Mapping) and strategy.get("_target_") == "lit_peft.training.fsdp.fsdp":
        from lit_peft.training.fsdp import check_fsdp_settings

        check_fsdp_settings(**strategy)  # state_dict_type, sharding_strategy, use_orig_params


def model_config(model: Mapping[str, Any]) -> Any:
    """The run's litgpt Config without loading weights: the checkpoint's model_config.yaml when it is there, else the
    conf's own `config` (a tiny model made on first use), else litgpt's config named like the checkpoint (repo_id's
    or checkpoint_dir's last part); None when none of them is known."""
    from litgpt import Config

    from lit_peft.checkpoints.hub import resolve_checkpoint_dir

    checkpoint_dir = model.get("checkpoint_dir")
    if isinstance(checkpoint_dir, str) and checkpoint_dir.strip():
        path = resolve_checkpoint_dir(checkpoint_dir) / "model_config.yaml"
        if path.is_file():
            return Config.from_file(path)
    if isinstance(model.get("config"), Mapping):
        return Config(**model["config"])
    for name in (model.get("repo_id"), checkpoint_dir):
        if isinstance(name, str) and name.strip():
            try:
                return Config.from_name(Path(name).name)
            except ValueError:
                continue
    return None


def transformed_widths(method: Any, settings: Any, config: Any) -> dict[int, str]:
    """{width: where} of every side a block-transform method transforms in a model of `config` (built on the meta
    device: no memory), as its adapters would: each part's input (the Linear's in_features) and/or output (its rows)."""
    import torch
    from litgpt import GPT

    from lit_peft.methods.base import target_linears
    from lit_peft.methods.transform import _side

    with torch.device("meta"):
        model = GPT(config)
    on_input = method.both_sides or not settings.flip_side
    on_output = method.both_sides or settings.flip_side
    widths: dict[int, str] = {}
    for _, linear, parts in target_linears(model, settings.targets, settings.qkv_layout):
        for part in parts:
            if on_input:
                widths.setdefault(linear.in_features, _side("input", part))
            if on_output:
                widths.setdefault(len(part.rows), _side("output", part))
    return widths


def check_method_shapes(cfg: DictConfig) -> None:
    """A block-transform method's block count (nb, or block_size) against every width it would transform in the
    run's model: one line naming the value, where it does not fit and the values that fit every width."""
    import torch

    from lit_peft.methods import METHODS, build_settings
    from lit_peft.methods.transform import BlockTransformMethod
    from lit_peft.tasks import TASKS, Task

    name, task = str(cfg.method.name), TASKS.get(str(cfg.task.name))
    if not (name in METHODS and issubclass(METHODS[name], BlockTransformMethod)):
        return
    if task is not None and task.build_model is not Task.build_model:  # the task trains its own model (lrc)
        return
    model = _value(cfg, "model")
    config = model_config(model) if isinstance(model, Mapping) else None
    if config is None:  # the model is known only once downloaded: the adapter's own check fails then
        return
    method, settings = build_settings(name, {k: v for k, v in _value(cfg, "method").items() if k != "name"})
    widths = transformed_widths(method, settings, config)
    key = "block_size" if settings.block_size is not None else "nb"

    def misfit(value: int) -> str | None:
        """The owner's reason why `value` does not fit one of the widths, or None when it fits them all."""
        for width, where in widths.items():
            try:
                with torch.device("meta"):
                    method.transform(width=width, where=where, **{key: value})
            except ValueError as e:
                return str(e).split(";")[0]
        return None

    reason = misfit(getattr(settings, key))
    if reason is None:
        return
    common = math.gcd(*widths)
    valid = [str(d) for d in range(1, common + 1) if common % d == 0 and misfit(d) is None]
    raise ConfigError(
        f"method.{reason} (model {model.get('key') or config.name}); valid method.{key} for this model: "
        f"{', '.join(valid) or 'none'}"
    )


def check_table(cfg: DictConfig) -> None:
    """Stage 1: the rule table and the checks across settings (nothing heavy imported)."""
    check_rules(cfg)
    check_resume(cfg)
    check_batches(cfg)


def check_built(cfg: DictConfig) -> None:
    """Stage 2: what the settings' owners check when they are built (imports the methods and tasks)."""
    try:
        check_devices(cfg)
        check_owners(cfg)
        check_method_shapes(cfg)
    except TypeError as e:  # an owner met a value of the wrong type that no rule above covers
        raise ConfigError(" ".join(str(e).split())) from None


STAGES = (check_table, check_built)


def validate_config(cfg: DictConfig) -> None:
    """Check a composed run config; raise ConfigError (one line: `key=value` and what is valid) on the first bad one."""
    for stage in STAGES:
        stage(cfg)
