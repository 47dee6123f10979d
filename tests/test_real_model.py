"""Checks on the real SmolLM2-135M-Instruct (slow: converted once, then cached under checkpoints/)."""

from __future__ import annotations

import pytest
import torch

from lit_peft.methods import adapters_disabled
from lit_peft.models.load import install_method, load_base

pytestmark = pytest.mark.slow


def test_lora_on_fused_gqa_qkv_starts_at_the_base_and_switches_off(smollm2_checkpoint):
    model = load_base(smollm2_checkpoint, max_seq_length=64).eval()
    idx = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    with torch.no_grad():
        base = model(idx)
        install_method(model, "lora", {"targets": ["query", "key", "value", "projection", "mlp"], "r": 4})
        assert torch.equal(model(idx), base)
        for name, p in model.named_parameters():
            if name.endswith(".lora_B.1"):  # the key part of every qkv adapter
                p.normal_(std=0.05)
        changed = model(idx)
        with adapters_disabled(model):
            assert torch.equal(model(idx), base)
    assert (changed - base).abs().max() > 1e-3
