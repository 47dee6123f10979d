"""Command-line front matter shared by the entry points: one error path, one line per bad input.

Every entry point reports a bad value a user typed as `error: <one line naming the value and what is valid>` on
stderr and exits with status 2, without a traceback and without leaving an output folder behind:

- argparse scripts use `ArgumentParser` (its own errors come out as that one line) and the `type=` validators here
  (`positive_int`, `non_negative_float`, `unit_interval`, ...);
- finetune/run.py composes the Hydra config itself before Hydra runs (`hydra_preflight`): composition errors (an
  unknown key, a bad override, a missing '+'), group choices and `lit_peft.cli.validate.validate_config` all fail before
  any folder is written, for every combination of a `-m` sweep;
- errors raised later (a missing file, a corrupt weight file, a setting only the model can check) go through
  `fail.on_user_error`, which first removes the output folders this run created (`OUTPUTS`), never one that existed.

LIT_PEFT_DEBUG=1 shows the traceback instead of the one line.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lit_peft.cli.args import fail
from lit_peft.env import debug_enabled
from lit_peft.errors import UserError, one_line, user_error_message
from lit_peft.training.run_folder import OUTPUTS, OutputFolders

# ---------------------------------------------------------------------------------------- Hydra: group choices


def group_choices(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Fail fast, in one line, on `group=value` overrides that name no conf/<group>/<value>.yaml.

    Sweeps (`a,b`) are checked value by value.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or key not in groups or "(" in value or "$" in value:
            continue
        for choice in value.split(","):
            if choice and not (conf_dir / key / f"{choice}.yaml").is_file():
                fail.exit(f"unknown {key} {choice!r}; valid choices: {', '.join(group_choices(conf_dir, key))}")


def run_dir_follows_out_dir(argv: list[str]) -> list[str]:
    """`out_dir=X` also puts Hydra's own files (.hydra/, run.log) in X, unless hydra.run.dir is given."""
    out = [a.partition("=")[2] for a in argv if a.startswith("out_dir=")]
    multirun = "-m" in argv or "--multirun" in argv
    if out and not multirun and not any(a.startswith("hydra.run.dir=") for a in argv):
        return [*argv, f"hydra.run.dir={out[-1]}"]
    return argv


# ------------------------------------------------------------------------------ output folders this run created


# ------------------------------------------------------------------------------------ Hydra: compose and check

HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}
HYDRA_PASS_THROUGH = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--info",
    "-i",
}
MAX_SWEEP_COMBINATIONS = 64


def _quote(value: str) -> str:
    """A string as a Hydra override value (quoted when it holds characters the grammar reads)."""
    if re.fullmatch(r"[\w./:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    flags, overrides = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            flags.append(name)
            if name in HYDRA_FLAGS_WITH_VALUE and "=" not in arg:
                next(args, None)
        else:
            overrides.append(arg)
    return flags, overrides


def _sweep_combinations(overrides: list[str], defaults: dict[str, str] | None = None) -> list[list[str]]:
    """The overrides of each job of a `-m` sweep (as Hydra's basic sweeper splits them); many: one value at a time."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lists: list[list[str]] = []
    searched = any(
        _override_key(o) == "hydra/sweeper" and o.partition("=")[2] not in ("", "basic", "lit_peft") for o in overrides
    )
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            if searched and o.is_interval_sweep():  # a search space (hydra/sweeper=optuna): both ends are checked
                sweep, cast = o.value(), int if "int" in o.value().tags else float
                lists.append([f"{o.get_key_element()}={cast(v)!r}" for v in (sweep.start, sweep.end)])
            elif not o.is_discrete_sweep():
                raise UserError(f"{o.input_line}: the basic sweeper sweeps lists of values only (a,b or choice(a,b))")
            else:
                lists.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            lists.append([o.input_line])
    if math.prod(len(v) for v in lists) <= MAX_SWEEP_COMBINATIONS:
        combos = [list(c) for c in itertools.product(*lists)]
    else:  # one value at a time, the others at their first
        combos = []
        for i, values in enumerate(lists):
            for v in values:
                combos.append([v if j == i else other[0] for j, other in enumerate(lists)])
    from lit_peft.sweeps.sweeper import applicable  # as the sweeper runs them: method.nb only where a method has it

    return applicable(combos, default_choices=defaults)


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _node_keys(cfg: Any, path: str) -> tuple[str, list[str]]:
    """The deepest existing node on `path` (dotted) and its keys."""
    from omegaconf import DictConfig, OmegaConf

    parts = path.split(".")
    for n in range(len(parts) - 1, -1, -1):
        node_path = ".".join(parts[:n])
        node = OmegaConf.select(cfg, node_path) if node_path else cfg
        if isinstance(node, DictConfig):
            return node_path, [str(k) for k in node if node_path or k != "hydra"]
    return "", [str(k) for k in cfg if k != "hydra"]


def _unknown_key(key: str, node: str, keys: list[str]) -> str:
    where = f"of {node}" if node else "at the top level"
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], keys, n=1)
    hint = f" (did you mean {node + '.' if node else ''}{close[0]}?)" if close else ""
    return f"unknown key {key}{hint}; valid keys {where}: {', '.join(sorted(keys))}"


def composition_error(e: Exception, overrides: list[str], compose: Callable[[list[str]], Any]) -> str:
    """Hydra's (multi-line) composition error as one line that names the override and what is valid."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(e)
    cause = e.__cause__

    def keys_without(key: str) -> tuple[str, list[str]] | None:
        """(the node holding `key`, its valid keys), composed without the override naming `key`; None if unknown."""
        try:
            return _node_keys(compose([o for o in overrides if _override_key(o) != key]), key)
        except Exception:
            return None

    if isinstance(e, OverrideParseException) or (isinstance(e, ValueError) and "Config group override" in text):
        bad = next((o for o in overrides if o.strip() in text), None) or getattr(e, "override", None)
        lines = [ln.strip() for ln in text.splitlines()]
        noise = ("Error parsing", "See ", "^")
        reason = next((ln for ln in lines if ln and not ln.startswith(noise) and ln != bad), "")
        reason = reason.removeprefix("LexerNoViableAltException: ")
        shown = f"override {bad!r}" if bad else "an override"
        detail = f" ({reason})" if reason and reason != bad else ""
        return (
            f"cannot parse {shown}{detail}; write key=value, +key=value to add a key, ~key to delete one, "
            "group=choice; quote values with spaces or special characters: key='a b'"
        )
    if isinstance(e, MissingConfigException):
        group = re.search(r"Could not find '([^']+)'", text)
        options = getattr(e, "options", None) or []
        name = group.group(1) if group else one_line(text)
        return f"unknown config {name!r}; valid choices: {', '.join(options)}" if options else one_line(text)
    match = re.search(r"Could not override '([^']+)'", text)
    if match and cause is not None and "not in" in str(cause):
        key = match.group(1)
        found = keys_without(key)
        return _unknown_key(key, *found) if found else f"unknown key {key}"
    if match and cause is not None:
        arg = next((o for o in overrides if _override_key(o) == match.group(1)), match.group(1))
        return f"{arg}: {one_line(str(cause))}"
    match = re.search(r"An item is already at '([^']+)'", text)
    if match:
        key = match.group(1)
        return f"+{key}: {key} already exists; set it with {key}=<value> (no '+'), or use ++{key}=<value>"
    match = re.search(r"Could not delete from config. '([^']+)' does not exist", text)
    if match:
        key = match.group(1)
        found = keys_without(key)
        if not found:
            return f"~{key}: no key {key} to delete"
        return f"~{key}: no key {key} to delete; {_unknown_key(key, *found).split('; ', 1)[1]}"
    match = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if match:
        arg = match.group(1)
        key, _, value = arg.partition("=")
        return (
            f"{arg}: several values sweep only with -m (--multirun); for a list write {key}=[{value}], "
            f"for a string quote it: {key}='{value}'"
        )
    reason = one_line(text)
    if cause is not None and one_line(str(cause)) not in reason:
        reason = f"{reason}: {one_line(str(cause))}"
    return reason


def closed_node_keys(conf_dir: Path, defaults: Any) -> dict[str, set[str]]:
    """Nodes whose keys are fixed: `+node.key=...` adding a key no consumer reads is an error there.

    The valid keys come from the configs themselves (conf/config.yaml; the union over conf/data, conf/model)."""
    from omegaconf import DictConfig, OmegaConf

    keys: dict[str, set[str]] = {"": {str(k) for k in defaults if k != "hydra"}}
    for node in ("trainer", "schedule", "cqil", "lrc"):
        value = OmegaConf.select(defaults, node)
        if isinstance(value, DictConfig):
            keys[node] = {str(k) for k in value}
    for group in ("data", "model"):
        union: set[str] = set()
        for f in (conf_dir / group).glob("*.yaml"):
            loaded = OmegaConf.load(f)
            if isinstance(loaded, DictConfig):
                union |= {str(k) for k in loaded}
        keys[group] = union
    return keys


def hydra_preflight(
    argv: list[str],
    conf_dir: Path,
    config_name: str,
    validate: Callable[[Any], None] | Sequence[Callable[[Any], None]],
    outputs: OutputFolders = OUTPUTS,
) -> list[str]:
    """Compose the config as Hydra will (every job of a `-m` sweep) and check it before Hydra writes anything.

    Composition errors and `validate`'s UserErrors exit with one line (`validate` may be a sequence of stages, cheap
    first: each stage checks every job of a sweep before the next stage runs). Returns argv with the run (or sweep)
    folder pinned to the path resolved here, which `outputs` remembers (so a failed run removes only what it created).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig, OmegaConf

    flags, overrides = _split_argv(argv)
    if any(f in HYDRA_PASS_THROUGH for f in flags):
        return argv
    multirun = "-m" in flags or "--multirun" in flags
    run_job = not any(f in HYDRA_FLAGS_WITH_VALUE or f == "--resolve" for f in flags)
    pinned: list[str] = []
    jobs: list[DictConfig] = []
    out_dirs: dict[str, list[int]] = {}
    folder: str | None = None
    claim = False
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):

        def compose_with(ovr: list[str]) -> DictConfig:
            return compose(config_name, overrides=ovr, return_hydra_config=True)

        try:
            defaults = compose_with([])
        except Exception as e:  # the shipped config itself does not compose: a bug, not the user's input
            raise RuntimeError(f"conf/{config_name}.yaml does not compose") from e
        choices = {str(k): str(v) for k, v in defaults.hydra.runtime.choices.items() if v is not None}
        try:
            combos = _sweep_combinations(overrides, choices) if multirun else [overrides]
        except Exception as e:
            fail.exit(composition_error(e, overrides, compose_with))
        closed = closed_node_keys(conf_dir, defaults)
        groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
        for o in overrides:
            key = _override_key(o)
            if o.startswith("+") and not o.startswith("++") and key not in groups:
                node, _, leaf = key.rpartition(".")
                if node in closed and leaf not in closed[node]:
                    fail.exit(_unknown_key(key, node, sorted(closed[node])))
        for i, combo in enumerate(combos):
            try:
                cfg = compose_with(combo)
            except Exception as e:
                fail.exit(composition_error(e, combo, compose_with))
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            if i == 0:
                try:
                    folder = str(OmegaConf.select(cfg, key, throw_on_missing=True))
                except Exception:
                    folder = None
                if folder:
                    given = any(_override_key(o) in (key, "out_dir") for o in overrides)
                    outputs.remember(folder)
                    claim = not given and run_job  # a dated default folder: this process's own (claimed below)
                    pinned = [f"{key}={_quote(folder)}"]
                    raw_out = next((o.partition("=")[2] for o in reversed(overrides) if o.startswith("out_dir=")), None)
                    if raw_out:
                        outputs.remember(raw_out)
            if not run_job:
                continue
            job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            raw = OmegaConf.to_container(job, resolve=False).get("out_dir")
            if isinstance(raw, str) and "hydra:" in raw:
                job.out_dir = folder if (not multirun and pinned) else None
            else:
                out_dirs.setdefault(os.path.abspath(str(raw)) if isinstance(raw, str) else repr(raw), []).append(i)
            jobs.append(job)
    with fail.on_user_error():
        for job in jobs:
            check_output_folder("out_dir", job.get("out_dir"))
        if folder:
            check_output_folder("hydra.sweep.dir" if multirun else "hydra.run.dir", folder)
    shared = next(((d, js) for d, js in out_dirs.items() if len(js) > 1), None)
    if multirun and shared:
        fail.exit(
            f"out_dir={shared[0]} is the same for jobs {shared[1][0]} and {shared[1][1]} of this sweep: they would "
            "train into one folder (the second resuming or overwriting the first); leave out_dir out (each job gets "
            "its own folder under hydra.sweep.dir) or make it differ per job, e.g. out_dir=runs/${hydra:job.num}"
        )
    for stage in [validate] if callable(validate) else validate:
        for job in jobs:
            try:
                stage(job)
            except Exception as e:
                message = user_error_message(e)
                if message is None or debug_enabled():
                    raise
                fail.exit(message)
    GlobalHydra.instance().clear()
    if multirun and folder and run_job:
        with fail.on_user_error():
            folder, claim, pinned = _sweep_folder(folder, claim, overrides, pinned, outputs)
    if folder and claim:  # checked: now take the folder, or a new one when another run took it in the same second
        folder = claim_new_folder(folder)
        pinned = [f"{'hydra.sweep.dir' if multirun else 'hydra.run.dir'}={_quote(folder)}"]
    if multirun and folder and run_job:
        with fail.on_user_error():
            _own_sweep_folder(Path(folder), overrides)
    if run_job and not any(_override_key(o) == "hydra.output_subdir" for o in overrides):
        pinned.append("hydra.output_subdir=null")  # the run writes .hydra/ itself once its settings are accepted
    return [*argv, *pinned]


_SWEEP_LOCKS: list[Any] = []  # the launching process's sweep-folder locks, held until it exits


def _sweep_folder(
    folder: str, claim: bool, overrides: list[str], pinned: list[str], outputs: OutputFolders
) -> tuple[str, bool, list[str]]:
    """A `-m` sweep's folder: the newest unfinished sweep of the same command when the folder is the dated default
    (lit_peft.sweeps.folder.resumable; not with resume=false), else the given one, refused when it holds another
    command's sweep. Returns (folder, claim a new dated folder, pinned overrides)."""
    from lit_peft.sweeps import folder as sweeps

    command = sweeps.sweep_command(overrides)
    if not claim:
        sweeps.check_reuse(Path(folder), command)
        return folder, claim, pinned
    fresh = any(_override_key(o) == "resume" and o.partition("=")[2].lower() in ("false", "no") for o in overrides)
    found = None if fresh else sweeps.resumable(folder, command)
    if found is None:
        return folder, claim, pinned
    done, planned = sweeps.progress(found)
    of = f" of {planned}" if planned is not None else ""
    print(
        f"resuming the unfinished sweep {found} of this command ({done}{of} jobs finished): finished jobs are kept, "
        "stopped ones continue from their checkpoints; resume=false starts a new sweep",
        flush=True,
    )
    outputs.remember(found)
    return str(found), False, [f"hydra.sweep.dir={_quote(str(found))}"]


def _own_sweep_folder(sweep: Path, overrides: list[str]) -> None:
    """Lock the sweep folder for this process's life and record its command (lit_peft.sweeps.folder)."""
    from lit_peft.sweeps import folder as sweeps

    _SWEEP_LOCKS.append(sweeps.lock(sweep))
    sweeps.record_command(sweep, sweeps.sweep_command(overrides))


def release_sweep_folders() -> None:
    """Give up this process's sweep-folder locks (its sweep ended; the kernel also drops them when it exits)."""
    while _SWEEP_LOCKS:
        _SWEEP_LOCKS.pop().release()


def check_output_folder(key: str, value: Any) -> None:
    """An output folder setting must name a folder this process can create or write: not empty, not a file, not on a
    read-only file system. UserError (one line) otherwise: the preflight checks it before Hydra creates anything."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key}={value!r} is empty; give the folder to write the run into, e.g. {key}=runs/my-run")
    path = Path(value).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise UserError(f"{key}={value}: a file is in the way; expected a folder (a new or an existing one)")
    if existing != path and not existing.is_dir():
        raise UserError(f"{key}={value}: {existing} is a file, not a folder")
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise UserError(f"{key}={value}: {existing} is on a read-only file system; choose a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={value}: {existing} is not writable (permission denied); choose a writable folder")


def claim_new_folder(folder: str) -> str:
    """`folder`, created now, or `folder-2`, `-3`, ... when another run took it (two runs started in one second)."""
    base = folder.rstrip("/")
    for n in itertools.count(1):
        candidate = base if n == 1 else f"{base}-{n}"
        try:
            Path(candidate).parent.mkdir(parents=True, exist_ok=True)
            Path(candidate).mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError:
            return folder  # check_output_folder says why it cannot be written
    raise AssertionError("unreachable")


def write_hydra_record(out_dir: str | os.PathLike, cfg: Any) -> None:
    """What Hydra writes into a run's `.hydra/` (config.yaml, hydra.yaml, overrides.yaml), written by the run once its
    settings are accepted (hydra.output_subdir=null keeps Hydra from writing them before the checks): a refused
    resume or a finished run's rerun leaves the record of the run that trained untouched."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from lit_peft.checkpoints.files import atomic_path

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    with atomic_path(Path(out_dir) / ".hydra") as tmp:
        tmp.mkdir()
        OmegaConf.save(cfg, tmp / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hc}), tmp / "hydra.yaml")
        OmegaConf.save(hc.overrides.task, tmp / "overrides.yaml")
