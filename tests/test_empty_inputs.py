"""Every adapted Linear takes inputs with no tokens: the chunked head's probe (`final_hidden` hands `lm_head` zero
positions) and eval's batched prefill call the head that way. An empty output of the right shape, and zero (not
NaN, not missing) gradients for the adapter's parameters, on every method, both routes of the ETHER family's input
side, both sides, the fused qkv and the output head, and over a 4-bit base."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY_RUN, tiny_config
from litgpt import GPT
from safetensors.torch import load_file

from lit_peft.methods import adapters, build_settings

BLOCK_METHODS = ("ether", "etherplus", "etherplusHH", "oft")
# (method, extra settings, the input side's route or None): every method, both routes of a Householder-type input
# side, and the output side alone (flip_side) of the one-sided transforms.
CASES = [
    ("lora", {}, None),
    ("lora", {"init": "pissa"}, None),
    ("dora", {}, None),
    ("hra", {}, None),
    *((m, {}, c) for m in ("ether", "etherplus", "etherplusHH") for c in ("direct", "low_rank")),
    ("oft", {}, "direct"),
    *((m, {"flip_side": True}, "direct") for m in ("ether", "etherplus", "oft")),
]
CASE_IDS = [
    f"{m}{'-' + '-'.join(f'{k}={v}' for k, v in s.items()) if s else ''}{'-' + c if c else ''}" for m, s, c in CASES
]
SHAPES = [(2, 0), (0,), (0, 0)]  # the leading dimensions of x (..., D): no tokens at all
TARGETS = {"head": ["head"], "qkv": ["query", "value"]}  # query and value: the key rows pass through (a rest group)


def adapted_layer(method: str, extra: dict, compute: str | None, targets: list[str], quantize: bool = False):
    """The one adapted Linear of a tiny model (the head, or the fused qkv of the first block), on `compute`."""
    torch.manual_seed(0)
    # bitsandbytes quantizes in blocks of 64: widths that are multiples of it
    model = GPT(tiny_config(n_embd=64, intermediate_size=128) if quantize else tiny_config())
    model.apply(model._init_weights)
    if quantize:
        from lit_peft.methods.quantize import quantize_base

        quantize_base(model, "nf4")
    values = {"targets": targets, **extra, **({"nb": 2} if method in BLOCK_METHODS else {})}
    m, settings = build_settings(method, values)
    m.apply(model, settings)
    name, layer = next(iter(adapters(model)))
    assert name == ("lm_head" if targets == ["head"] else "transformer.h.0.attn.qkv")
    if compute is not None:
        layer.compute = compute
    with torch.no_grad():  # off the initial values (ETHER+, OFT and LoRA's B start at the identity / zero)
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return layer


def assert_empty_forward_and_backward(layer, lead: tuple[int, ...]) -> None:
    x = torch.randn(*lead, layer.in_features, requires_grad=True)
    y = layer(x)
    assert y.shape == (*lead, layer.out_features) and y.dtype == x.dtype
    (y * 2).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    assert grads, "the adapter has no trainable parameters"
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient"
        assert g.isfinite().all(), f"{name}: non-finite gradient"
        assert not g.any(), f"{name}: a non-zero gradient from no tokens"
    # The same layer still computes on real tokens afterwards (the empty call left nothing behind).
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x[None])[0], layer(x))


@pytest.mark.parametrize("lead", SHAPES, ids=lambda s: "x".join(map(str, s)) or "none")
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize(("method", "extra", "compute"), CASES, ids=CASE_IDS)
def test_every_adapter_takes_zero_tokens(method, extra, compute, target, lead):
    layer = adapted_layer(method, extra, compute, TARGETS[target])
    assert_empty_forward_and_backward(layer, lead)


@pytest.mark.parametrize("lead", SHAPES, ids=lambda s: "x".join(map(str, s)) or "none")
@pytest.mark.parametrize(
    ("method", "extra", "compute"),
    [c for c in CASES if c[1] != {"init": "pissa"}],
    ids=[i for c, i in zip(CASES, CASE_IDS, strict=True) if c[1] != {"init": "pissa"}],
)
def test_every_adapter_over_a_4bit_base_takes_zero_tokens(method, extra, compute, lead):
    layer = adapted_layer(method, extra, compute, TARGETS["qkv"], quantize=True)
    assert type(layer.base).__name__ == "Linear4bit"
    assert_empty_forward_and_backward(layer, lead)


@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_a_block_transform_on_its_own_takes_zero_tokens(method):
    layer = adapted_layer(method, {}, None, TARGETS["head"])
    t = (layer.t_in or layer.t_out)[0]
    x = torch.randn(2, 0, t.width, requires_grad=True)
    y = t(x)
    assert y.shape == x.shape
    y.sum().backward()
    grads = [p.grad for p in t.parameters()]
    assert grads and all(g is not None and g.isfinite().all() and not g.any() for g in grads)


@pytest.mark.parametrize(("method", "compute"), [("etherplusHH", "direct"), ("ether", "low_rank"), ("oft", "direct")])
def test_the_chunked_head_loss_with_an_adapted_head_equals_the_full_logits_one(method, compute):
    """`cross_entropy_sum_chunked` probes the model with zero head positions, then runs the head on the targets: the
    same loss and gradients as the full logits."""
    from lit_peft.tasks.chunked_head import cross_entropy_sum_chunked

    torch.manual_seed(0)
    model = GPT(tiny_config())
    model.apply(model._init_weights)
    m, settings = build_settings(method, {"targets": ["query", "head"], "nb": 2})
    m.apply(model, settings)
    for _, layer in adapters(model):
        layer.compute = compute
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 259, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt: positions without a target
    results = []
    for chunk in (4, 0):
        model.zero_grad()
        if chunk:
            loss = cross_entropy_sum_chunked(model, ids, labels, chunk)
        else:
            logits = model(ids)[:, :-1].reshape(-1, model.config.padded_vocab_size)
            loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (chunked, chunked_grads), (full, full_grads) = results
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert any(n.startswith("lm_head.") for n in chunked_grads)
    for name, g in full_grads.items():
        assert chunked_grads[name].isfinite().all() and chunked_grads[name].any(), name
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_one_training_step_with_an_adapted_head_exports_the_adapter(tiny_checkpoint, tmp_path, method):
    """The reported failure: method.targets=[query,head] through the real training path (the chunked head)."""
    from hydra import compose, initialize_config_dir

    from lit_peft.training.train import train

    out = tmp_path / method
    overrides = [
        *TINY_RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={out}",
        f"method={method}",
        "method.targets=[query,head]",
        "method.nb=2",  # OFT's default of 32 blocks leaves 1-feature blocks on the tiny model's width 32
        "trainer.max_steps=1",
        "trainer.global_batch_size=2",
        "trainer.validate_first=false",
        "trainer.validate_last=false",
        "trainer.val_check_interval=100",
        "data.val_size=2",
        "data.synthetic.num_examples=8",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "lit_peft" / "conf"), version_base="1.3"):
        result = train(compose("config", overrides=overrides))
    assert result["metrics"]["status"] == "ok" and result["metrics"]["steps"] == 1
    weights = load_file(str(out / "adapter" / "adapter.safetensors"))
    head = {k: w for k, w in weights.items() if k.startswith("lm_head.")}
    assert head and any(k.startswith("transformer.h.0.attn.qkv.") for k in weights)
    assert all(w.isfinite().all() for w in weights.values())
