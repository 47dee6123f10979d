"""What a run shows: one line per event on the console, everything in the run's run.log.

`run_logging(out_dir)` routes every logger (ours, Lightning's, the libraries', Python warnings) through the root
logger to two handlers: the console (stdout, the bare message) and `<out_dir>/run.log` (time, level and logger name;
everything at INFO and above). The console drops third-party noise: advertisements, deprecation warnings raised inside
dependencies, and what libraries print on our path (captured with `quiet_stdout`, logged to run.log only).
`LIT_PEFT_DEBUG=1` or `verbose=true` shows all of it on the console too. Lightning's progress bar draws on the terminal
itself: `StepProgressBar` counts optimizer steps of max_steps (micro-batches were counted before, against max_steps).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("lit_peft")

# Console lines that carry nothing for a fine-tuner (they stay in run.log).
NOISE = (
    "💡 Tip:",  # Lightning's advertisement for its logging product
    "litlogger",
    "`weights_only` was not set",
    "DeprecationWarning",
)
_HANDLER_MARK = "_lit_peft_handler"


def debug_enabled() -> bool:
    return os.environ.get("LIT_PEFT_DEBUG", "") not in ("", "0", "false", "False")


class ConsoleFilter(logging.Filter):
    """What the console shows when not verbose: our lines and the libraries' warnings, without the noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        message = record.getMessage()
        if record.name == "py.warnings" and "site-packages" in message:  # raised inside a dependency
            return "deprecat" not in message.lower() and not any(n in message for n in NOISE)
        return not any(n in message for n in NOISE)


class _Unique(logging.Filter):
    """Drops an exact repeat of the line just shown (one event that reached the root twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[str, str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name.split(".")[0], record.getMessage())
        repeat = key == self.last
        self.last = key
        return not repeat


@contextlib.contextmanager
def run_logging(out_dir: str | Path | None, verbose: bool = False, rank: int = 0) -> Iterator[None]:
    """For the duration of a run: one console handler and one run.log handler on the root logger, every other
    handler folded in (see the module docstring); what was there before is put back at the end.

    Ranks other than 0 show warnings and errors only, and write no run.log (rank 0's is the run's). A run that fails
    on a user error leaves `error: <one line>` in its run.log (the console gets it from the entry point).
    """
    verbose = verbose or debug_enabled()
    root = logging.getLogger()
    saved_root = (root.level, root.handlers[:])
    saved_children: dict[str, tuple[list[logging.Handler], bool]] = {}
    # Lightning gives its loggers their own stream handler when imported before logging is configured: one line
    # would be printed twice (bare, then through the root's handler). Everything goes through the root instead.
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            logger = logging.getLogger(name)
            saved_children[name] = (logger.handlers[:], logger.propagate)
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)
            logger.propagate = True
    for handler in saved_root[1]:  # Hydra's job logging (a console with timestamps and run.log): ours replace both
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    ours: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not verbose:
        console.addFilter(ConsoleFilter())
    console.addFilter(_Unique())
    ours.append(console)
    if out_dir is not None and rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(out_dir) / "run.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
        ours.append(file)
    for handler in ours:
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger: run.log always, the console when ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once per location
            yield
    except Exception as e:
        from lit_peft.cli import user_error_message

        message = user_error_message(e)
        if message is not None:
            log.error(f"error: {message}", extra={"console": False})
        raise
    finally:
        logging.captureWarnings(False)
        for handler in ours:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_root[0])
        for handler in saved_root[1]:
            root.addHandler(handler)
        for name, (handlers, propagate) in saved_children.items():
            logger = logging.getLogger(name)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate


@contextlib.contextmanager
def quiet_stdout(source: str, stderr: bool = False) -> Iterator[None]:
    """What a library prints to stdout (and stderr: its progress bars) inside the block goes to run.log (logger
    `source`), not the console; a progress bar's redraws are kept as their last state."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err) if stderr else contextlib.nullcontext():
            yield
    finally:
        lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in (out.getvalue() + err.getvalue()).splitlines()]
        text = "\n".join(ln for ln in lines if ln.strip())
        if text:
            logging.getLogger(source).info(text, extra={"console": debug_enabled()})


def info(message: str) -> None:
    """A line of ours: on the console and in run.log (with the handlers of `run_logging`), else printed."""
    if any(getattr(h, _HANDLER_MARK, False) for h in logging.getLogger().handlers):
        log.info(message)
    else:
        print(message, flush=True)


# ---------------------------------------------------------------------------------------------- parameter summary


def parameter_kinds(model: Any) -> dict[str, tuple[int, int]]:
    """{kind: (trainable, total)} over the model's unique parameters: adapter (what a method added), norms,
    embeddings, head, and the base's other weights ("linear")."""
    kinds: dict[str, list[int]] = {}
    adapter_prefixes = _adapter_prefixes(model)
    for name, p in model.named_parameters():
        kind = _kind(name, adapter_prefixes)
        counts = kinds.setdefault(kind, [0, 0])
        counts[1] += p.numel()
        if p.requires_grad:
            counts[0] += p.numel()
    order = ("adapter", "linear", "norms", "embeddings", "head", "other")
    return {k: (kinds[k][0], kinds[k][1]) for k in order if k in kinds}


def _adapter_prefixes(model: Any) -> list[str]:
    from lit_peft.methods import adapters

    return [f"{name}." for name, _ in adapters(model)]


def _kind(name: str, adapter_prefixes: list[str]) -> str:
    for prefix in adapter_prefixes:
        if name.startswith(prefix):
            return "linear" if name[len(prefix) :].startswith("base.") else "adapter"
    leaf = name.rsplit(".", 2)
    if any("norm" in part or part.startswith("ln_") for part in leaf[:-1]):
        return "norms"
    if "wte" in name or "embed" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    return "linear" if name.endswith(("weight", "bias")) else "other"


def parameter_table(model: Any, kinds: dict[str, tuple[int, int]] | None = None) -> str:
    """The model summary a fine-tuner reads: trainable and total parameters and the share, per kind of module
    (`kinds`: `parameter_kinds(model)` counted earlier, e.g. before a sharding strategy split the parameters)."""
    kinds = kinds if kinds is not None else parameter_kinds(model)
    trainable = sum(t for t, _ in kinds.values())
    total = sum(n for _, n in kinds.values())
    lines = [f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3f}%)"]
    width = max(len(f"{total:,}"), 9)
    lines.append(f"  {'kind':<11}{'trainable':>{width}}  {'total':>{width}}  share")
    for kind, (t, n) in kinds.items():
        lines.append(f"  {kind:<11}{t:>{width},}  {n:>{width},}  {100 * t / max(n, 1):5.1f}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- progress bar


def step_progress_bar() -> Any:
    """Lightning's rich progress bar, counting optimizer steps (of max_steps) instead of micro-batches."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        @property
        def total_train_batches(self) -> int | float:
            trainer = self.trainer
            if trainer.max_steps is not None and trainer.max_steps > 0:
                return trainer.max_steps
            return trainer.estimated_stepping_batches

        def _get_train_description(self, current_epoch: int) -> str:
            description = "steps"
            if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
                description += f" (epoch {current_epoch + 1}/{self.trainer.max_epochs})"
            return f"{description:{len(self.validation_description)}}"

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.train_progress_bar_id is None or self.progress is None:
                super().on_train_epoch_start(trainer, pl_module)
            else:  # one bar for the whole run: its total is in steps, not per epoch
                self.progress.update(
                    self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch)
                )
            self._update(self.train_progress_bar_id, trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not self.is_disabled and self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()

        def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)  # the rest is in tensorboard and run.log
            shown: dict[str, Any] = {}
            if "train/loss" in metrics:
                shown["loss"] = metrics["train/loss"]
            tokens = getattr(pl_module, "tokens_seen", None)
            if tokens:
                shown["tokens"] = f"{int(tokens):,}"
            return shown

    return StepProgressBar(leave=True)


# ---------------------------------------------------------------------------------------------------- run summary


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


# How the peak memory was measured (metrics.json's peak_memory_kind: lit_peft.module.JobMemory), in words.
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA max allocated, this job",
    "cpu_job_peak_rss": "peak resident, this job",
    "cpu_job_sampled_rss": "peak resident, this job, sampled every 20 ms",
    "cpu_max_rss": "peak resident of the process, all its jobs so far",
}


def run_summary(metrics: dict[str, Any], settings: dict[str, Any], paths: dict[str, str | None]) -> str:
    """The block printed at the end of a run: what ran, what it cost, what it reached, where it went."""
    shown = ", ".join(f"{k}={_short(v)}" for k, v in settings.items() if k != "qkv_layout" and v is not None)
    rows = [("method", f"{metrics.get('method')} ({shown})" if shown else str(metrics.get("method")))]
    rows.append(("task", str(metrics.get("task"))))
    wall = float(metrics.get("wall_time_s") or 0.0)
    tokens = int(metrics.get("tokens") or 0)
    rate = f", {tokens / wall:,.0f} tokens/s" if wall > 0 and tokens else ""
    rows.append(("steps", f"{metrics.get('steps')} ({tokens:,} tokens, {wall:,.1f} s{rate})"))
    peak = metrics.get("peak_memory_bytes")
    if peak:
        kind = MEMORY_KINDS.get(str(metrics.get("peak_memory_kind")), "")
        rows.append(("peak memory", f"{human_bytes(float(peak))}{f' ({kind})' if kind else ''}"))
    initial, final = metrics.get("initial") or {}, metrics.get("final") or {}
    if "val/loss" in final:
        before = f"{_loss_and_se(initial)} -> " if "val/loss" in initial else ""
        line = f"{before}{_loss_and_se(final)}"
        if "val/ppl" in final:
            ppl_before = f"{initial['val/ppl']:.3f} -> " if "val/ppl" in initial else ""
            line += f" (perplexity {ppl_before}{final['val/ppl']:.3f}"
            line += f"; {metrics.get('held_out_examples', 0)} examples)"
        rows.append(("held-out loss", line))
    rows.append(
        (
            "trainable",
            f"{int(metrics.get('trainable_params') or 0):,} of {int(metrics.get('total_params') or 0):,} parameters",
        )
    )
    for key, value in paths.items():
        if value:
            rows.append((key, str(value)))
    return "summary\n" + "\n".join(f"  {k}: {v}" for k, v in rows)


def _loss_and_se(held_out: dict[str, float]) -> str:
    """'2.1232 ± 0.0312': the held-out loss and its standard error (val/loss_se) when there is one."""
    se = held_out.get("val/loss_se")
    return f"{held_out['val/loss']:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)
