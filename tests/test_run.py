"""The real entry point, `finetune/run.py`, on the tiny model: saved files, resume, sweeps and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN as BASE_RUN
from conftest import run_cli, scalars
from litgpt import GPT, Config
from safetensors.torch import load_file

from lit_peft.models.load import load_adapter_into, load_base

TINY_RUN = [*BASE_RUN, "data.val_size=8"]


def finetune(tiny_checkpoint: Path, out_dir: Path, *overrides: str):
    if not any(o.startswith("data=") for o in overrides):
        overrides = ("data.synthetic.num_examples=48", *overrides)
    return run_cli(
        "finetune/run.py", *TINY_RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out_dir}", *overrides
    )


def event_files(out_dir: Path) -> list[Path]:
    return list((out_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_lora_run_writes_adapter_logs_and_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "lora"
    res = finetune(tiny_checkpoint, out, "method=lora", "method.targets=[query,key,value,mlp]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out loss:" in res.stdout
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "run.log").is_file()  # Hydra follows out_dir

    weights = load_file(str(out / "adapter" / "adapter.safetensors"))
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["settings"]["targets"] == ["query", "key", "value", "mlp"]
    assert meta["step"] == 4 and meta["config"]["trainer"]["max_steps"] == 4
    assert weights and all(".lora_" in k for k in weights)
    assert any(k.endswith("attn.qkv.lora_A") for k in weights) and any("mlp.fc_1" in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # B moved away from zero

    # The saved adapter rebuilds the trained model from the base checkpoint alone, without Hydra.
    model = load_base(tiny_checkpoint)
    loaded = load_adapter_into(model, out / "adapter")
    assert loaded["method"] == "lora"
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)

    logged = scalars(out)
    for tag in (
        "train/loss",
        "val/loss",
        "train/lr",
        "train/tokens_per_sec",
        "train/grad_norm",
        "train/step_time_s",
        "train/peak_memory_bytes",
        "params/trainable",
        "params/total",
    ):
        assert tag in logged, tag
    trainable = logged["params/trainable"][0][1]
    assert trainable == sum(w.numel() for w in weights.values())
    # metrics.json: what the run measured, read by scripts/report.py
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["steps"] == 4 and metrics["trainable_params"] == trainable
    assert metrics["final"]["val/loss"] == pytest.approx(logged["val/loss"][-1][1], rel=1e-6)
    assert metrics["tokens"] > 0 and metrics["peak_memory_bytes"] > 0 and metrics["held_out_examples"] > 0
    assert "held-out loss:" in (out / "run.log").read_text()
    hparams = (out / "tensorboard" / "hparams.yaml").read_text()
    assert "method.r: 8" in hparams and "optim.lr:" in hparams  # the HParams tab has the settings
    assert logged["params/total"][0][1] > trainable
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in weights}  # no frozen base weights in resume files


def test_full_run_saves_a_loadable_litgpt_model(tiny_checkpoint, tmp_path):
    out = tmp_path / "full"
    res = finetune(tiny_checkpoint, out, "method=full", "optim.lr=1e-2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert event_files(out)
    saved = out / "model"
    assert json.loads((saved / "lit_peft.json").read_text())["method"] == "full"
    model = GPT(Config.from_file(saved / "model_config.yaml"))
    model.load_state_dict(torch.load(saved / "lit_model.pth", weights_only=True))
    base = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    assert "transformer.wte.weight" in changed and len(changed) == len(base)  # every weight trained
    assert (saved / "tokenizer.json").is_file()


def test_resume_continues_from_the_last_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "resume"
    assert finetune(tiny_checkpoint, out).returncode == 0
    first = load_file(str(out / "adapter" / "adapter.safetensors"))
    first_wall = json.loads((out / "metrics.json").read_text())["wall_time_s"]
    # What a resume carries over is the time up to the checkpoint it starts from (the first segment's final
    # evaluation and export come after that checkpoint, so they are not part of the resumed run).
    carried = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["wall_time_s"]
    assert 0 < carried <= first_wall
    res = finetune(tiny_checkpoint, out, "trainer.max_steps=6", "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Restored all states" in res.stdout + res.stderr
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["step"] == 6
    second = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # The held-out loss before training is the first segment's, not measured again at the resumed weights: one
    # step-0 point in the events, the same value in metrics.json; the wall time covers both segments.
    val = scalars(out)["val/loss"]
    assert [s for s, _ in val].count(0) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["initial"]["val/loss"] == pytest.approx(val[0][1], rel=1e-6)
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["initial_held_out"] == metrics["initial"]
    assert metrics["wall_time_s"] >= saved["wall_time_s"] > carried


def test_two_point_sweep_runs_each_job(tiny_checkpoint, tmp_path):
    res = run_cli(
        "finetune/run.py",
        "-m",
        *TINY_RUN,
        "data.synthetic.num_examples=48",
        f"model.checkpoint_dir={tiny_checkpoint}",
        "method=lora",
        "method.r=2,4",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=r${method.r}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for r in (2, 4):
        weights = load_file(str(tmp_path / f"r{r}" / "adapter" / "adapter.safetensors"))
        a = next(v for k, v in weights.items() if k.endswith("qkv.lora_A"))
        assert a.shape[0] == 2 * r  # query and value, r rows each
        assert event_files(tmp_path / f"r{r}")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "method=vera",
            "error: unknown method 'vera'; valid choices: dora, ether, etherplus, etherplusHH, full, hra, lora, oft",
        ),
        (
            "model=gpt5",
            "error: unknown model 'gpt5'; valid choices: gemma-2-2b-it, gemma-2b, llama2-7b, llama3.1-8b-instruct,",
        ),
        (
            "data=imagenet",
            "error: unknown data 'imagenet'; valid choices: alpaca, dolly, guanaco, hh_rlhf, lima, messages, pairs, "
            "sharegpt, sharegpt_pairs, synthetic, text",
        ),
        ("method.targets=[query,kv]", "error: unknown target 'kv'; valid targets: query, key, value"),
        ("trainer.global_batch_size=5", "error: trainer.global_batch_size=5 is not a multiple of"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tiny_checkpoint, tmp_path, override, message):
    out = tmp_path / "bad"
    res = finetune(tiny_checkpoint, out, override)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), res.stderr[-2000:]
    assert not out.exists()  # nothing half-written: not even Hydra's bookkeeping


def test_missing_checkpoint_says_how_to_get_it(tmp_path):
    res = run_cli(
        "finetune/run.py",
        "model=tinyllama-1.1b",
        f"model.checkpoint_dir={tmp_path / 'none'}",
        f"out_dir={tmp_path / 'out'}",
    )
    assert res.returncode == 2
    assert "python scripts/download.py model=tinyllama-1.1b" in res.stderr.strip().splitlines()[-1]


def test_malformed_record_names_file_and_record(tiny_checkpoint, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "i", "output": "o"}] * 20 + [{"instruction": "i", "reply": "o"}]))
    res = finetune(tiny_checkpoint, tmp_path / "out", "data=alpaca", f"data.path={data}", "data.val_size=4")
    assert res.returncode == 2
    assert f"error: {data}: record" in res.stderr and "has no field 'output'" in res.stderr
    assert not (tmp_path / "out").exists()
