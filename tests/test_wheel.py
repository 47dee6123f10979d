"""The package as a user installs it: a wheel, installed into a fresh virtual environment outside the checkout, runs
a tiny-model fine-tune and a merge through its `lit-peft` command (configs and task files come from the wheel)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(out)],
        ROOT,
    )
    (built,) = out.glob("lit_peft-*.whl")
    return built


def test_the_wheel_ships_the_configs_the_eval_tasks_and_the_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "lit_peft/conf/config.yaml",
        "lit_peft/conf/method/lora.yaml",
        "lit_peft/conf/model/tiny-random.yaml",
    } <= names
    assert "lit_peft/inference/eval_tasks/local_arc_easy.yaml" in names
    assert "hydra_plugins/lit_peft_sweeper/__init__.py" in names
    assert not any(n.startswith(("tests/", "bench/", "finetune/", "scripts/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lit-peft = lit_peft.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_an_installed_wheel_fine_tunes_and_merges_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    # The dependencies (torch, lightning, ...) come from this environment's site-packages, added as a plain path:
    # its .pth files (this checkout's editable install among them) are not processed there, so lit_peft can only
    # come from the wheel.
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        tmp_path,
    )
    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import lit_peft; print(lit_peft.__file__)"], work).stdout
    assert Path(where.strip()).is_relative_to(purelib)

    lit_peft = str(venv / "bin" / "lit-peft")
    assert "finetune" in _run([lit_peft, "--help"], work).stdout
    run = _run(
        [lit_peft, "finetune", *TINY_RUN, "data.synthetic.num_examples=48", "data.val_size=8", "out_dir=run"], work
    )
    assert "held-out loss:" in run.stdout
    adapter = work / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["method"] == "lora"
    assert (work / "checkpoints" / "tiny-random" / "lit_model.pth").is_file()  # relative paths resolve in the cwd
    _run([lit_peft, "merge", "--adapter", str(adapter), "--out", "merged"], work)
    assert (work / "merged" / "lit_model.pth").is_file() and (work / "merged" / "model_config.yaml").is_file()
