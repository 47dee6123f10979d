"""The sweep's job list: Hydra's basic sweeper, where a setting swept beside a group applies where it exists.

`python finetune/run.py -m method=lora,ether,etherplus method.nb=1,32` runs lora once and ether and etherplus at each
nb: `method.nb` belongs to the ETHER family, not to LoRA. Hydra's own product would give lora `method.nb` (an unknown
key: the sweep is refused) and, if it were ignored, two identical LoRA jobs. The rule, for any group (method, data,
task, model, strategy): a job's `<group>.<key>=<value>` is left out when the job's choice for that group has no such
key while another choice in the same sweep has it; jobs that become identical run once, in Hydra's order. A key that
no choice has is kept, so a misspelt setting is still refused in one line.

conf/config.yaml makes this the default sweeper (`hydra/sweeper: lit_peft`, the class in
hydra_plugins/lit_peft_sweeper/: Hydra loads sweepers from that package only); the preflight check of every job
(lit_peft.cli.preflight) and the report's list of planned jobs use the same rule.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from lit_peft.paths import CONF_DIR


@cache
def _group_keys(conf_dir: Path, group: str, choice: str) -> frozenset[str] | None:
    """The top-level keys of conf/<group>/<choice>.yaml, following its defaults list; None when unknown."""
    path = conf_dir / group / f"{choice}.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return None
    if not isinstance(node, dict):
        return None
    if "@package _global_" in path.read_text().split("\n", 1)[0]:  # e.g. qlora sets method: {...} and quantize
        node = {**(node.get(group) or {}), "defaults": node.get("defaults")}
    keys = set(node) - {"defaults"}
    for entry in node.get("defaults") or []:  # e.g. qlora: defaults: [lora]
        name = entry if isinstance(entry, str) else None
        if name and name != "_self_":
            inherited = _group_keys(conf_dir, group, name)
            keys |= inherited or set()
    return frozenset(keys)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def applicable(jobs: list[list[str]], conf_dir: Path = CONF_DIR, default_choices: dict[str, str] | None = None):
    """Each job's overrides without the group settings its group choice does not have (see the module doc), and
    without jobs that became duplicates. `default_choices`: a group's choice when a job does not name one."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"}

    def chosen_by(job: list[str]) -> dict[str, str]:
        chosen = {k: v for k, v in (default_choices or {}).items() if k in groups}
        chosen.update({k: v for k, v in map(_split, job) if k in groups})
        return chosen

    choices_in_sweep: dict[str, set[str]] = {}
    for job in jobs:
        for group, choice in chosen_by(job).items():
            choices_in_sweep.setdefault(group, set()).add(choice)
    out: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for job in jobs:
        chosen = chosen_by(job)
        kept = []
        for o in job:
            key, _ = _split(o)
            group, dot, leaf = key.partition(".")
            if dot and group in choices_in_sweep and group in chosen and "." not in leaf:
                mine = _group_keys(conf_dir, group, chosen[group])
                others = [_group_keys(conf_dir, group, c) for c in choices_in_sweep[group]]
                if mine is not None and leaf not in mine and any(k is not None and leaf in k for k in others):
                    continue  # this choice has no such setting; another choice in the sweep has it
            kept.append(o)
        if tuple(kept) not in seen:
            seen.add(tuple(kept))
            out.append(kept)
    return out
