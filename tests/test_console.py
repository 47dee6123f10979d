"""What a run prints: one line per event, no third-party noise, the summary block with what the run logged."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, run_cli

# What must never reach the console (it stays in run.log): advertisements, deprecation warnings from dependencies,
# litgpt's converter dict dumps, Lightning's model summary with its empty FLOPs column.
NOISE = ("💡", "litlogger", "deprecated", "{'checkpoint_dir'", "FLOPs", "set_vital", "LeafSpec", "UserWarning")


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[object, Path]:
    """The README's first command's config (sft, LoRA, synthetic data) on the tiny model, progress bar on."""
    out = tmp_path_factory.mktemp("console") / "run"
    overrides = [o for o in TINY_RUN if not o.startswith("trainer.progress_bar")]
    res = run_cli("finetune/run.py", *overrides, "trainer.progress_bar=true", f"out_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    return res, out


def test_the_console_shows_each_line_once_and_none_of_the_noise(readme_run):
    res, out = readme_run
    lines = [ln for ln in _lines(res.stdout) if "━" not in ln and not ln.startswith(" " * 20)]  # bars drawn apart
    repeated = {ln for ln in lines if lines.count(ln) > 1 and not ln.startswith("  ")}
    assert not repeated, repeated
    for noise in NOISE:
        assert noise not in res.stdout + res.stderr, noise
    log = (out / "run.log").read_text()
    assert "litlogger" in log  # nothing is lost: the noise is in run.log, with the lines shown
    assert "held-out set:" in log and "parameters:" in log


def test_the_summary_block_holds_what_the_run_logged(readme_run):
    res, out = readme_run
    metrics = json.loads((out / "metrics.json").read_text())
    block = res.stdout[res.stdout.index("summary\n") :]
    assert "  method: lora (" in block and "r=8" in block
    assert f"  steps: {metrics['steps']} ({metrics['tokens']:,} tokens," in block
    before, after = metrics["initial"], metrics["final"]  # the held-out loss ± its standard error
    held_out = f"{before['val/loss']:.4f} ± {before['val/loss_se']:.4f} -> {after['val/loss']:.4f} ± "
    assert f"  held-out loss: {held_out}{after['val/loss_se']:.4f} (perplexity " in block
    assert "peak resident, this job" in block or "CUDA max allocated, this job" in block
    assert f"; {metrics['held_out_examples']} examples)" in block
    assert f"  trainable: {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters" in block
    assert f"  adapter: {out / 'adapter'}" in block
    assert f"  checkpoint: {out / 'checkpoints' / 'last.ckpt'}" in block
    assert f"  run.log: {out / 'run.log'}" in block
    assert "summary\n" in (out / "run.log").read_text()


def test_the_progress_bar_counts_optimizer_steps_of_max_steps(readme_run):
    res, _ = readme_run
    # 4 optimizer steps of 2 micro-batches each (global 4, micro 2): micro-batches were counted before (8/4)
    bars = [ln for ln in res.stdout.splitlines() if ln.startswith("steps") and "━" in ln]
    assert bars and re.search(r" 4/4 ", bars[-1]), bars[-1:]
    assert "Epoch" not in res.stdout and "/-" not in res.stdout


def test_the_parameter_table_counts_each_kind(tiny_checkpoint):
    from lit_peft.models.load import install_method, load_base
    from lit_peft.training.summary import parameter_kinds, parameter_table

    model = load_base(tiny_checkpoint)
    install_method(model, "lora", {"r": 2, "alpha": 4.0, "targets": ["query", "value"]})
    kinds = parameter_kinds(model)
    cfg = model.config
    q = cfg.n_head * cfg.head_size
    kv = cfg.n_query_groups * cfg.head_size
    lora = cfg.n_layer * (2 * 2 * cfg.n_embd + 2 * (q + kv))  # A: (2 parts x r, in); B: (q rows, r) + (v rows, r)
    assert kinds["adapter"] == (lora, lora)
    assert kinds["norms"] == (0, (2 * cfg.n_layer + 1) * cfg.n_embd)
    assert kinds["embeddings"] == (0, cfg.padded_vocab_size * cfg.n_embd)
    assert sum(t for t, _ in kinds.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(n for _, n in kinds.values()) == sum(p.numel() for p in model.parameters())
    assert "FLOPs" not in parameter_table(model)


def test_logging_is_put_back_after_a_run_and_a_user_error_lands_in_run_log(tmp_path):
    from lit_peft.console import run_logging

    root = logging.getLogger()
    before = root.handlers[:]
    with pytest.raises(FileNotFoundError), run_logging(tmp_path):
        logging.getLogger("lit_peft.test").info("inside")
        raise FileNotFoundError(str(tmp_path / "missing.json"))
    assert root.handlers == before
    log = (tmp_path / "run.log").read_text()
    assert "inside" in log and "error: " in log

    from lit_peft.sweeps.jobs import _error_in_log

    assert _error_in_log(tmp_path)


def test_train_has_no_per_task_branches():
    words = set(re.findall(r"\w+", (ROOT / "lit_peft" / "training" / "train.py").read_text()))
    assert not words & {"lrc", "LowRankClone", "clone_settings", "cqil"}  # the task's build_model hook builds them
