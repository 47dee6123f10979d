"""ETHER, ETHER+, ETHER+HH and OFT against dense matrices built from their definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from litgpt import GPT
from test_methods import dense_qkv_rows
from torch import nn

from lit_peft.methods import adapters, adapters_disabled, build_settings, merge_adapters
from lit_peft.methods.base import Part
from lit_peft.model import trainable_state_dict
from lit_peft.qkv import qkv_rows

FAMILY = ["ether", "etherplus", "etherplusHH", "oft"]
LAYOUTS = ["concatenated", "interleaved"]


# ---- the definitions, written out densely -------------------------------------------------------------------------
def householder(u: torch.Tensor) -> torch.Tensor:
    u = u.double()
    return torch.eye(len(u), dtype=torch.double) - 2 * torch.outer(u, u) / (u @ u)


def householder_plus(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u, v = u.double(), v.double()
    return torch.eye(len(u), dtype=torch.double) - torch.outer(u, u) / (u @ u) + torch.outer(v, v) / (v @ v)


def cayley(upper: torch.Tensor, b: int) -> torch.Tensor:
    s = torch.zeros(b, b, dtype=torch.double)
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            s[i, j], s[j, i] = upper[k], -upper[k]
            k += 1
    eye = torch.eye(b, dtype=torch.double)
    return (eye + s) @ torch.inverse(eye - s)


def dense_transform(t) -> torch.Tensor:
    """The block-diagonal matrix of a transform module, from its raw parameters and the method's definition."""
    if hasattr(t, "s"):
        return torch.block_diag(*[cayley(t.s[n].detach(), t.block) for n in range(t.nb)])
    if hasattr(t, "v"):
        return torch.block_diag(*[householder_plus(t.u[n].detach(), t.v[n].detach()) for n in range(t.nb)])
    return torch.block_diag(*[householder(t.u[n].detach()) for n in range(t.nb)])


def perturb(module: nn.Module) -> None:
    """Move every adapter parameter off its initial value (ETHER+ and OFT start at the identity)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "t_in" in name or "t_out" in name:
                p.add_(torch.randn_like(p) * 0.3)


def make_qkv(method: str, parts, layout: str, nb: int = 2, flip_side: bool = False, bias: bool = True):
    config = tiny_config()
    base = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=bias)
    m, settings = build_settings(
        method, {"targets": list(parts), "qkv_layout": layout, "nb": nb, "flip_side": flip_side}
    )
    rows = qkv_rows(config, layout)
    layer = m.make_adapter(base, [Part(p, rows[p]) for p in parts], settings)
    return config, layer


PART_SETS = [("query",), ("key", "value"), ("query", "key", "value")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize("parts", PART_SETS, ids="-".join)
@pytest.mark.parametrize("method", FAMILY)
def test_output_equals_dense_definition_on_fused_qkv(method, parts, flip_side, layout):
    config, layer = make_qkv(method, parts, layout, nb=2, flip_side=flip_side)
    perturb(layer)
    x = torch.randn(2, 3, config.n_embd, dtype=torch.float32)
    y = layer(x).double()
    rows = dense_qkv_rows(config, layout)
    w, b = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    both = method == "etherplusHH"
    for name in ("query", "key", "value"):
        idx = torch.tensor(rows[name])
        w_p, b_p = w[idx], b[idx]
        if name in parts:
            i = parts.index(name)
            if both or not flip_side:
                w_p = w_p @ dense_transform(layer.t_in[i])  # W H_in
            if both or flip_side:
                h_out = dense_transform(layer.t_out[i])
                w_p, b_p = h_out @ w_p, h_out @ b_p  # H_out (W x + b)
        torch.testing.assert_close(y[..., idx], x.double() @ w_p.T + b_p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", FAMILY)
def test_fused_qkv_equals_three_separate_linears(method, layout):
    """q, k and v of the fused Linear behave exactly as three Linears, each with its own adapter."""
    parts = ("query", "key", "value")
    config, fused = make_qkv(method, parts, layout, nb=4)
    perturb(fused)
    x = torch.randn(2, 5, config.n_embd)
    y = fused(x)
    rows = dense_qkv_rows(config, layout)
    m, settings = build_settings(method, {"targets": ["projection"], "nb": 4})
    for i, name in enumerate(parts):
        idx = torch.tensor(rows[name])
        single = nn.Linear(config.n_embd, len(idx))
        with torch.no_grad():
            single.weight.copy_(fused.base.weight[idx])
            single.bias.copy_(fused.base.bias[idx])
        alone = m.make_adapter(single, [Part("all", torch.arange(len(idx)))], settings)
        for side in ("t_in", "t_out"):
            if getattr(fused, side) is not None:
                getattr(alone, side)[0].load_state_dict(getattr(fused, side)[i].state_dict())
        torch.testing.assert_close(y[..., idx], alone(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ether", "oft"])
@pytest.mark.parametrize("nb", [1, 4])
def test_transforms_are_orthogonal(method, nb):
    config, layer = make_qkv(method, ("query", "value"), "concatenated", nb=nb)
    perturb(layer)
    for t in layer.t_in:
        h = dense_transform(t)
        torch.testing.assert_close(h.T @ h, torch.eye(len(h), dtype=torch.double), rtol=0, atol=1e-10)
        torch.testing.assert_close(t.dense().double(), h, rtol=1e-5, atol=1e-5)  # the module's own dense form
        x = torch.randn(7, t.width)
        torch.testing.assert_close(t(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_ether_at_init_is_a_reflection_not_the_identity():
    config, layer = make_qkv("ether", ("query",), "concatenated", nb=4)
    t = layer.t_in[0]
    h = dense_transform(t)
    assert (h - torch.eye(len(h), dtype=torch.double)).abs().max() > 0.5
    torch.testing.assert_close(h @ h, torch.eye(len(h), dtype=torch.double), rtol=0, atol=1e-10)  # an involution
    for n in range(t.nb):  # each block reflects its own u: H u = -u, determinant -1
        block = h[n * t.block : (n + 1) * t.block, n * t.block : (n + 1) * t.block]
        u = t.u[n].detach().double()
        torch.testing.assert_close(block @ u, -u)
        assert torch.linalg.det(block).item() == pytest.approx(-1.0)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config())
    model.apply(model._init_weights)
    return model


@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize("method", ["etherplus", "etherplusHH", "oft"])
def test_identity_at_init_gives_the_base_logits(method, flip_side):
    model = tiny_model()
    idx = torch.randint(0, 259, (2, 12))
    base = model(idx)
    m, settings = build_settings(
        method, {"targets": ["query", "key", "value", "projection", "mlp", "head"], "nb": 4, "flip_side": flip_side}
    )
    m.apply(model, settings)
    torch.testing.assert_close(model(idx), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize("method", FAMILY)
def test_merge_equals_the_adapter_model_and_is_refused_twice(method, flip_side):
    model = tiny_model()
    m, settings = build_settings(
        method, {"targets": ["query", "key", "value", "projection", "mlp", "head"], "nb": 4, "flip_side": flip_side}
    )
    m.apply(model, settings)
    perturb(model)
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        adapted = model(idx)
        with adapters_disabled(model):
            base = model(idx)
        assert (adapted - base).abs().max() > 1e-3  # the adapter does something
        merge_adapters(model)
        plain = GPT(tiny_config())
        plain.load_state_dict(model.state_dict())  # a plain LitGPT state dict
        assert (plain(idx) - adapted).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="nothing to merge: the model has no adapters"):
        merge_adapters(model)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", FAMILY)
def test_layer_merge_matches_on_both_layouts(method, layout):
    config, layer = make_qkv(method, ("query", "value"), layout, nb=2, flip_side=method == "oft")
    perturb(layer)
    x = torch.randn(4, config.n_embd)
    torch.testing.assert_close(layer.merged_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def expected_trainable(method: str, nb: int, flip_side: bool, widths_in: list[int], widths_out: list[int]) -> int:
    """The parameter-count formulas: per adapted part, on each transformed side of width d."""

    def side(d: int) -> int:
        if method == "oft":
            b = d // nb
            return nb * b * (b - 1) // 2
        return (1 if method == "ether" else 2) * d

    if method == "etherplusHH":
        return sum(side(d) for d in widths_in) + sum(side(d) for d in widths_out)
    return sum(side(d) for d in (widths_out if flip_side else widths_in))


@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize("nb", [1, 4])
@pytest.mark.parametrize("method", FAMILY)
def test_trainable_parameter_counts_match_the_formulas(method, nb, flip_side):
    model = tiny_model()
    c = model.config
    m, settings = build_settings(method, {"targets": ["query", "value", "mlp"], "nb": nb, "flip_side": flip_side})
    m.apply(model, settings)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    q, v = c.n_head * c.head_size, c.n_query_groups * c.head_size
    # per layer: qkv (query, value parts, input width n_embd), fc_1, fc_2 (n_embd -> I), proj (I -> n_embd)
    widths_in = [c.n_embd, c.n_embd, c.n_embd, c.n_embd, c.intermediate_size]
    widths_out = [q, v, c.intermediate_size, c.intermediate_size, c.n_embd]
    assert n == c.n_layer * expected_trainable(method, nb, flip_side, widths_in, widths_out)


@pytest.mark.parametrize("method", FAMILY)
def test_only_adapter_parameters_change_after_a_step(method):
    model = tiny_model()
    m, settings = build_settings(method, {"targets": ["query", "key", "value", "projection", "mlp"], "nb": 2})
    m.apply(model, settings)
    perturb(model)  # off the identity so every parameter gets a gradient
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(trainable_state_dict(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 259, (2, 10))
    logits = model(idx)
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == trainable and all(".t_in." in k or ".t_out." in k for k in trainable)


@pytest.mark.parametrize("method", FAMILY)
def test_nb_that_does_not_divide_the_width_is_a_clear_error(method):
    with pytest.raises(
        ValueError,
        match=r"nb=3 does not divide the width 32 of the input of query; valid nb here: "
        r"1, 2, 4, 8, 16, 32",
    ):
        make_qkv(method, ("query",), "concatenated", nb=3)


def test_every_registered_adapter_method_starts_exactly_or_as_documented():
    """The one contract table: for each method, whether it starts at the base model."""
    from lit_peft.methods import METHODS

    starts_at_base = {"lora": True, "etherplus": True, "etherplusHH": True, "oft": True, "ether": False}
    assert set(METHODS) - {"full"} == set(starts_at_base)
    idx = torch.randint(0, 259, (1, 8))
    for name, expected in starts_at_base.items():
        model = tiny_model()
        base = model(idx)
        m, settings = build_settings(name, {"targets": ["query", "value"], **({} if name == "lora" else {"nb": 4})})
        m.apply(model, settings)
        assert torch.allclose(model(idx), base, rtol=0, atol=1e-6) == expected, name
        assert list(adapters(model))


def test_oft_refuses_blocks_that_cannot_rotate():
    with pytest.raises(ValueError, match=r"nb=32 leaves blocks of 1 feature on the input of query \(width 32\)"):
        make_qkv("oft", ("query",), "concatenated", nb=32)
