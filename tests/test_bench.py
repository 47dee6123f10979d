"""bench/methods.py end to end on a tiny random model: one round, one step, every row present with finite ratios."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_methods_bench_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # bench scripts import their neighbours
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench/methods.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_methods", bench)
    spec.loader.exec_module(bench)
    peers = importlib.util.find_spec("peft") is not None
    cmd = [sys.executable, str(ROOT / "bench/methods.py"), "--models", "tiny", "--rounds", "1", "--steps", "1"]
    cmd += ["--batch", "1", "--seq", "16"] + (["--peers"] if peers else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model gains nothing from threads on a shared machine
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    header, rule, *lines = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert header.split("|")[2:5] == [" s/step ", " x LoRA r=8 ", " x floor "]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    expected = bench.VARIANTS + (bench.PEER_VARIANTS if peers else [])
    assert list(rows) == expected
    for name, cells in rows.items():
        assert not cells[0].startswith(("skipped", "failed")), f"{name}: {cells[0]}"
        sec, vs_lora, vs_floor = (float(c) for c in cells[:3])
        assert all(math.isfinite(v) and v > 0 for v in (sec, vs_lora, vs_floor)), (name, cells)
    assert rows["lora r=8"][1] == "1.00" and rows["frozen base"][2] == "1.00"
    if not peers:
        pytest.skip("our rows checked; PEFT rows not: peft is not installed (pip install -e '.[bench]')")
    assert rows["peft frozen base"][2] == "1.00"


def test_mfu_counts_the_step_flops_of_the_math(monkeypatch):
    """bench/mfu.py's model FLOPs of a full fine-tuning step are exactly 3 x the forward's: 2 x tokens x every Linear's
    weights (the head included) and attention's two T x T products per head and layer; MFU is achieved / peak."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_mfu", ROOT / "bench/mfu.py")
    mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfu)
    import torch

    batch, seq = 2, 16
    model, trainable = mfu.build("tiny", "full", torch.float32, "cpu")
    model.max_seq_length = seq
    idx = torch.randint(0, model.config.vocab_size, (batch, seq))
    c = model.config
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    forward = 2 * batch * seq * weights + c.n_layer * 2 * (2 * batch * c.n_head * seq * seq * c.head_size)
    assert mfu.step_flops(model, idx) == 3 * forward
    assert len(trainable) == len(list(model.parameters()))
    assert mfu.device_peak("NVIDIA H100 80GB HBM3") == 989.4 and mfu.device_peak("NVIDIA GeForce GTX 1080") is None

    cmd = [sys.executable, str(ROOT / "bench/mfu.py"), "--model", "tiny", "--batch", "2", "--seq", "16"]
    cmd += ["--precision", "32-true", "--no-compile", "--steps", "1", "--warmup", "0", "--peak-tflops", "0.001"]
    out = subprocess.run([*cmd, "--methods", "full", "lora"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith(("| full", "| lora"))]
    assert [r[0].strip() for r in rows] == ["full", "lora"]
    for r in rows:
        tflops, pct = float(r[5]), float(r[6].strip().rstrip("%"))
        assert tflops > 0 and pct == pytest.approx(100 * tflops / 0.001, rel=0.01)
    bad = subprocess.run([*cmd, "--methods", "lorax"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown method 'lorax'; valid: full," in bad.stderr
