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
    from lit_peft.checkpoints.hub import create_tiny_checkpoint

    return create_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-random", TINY, seed=0)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The real embedded model, converted once per machine under checkpoints/ (as the README's main job does)."""
    from lit_peft.checkpoints.hub import prepare_checkpoint

    return prepare_checkpoint(
        {"checkpoint_dir": str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), "source": "smollm2-gguf"}
    )


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs the shared data set {relative} (../shared/data is absent on this machine)")
    return path


# Entry points that run in the test process: argparse scripts whose work is a `main()` call (their imports, seconds
# each in a fresh process, are paid once). finetune/run.py (Hydra, launchers, signals) and scripts/download.py (the
# hub reads its endpoint from the environment at import) always get a fresh process, as does any call with `env`.
IN_PROCESS = {
    "chat/base.py",
    "eval/run.py",
    "scripts/convert_hf_checkpoint.py",
    "scripts/convert_lit_checkpoint.py",
    "scripts/convert_lrc.py",
    "scripts/merge.py",
    "scripts/report.py",
}


def assert_compiled_equals_eager(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """torch.compile of `layer` (dynamo + AOTAutograd with eager kernels, fullgraph: a graph break is an error) gives
    the eager output and the same gradients of the input and of every trainable parameter."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for net in (layer, compiled):
        layer.zero_grad()
        x_ = x.clone().requires_grad_()
        y = net(x_)
        y.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
        results.append((y.detach(), x_.grad, grads))
    torch._dynamo.reset()
    (y, gx, grads), (c_y, c_gx, c_grads) = results
    torch.testing.assert_close(c_y, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_gx, gx, rtol=1e-6, atol=1e-6)
    assert c_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def autocast_gradients(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Under bf16 autocast the adapted `layer` returns what autocast makes of its base Linear (bfloat16), close to
    its float32 output; returns the trainable parameters' gradients of a loss on that output (checked float32 and
    finite)."""
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == layer.base(x).dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=5e-2, atol=5e-2)
    y.float().pow(2).sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    return grads


def scalars(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged to `<out_dir>/tensorboard`: tag -> [(step, value), ...] in the order written.

    TensorBoard reads a folder's event files in name order, whose last part is a counter that is not zero-padded (files
    of one second can be read out of order), and by default drops points at a step it saw before: read them all and
    sort by wall time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {
        t: [(e.step, e.value) for e in sorted(acc.Scalars(t), key=lambda e: e.wall_time)] for t in acc.Tags()["scalars"]
    }


def run_cli(
    script: str, *args: str, env: dict | None = None, timeout: int = 600, stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run one of the project's entry points as a user would: its argv, stdin, stdout, stderr and exit status."""
    if script in IN_PROCESS and not env:
        return _run_in_process(script, list(args), stdin)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        input=stdin,
    )


def _run_in_process(script: str, args: list[str], stdin: str | None) -> subprocess.CompletedProcess:
    """`python <script> <args>` in this process: `__main__` run, SystemExit turned into the status, an uncaught
    exception into status 1 with its traceback on stderr (what the interpreter does)."""
    import contextlib
    import io
    import logging
    import runpy
    import signal
    import traceback
    import warnings

    path = str(ROOT / script)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdin, os.getcwd(), list(logging.getLogger().handlers)
    stop_signals = [getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGHUP", "SIGINT")]
    handlers = {s: signal.getsignal(s) for s in stop_signals}  # the entry point installs its own for its life
    sys.argv = [path, *args]
    sys.stdin = io.StringIO(stdin or "")
    os.chdir(ROOT)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - the interpreter's behaviour: traceback, status 1
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
    finally:
        sys.argv, sys.stdin = saved[0], saved[1]
        os.chdir(saved[2])
        for s, handler in handlers.items():
            signal.signal(s, handler)
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if handler not in saved[3]:
                root.removeHandler(handler)
    return subprocess.CompletedProcess([sys.executable, path, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
