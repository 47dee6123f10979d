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
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from lit_peft.env import debug_enabled

log = logging.getLogger("lit_peft")

# Console lines that carry nothing for a fine-tuner (they stay in run.log).
NOISE = (
    "💡 Tip:",  # Lightning's advertisement for its logging product
    "litlogger",
    "`weights_only` was not set",
    "DeprecationWarning",
)
_HANDLER_MARK = "_lit_peft_handler"


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
        from lit_peft.errors import user_error_message

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
