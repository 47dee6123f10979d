from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from litgpt import Config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

# The tiny model every fast test uses: grouped-query attention (4 heads, 2 query groups), LLaMA MLP, RMSNorm.
TINY = dict(
    name="tiny-random",
    block_size=128,
    padded_vocab_size=320,
    n_layer=2,
    n_head=4,
    n_query_groups=2,
    n_embd=32,
    intermediate_size=64,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    rotary_percentage=1.0,
    parallel_residual=False,
)


# Overrides for a few-second run of finetune/run.py on the tiny model (tests add data and task overrides).
TINY_RUN = [
    "model=tiny-random",
    "data.max_seq_length=96",
    "trainer.max_steps=4",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.val_check_interval=4",
    "trainer.save_every_n_steps=2",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def tiny_config(**overrides) -> Config:
    return Config(**{"vocab_size": 259, **TINY, **overrides})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from lit_peft.hub import create_tiny_checkpoint

    return create_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random", TINY, seed=0)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The real embedded model, converted once per machine under checkpoints/ (as the README's main job does)."""
    from lit_peft.hub import prepare_checkpoint

    return prepare_checkpoint(
        {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
    )


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs the shared data set {relative} (../shared/data is absent on this machine)")
    return path


def run_cli(
    script: str, *args: str, env: dict | None = None, timeout: int = 600, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run one of the project's entry points as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        input=stdin,
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
