"""Where the package's own files are, and where relative paths in a config resolve.

The configs (`lit_peft/conf/`, Hydra's config tree) and the local lm-eval tasks (`lit_peft/inference/eval_tasks/`)
ship inside the package, so an installed wheel finds them as a source checkout does. Relative paths in a config
(`checkpoint_dir: checkpoints/...`) resolve against the checkout when running from one (the folder that holds
`pyproject.toml` beside the package), else against the working directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
MODEL_CONF_DIR = CONF_DIR / "model"
EVAL_TASKS_DIR = PACKAGE_DIR / "inference" / "eval_tasks"


def checkout_root() -> Path | None:
    """The source checkout this package runs from, or None for an installed package."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "finetune").is_dir() else None


def project_root() -> Path:
    """What a relative path in a config is relative to: the checkout, or the working directory when installed."""
    return checkout_root() or Path.cwd()
