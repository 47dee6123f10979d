"""scripts/merge.py for every registered method: merged checkpoint = adapter model; plain LitGPT; no double merge."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from litgpt import GPT, Config

from lit_peft.io import save_adapter
from lit_peft.methods import METHODS
from lit_peft.model import install_method, load_adapter_into, load_base, trainable_state_dict

ADAPTER_METHODS = sorted(set(METHODS) - {"full"})


def trained_adapter(tiny_checkpoint, tmp_path, method: str):
    """An adapter whose every parameter is away from its initial value, saved as finetune/run.py saves it."""
    model = load_base(tiny_checkpoint)
    values = {
        "targets": ["query", "key", "value", "projection", "mlp", "head"],
        **({} if method == "lora" else {"nb": 4}),
    }
    _, settings = install_method(model, method, values)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # trained-adapter scale (fp32 merge bound below is 1e-5)
    meta = {"method": method, "settings": settings.to_dict(), "base_checkpoint": str(tiny_checkpoint)}
    return save_adapter(tmp_path / "adapter", trainable_state_dict(model), meta), model


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_merge_script_gives_a_plain_checkpoint_with_the_adapter_logits(tiny_checkpoint, tmp_path, method):
    adapter, model = trained_adapter(tiny_checkpoint, tmp_path, method)
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]

    plain = GPT(Config.from_file(out / "model_config.yaml"))  # litgpt alone, no lit_peft code
    plain.load_state_dict(torch.load(out / "lit_model.pth", weights_only=True), strict=True)
    idx = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        base = GPT(Config.from_file(out / "model_config.yaml"))
        base.load_state_dict(torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True))
        assert (base(idx) - model(idx)).abs().max() > 1e-2  # the adapter matters
        assert (plain(idx) - model(idx)).abs().max() <= 1e-5
        reloaded = load_base(tiny_checkpoint)
        load_adapter_into(reloaded, adapter)
        assert torch.equal(reloaded(idx), model(idx))
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "lit_peft_merge.json").read_text())["adapters"][0]["method"] == method

    again = run_cli("scripts/merge.py", "--adapter", str(adapter), "--base", str(out), "--out", str(tmp_path / "m2"))
    assert again.returncode == 2 and "already merged into" in again.stderr and not (tmp_path / "m2").exists()


def test_merge_never_writes_into_the_base_or_an_existing_folder(tiny_checkpoint, tmp_path):
    adapter, _ = trained_adapter(tiny_checkpoint, tmp_path, "lora")
    before = (tiny_checkpoint / "lit_model.pth").read_bytes()
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(tiny_checkpoint))
    assert res.returncode == 2 and "is the base checkpoint" in res.stderr
    assert (tiny_checkpoint / "lit_model.pth").read_bytes() == before
    (tmp_path / "taken").mkdir()
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(tmp_path / "taken"))
    assert res.returncode == 2 and "already exists" in res.stderr


def test_missing_adapter_is_a_one_line_error(tmp_path):
    res = run_cli("scripts/merge.py", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.strip().startswith("error: no adapter at")
