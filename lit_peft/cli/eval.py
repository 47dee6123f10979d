"""Evaluate a base, adapter or merged checkpoint with lm-evaluation-harness: any lm-eval task, any few-shot count.

    python eval/run.py --data-dir ../shared/data --tasks local_arc_easy,local_piqa,local_boolq --limit 300
    python eval/run.py --adapter outputs/<run>/adapter --compare-base --data-dir ../shared/data --tasks local_core
    python eval/run.py --checkpoint-dir checkpoints/merged/my-model --tasks local_mmlu --num-fewshot 5 --data-dir DIR
    python eval/run.py --tasks hellaswag,arc_easy        # lm-eval's own tasks (they download their data sets)

Local tasks (eval/tasks/, no network): local_arc_easy, local_arc_challenge, local_piqa, local_boolq,
local_winogrande, local_mmlu (57 subjects), local_truthfulqa_mc1, local_truthfulqa_mc2, and the group local_core
(ARC-easy, ARC-challenge, PIQA, BoolQ). They read their files under --data-dir (layout of ../shared/data).
--compare-base evaluates the original model (adapters switched off, CQIL undone: the same weights in memory) beside
the adapter (and, for a CQIL adapter, the rewired model without the adapter: three columns). Writes results.json
(lm-eval's results per model, timings, settings) and results.md (the table) to --out.

Prompts: an instruction-tuned adapter (one trained on conversations, not raw text) and a merged model made from one
are evaluated with lm-eval's chat-template mode, in the template and system prompt they were trained with (recorded
in adapter_config.json / lit_peft_merge.json); --no-apply-chat-template or --template none turns that off, and
--apply-chat-template turns it on for any model. --template / --system override the recorded ones (--system ''
renders no system turn). The model computes in the base's stored dtype (a 4-bit adapter: the precision it trained
in) unless --dtype says otherwise. Both choices, and where they came from, are printed and kept in results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_peft.cli.args import ArgumentParser, fail, non_negative_int, positive_int, seed_int
from lit_peft.errors import UserError
from lit_peft.paths import project_root

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lit_peft.inference.evaluation import LitLM
    from lit_peft.inference.load import PromptFormat

DEFAULT_CHECKPOINT = project_root() / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"
PRECISIONS = {"32-true": "float32", "bf16-true": "bfloat16", "16-true": "float16"}
NO_TEMPLATE = "none"


def parse_args(argv: list[str] | None):
    from lit_peft.data.templates import TEMPLATES

    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint-dir", type=Path, help="LitGPT checkpoint (default: the adapter's base, or SmolLM2)")
    p.add_argument("--adapter", type=Path, help="an adapter folder written by finetune/run.py")
    p.add_argument(
        "--compare-base",
        action="store_true",
        help="also evaluate the original model (adapters off, CQIL undone) and, for CQIL, the rewired one",
    )
    p.add_argument("--cqil", help="rewire the loaded model first: groups such as pairs:12-27 or [[12,13],[14,15]]")
    p.add_argument("--cqil-bypass", type=non_negative_int, default=0, help="CQIL bypass d (with --cqil)")
    p.add_argument("--tasks", default="local_core", help="comma-separated lm-eval task or group names")
    p.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples per question (default: the task's)")
    p.add_argument("--limit", type=limit_value, help="items per task (a count, or a fraction below 1)")
    p.add_argument("--data-dir", type=Path, help="folder the local tasks read (e.g. ../shared/data)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, help="longest input in tokens (default: the model's block size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype",
        help="auto | float32 | bfloat16 | float16 (default auto: the stored dtype; a 4-bit adapter's training one)",
    )
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="older spelling of --dtype (32-true = float32, ...)")
    p.add_argument(
        "--apply-chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (default: on for instruction-tuned adapters and their merges)",
    )
    p.add_argument(
        "--template",
        help=f"{' | '.join(sorted(TEMPLATES))} | {NO_TEMPLATE} (default: the adapter's or merged model's, else guessed "
        f"from the tokenizer; {NO_TEMPLATE}: plain lm-eval prompts)",
    )
    p.add_argument("--system", help="system prompt in the chat template (default: the recorded one; '' for none)")
    p.add_argument("--seed", type=seed_int, default=1234)
    p.add_argument(
        "--bootstrap-iters",
        type=non_negative_int,
        default=1000,
        help="lm-eval's resamples for the standard errors of bootstrapped metrics (acc's is analytic); 0: none",
    )
    p.add_argument("--log-samples", action="store_true", help="keep every item's scores in results.json")
    p.add_argument("--out", type=Path, help="output folder (default: outputs/eval/<date>_<time>)")
    args = p.parse_args(argv)
    if args.compare_base and args.adapter is None and args.cqil is None:
        p.error("--compare-base needs --adapter or --cqil")
    if args.cqil_bypass and args.cqil is None:
        p.error("--cqil-bypass needs --cqil")
    if not [t for t in args.tasks.split(",") if t.strip()]:
        p.error(f"--tasks {args.tasks!r} names no task; give comma-separated task names, e.g. local_core")
    return args


def limit_value(text: str) -> float:
    """--limit: a whole count of items (>= 1) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < 1 or (value >= 1 and value.is_integer())):
        raise argparse.ArgumentTypeError(f"{text} is not valid; expected a whole count >= 1 or a fraction in (0, 1)")
    return value


def parse_cqil(text: str, bypass: int):
    """--cqil as groups (a preset string or a YAML list of layer lists), checked before the model loads."""
    import yaml

    from lit_peft.models import cqil

    spec = text
    if text.lstrip().startswith("["):
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"--cqil {text!r} is not a list of layer groups, e.g. [[12,13],[14,15]]") from None
    groups = cqil.parse_groups(spec)
    if not groups:
        raise UserError(f"--cqil {text!r} names no groups; e.g. pairs:12-27 or [[12,13],[14,15]]")
    cqil.check(groups, bypass, n_layer=10**6)  # the layer range is checked once the model is loaded
    return spec


@dataclass(frozen=True)
class _Checked:
    """What the arguments give once checked, before anything loads."""

    cqil_spec: Any  # --cqil parsed (a preset string or a list of layer groups), or None
    requested_dtype: str
    device: torch.device


@dataclass(frozen=True)
class _Source:
    """What is evaluated and how: the checkpoint, the adapter's metadata, the dtype and the prompt format."""

    checkpoint_dir: Path
    meta: dict[str, Any]
    dtype: torch.dtype
    dtype_from: str
    fmt: PromptFormat
    apply_chat: bool
    why: str


def main(argv: list[str] | None = None) -> dict:
    """Evaluate the model the arguments name, print the table and write results.json/.md; returns the report."""
    args = parse_args(argv)
    import logging

    # lm-eval warns once per local task that it reads a custom data set: expected here.
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    out = args.out or project_root() / "outputs" / "eval" / time.strftime("%Y-%m-%d_%H-%M-%S")
    with fail.on_user_error():
        checked = _checked_settings(args, out)
        source = _model_source(args, checked.requested_dtype)
        manager = _task_index(tasks, args.data_dir)
        _print_choices(source)
        model, lm = _load(args, checked, source)
        named = _run_all(args, model, lm, tasks, manager, limit, source.apply_chat)
    report = _results_record(args, checked, source, model, named, tasks, limit)
    _write_results(out, report, named, source.checkpoint_dir, args.adapter)
    return report


def _checked_settings(args: argparse.Namespace, out: Path) -> _Checked:
    """The checks that need no model, in this order: --out, --cqil, --data-dir, the dtype, the template, --device."""
    from lit_peft.data.templates import TEMPLATES
    from lit_peft.models.load import check_dtype

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a new folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; pass a new --out")
    cqil_spec = parse_cqil(args.cqil, args.cqil_bypass) if args.cqil else None
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise NotADirectoryError(f"--data-dir {args.data_dir} is not a folder")
    requested_dtype = check_dtype(args.dtype)
    if args.precision is not None:
        if args.dtype not in (None, "auto", PRECISIONS[args.precision]):
            raise UserError(f"--precision {args.precision} contradicts --dtype {args.dtype}; give one of them")
        requested_dtype = PRECISIONS[args.precision]
    if args.template is not None and args.template not in (*TEMPLATES, NO_TEMPLATE):
        raise UserError(
            f"unknown template {args.template!r}; valid templates: {', '.join(sorted(TEMPLATES))}, {NO_TEMPLATE}"
        )
    if args.template == NO_TEMPLATE and args.apply_chat_template:
        raise UserError(f"--apply-chat-template needs a template, but --template is {NO_TEMPLATE}")
    return _Checked(cqil_spec, requested_dtype, _device(args.device))


def _device(name: str) -> torch.device:
    """--device as a device this machine has (auto: CUDA if there is one, else the CPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            have = f"CUDA devices 0..{count - 1}" if count else "no CUDA device"
            raise UserError(f"--device {name}: this machine has {have}; valid: auto, cpu, cuda:<index>")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; valid: auto, cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:<index>")
    return device


def _model_source(args: argparse.Namespace, requested_dtype: str) -> _Source:
    """The checkpoint (default: the adapter's base), the dtype and the prompt format, each with where it came from."""
    from lit_peft.inference.evaluation import chat_template_choice
    from lit_peft.inference.load import inference_dtype, inference_source, prompt_format

    checkpoint_dir, meta = inference_source(args.checkpoint_dir, args.adapter, DEFAULT_CHECKPOINT)
    dtype, dtype_from = inference_dtype(requested_dtype, checkpoint_dir, meta)
    if args.precision is not None:
        dtype_from = f"--precision {args.precision}"
    fmt = prompt_format(
        checkpoint_dir, meta, args.adapter, None if args.template == NO_TEMPLATE else args.template, args.system
    )
    apply_chat, why = chat_template_choice(fmt, args.apply_chat_template, args.template == NO_TEMPLATE)
    return _Source(checkpoint_dir, meta, dtype, dtype_from, fmt, apply_chat, why)


def _task_index(tasks: list[str], data_dir: Path | None):
    """lm-eval's task index with `tasks` checked in it: thousands of YAMLs, seconds to build, so only after every
    cheap check."""
    from lit_peft.inference.evaluation import check_tasks, task_manager

    manager = task_manager(data_dir)
    check_tasks(tasks, manager)
    return manager


def _print_choices(source: _Source) -> None:
    """The dtype and the prompt format, and why each."""
    from lit_peft.models.load import dtype_name

    print(f"dtype: {dtype_name(source.dtype)} ({source.dtype_from})")
    if source.apply_chat:
        print(f"prompts: chat template applied ({source.why}): {source.fmt.describe()}")
    else:
        print(f"prompts: lm-eval's plain prompts, no chat template ({source.why})")


def _load(args: argparse.Namespace, checked: _Checked, source: _Source) -> tuple[nn.Module, LitLM]:
    """The model (with its adapter, CQIL-rewired if asked) on the device, and lm-eval's view of it."""
    from litgpt import Tokenizer

    from lit_peft.data.templates import get_template
    from lit_peft.inference.evaluation import LitLM
    from lit_peft.inference.load import load_for_inference
    from lit_peft.models import cqil

    model, _, _ = load_for_inference(source.checkpoint_dir, args.adapter, DEFAULT_CHECKPOINT, dtype=source.dtype)
    if checked.cqil_spec is not None:
        settings = {"groups": checked.cqil_spec, "bypass": args.cqil_bypass}
        cqil.install(model, cqil.build_settings(settings, model.config.n_layer))
    model = model.to(device=checked.device)
    tokenizer = Tokenizer(source.checkpoint_dir)
    template = get_template(source.fmt.template, source.fmt.system_prompt) if source.apply_chat else None
    lm = LitLM(model, tokenizer, args.batch_size, args.max_length, template=template, name=source.checkpoint_dir.name)
    return model, lm


def _run_all(
    args: argparse.Namespace,
    model: nn.Module,
    lm: LitLM,
    tasks: list[str],
    manager,
    limit: float | None,
    apply_chat: bool,
) -> dict[str, dict]:
    """lm-eval's results per model: with --compare-base first the original model (and, for a CQIL adapter, the
    rewired model without it), then the model as loaded, named adapter, rewired or model."""
    from lit_peft.inference.evaluation import evaluate
    from lit_peft.methods import adapters_disabled
    from lit_peft.models.cqil import original_model

    def run() -> dict:
        return evaluate(
            lm,
            tasks,
            manager,
            args.num_fewshot,
            limit,
            args.seed,
            apply_chat,
            args.log_samples,
            args.bootstrap_iters,
        )

    named: dict[str, dict] = {}
    rewired = getattr(model, "cqil", None) is not None
    if args.compare_base:
        with original_model(model):
            named["base"] = run()
        if rewired and args.adapter:
            with adapters_disabled(model):
                named["rewired"] = run()
    named["adapter" if args.adapter else ("rewired" if rewired else "model")] = run()
    return named


def _results_record(
    args: argparse.Namespace,
    checked: _Checked,
    source: _Source,
    model: nn.Module,
    named: dict[str, dict],
    tasks: list[str],
    limit: float | None,
) -> dict:
    """What results.json holds: the settings, the seconds each model's evaluation took and lm-eval's results."""
    from lit_peft.models.load import dtype_name

    settings = {
        "checkpoint_dir": str(source.checkpoint_dir),
        "adapter": str(args.adapter) if args.adapter else None,
        "method": source.meta.get("method"),
        "architecture": (model.cqil.to_dict() if getattr(model, "cqil", None) else None),
        "tasks": tasks,
        "num_fewshot": args.num_fewshot,
        "limit": limit,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "device": str(checked.device),
        "dtype": dtype_name(source.dtype),
        "dtype_from": source.dtype_from,
        "precision": {v: k for k, v in PRECISIONS.items()}[dtype_name(source.dtype)],
        "batch_size": args.batch_size,
        "apply_chat_template": source.apply_chat,
        "apply_chat_template_why": source.why,
        "template": source.fmt.template if source.apply_chat else None,
        "system_prompt": source.fmt.system_prompt if source.apply_chat else None,
        "prompt_format": source.fmt.to_dict(),
        "seed": args.seed,
        "bootstrap_iters": args.bootstrap_iters,
    }
    return {
        "settings": settings,
        "wall_seconds": {name: res["wall_seconds"] for name, res in named.items()},
        "models": {
            name: {k: v for k, v in res.items() if k != "samples" or args.log_samples} for name, res in named.items()
        },
    }


def _write_results(out: Path, report: dict, named: dict[str, dict], checkpoint_dir: Path, adapter: Path | None) -> None:
    """results.json (the report) and results.md (the comparison table and timings) in `out`; the table printed."""
    from lm_eval.utils import handle_non_serializable

    from lit_peft.checkpoints.files import atomic_path
    from lit_peft.inference.evaluation import comparison_table

    table = comparison_table(named, next(iter(named.values())).get("n-samples"))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=handle_non_serializable))
    timing = ", ".join(f"{name} {sec:.0f} s" for name, sec in report["wall_seconds"].items())
    md = f"{table}\n\n{checkpoint_dir.name}{' + ' + str(adapter) if adapter else ''}; {timing}\n"
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(md)
    print(md + f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
