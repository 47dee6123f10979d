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
        if cells[0].startswith("skipped") and name == "oft b=32":  # until OFT has its block_size setting
            assert "block_size" in cells[0]
            continue
        assert not cells[0].startswith(("skipped", "failed")), f"{name}: {cells[0]}"
        sec, vs_lora, vs_floor = (float(c) for c in cells[:3])
        assert all(math.isfinite(v) and v > 0 for v in (sec, vs_lora, vs_floor)), (name, cells)
    assert rows["lora r=8"][1] == "1.00" and rows["frozen base"][2] == "1.00"
    if not peers:
        pytest.skip("our rows checked; PEFT rows not: peft is not installed (pip install -e '.[bench]')")
    assert rows["peft frozen base"][2] == "1.00"
