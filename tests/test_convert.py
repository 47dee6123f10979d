"""LitGPT -> HF export loads in transformers with the same logits; HF -> LitGPT gives back the same model."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from lit_peft.models.load import load_base


def test_lit_to_hf_gives_transformers_the_same_logits(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = run_cli(
        "scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(tiny_checkpoint), "--out", str(tmp_path / "hf")
    )
    assert res.returncode == 0, res.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    lit = load_base(tiny_checkpoint).eval()
    idx = torch.randint(0, 259, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, lit(idx), rtol=1e-5, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.eos_token == "<|im_end|>"
    again = run_cli(
        "scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(tiny_checkpoint), "--out", str(tmp_path / "hf")
    )
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.slow
def test_smollm2_round_trip_lit_hf_lit(smollm2_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    res = run_cli(
        "scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(smollm2_checkpoint), "--out", str(tmp_path / "hf")
    )
    assert res.returncode == 0, res.stderr[-2000:]
    back = tmp_path / "lit" / "SmolLM2-135M-Instruct"
    res = run_cli("scripts/convert_hf_checkpoint.py", "--hf-dir", str(tmp_path / "hf"), "--out", str(back))
    assert res.returncode == 0, res.stderr[-2000:]
    idx = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    with torch.no_grad():
        original = load_base(smollm2_checkpoint)(idx)
        torch.testing.assert_close(load_base(back)(idx), original, rtol=0, atol=0)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
        torch.testing.assert_close(hf(idx).logits, original, rtol=1e-4, atol=1e-4)


def test_a_bf16_checkpoint_exports_as_bf16(tiny_checkpoint, tmp_path):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lit_peft.checkpoints.files import save_lit_checkpoint

    state = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    bf16 = save_lit_checkpoint(tmp_path / "bf16", {k: v.bfloat16() for k, v in state.items()}, tiny_checkpoint)
    res = run_cli("scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(bf16), "--out", str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(str(tmp_path / "hf" / "model.safetensors")).values()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto").eval()
    assert hf.dtype == torch.bfloat16
    idx = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            hf(idx).logits.float(), load_base(bf16, dtype="auto")(idx).float(), rtol=0, atol=0.05
        )


class Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


def test_a_crafted_lit_model_pth_is_read_as_tensors_only(tiny_checkpoint, tmp_path):
    """The HF export reads lit_model.pth with weights_only (litgpt's converter would unpickle it with lazy_load)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    state = torch.load(ckpt / "lit_model.pth", weights_only=True)
    torch.save({**state, "extra": Payload(tmp_path / "pwned")}, ckpt / "lit_model.pth")
    res = run_cli("scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "hf"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith(f"error: {ckpt / 'lit_model.pth'} holds more than tensors, refused (weights_only:")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "hf").exists()


def test_the_hf_export_never_lands_inside_its_checkpoint(tiny_checkpoint):
    res = run_cli(
        "scripts/convert_lit_checkpoint.py",
        "--checkpoint-dir",
        str(tiny_checkpoint),
        "--out",
        str(tiny_checkpoint / "hf"),
    )
    assert res.returncode == 2 and f"is inside the checkpoint {tiny_checkpoint}" in res.stderr
    assert not (tiny_checkpoint / "hf").exists()
