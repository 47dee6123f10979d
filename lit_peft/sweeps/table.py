"""The report's numbers and tables: one row per job (report.md, report.csv) and one per group of jobs that differ only
in their seed (report.md, report_groups.csv), with standard errors and the difference of each row to the best one.

Settings come from each job's composed config (`.hydra/config.yaml`, resolved here), so `-m method=lora,ether` shows
the learning rate each method's `optim.lr: ${method.lr}` gave, not only the overrides typed on the command line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_peft.stats import weighted_mean_se
from lit_peft.sweeps.jobs import CORE_TRAIN, CORE_VAL, STATUSES, Job, ReportError
from lit_peft.training.run_folder import HELDOUT_FILE

REPORT_GROUPS_CSV = "report_groups.csv"
OPTUNA_FILE = "optimization_results.yaml"  # hydra-optuna-sweeper's best_params and best_value
RUN_PATHS = ("out_dir", "logger.save_dir")  # the run's own folders: they differ between jobs by construction
OWN_COLUMNS = ("method.name", "task.name")  # the Method and Task columns
OWN_GROUPS = ("method", "task")
SEED = "seed"
LOSS = "val/loss"
UNFINISHED = ("failed", "killed", "preempted")  # stopped before the end: curves dashed, x at their end


class _Absent:
    """A setting the job's config does not have (method.r of an ETHER job): '—', never another job's default."""

    def __repr__(self) -> str:
        return "—"


ABSENT = _Absent()


# ------------------------------------------------------------------------------------------------------ settings


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists and scalars are leaves."""
    if not isinstance(node, dict) or (prefix and not node):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def job_settings(job: Job) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The job's composed config, flattened to dotted keys and resolved where it can be (else the value as written),
    and the keys whose written value is an interpolation (`optim.lr: ${method.lr}`); None without a config."""
    path = job.folder / ".hydra" / "config.yaml" if job.folder is not None else None
    if path is None or not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        raw = _flatten(OmegaConf.to_container(cfg, resolve=False))
    except Exception:
        return None
    # `${hydra:...}` is the job's Hydra state, not this process's: out_dir is the job's folder by definition, any
    # other such value stays as written (escaped, so that resolving the rest does not read this process's state).
    for key, value in raw.items():
        if isinstance(value, str) and "${hydra:" in value:
            own = key == "out_dir" and value.strip() == "${hydra:runtime.output_dir}"
            with contextlib.suppress(Exception):
                OmegaConf.update(cfg, key, str(job.folder) if own else value.replace("${", "\\${"), merge=False)
    interpolated = {k: v for k, v in raw.items() if isinstance(v, str) and "${" in v}
    try:
        return _flatten(OmegaConf.to_container(cfg, resolve=True)), interpolated
    except Exception:
        pass
    resolved = {}
    for key, value in raw.items():
        try:
            node = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            resolved[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except Exception:
            resolved[key] = value
    return resolved, interpolated


def parse_value(text: str) -> Any:
    """An override's value as Hydra reads it (1e-3 is a float, [a,b] a list, null None), else the text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _override_settings(job: Job, nodes: set[str]) -> dict[str, Any]:
    """What the command line says of a job without a config (a planned job, a failed job whose folder is gone).

    A config group's choice (`method=ether`) is its `name` (method.name) where the group has one; other choices
    (`model=tiny-random`, a node of the other jobs' configs, not a setting) are left out."""
    out: dict[str, Any] = {}
    for override in job.overrides:
        if override.startswith("~"):
            continue
        key, sep, value = override.lstrip("+").partition("=")
        if not sep or "@" in key or key in RUN_PATHS or key.startswith("hydra."):
            continue
        if key in OWN_GROUPS:
            key += ".name"
        elif key in nodes:
            continue
        out[key] = parse_value(value)
    return out


def same(value: Any) -> str:
    """A comparable form of a setting: 16 and 16.0, 1e-3 and 0.001, False and false are the same setting."""
    if value is ABSENT:
        return "\0absent"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)


def fmt_setting(value: Any, exponent: bool = False) -> str:
    """A setting as a reader writes it: 5e-3, 16, true, null, [query, value]; `exponent`: every float as 1e-2 (for
    a setting whose other values need it, so that a column of learning rates reads alike)."""
    if value is ABSENT:
        return "—"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _short_float(value, exponent)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_setting(v, exponent) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _short_float(v: float, exponent: bool = False) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if 1e-2 <= abs(v) < 1e5 and not exponent:
        return f"{v:.4g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


GENERIC_LEAVES = {"path", "name", "dir", "format", "init", "type", "key", "size", "seed", "version", "enabled"}


def short_names(keys: Sequence[str], taken: Iterable[str] = ()) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key (nor a column name in `taken`) shares; generic leaves
    (path, name, init, ...) keep their parent: data.path, not path."""
    taken = set(taken)
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if n == 1 and name in GENERIC_LEAVES and len(parts) > 1:
                continue
            clash = name in taken or any(o != key and (o == name or o.endswith("." + name)) for o in keys)
            if not clash:
                break
        out[key] = name
    return out


# ---------------------------------------------------------------------------------------------------- statistics


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (n - 1; None below two values) and count."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def heldout_losses(job: Job) -> dict[str, tuple[list[float], list[float]]]:
    """`<job>/heldout_losses.json`: per-example held-out losses and weights, 'initial' and 'final' (those readable)."""
    path = job.folder / HELDOUT_FILE if job.folder is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    out = {}
    for when in ("initial", "final"):
        part = data.get(when) if isinstance(data, dict) else None
        if not isinstance(part, dict):
            continue
        loss, weight = part.get("loss"), part.get("weight")
        if not isinstance(loss, list) or not loss:
            continue
        weight = weight if isinstance(weight, list) else [1.0] * len(loss)
        numbers = [*loss, *weight]
        if len(weight) != len(loss) or not all(_number(v) and math.isfinite(v) for v in numbers):
            continue
        if sum(weight) <= 0:
            continue
        out[when] = ([float(v) for v in loss], [float(v) for v in weight])
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------- scalars and steps


def _values(job: Job, tag: str) -> list[float]:
    return [p.value for p in job.scalars.get(tag, []) if math.isfinite(p.value)]


def _last(job: Job, tag: str) -> float | None:
    v = _values(job, tag)
    return v[-1] if v else None


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def step_times(job: Job) -> list[float]:
    """Seconds per optimizer step as the job logged them (train/step_time_s), else the gaps between the event
    timestamps of consecutive train-loss points divided by their step gap."""
    logged = _values(job, "train/step_time_s")
    if logged:
        return logged
    points = job.scalars.get("train/loss", [])
    gaps = []
    for a, b in zip(points, points[1:], strict=False):
        if b.step > a.step:
            gaps.append((b.wall_time - a.wall_time) / (b.step - a.step))
    return gaps


def val_points(job: Job, name: str = LOSS) -> list[tuple[int, float]]:
    """A held-out metric's points as (optimizer steps done, value), one per step (the last logged).

    Lightning logs train scalars and a validation inside the loop at the step index counted from 0 (before the
    step counter moves on), and a validation outside the loop (before or after fit) at the steps done. So a point
    logged while training went on (a train point before it, and one after it or at its own step) is moved one step
    on, and the final validation after the last step lands on the same step as the last one inside the loop."""
    first_at: dict[int, float] = {}  # train step -> when its first point was written
    for tag, points in job.scalars.items():
        if tag.startswith("train/"):
            for t in points:
                first_at[t.step] = min(t.wall_time, first_at.get(t.step, math.inf))
    start, end = min(first_at.values(), default=math.inf), max(first_at.values(), default=-math.inf)
    out: dict[int, float] = {}
    for p in job.scalars.get(name, []):
        if not math.isfinite(p.value):
            continue
        inside = start <= p.wall_time and (end > p.wall_time or first_at.get(p.step, math.inf) <= p.wall_time)
        out[p.step + 1 if inside else p.step] = p.value
    return sorted(out.items())


def steps_done(job: Job) -> int | None:
    """Optimizer steps taken: metrics.json's, else from the events (train points are logged at the step index
    counted from 0, so the last one at step k means k + 1 steps; a validation at its steps done)."""
    saved = job.metrics.get("steps")
    if _number(saved):
        return int(saved)
    done = [p.step + 1 for tag, points in job.scalars.items() if tag.startswith("train/") for p in points]
    done += [s for name in job.scalars if name.startswith("val/") for s, _ in val_points(job, name)]
    return max(done) if done else None


def _held_out(job: Job, name: str, when: str) -> float | None:
    """Held-out metric `name` before ('initial') or after ('final') training: metrics.json, else the events (a
    validation before any step for 'initial', the latest one after at least one step for 'final')."""
    saved = job.metrics.get(when)
    if isinstance(saved, dict):
        for key, value in saved.items():
            if str(key) == name and _number(value) and math.isfinite(value):
                return float(value)
        return None
    points = val_points(job, name)
    if when == "initial":
        return points[0][1] if points and points[0][0] == 0 else None
    after = [v for step, v in points if step > 0]
    return after[-1] if after else None


def _held_out_se(job: Job, name: str, when: str, losses: dict) -> tuple[float | None, str]:
    """The standard error of a held-out metric: metrics.json's `<name>_se`, else (loss only) the weighted mean's
    from the per-example losses in heldout_losses.json."""
    saved = job.metrics.get(when)
    if isinstance(saved, dict):
        for key, value in saved.items():
            if str(key) == f"{name}_se" and _number(value) and math.isfinite(value):
                return float(value), "metrics.json"
    if name == LOSS and when in losses:
        return weighted_mean_se(*losses[when]), HELDOUT_FILE
    if not isinstance(saved, dict):  # no metrics.json: the SE logged with the validation the row shows
        points = val_points(job, name)
        after = [s for s, _ in points if s > 0]
        step = 0 if when == "initial" else (after[-1] if after else None)
        se = dict(val_points(job, f"{name}_se")).get(step) if step is not None else None
        if se is not None and (when == "final" or (points and points[0][0] == 0)):
            return se, "events"
    return None, ""


def _num(job: Job, key: str, tag: str | None = None, reduce=None) -> float | int | None:
    value = job.metrics.get(key)
    if _number(value):
        return value
    if tag is None:
        return None
    values = _values(job, tag)
    if not values:
        return None
    return reduce(values) if reduce else values[0]


def _as_int(value: float | int | None) -> int | None:
    return None if value is None else int(round(value))


def val_names(jobs: Sequence[Job]) -> list[str]:
    names: dict[str, None] = {}
    for job in jobs:
        saved = [job.metrics.get(w) for w in ("initial", "final")]
        for key in (*[k for d in saved if isinstance(d, dict) for k in d], *job.scalars):
            name = str(key)
            if name.startswith("val/") and not name.endswith("_se"):
                names[name] = None
    rest = sorted(n for n in names if n not in CORE_VAL)
    return [*CORE_VAL, *rest]


def train_names(jobs: Sequence[Job]) -> list[str]:
    names = {t for job in jobs for t in job.scalars if t.startswith("train/") and t not in CORE_TRAIN}
    return sorted(names)


# ---------------------------------------------------------------------------------------------- the table's model


@dataclass
class Group:
    """Jobs whose settings are the same but for the seed."""

    label: str
    jobs: list[Job]
    row: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table:
    """What the tables and plots show beside each job's row: the settings that differ, labels, groups, best rows."""

    keys: list[str]  # settings that differ between jobs (dotted), seed last
    short: dict[str, str]  # their column headers
    label_keys: list[str]  # the settings a label names (not a method's own settings that only the method changes)
    labels: dict[str, str]  # job name -> label
    groups: list[Group]
    group_of: dict[str, Group]  # job name -> its group
    known: dict[str, bool]  # job name -> whether its whole config was read (else only its overrides)
    settings: dict[str, dict[str, Any]]  # job name -> its settings (every key, resolved)
    vals: list[str]
    trains: list[str]
    losses: dict[str, dict[str, tuple[list[float], list[float]]]]  # job name -> heldout_losses.json
    ref_job: str | None = None  # what the Δ column of the job table is taken against
    ref_group: str | None = None
    best_job: str | None = None
    best_group: str | None = None
    baseline: str | None = None
    exponent: set[str] = field(default_factory=set)  # settings written 1e-2 for all values (see `fmt_setting`)

    def fmt(self, key: str, value: Any) -> str:
        return fmt_setting(value, key in self.exponent)

    @property
    def seeded(self) -> bool:
        """Whether some group holds several jobs (then report.md shows the group table)."""
        return any(len(g.jobs) > 1 for g in self.groups)


def fill_rows(jobs: Sequence[Job], baseline: str | None = None) -> Table:
    """Each job's row (job.row, raw values), its group's (group.row), and what the tables and plots show beside them.

    `baseline`: a job name or group label the Δ columns are taken against (default: the best row); ReportError if
    it names neither."""
    table = _settings_table(jobs)
    for job in jobs:
        job.row = _job_row(job, table)
    for group in table.groups:
        group.row = _group_row(group, table)
    _mark_best(jobs, table, baseline)
    return table


def _settings_table(jobs: Sequence[Job]) -> Table:
    read = {job.name: job_settings(job) for job in jobs}
    complete = {name: r[0] for name, r in read.items() if r is not None}
    interpolated = {name: r[1] for name, r in read.items() if r is not None}
    nodes = {k.rsplit(".", i)[0] for s in complete.values() for k in s for i in range(1, k.count(".") + 1)}
    settings = {job.name: complete.get(job.name) or _override_settings(job, nodes) for job in jobs}
    known = {job.name: job.name in complete or not complete for job in jobs}

    keys = _differing_keys(jobs, settings, known, interpolated)
    choice = [k for k in OWN_COLUMNS if differs(k, jobs, settings, known)]
    label_keys = [*choice, *(k for k in keys if k != SEED and not _implied(k, choice, jobs, settings, known))]
    short = short_names(keys, taken=("job", "group", "status", "method", "task", "steps", "tokens"))
    exponent = {k for k in keys if any(_tiny(s.get(k)) for s in settings.values())}
    groups = _groups(jobs, keys, settings, known)
    for group in groups:  # named by a member whose whole config was read, where there is one
        job = next((j for j in group.jobs if known[j.name]), group.jobs[0])
        text = _label(label_keys, settings[job.name], short, exponent) or job.method or "all jobs"
        while any(g.label == text for g in groups):
            text += "'"
        group.label = text
    group_of = {job.name: group for group in groups for job in group.jobs}
    labels: dict[str, str] = {}
    for job in jobs:
        group, label = group_of[job.name], group_of[job.name].label
        if len(group.jobs) > 1:
            seed = settings[job.name].get(SEED)
            label += f" seed={fmt_setting(seed)}" if seed is not None else f" [{job.name}]"
        labels[job.name] = label if label_keys or len(group.jobs) > 1 else job.name
    counts = Counter(labels.values())
    labels = {name: f"{label} [{name}]" if counts[label] > 1 else label for name, label in labels.items()}
    return Table(
        keys=keys,
        short=short,
        label_keys=label_keys,
        labels=labels,
        groups=groups,
        group_of=group_of,
        known=known,
        settings=settings,
        vals=val_names(jobs),
        trains=train_names(jobs),
        losses={job.name: heldout_losses(job) for job in jobs},
        exponent=exponent,
    )


def representative(group: Group, table: Table) -> Job:
    """The group's first job whose whole config was read (its settings are the group's), else its first."""
    return next((j for j in group.jobs if table.known[j.name]), group.jobs[0])


def _differing_keys(jobs: Sequence[Job], settings: dict, known: dict, interpolated: dict) -> list[str]:
    """The settings that differ between jobs, in config order, seed last; not the run's own folders, not method and
    task (columns of their own), and one column for `optim.lr: ${method.lr}` where both are the same in every job
    (optim.lr: the value the optimizer used)."""
    skip = set(RUN_PATHS) | set(OWN_COLUMNS)
    order: dict[str, None] = {}
    for job in jobs:
        order.update(dict.fromkeys(k for k in settings[job.name] if k not in skip and not k.startswith("hydra.")))
    keys = [key for key in order if differs(key, jobs, settings, known)]
    for key in list(keys):
        for alias in keys:
            users = [name for name in interpolated if alias in settings[name]]
            if (
                alias != key
                and users
                and all(interpolated[n].get(alias) == "${" + key + "}" for n in users)
                and all(same(settings[j.name].get(key)) == same(settings[j.name].get(alias)) for j in jobs)
            ):
                keys.remove(key)
                break
    return [k for k in keys if k != SEED] + [SEED] * (SEED in keys)


def _groups(jobs: Sequence[Job], keys: Sequence[str], settings: dict, known: dict) -> list[Group]:
    """Jobs with the same settings but the seed; a job known by its overrides only joins the group of a job whose
    overrides are the same but the seed (the same command: the same config)."""
    signature = {job.name: _signature(job, keys, settings, known) for job in jobs}
    for job in jobs:
        if not known[job.name]:
            mine = _overrides_but_seed(job)
            twin = next((j for j in jobs if known[j.name] and _overrides_but_seed(j) == mine), None)
            signature[job.name] = signature[twin.name] if twin else signature[job.name]
    groups: dict[tuple, Group] = {}
    for job in jobs:
        groups.setdefault(signature[job.name], Group("", [])).jobs.append(job)
    return list(groups.values())


def differs(key: str, jobs: Sequence[Job], settings: dict, known: dict) -> bool:
    """Whether jobs differ in `key` (a job known by its overrides only counts where it names the key)."""
    values = {same(settings[j.name].get(key, ABSENT)) for j in jobs if known[j.name] or key in settings[j.name]}
    return len(values) > 1


NAMED_ALWAYS = ("optim.", "schedule.", "trainer.")  # training settings a reader compares: in labels even if implied


def _implied(key: str, choice: list[str], jobs: Sequence[Job], settings: dict, known: dict) -> bool:
    """Whether `key` is the same for every job of the same method (and task): what the method's name already says
    (method.r of LoRA, the data settings of a DPO job beside SFT ones). Optimizer and trainer settings (optim.lr,
    `${method.lr}`) are named anyway."""
    if not choice or key.startswith(NAMED_ALWAYS):
        return False
    by_choice: dict[tuple, set[str]] = {}
    for job in jobs:
        if not known[job.name]:
            continue
        s = settings[job.name]
        by_choice.setdefault(tuple(same(s.get(k, ABSENT)) for k in choice), set()).add(same(s.get(key, ABSENT)))
    return all(len(v) == 1 for v in by_choice.values())


def _tiny(value: Any) -> bool:
    return isinstance(value, float) and 0 < abs(value) < 1e-2


def _label(keys: Sequence[str], settings: dict[str, Any], short: dict[str, str], exponent: set[str]) -> str:
    parts = []
    for key in keys:
        if key not in settings:
            continue
        value = fmt_setting(settings[key], key in exponent)
        parts.append(value if key in OWN_COLUMNS else f"{short.get(key, key)}={value}")
    return " ".join(parts)


def _signature(job: Job, keys: Sequence[str], settings: dict, known: dict) -> tuple:
    s = settings[job.name]
    unknown = "\0unknown"
    values = [same(s.get(k, ABSENT)) if known[job.name] or k in s else unknown for k in keys if k != SEED]
    return (*values, same(s.get("method.name", job.method)), same(s.get("task.name", job.task)))


def _overrides_but_seed(job: Job) -> dict[str, str]:
    pairs = (o.lstrip("+").partition("=") for o in job.overrides if not o.startswith("~"))
    return {k: same(parse_value(v)) for k, _, v in pairs if k not in (SEED, *RUN_PATHS) and not k.startswith("hydra.")}


# --------------------------------------------------------------------------------------------------------- rows


def _job_row(job: Job, table: Table) -> dict[str, Any]:
    trainable = _as_int(_num(job, "trainable_params", "params/trainable"))
    total = _as_int(_num(job, "total_params", "params/total"))
    settings = table.settings[job.name]
    peak = _num(job, "peak_memory_bytes")
    kind = job.metrics.get("peak_memory_kind") if peak is not None else None
    if peak is None:
        logged = _values(job, "train/peak_memory_bytes")
        peak, kind = (max(logged), "logged") if logged else (None, None)
    row: dict[str, Any] = {
        "job": job.name,
        "group": table.group_of[job.name].label,
        "status": job.status,
        "error": job.error,
        **{k: _setting_cell(settings.get(k, ABSENT)) for k in table.keys},
        "method": job.method,
        "task": job.task,
        "trainable_params": trainable,
        "trainable_share": trainable / total if trainable is not None and total else None,
        "total_params": total,
        "steps": steps_done(job),
        "tokens": _as_int(_num(job, "tokens")),
        "s_per_step": _median(step_times(job)),
        "tokens_per_s": _median(_values(job, "train/tokens_per_sec")),
        "peak_memory_bytes": _as_int(peak),
        "peak_memory_kind": kind,
        "wall_time_s": _num(job, "wall_time_s"),
        "held_out_examples": _as_int(_num(job, "held_out_examples")),
    }
    losses = table.losses[job.name]
    for name in table.vals:
        for when, word in (("initial", "before"), ("final", "after")):
            row[f"{name} {word}"] = _held_out(job, name, when)
            se, source = _held_out_se(job, name, when, losses)
            if se is not None or name == LOSS:
                row[f"{name} {word} se"] = se
            if name == LOSS and word == "after":
                row[f"{name} after se from"] = source or None
                row.update({"best": None, "delta": None, "delta se": None, "delta se kind": None, "delta to": None})
    for name in table.trains:
        row[f"{name} last"] = _last(job, name)
    for task, metrics in job.evals.items():
        for metric, ev in metrics.items():
            row[f"eval/{task} {metric}"] = ev.value
            row[f"eval/{task} {metric}_stderr"] = ev.stderr
            row[f"eval/{task} n"] = ev.n
    if job.eval_error:
        row["eval error"] = job.eval_error
    row["folder"] = str(job.folder) if job.folder is not None else ""
    return row


def _setting_cell(value: Any) -> Any:
    """A setting in report.csv: numbers and text as they are, the rest as written in a config; absent: empty."""
    if value is ABSENT:
        return None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return fmt_setting(value)


GROUP_MEANS = ("steps", "s_per_step", "tokens_per_s", "wall_time_s")


def _group_row(group: Group, table: Table) -> dict[str, Any]:
    """Means ± sd over the group's finished jobs (status ok) of the held-out metrics, evaluations and costs."""
    first = representative(group, table)
    ok = [job for job in group.jobs if job.status == "ok"]
    row: dict[str, Any] = {
        "group": group.label,
        "jobs": len(group.jobs),
        "ok": len(ok),
        "seeds": " ".join(
            fmt_setting(table.settings[j.name][SEED]) for j in group.jobs if SEED in table.settings[j.name]
        ),
        **{k: first.row.get(k) for k in table.keys if k != SEED},
        "method": first.method,
        "task": first.task,
    }
    params = {j.row.get("trainable_params") for j in ok if j.row.get("trainable_params") is not None}
    row["trainable_params"] = params.pop() if len(params) == 1 else None
    cols = [c for c in first.row if c.endswith((" before", " after")) or (c.startswith("eval/") and _is_eval(c))]
    for c in cols + [c for j in ok for c in j.row if c.startswith("eval/") and _is_eval(c) and c not in cols]:
        mean, sd, n = mean_sd([j.row.get(c) for j in ok if j.row.get(c) is not None])
        row[f"{c} mean"], row[f"{c} sd"], row[f"{c} n"] = mean, sd, n
    for c in GROUP_MEANS:
        row[c] = mean_sd([j.row.get(c) for j in ok if j.row.get(c) is not None])[0]
    peaks = [j.row.get("peak_memory_bytes") for j in ok if j.row.get("peak_memory_bytes") is not None]
    kinds = {j.row.get("peak_memory_kind") for j in ok if j.row.get("peak_memory_bytes") is not None}
    row["peak_memory_bytes"] = max(peaks) if peaks else None
    row["peak_memory_kind"] = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)
    if len(ok) == 1:  # one seed: the uncertainty of its mean is the held-out one
        row[f"{LOSS} after se"] = ok[0].row.get(f"{LOSS} after se")
    row.update({"best": None, "delta": None, "delta se": None, "delta se kind": None, "delta to": None})
    return row


def _is_eval(col: str) -> bool:
    return not col.endswith(("_stderr", " n")) and col != "eval error"


def _mark_best(jobs: Sequence[Job], table: Table, baseline: str | None) -> None:
    """The best job and group (lowest held-out loss after training among finished ones) and each row's difference
    to it, or to the baseline, with its standard error (see `job_delta`, `group_delta`)."""
    after = f"{LOSS} after"
    finished = [j for j in jobs if j.status == "ok" and j.row.get(after) is not None]
    table.best_job = min(finished, key=lambda j: j.row[after]).name if finished else None
    scored = [g for g in table.groups if g.row.get(f"{after} mean") is not None]
    table.best_group = min(scored, key=lambda g: g.row[f"{after} mean"]).label if scored else None
    table.ref_job, table.ref_group = table.best_job, table.best_group
    if baseline is not None:
        by_name = {j.name: j for j in jobs}
        by_label = {g.label: g for g in table.groups}
        if baseline in by_name:
            table.ref_job, table.ref_group = baseline, table.group_of[baseline].label
        elif baseline in by_label:
            table.ref_group = baseline
            members = [j for j in by_label[baseline].jobs if j.row.get(after) is not None]
            table.ref_job = members[0].name if len(by_label[baseline].jobs) == 1 and members else table.best_job
        else:
            choices = ", ".join([*(repr(n) for n in by_name), *(repr(g) for g in by_label if g not in by_name)])
            raise ReportError(
                f"--baseline {baseline!r} is neither a job nor a group of this report; choose from {choices}"
            )
        table.baseline = baseline
    for job in jobs:
        job.row["best"] = True if job.name == table.best_job else None
    for group in table.groups:
        group.row["best"] = True if group.label == table.best_group else None
    ref = next((j for j in jobs if j.name == table.ref_job), None)
    for job in jobs:
        if ref is not None and job.row.get(after) is not None and ref.row.get(after) is not None:
            delta, se, kind = job_delta(job, ref, table)
            job.row.update({"delta": delta, "delta se": se, "delta se kind": kind, "delta to": ref.name})
    ref_group = next((g for g in table.groups if g.label == table.ref_group), None)
    for group in table.groups:
        if ref_group is not None and None not in (group.row.get(f"{after} mean"), ref_group.row.get(f"{after} mean")):
            delta, se, kind = group_delta(group, ref_group)
            group.row.update({"delta": delta, "delta se": se, "delta se kind": kind, "delta to": ref_group.label})


def job_delta(job: Job, ref: Job, table: Table) -> tuple[float, float | None, str | None]:
    """`job`'s held-out loss after training minus `ref`'s, and its standard error: paired over the examples where
    both wrote their per-example losses on the same held-out set (same count and weights), else the two held-out
    SEs as independent, sqrt(se_a^2 + se_b^2)."""
    after = f"{LOSS} after"
    delta = job.row[after] - ref.row[after]
    if job.name == ref.name:
        return 0.0, None, None
    a, b = table.losses[job.name].get("final"), table.losses[ref.name].get("final")
    if a and b and len(a[0]) == len(b[0]) and a[1] == b[1]:
        se = weighted_mean_se(a[0], a[1], b[0], b[1])
        if se is not None:
            return delta, se, "paired"
    se_a, se_b = job.row.get(f"{after} se"), ref.row.get(f"{after} se")
    if se_a is not None and se_b is not None:
        return delta, math.hypot(se_a, se_b), "independent"
    return delta, None, None


def group_delta(group: Group, ref: Group) -> tuple[float, float | None, str | None]:
    """Difference of the groups' mean held-out losses and its Welch standard error, sqrt(sd_a^2/n_a + sd_b^2/n_b);
    a group of one finished job counts its held-out SE instead (then the kind says so)."""
    after = f"{LOSS} after"
    delta = group.row[f"{after} mean"] - ref.row[f"{after} mean"]
    if group is ref:
        return 0.0, None, None
    parts, kinds = [], set()
    for g in (group, ref):
        sd, n = g.row.get(f"{after} sd"), g.row.get(f"{after} n")
        if sd is not None and n and n > 1:
            parts.append(sd * sd / n)
            kinds.add("Welch")
        elif g.row.get(f"{after} se") is not None:
            parts.append(g.row[f"{after} se"] ** 2)
            kinds.add("held-out SE")
        else:
            return delta, None, None
    return delta, math.sqrt(sum(parts)), " + ".join(sorted(kinds, reverse=True))


def columns(jobs: Sequence[Job]) -> list[str]:
    cols: dict[str, None] = {}
    for job in jobs:
        cols.update(dict.fromkeys(job.row))
    tail = [c for c in cols if c.startswith("eval")] + ["folder"]
    return [c for c in cols if c not in tail] + [c for c in tail if c in cols]


# ------------------------------------------------------------------------------------------------------- formats


def _fmt_count(v: Any) -> str:
    return f"{int(round(v)):,}"


def _fmt_sig(v: float) -> str:
    return f"{v:.3g}"


def _fmt_bytes(v: Any) -> str:
    v = float(v)
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def _fmt_duration(v: float) -> str:
    if v >= 3600:
        return f"{v / 3600:.2f} h"
    return f"{v / 60:.1f} min" if v >= 120 else f"{v:.1f} s"


def _fmt_metric(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def _fmt_delta(v: float) -> str:
    return f"{v:+.4f}" if abs(v) < 1000 else f"{v:+,.1f}"


MD_FORMATS = {
    "trainable_params": ("Trainable", _fmt_count),
    "trainable_share": ("Share", lambda v: f"{100 * v:.3f}%"),
    "total_params": ("Total", _fmt_count),
    "steps": ("Steps", _fmt_count),
    "tokens": ("Tokens", _fmt_count),
    "s_per_step": ("s/step (median)", _fmt_sig),
    "tokens_per_s": ("tokens/s (median)", lambda v: f"{v:,.0f}"),
    "peak_memory_bytes": ("Peak memory", _fmt_bytes),
    "wall_time_s": ("Wall time", _fmt_duration),
    "held_out_examples": ("Held-out n", _fmt_count),
    "job": ("Job", str),
    "group": ("Group", str),
    "status": ("Status", str),
    "method": ("Method", str),
    "task": ("Task", str),
}
# what peak_memory_bytes measured; 'logged': the largest train/peak_memory_bytes in the events (no metrics.json)
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA",
    "cpu_max_rss": "RSS, process",
    "cpu_job_peak_rss": "RSS, job",
    "cpu_job_sampled_rss": "RSS, job, sampled",
    "logged": "logged",
    "mixed": "mixed kinds",
}
TEXT_COLUMNS = ("job", "group", "status", "method", "task")


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]], right: list[bool]) -> list[str]:
    """A markdown table without its empty columns (the first two are kept)."""
    keep = [i for i in range(len(headers)) if i < 2 or any(r[i] for r in rows)]
    out = ["| " + " | ".join(_md_escape(headers[i]) for i in keep) + " |"]
    out.append("|" + "|".join("---:" if right[i] else "---" for i in keep) + "|")
    out += ["| " + " | ".join(_md_escape(r[i]) for i in keep) + " |" for r in rows]
    return out


def _cell(col: str, v: Any, row: dict[str, Any]) -> str:
    """A raw row value as report.md shows it."""
    if v is None or v == "":
        return ""
    if col in MD_FORMATS:
        text = MD_FORMATS[col][1](v)
        if col == "peak_memory_bytes":
            kind = row.get("peak_memory_kind")
            text += f" ({MEMORY_KINDS.get(kind, kind) if kind else 'kind not recorded'})"
        return text
    if isinstance(v, float):
        return _fmt_metric(v)
    return str(v)


def _loss_cell(value: float | None, spread: float | None, best: bool) -> str:
    if value is None:
        return ""
    text = _fmt_metric(value) + (f" ± {_fmt_metric(spread)}" if spread is not None else "")
    return text + (" ★" if best else "")


def _delta_cell(row: dict[str, Any], ref_word: str) -> str:
    if row.get("delta") is None:
        return ""
    if row.get("delta to") == row.get("job", row.get("group")):
        return ref_word
    text = _fmt_delta(row["delta"])
    if row.get("delta se") is not None:
        text += f" ± {_fmt_metric(row['delta se'])} ({row['delta se kind']})"
    return text


def _eval_cell(job_or_row: dict[str, Any], col: str, binomial: bool) -> str:
    v = job_or_row.get(col)
    if v is None:
        return ""
    stderr = job_or_row.get(f"{col}_stderr")
    return f"{v:.3f}" if stderr is None else f"{v:.3f} ± {stderr:.3f}{'*' if binomial else ''}"


# ------------------------------------------------------------------------------------------------------ report.md


def markdown(
    jobs: Sequence[Job],
    table: Table,
    folders: Sequence[Path],
    report_dir: Path,
    plots: Sequence[Path] = (),
) -> str:
    """report.md: the Optuna result, the group table (seeds), the job table, how every number was read, the plots."""
    out = [f"# Sweep report: {report_dir.name}", ""]
    counts = {s: sum(job.status == s for job in jobs) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    summary = f" ({summary})" if summary else ""
    out.append(f"{len(jobs)} jobs{summary} from {', '.join(str(f) for f in folders)}; written {_now()}.")
    out.append("")
    out += optuna_lines(folders, jobs)
    if table.seeded:
        out += ["## Groups: the same settings, different seeds", ""]
        out += _group_table(table)
        out.append("")
        out += ["## Jobs", ""]
    failures: list[str] = []
    out += _job_table(jobs, table, failures) if jobs else ["No job has started yet."]
    out.append("")
    if failures:
        out += [f"[{i}] {_md_escape(text)}  " for i, text in enumerate(failures, 1)]
        out.append("")
    out += _notes(jobs, table)
    while out and not out[-1]:
        out.pop()
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


def _setting_md(job: Job, key: str, table: Table) -> str:
    value = table.settings[job.name].get(key, ABSENT)
    if value is ABSENT and not table.known[job.name]:
        return ""  # a job known by its overrides only: not that it has no such setting
    return table.fmt(key, value)


def _job_table(jobs: Sequence[Job], table: Table, failures: list[str]) -> list[str]:
    after = f"{LOSS} after"
    skip = {"error", "folder", "peak_memory_kind", "eval error", "best", "delta se", "delta se kind", "delta to"}
    cols = [c for c in columns(jobs) if c not in skip and not c.endswith((" se", " se from"))]
    cols = [c for c in cols if not (c.startswith("eval/") and not _is_eval(c))]
    if not table.seeded and "group" in cols:
        cols.remove("group")
    ref_word = "baseline" if table.baseline else "best"
    rows = []
    for job in jobs:
        cells = []
        for c in cols:
            v = job.row.get(c)
            if c == "status" and job.error:
                failures.append(f"{job.name}: {job.error}")
                cells.append(f"{v} [{len(failures)}]")
            elif c in table.keys:
                cells.append(_setting_md(job, c, table))
            elif c.endswith((" before", " after")) and c.startswith("val/"):
                best = c == after and job.name == table.best_job
                cells.append(_loss_cell(v, job.row.get(f"{c} se"), best))
            elif c == "delta":
                cells.append(_delta_cell({**job.row, "job": job.name}, ref_word))
            elif c.startswith("eval/"):
                task, _, metric = c[len("eval/") :].partition(" ")
                ev = job.evals.get(task, {}).get(metric)
                cells.append(_eval_cell(job.row, c, ev is not None and ev.source == "binomial"))
            else:
                cells.append(_cell(c, v, job.row))
        rows.append(cells)
    headers = [_header(c, table) for c in cols]
    return _md_table(headers, rows, [_right(c) for c in cols])


def _group_table(table: Table) -> list[str]:
    after = f"{LOSS} after"
    first = table.groups[0].row
    metric_cols = [c[: -len(" mean")] for c in first if c.endswith(" mean")]
    for g in table.groups[1:]:
        metric_cols += [c[: -len(" mean")] for c in g.row if c.endswith(" mean") and c[:-5] not in metric_cols]
    settings = [k for k in table.keys if k != SEED]
    cols = ["group", "n", *settings, "method", "task", "trainable_params", "steps", f"{LOSS} before", after, "delta"]
    cols += [c for c in metric_cols if c not in (f"{LOSS} before", after)]
    cols += ["s_per_step", "peak_memory_bytes", "wall_time_s"]
    ref_word = "baseline" if table.baseline else "best"
    rows = []
    for g in table.groups:
        r = g.row
        cells = []
        for c in cols:
            if c == "n":
                n = r.get(f"{after} n") or 0
                cells.append(str(n) if n == len(g.jobs) else f"{n} of {len(g.jobs)}")
            elif c in settings:
                cells.append(_setting_md(representative(g, table), c, table))
            elif c == after:
                cells.append(_loss_cell(r.get(f"{c} mean"), r.get(f"{c} sd"), g.label == table.best_group))
            elif c == "delta":
                cells.append(_delta_cell(r, ref_word))
            elif c in metric_cols:
                mean, sd = r.get(f"{c} mean"), r.get(f"{c} sd")
                cells.append("" if mean is None else _fmt_metric(mean) + (f" ± {_fmt_metric(sd)}" if sd else ""))
            else:
                cells.append(_cell(c, r.get(c), r))
        rows.append(cells)
    headers = [_header(c, table) for c in cols]
    headers[cols.index(after)] = f"{after} (mean ± sd)"
    headers[cols.index("n")] = "n (seeds)"
    return _md_table(headers, rows, [_right(c) for c in cols])


def _right(col: str) -> bool:
    return col not in TEXT_COLUMNS and not col.startswith("eval error")


def _header(col: str, table: Table) -> str:
    if col in MD_FORMATS:
        return MD_FORMATS[col][0]
    if col in table.short:
        return table.short[col]
    if col == "delta":
        return f"Δ {LOSS} vs {table.baseline}" if table.baseline else f"Δ {LOSS} vs best"
    if col.startswith("eval/"):
        return col[len("eval/") :]
    return col


def _notes(jobs: Sequence[Job], table: Table) -> list[str]:
    out = [
        "Read from each job's metrics.json, tensorboard events and `.hydra/config.yaml` (nothing recomputed but the "
        "standard errors): parameters, steps, tokens, wall time and peak memory from metrics.json (parameters, steps "
        "and peak memory from the events for jobs that have none); s/step and tokens/s are medians of the logged "
        "train/step_time_s and train/tokens_per_sec. Setting columns: the keys of the jobs' resolved configs whose "
        "values differ between jobs ('—': that job's config has no such key). 'before' is the validation before the "
        "first step, 'after' the last one after at least one step (for running, killed or failed jobs: the latest "
        "logged); 'Steps' are the optimizer steps done. Peak memory says what it measured: CUDA (max allocated), "
        "RSS, process (peak resident memory of the process), RSS, job (of the job alone), logged (the largest "
        "train/peak_memory_bytes). 'last' is the last logged training value. Empty cells: not logged.",
        "",
    ]
    sources = {j.row.get(f"{LOSS} after se from") for j in jobs}
    said = {
        "metrics.json": "val/loss_se of metrics.json, as the run computed it",
        "events": "val/loss_se logged with that validation",
        HELDOUT_FILE: f"from the per-example losses of {HELDOUT_FILE}: the SE of their weighted mean (delta method)",
    }
    if sources - {None}:
        where = "; ".join(v for k, v in said.items() if k in sources)
        out += [f"{LOSS} after ± its standard error over the held-out examples ({where}).", ""]
    if any(j.row.get("delta") is not None for j in jobs):
        ref = f"the baseline {table.baseline}" if table.baseline else "the best finished row (★, lowest held-out loss)"
        kinds = {j.row.get("delta se kind") for j in jobs} | {g.row.get("delta se kind") for g in table.groups}
        explained = {
            "paired": f"paired: the SE of the mean per-example difference, same held-out examples ({HELDOUT_FILE})",
            "independent": "independent: sqrt(se_a² + se_b²) of the two held-out SEs",
            "Welch": "Welch: sqrt(sd_a²/n_a + sd_b²/n_b) over the groups' seeds",
            "held-out SE": "held-out SE: a group of one finished job counts its held-out SE",
        }
        used = [v for k, v in explained.items() if any(k in str(kind) for kind in kinds)]
        how = "; ".join(used) if used else "none could be computed (no held-out SE)"
        out += [
            f"Δ: the held-out loss after training minus {ref}'s, ± the standard error of the difference: {how}.",
            "",
        ]
    if table.seeded:
        ref_group = f"the baseline {table.baseline}" if table.baseline else "the best group (★)"
        to_job = f", the job table's to job {table.ref_job}" if table.ref_job else ""
        out += [
            f"Groups: jobs whose resolved settings are the same but for `seed`; {LOSS} after is the mean ± sd over "
            f"their finished (ok) jobs, n of them; the group table's Δ is to {ref_group}{to_job}.",
            "",
        ]
    if any(job.evals for job in jobs):
        out += [
            "",
            "Evaluations: lm-eval's value ± its stderr over n items (eval/run.py); where lm-eval reported no standard "
            "error, the binomial one, sqrt(p(1-p)/(n-1)), marked *.",
        ]
    if any(job.eval_error for job in jobs):
        out.append("")
        out += [f"- evaluation of {job.name} failed: {_md_escape(job.eval_error)}" for job in jobs if job.eval_error]
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------------------------------------- optuna


def optuna_lines(folders: Sequence[Path], jobs: Sequence[Job]) -> list[str]:
    """The best Optuna trial of each sweep folder that has one (hydra-optuna-sweeper's optimization_results.yaml)."""
    import yaml

    out = []
    for folder in folders:
        path = Path(folder) / OPTUNA_FILE
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            out += [f"Optuna: {path} is unreadable ({type(e).__name__}).", ""]
            continue
        direction = _sweeper_direction(Path(folder))
        trials = [{"params": data.get("best_params"), "values": [data.get("best_value")]}]
        if "best_params" not in data:
            trials = [t for t in data.get("solutions") or [] if isinstance(t, dict)]
        for trial in trials:
            params = trial.get("params") if isinstance(trial.get("params"), dict) else {}
            values = ", ".join(fmt_setting(v) if not _number(v) else _fmt_metric(float(v)) for v in trial["values"])
            settings = ", ".join(f"{k}={fmt_setting(v)}" for k, v in params.items())
            match = [j.name for j in jobs if _matches(j, params)]
            where = f" (job {', '.join(match)})" if match else ""
            out.append(
                f"**Optuna best trial** ({Path(folder).name}{', ' + direction if direction else ''}): "
                f"objective {values} with {settings or 'no parameters'}{where}."
            )
        out.append("")
    return out


def _sweeper_direction(folder: Path) -> str:
    import yaml

    try:
        cfg = yaml.safe_load((folder / "multirun.yaml").read_text()) or {}
        direction = cfg["hydra"]["sweeper"]["direction"]
    except Exception:
        return ""
    return direction if isinstance(direction, str) else "/".join(map(str, direction))


def _matches(job: Job, params: dict[str, Any]) -> bool:
    given = {k: same(parse_value(v)) for k, v in job.override_map.items()}
    return bool(params) and all(given.get(k) == same(v) for k, v in params.items())


# ------------------------------------------------------------------------------------------------------------ csv


def csv_text(jobs: Sequence[Job]) -> str:
    """report.csv: one row per job, raw values (full setting keys; the group each job belongs to)."""
    return _csv(columns(jobs), [job.row for job in jobs])


def groups_csv_text(table: Table) -> str:
    """report_groups.csv: one row per group of seeds, means, sds and counts of its finished jobs."""
    cols: dict[str, None] = {}
    for g in table.groups:
        cols.update(dict.fromkeys(g.row))
    return _csv(list(cols), [g.row for g in table.groups])


def _csv(cols: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else _csv_value(row.get(c)) for c in cols])
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    return repr(v) if isinstance(v, float) else v
