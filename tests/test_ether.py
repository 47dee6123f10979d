"""ETHER, ETHER+, ETHER+HH and OFT against dense matrices built from their definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_compiled_equals_eager, autocast_gradients, tiny_config
from litgpt import GPT
from test_methods import dense_qkv_rows
from torch import nn

from lit_peft.methods import adapters, adapters_disabled, build_settings, merge_adapters
from lit_peft.methods.base import Part
from lit_peft.methods.qkv import qkv_rows
from lit_peft.models.load import trainable_state_dict

FAMILY = ["ether", "etherplus", "etherplusHH", "oft"]
LAYOUTS = ["concatenated", "interleaved"]
# (method, the input side's route): Householder-type input sides run either directly or as a low-rank correction.
ROUTES = [(m, c) for m in FAMILY for c in (("direct",) if m == "oft" else ("direct", "low_rank"))]


def set_route(module: nn.Module, compute: str) -> None:
    """Force every transform adapter in `module` onto one route of its input side."""
    from lit_peft.methods.transform import TransformLinear

    layers = [m for m in module.modules() if isinstance(m, TransformLinear)]
    assert layers
    for layer in layers:
        layer.compute = compute


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


def make_qkv(method: str, parts, layout: str, nb: int = 2, flip_side: bool = False, bias: bool = True, block_size=None):
    """A fused qkv adapter of the tiny model; `block_size` replaces `nb` when given."""
    config = tiny_config()
    base = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=bias)
    blocks = {"nb": nb} if block_size is None else {"block_size": block_size}
    m, settings = build_settings(
        method, {"targets": list(parts), "qkv_layout": layout, "flip_side": flip_side, **blocks}
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

    starts_at_base = {
        **{"lora": True, "dora": True, "hra": True},  # hra: paired init (init=random does not)
        **{"etherplus": True, "etherplusHH": True, "oft": True, "ether": False},
    }
    assert set(METHODS) - {"full"} == set(starts_at_base)
    idx = torch.randint(0, 259, (1, 8))
    for name, expected in starts_at_base.items():
        model = tiny_model()
        base = model(idx)
        blocks = {} if name in ("lora", "dora", "hra") else {"nb": 4}
        m, settings = build_settings(name, {"targets": ["query", "value"], **blocks})
        m.apply(model, settings)
        assert torch.allclose(model(idx), base, rtol=0, atol=1e-6) == expected, name
        assert list(adapters(model))


def test_oft_refuses_blocks_that_cannot_rotate():
    with pytest.raises(ValueError, match=r"nb=32 leaves blocks of 1 feature on the input of query \(width 32\)"):
        make_qkv("oft", ("query",), "concatenated", nb=32)


# ---- forward and backward of the Functions against the definitions, float64 ---------------------------------------
def definition(t, params: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The block-diagonal matrix of transform `t` written out from its definition, differentiable in `params`."""
    if hasattr(t, "s"):
        return torch.block_diag(*[cayley(row, t.block) for row in params[f"{prefix}.s"]])
    if hasattr(t, "v"):
        u, v = params[f"{prefix}.u"], params[f"{prefix}.v"]
        return torch.block_diag(*[householder_plus(u[n], v[n]) for n in range(t.nb)])
    return torch.block_diag(*[householder(row) for row in params[f"{prefix}.u"]])


def reference_forward(layer, rows: dict[str, list[int]], parts, x: torch.Tensor, params: dict) -> torch.Tensor:
    """y = x W'^T + b' with W'_p = H_out_p W_p H_in_p (and b'_p = H_out_p b_p) for each adapted part p, in float64."""
    w = layer.base.weight.detach().double()
    b = layer.base.bias.detach().double() if layer.base.bias is not None else torch.zeros(len(w), dtype=torch.double)
    for i, name in enumerate(parts):
        idx = torch.tensor(rows[name])
        w_p, b_p = w[idx], b[idx]
        if layer.t_in is not None:
            w_p = w_p @ definition(layer.t_in[i], params, f"t_in.{i}")
        if layer.t_out is not None:
            h = definition(layer.t_out[i], params, f"t_out.{i}")
            w_p, b_p = h @ w_p, h @ b_p
        w, b = w.index_copy(0, idx, w_p), b.index_copy(0, idx, b_p)
    return x @ w.T + b


def assert_forward_and_backward_match_definition(layer, rows, parts, x_shape) -> None:
    layer.double()
    x = torch.randn(*x_shape, dtype=torch.double, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad}
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference_forward(layer, rows, parts, x_ref, params)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert params and all(p.grad is not None for p in params.values())
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize("parts", [("query", "value"), ("query", "key", "value"), ("key",)], ids="-".join)
@pytest.mark.parametrize(("method", "compute"), ROUTES)
def test_gradients_equal_the_dense_definition_on_fused_qkv(method, compute, parts, flip_side, layout):
    """Output, input gradient and every adapter parameter's gradient equal the dense W' = H_out W H_in, per part."""
    config, layer = make_qkv(method, parts, layout, nb=2, flip_side=flip_side)
    set_route(layer, compute)
    perturb(layer)
    assert_forward_and_backward_match_definition(layer, dense_qkv_rows(config, layout), parts, (2, 3, config.n_embd))


@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize(("method", "compute"), ROUTES)
def test_gradients_equal_the_dense_definition_on_a_plain_linear(method, compute, flip_side):
    base = nn.Linear(16, 24, bias=True)
    m, settings = build_settings(method, {"nb": 4, "flip_side": flip_side})
    layer = m.make_adapter(base, [Part("all", torch.arange(24))], settings)
    set_route(layer, compute)
    perturb(layer)
    assert_forward_and_backward_match_definition(layer, {"all": list(range(24))}, ("all",), (5, 16))


def test_the_functions_pass_gradcheck():
    from lit_peft.methods.ether import Householder, HouseholderPlus
    from lit_peft.methods.oft import Cayley
    from lit_peft.methods.transform import BlockFunction, Group, TransformLinearFunction

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.double, requires_grad=True)

    x = leaf(5, 3, 4)  # (tokens, nb, b)
    for kind, f in ((Householder, leaf(1, 3, 4)), (HouseholderPlus, leaf(2, 3, 4)), (Cayley, leaf(3, 4, 4))):
        assert torch.autograd.gradcheck(lambda x, f, kind=kind: BlockFunction.apply(x, f, kind), (x, f))
    # A whole Linear (8 x 6): rows 0-1 and 5 (one group in two runs) and rows 2-4 transformed on both sides, by
    # different kinds; rows 6-7 plain. On the direct route with rotations among them; on the low-rank route of the
    # input side with Householder-type kinds only (K = 1 and 2), whose output sides then work in place.
    w, b = torch.randn(8, 6, dtype=torch.double), torch.randn(8, dtype=torch.double)
    cases = [  # (low_rank, the second group's input and output kinds, the four factors)
        (False, (Cayley, Cayley), (leaf(1, 2, 3), leaf(3, 2, 2), leaf(2, 1, 3), leaf(1, 3, 3))),
        (True, (HouseholderPlus, Householder), (leaf(1, 2, 3), leaf(2, 2, 3), leaf(2, 1, 3), leaf(1, 1, 3))),
    ]
    for low_rank, (kind_in, kind_out), factors in cases:
        plan = (
            Group(((0, 2), (5, 6)), (Householder, 0), (HouseholderPlus, 2)),
            Group(((2, 5),), (kind_in, 1), (kind_out, 3)),
            Group(((6, 8),), None, None),
        )
        assert torch.autograd.gradcheck(
            lambda x, *f, plan=plan, low_rank=low_rank: TransformLinearFunction.apply(
                x, w, b, None, plan, low_rank, *f
            ),
            (leaf(2, 3, 6), *factors),
        )


def test_the_low_rank_route_is_refused_for_rotations():
    _, layer = make_qkv("oft", ("query",), "concatenated")
    layer.compute = "low_rank"
    with pytest.raises(ValueError, match="Householder-type"):
        layer(torch.randn(3, layer.in_features))


@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize(("method", "compute"), ROUTES)
def test_only_the_inputs_of_the_transforms_are_kept_for_backward(method, compute, flip_side):
    """Activation-sized tensors autograd keeps: the Linear's input x for the input side; for the output side the base
    output W x + b (OFT), or for Householder-type sides the Linear's output itself, transformed in place (what the
    next layer often keeps anyway, e.g. SiLU its input); one storage for all parts, never an extra copy."""
    config, layer = make_qkv(method, ("query", "key", "value"), "concatenated", nb=4, flip_side=flip_side)
    set_route(layer, compute)
    perturb(layer)
    x = torch.randn(64, config.n_embd, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    storages = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}
    storages -= {layer.base.weight.untyped_storage().data_ptr()}  # the frozen weight itself, not a copy
    on_input, on_output = layer.t_in is not None, layer.t_out is not None
    assert (x.untyped_storage().data_ptr() in storages) == on_input
    assert len(storages) == on_input + on_output
    assert (y.untyped_storage().data_ptr() in storages) == (on_output and method != "oft")


# ---- block_size ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize("method", FAMILY)
def test_block_size_gives_width_over_block_size_blocks_per_part(method, flip_side):
    """block_size=8 on qkv: q, k, v (widths 32, 16, 16 on the output side) get 4, 2 and 2 blocks; the input side 4."""
    _, layer = make_qkv(method, ("query", "key", "value"), "concatenated", flip_side=flip_side, block_size=8)
    for side in (layer.t_in, layer.t_out):
        if side is not None:
            assert [t.block for t in side] == [8, 8, 8]
            assert [t.nb for t in side] == [t.width // 8 for t in side]
    if layer.t_out is not None:
        assert [t.nb for t in layer.t_out] == [4, 2, 2]


@pytest.mark.parametrize("method", FAMILY)
def test_block_size_equals_the_equivalent_nb(method):
    """On a 32 x 32 Linear, block_size=8 is nb=4: same parameters, same output, same saved settings."""
    layers = []
    for values in ({"nb": 4}, {"block_size": 8}):
        torch.manual_seed(0)
        base = nn.Linear(32, 32)
        m, settings = build_settings(method, values)
        layers.append(m.make_adapter(base, [Part("all", torch.arange(32))], settings))
    by_nb, by_size = layers
    perturb(by_nb)
    by_size.load_state_dict(by_nb.state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(by_size(x), by_nb(x), rtol=0, atol=0)
    assert settings.to_dict()["block_size"] == 8 and settings.to_dict()["nb"] is None
    assert build_settings(method, settings.to_dict())[1] == settings  # what an adapter folder saves rebuilds it


def test_block_size_is_saved_and_rebuilds_the_same_adapter_for_load_and_merge():
    from lit_peft.models.load import trainable_state_dict

    model = tiny_model()
    m, settings = build_settings("oft", {"targets": ["query", "value", "mlp"], "block_size": 4})
    m.apply(model, settings)
    perturb(model)
    saved = {"method": "oft", "settings": settings.to_dict()}  # as train.py writes adapter_config.json
    again = tiny_model()
    m2, settings2 = build_settings(saved["method"], saved["settings"])
    m2.apply(again, settings2)
    again.load_state_dict(trainable_state_dict(model), strict=False)
    idx = torch.randint(0, 259, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
        merge_adapters(again)
        torch.testing.assert_close(again(idx), model(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", FAMILY)
def test_block_size_that_does_not_divide_the_width_is_a_one_line_error(method):
    message = (
        r"block_size=3 does not divide the width 32 of the input of query; valid block_size here: 1, 2, 4, 8, 16, 32$"
    )
    with pytest.raises(ValueError, match=message):
        make_qkv(method, ("query",), "concatenated", block_size=3)


def test_a_width_error_names_the_linear_in_the_model():
    m, settings = build_settings("etherplus", {"targets": ["mlp"], "block_size": 48, "flip_side": True})
    with pytest.raises(ValueError) as err:
        m.apply(tiny_model(), settings)
    assert str(err.value) == (
        "block_size=48 does not divide the width 64 of the output of transformer.h.0.mlp.fc_1; "
        "valid block_size here: 1, 2, 4, 8, 16, 32, 64"
    )


@pytest.mark.parametrize(
    "method, values, message",
    [
        ("ether", {"nb": 4, "block_size": 8}, "nb=4 and block_size=8 both given; give one (the other null)"),
        ("oft", {"block_size": 0}, "block_size must be a positive integer or null, got 0"),
        ("etherplus", {"nb": 2.5}, "nb must be a positive integer or null, got 2.5"),
    ],
)
def test_bad_block_settings_are_one_line_errors(method, values, message):
    with pytest.raises(ValueError) as err:
        build_settings(method, values)
    assert str(err.value) == message


def test_block_settings_defaults():
    assert build_settings("ether", {})[1].nb == 1 and build_settings("oft", {})[1].nb == 32
    assert build_settings("oft", {"block_size": 16})[1].nb is None  # the block count then follows each width
    assert build_settings("oft", {"nb": None, "block_size": None})[1].nb == 32  # conf/method/oft.yaml as written
    with pytest.raises(ValueError, match=r"^block_size=1 leaves blocks of 1 feature on the input of query"):
        make_qkv("oft", ("query",), "concatenated", block_size=1)


# ---- over a 4-bit base; under torch.compile -----------------------------------------------------------------------
def saved_bytes(model: nn.Module, idx: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx).logsumexp(-1).mean().backward()
    return sum(seen.values())


@pytest.mark.parametrize("flip_side", [False, True], ids=["input", "flip"])
@pytest.mark.parametrize(("method", "compute"), ROUTES)
def test_over_a_4bit_base_gradients_equal_the_dequantized_dense_math_and_no_dense_weight_is_kept(
    method, compute, flip_side
):
    import copy

    from lit_peft.methods.quantize import dequantize_base, quantize_base

    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, intermediate_size=128))  # widths: multiples of bitsandbytes' 64-wide blocks
    model.apply(model._init_weights)
    quantize_base(model, "nf4")
    m, settings = build_settings(method, {"targets": ["query", "value", "mlp"], "nb": 4, "flip_side": flip_side})
    m.apply(model, settings)
    set_route(model, compute)
    perturb(model)
    dense = copy.deepcopy(model)
    assert dequantize_base(dense) == 2 * 5  # the same adapters over plain Linears holding the dequantized weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in dense.named_parameters():
        p.requires_grad_(name in trainable)
    idx = torch.randint(0, 259, (2, 10))
    grads = []
    for net in (model, dense):
        net.zero_grad()
        logits = net(idx)
        logits.logsumexp(-1).mean().backward()
        grads.append((logits, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}))
    (q_logits, q_grads), (d_logits, d_grads) = grads
    torch.testing.assert_close(q_logits, d_logits, rtol=1e-5, atol=1e-5)
    assert q_grads.keys() == d_grads.keys() and q_grads
    for name, g in q_grads.items():
        torch.testing.assert_close(g, d_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Nothing more is kept for backward than over the dense base, whose weights are parameters (not counted):
    # no dequantized copy of a 4-bit weight lives until backward.
    assert saved_bytes(model, idx) == saved_bytes(dense, idx)


@pytest.mark.parametrize(("method", "compute"), ROUTES)
def test_compiled_adapter_equals_eager_without_graph_breaks(method, compute):
    """torch.compile (dynamo + AOTAutograd, eager kernels) traces the Functions: same output and gradients."""
    config, layer = make_qkv(method, ("query", "value"), "interleaved", nb=2, flip_side=method == "oft")
    set_route(layer, compute)
    perturb(layer)
    assert_compiled_equals_eager(layer, torch.randn(2, 5, config.n_embd))


@pytest.mark.parametrize(("method", "compute"), ROUTES)
def test_under_autocast_the_adapter_computes_in_the_autocast_dtype_as_the_base_linear(method, compute):
    """bf16-mixed: the adapted Linear returns what autocast makes of a Linear (bfloat16), close to float32."""
    config, layer = make_qkv(method, ("query", "value"), "concatenated", nb=2, flip_side=method == "oft")
    set_route(layer, compute)
    perturb(layer)
    autocast_gradients(layer, torch.randn(2, 5, config.n_embd))
