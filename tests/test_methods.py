"""Method contract and numerics, checked against dense matrices built from the definitions."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_compiled_equals_eager, autocast_gradients, tiny_config
from litgpt import GPT
from torch import nn

from lit_peft.methods import METHODS, adapters, adapters_disabled, build_settings, merge_adapters
from lit_peft.methods.qkv import qkv_rows, to_interleaved
from lit_peft.models.load import trainable_state_dict

PART_SETS = [s for n in (1, 2, 3) for s in itertools.combinations(("query", "key", "value"), n)]


def dense_qkv_rows(config, layout: str) -> dict[str, list[int]]:
    """Row indices of q, k, v written out from the layout definitions, head by head."""
    hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
    if layout == "concatenated":
        q = list(range(nh * hs))
        k = list(range(nh * hs, (nh + ng) * hs))
        v = list(range((nh + ng) * hs, (nh + 2 * ng) * hs))
        return {"query": q, "key": k, "value": v}
    q, k, v, row = [], [], [], 0
    for _ in range(ng):
        for _ in range(nh // ng):
            q += range(row, row + hs)
            row += hs
        k += range(row, row + hs)
        row += hs
        v += range(row, row + hs)
        row += hs
    return {"query": q, "key": k, "value": v}


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_qkv_rows_match_layout_definition(layout):
    config = tiny_config()
    rows = qkv_rows(config, layout)
    expected = dense_qkv_rows(config, layout)
    for part in ("query", "key", "value"):
        assert rows[part].tolist() == expected[part]
    allrows = sorted(sum(expected.values(), []))
    assert allrows == list(range((config.n_head + 2 * config.n_query_groups) * config.head_size))


def test_interleave_roundtrip_matches_litgpt_legacy_conversion():
    from litgpt.scripts.convert_hf_checkpoint import qkv_reassemble

    config = tiny_config()
    w = torch.randn((config.n_head + 2 * config.n_query_groups) * config.head_size, config.n_embd)
    # litgpt's own converter takes interleaved rows back to concatenated ones.
    assert torch.equal(qkv_reassemble(to_interleaved(w, config), config), w)


def lora_on_qkv(config, parts, layout, r=2, alpha=4.0):
    base = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=True)
    method, settings = build_settings("lora", {"r": r, "alpha": alpha, "targets": list(parts), "qkv_layout": layout})
    rows = qkv_rows(config, layout)
    from lit_peft.methods.base import Part

    layer = method.make_adapter(base, [Part(p, rows[p]) for p in parts], settings)
    with torch.no_grad():  # non-zero B so the adapter does something
        for b in layer.lora_B:
            b.normal_()
    return layer


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
@pytest.mark.parametrize("parts", PART_SETS, ids="-".join)
def test_fused_qkv_lora_equals_three_separate_loras(layout, parts):
    """Splitting the fused output into q, k, v gives exactly three independent Linears, each with its own LoRA."""
    config = tiny_config()
    layer = lora_on_qkv(config, parts, layout)
    x = torch.randn(3, 5, config.n_embd)
    y = layer(x)

    rows = dense_qkv_rows(config, layout)
    w, bias = layer.base.weight.detach(), layer.base.bias.detach()
    r, scale = layer.r, layer.scaling
    for name in ("query", "key", "value"):
        idx = torch.tensor(rows[name])
        w_p = w[idx].clone()  # this part's own dense matrix
        if name in parts:
            i = parts.index(name)
            a = layer.lora_A[i * r : (i + 1) * r].detach()
            b = layer.lora_B[i].detach()
            w_p = w_p + scale * b @ a
        expected = x @ w_p.T + bias[idx]
        torch.testing.assert_close(y[..., idx], expected, rtol=1e-5, atol=1e-5)


class FixedMask(nn.Module):
    """Dropout with a fixed mask, so the dropped path has a definition to compare with."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
@pytest.mark.parametrize("parts", [("query",), ("query", "value"), ("query", "key", "value")], ids="-".join)
def test_lora_forward_and_backward_equal_the_dense_definition(layout, parts, dropout):
    """y = x W^T + b + s x_d A_p^T B_p^T at each part's rows (x_d = x, or x after a dropout mask), float64: the output
    and the gradients of x, every A and B against autograd through the dense definition."""
    config = tiny_config()
    torch.manual_seed(0)
    layer = lora_on_qkv(config, parts, layout).double()
    # The concatenated layout's parts are row spans (the fused Function); interleaved rows take the general path.
    assert (layer.spans is not None) == (layout == "concatenated")
    x_shape = (2, 3, config.n_embd)
    mask = (torch.rand(x_shape) > 0.3).double() / 0.7
    if dropout:
        layer.dropout = FixedMask(mask)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 3, layer.out_features, dtype=torch.float64)
    y = layer(x)
    y.backward(grad_y)

    r, s = layer.r, layer.scaling
    a = layer.lora_A.detach().clone().requires_grad_(True)
    bs = [b.detach().clone().requires_grad_(True) for b in layer.lora_B]
    x_ref = x.detach().clone().requires_grad_(True)
    x_d = x_ref * mask if dropout else x_ref
    rows = dense_qkv_rows(config, layout)
    y_ref = x_ref @ layer.base.weight.T + layer.base.bias
    delta = torch.zeros_like(y_ref)
    for i, name in enumerate(parts):
        delta[..., rows[name]] = s * x_d @ (bs[i] @ a[i * r : (i + 1) * r]).T
    (y_ref + delta).backward(grad_y)
    torch.testing.assert_close(y, y_ref + delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-12, atol=1e-12)
    for b, b_ref in zip(layer.lora_B, bs, strict=True):
        torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    assert layer.base.weight.grad is None


def test_lora_function_passes_gradcheck():
    from lit_peft.methods.lora import LoRALinearFunction

    torch.manual_seed(0)
    x, xa = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, bias = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # two parts of r = 2
    b1, b2 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(2, 2, dtype=torch.float64)
    b2.requires_grad_(True)
    spans = ((0, 3), (5, 7))  # rows 3-4 belong to no part
    assert torch.autograd.gradcheck(lambda *t: LoRALinearFunction.apply(t[0], None, w, t[1], t[2], 1.5, spans, *t[3:]),
                                    (x, bias, a, b1, b2))  # fmt: skip
    assert torch.autograd.gradcheck(lambda *t: LoRALinearFunction.apply(t[0], t[1], w, None, t[2], 0.5, spans, *t[3:]),
                                    (x, xa, a, b1, b2))  # fmt: skip


def test_compiled_lora_equals_eager_without_graph_breaks():
    """torch.compile traces LoRALinearFunction whole (fullgraph: a graph break is an error): same output, gradients."""
    config = tiny_config()
    layer = lora_on_qkv(config, ("query", "value"), "concatenated")
    assert layer.spans is not None
    assert_compiled_equals_eager(layer, torch.randn(2, 5, config.n_embd))


def test_lora_under_autocast_computes_in_the_autocast_dtype_as_the_base_linear():
    config = tiny_config()
    layer = lora_on_qkv(config, ("query", "key", "value"), "concatenated")
    assert len(autocast_gradients(layer, torch.randn(2, 5, config.n_embd))) == 4  # A and the three B


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_lora_merge_and_off_switch(layout):
    config = tiny_config()
    layer = lora_on_qkv(config, ("query", "value"), layout)
    x = torch.randn(2, 4, config.n_embd)
    merged = layer.merged_linear()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    layer.enabled = False
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize("targets", [["query", "value"], ["query", "key", "value", "projection", "mlp", "head"]])
def test_lora_at_init_is_exactly_the_base_model(targets):
    config = tiny_config()
    torch.manual_seed(1)
    model = GPT(config)
    model.apply(model._init_weights)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    before = model(idx)
    method, settings = build_settings("lora", {"targets": targets, "r": 4})
    adapted = method.apply(model, settings)
    n_mlp = 3 * config.n_layer if "mlp" in targets else 0
    assert len(adapted) == config.n_layer * (1 + ("projection" in targets)) + n_mlp + ("head" in targets)
    assert torch.equal(model(idx), before)


def test_only_lora_parameters_change_after_a_step():
    config = tiny_config()
    model = GPT(config)
    model.apply(model._init_weights)
    method, settings = build_settings("lora", {"targets": ["query", "key", "value", "mlp"], "r": 2})
    method.apply(model, settings)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(trainable_state_dict(model))
    assert trainable and all(".lora_" in k for k in trainable)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, config.vocab_size, (2, 8))
    for _ in range(2):  # two steps: B moves on the first, then A gets a gradient too
        loss = nn.functional.cross_entropy(
            model(idx)[:, :-1].reshape(-1, config.padded_vocab_size), idx[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


def test_merge_gives_a_plain_model_with_the_same_logits():
    config = tiny_config()
    model = GPT(config)
    model.apply(model._init_weights)
    method, settings = build_settings("lora", {"targets": ["query", "key", "projection", "mlp", "head"], "r": 2})
    method.apply(model, settings)
    for _, layer in adapters(model):
        for b in layer.lora_B:
            nn.init.normal_(b)
    idx = torch.randint(0, config.vocab_size, (2, 8))
    adapted = model(idx)
    with adapters_disabled(model):
        base = model(idx)
    assert not torch.allclose(adapted, base)
    assert all(layer.enabled for _, layer in adapters(model))  # restored after the context
    assert merge_adapters(model) == 2 * (1 + 1 + 3) + 1
    assert not list(adapters(model))
    plain = GPT(config)
    plain.load_state_dict(model.state_dict())  # same keys as a LitGPT checkpoint
    torch.testing.assert_close(plain(idx), adapted, rtol=1e-5, atol=1e-5)


def test_full_trains_everything():
    model = GPT(tiny_config())
    method, settings = build_settings("full", {})
    method.apply(model, settings)
    assert all(p.requires_grad for p in model.parameters())
    assert not list(adapters(model))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"targets": ["query", "kv"]}, "unknown target 'kv'; valid targets: query, key, value, projection, mlp, head"),
        ({"rank": 4}, "unknown setting 'rank' for this method; valid settings:"),
        ({"r": 0}, "lora r must be a positive integer, got 0"),
        ({"qkv_layout": "fused"}, "unknown qkv_layout 'fused'; valid: concatenated, interleaved"),
    ],
)
def test_bad_settings_name_the_value_and_the_choices(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_settings("lora", values)


def test_unknown_method_lists_the_registry():
    with pytest.raises(
        ValueError,
        match=r"unknown method 'vera'; valid methods: dora, ether, etherplus, etherplusHH, full, hra, lora, oft",
    ):
        build_settings("vera", {})


def test_registry_and_conf_method_folder_agree():
    """Every conf/method file names a registered method; qlora is lora over a 4-bit base, not a method of its own."""
    from conftest import ROOT
    from omegaconf import OmegaConf

    files = {p.stem: OmegaConf.load(p) for p in (ROOT / "lit_peft" / "conf" / "method").glob("*.yaml")}
    assert set(files) == set(METHODS) | {"qlora"}
    for stem, cfg in files.items():
        name = cfg.method.name if stem == "qlora" else cfg.name
        assert name == ("lora" if stem == "qlora" else stem)
        method, _ = build_settings(
            name, {k: v for k, v in OmegaConf.to_container(cfg.get("method", cfg)).items() if k != "name"}
        )  # every YAML setting is a valid setting
    assert files["qlora"].quantize == "nf4-dq"


def test_sharded_clip_without_fsdp_units_is_plain_global_norm_clipping():
    """The FSDP clipping path (GPU-only end to end) falls back to the global norm over local gradients."""
    from lit_peft.training.lit_module import clip_sharded_grad_norm_

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    for m in (a, b):
        (m(x) ** 2).sum().mul(10).backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
    got = clip_sharded_grad_norm_(b, b, 0.5)
    assert got == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0.5  # it did clip
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=oft", "method.block_size=32"], None),
        (["method=etherplusHH", "method.block_size=8", "method.flip_side=true"], None),
        (["method=ether", "method.block_size=0"], "method.block_size=0 is not valid; expected an integer >= 1 or null"),
        (["method=oft", "method.nb=4", "method.block_size=32"], "nb=4 and block_size=32 both given; give one"),
    ],
)
def test_block_size_is_checked_with_the_run_config_before_the_run(overrides, message):
    """conf/method/*.yaml have nb: null and block_size: null; a run sets one of them (validated before Hydra writes)."""
    from test_cli import composed

    from lit_peft.cli.validate import validate_config

    if message is None:
        validate_config(composed(*overrides))
        return
    with pytest.raises(ValueError) as err:
        validate_config(composed(*overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# ------------------------------------------------------------------------- one MLP Linear as a target


def adapted_names(targets, **config):
    with torch.device("meta"):
        model = GPT(tiny_config(**config))
    method, settings = build_settings("lora", {"targets": targets, "r": 2})
    return method.apply(model, settings)


def test_mlp_linears_are_targets_of_their_own_and_mlp_is_all_of_them():
    """mlp.fc_1, mlp.fc_2, mlp.proj (LLaMA's gate_proj, up_proj, down_proj) each select one MLP Linear, as PEFT's
    target_modules do; `mlp` stays the shorthand for all of them (GPT-NeoX's MLP has mlp.fc and mlp.proj)."""
    layers = range(tiny_config().n_layer)
    assert adapted_names(["query", "mlp.proj"]) == [
        f"transformer.h.{i}.{n}" for i in layers for n in ("attn.qkv", "mlp.proj")
    ]
    every = [f"transformer.h.{i}.mlp.{n}" for i in layers for n in ("fc_1", "fc_2", "proj")]
    assert adapted_names(["mlp"]) == adapted_names(["mlp.fc_1", "mlp.fc_2", "mlp.proj"]) == every
    assert adapted_names(["mlp", "mlp.fc_2"]) == every
    assert adapted_names(["mlp.fc"], mlp_class_name="GptNeoxMLP") == [f"transformer.h.{i}.mlp.fc" for i in layers]
    with pytest.raises(ValueError, match=r"^target mlp.fc matched no Linear in the model; its MLP Linears are "):
        adapted_names(["query", "mlp.fc"])
    with pytest.raises(ValueError) as err:
        build_settings("lora", {"targets": ["query", "mlp.down"]})
    assert str(err.value) == (
        "unknown target 'mlp.down'; valid targets: query, key, value, projection, mlp, head, mlp.fc_1, mlp.fc_2, "
        "mlp.fc, mlp.proj"
    )


def test_a_run_config_targeting_down_proj_alone_is_accepted_and_merges_exactly(tiny_checkpoint, tmp_path):
    from omegaconf import OmegaConf
    from test_cli import composed

    from lit_peft.checkpoints.adapter import save_adapter
    from lit_peft.cli.validate import validate_config
    from lit_peft.export.merge import merge_checkpoint
    from lit_peft.models.load import install_method, load_base

    cfg = composed("model=tiny-random", "method=lora", "method.targets=[query,mlp.proj]")
    validate_config(cfg)
    values = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in ("name", "lr")}
    model = load_base(tiny_checkpoint)
    _, settings = install_method(model, "lora", values)
    model.eval()  # the conf's dropout off
    assert settings.targets == ("query", "mlp.proj")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    meta = {"method": "lora", "settings": settings.to_dict(), "base_checkpoint": str(tiny_checkpoint)}
    adapter = save_adapter(tmp_path / "adapter", trainable_state_dict(model), meta)
    merged = merge_checkpoint(adapter, tmp_path / "merged", dtype="float32")

    base, plain = load_base(tiny_checkpoint).state_dict(), load_base(merged).eval()
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), model(idx), rtol=0, atol=1e-5)
    changed = {k for k, v in plain.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {f"transformer.h.{i}.{n}.weight" for i in range(2) for n in ("attn.qkv", "mlp.proj")}
