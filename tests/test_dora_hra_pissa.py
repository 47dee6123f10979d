"""DoRA, HRA and PiSSA (LoRA's and DoRA's `init=pissa`): against dense float64 definitions and Hugging Face PEFT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from litgpt import GPT
from test_methods import dense_qkv_rows
from torch import nn

from lit_peft.methods import adapters, adapters_disabled, build_settings, merge_adapters, regularization
from lit_peft.methods.base import Part
from lit_peft.methods.qkv import qkv_rows
from lit_peft.models.load import trainable_state_dict

LAYOUTS = ["concatenated", "interleaved"]
ALL_TARGETS = ["query", "key", "value", "projection", "mlp", "head"]
# (method, settings) under test; ids name them
VARIANTS = {
    "dora": ("dora", {}),
    "hra": ("hra", {}),
    "hra-gs": ("hra", {"apply_GS": True, "init": "random"}),
    "pissa": ("lora", {"init": "pissa"}),
    "dora-pissa": ("dora", {"init": "pissa"}),
}


# ---- the definitions, written out densely in float64 ------------------------------------------------------------
def householder_chain(u: torch.Tensor, gram_schmidt: bool = False) -> torch.Tensor:
    """H_1 H_2 ... H_r for the columns of u (in, r), H_i = I - 2 u_i u_i^T/|u_i|^2; with Gram-Schmidt (PEFT's
    apply_GS) the columns are orthonormalised one after another first and H = I - 2 Q Q^T."""
    u = u.double()
    eye = torch.eye(len(u), dtype=torch.double)
    if gram_schmidt:
        q = []
        for i in range(u.shape[1]):
            v = u[:, i]
            for w in q:
                v = v - (w @ v) * w
            q.append(v / v.norm())
        q = torch.stack(q, dim=1)
        return eye - 2 * q @ q.T
    h = eye
    for i in range(u.shape[1]):
        v = u[:, i] / u[:, i].norm()
        h = h @ (eye - 2 * torch.outer(v, v))
    return h


def top_r(w: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation U_r S_r V_r^T of w, by a float64 SVD."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def part_params(layer, i: int) -> dict[str, torch.Tensor]:
    """Part i's adapter tensors (float64, detached): a (r, in), b (rows, r), m (rows,), u (in, r)."""
    out = {}
    if hasattr(layer, "lora_A"):
        out["a"] = layer.lora_A[i * layer.r : (i + 1) * layer.r].detach().double()
        out["b"] = layer.lora_B[i].detach().double()
    if hasattr(layer, "magnitude"):
        out["m"] = layer.magnitude[i].detach().double()
    if hasattr(layer, "hra_u"):
        out["u"] = layer.hra_u[i].detach().double()
    return out


def perturb(model: nn.Module, scale: float = 0.2) -> None:
    """Move every adapter parameter off its initial value (all of them start at the identity or at W)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale * (p.abs().mean() + 0.05))


def make_qkv(kind: str, settings: dict, parts, layout: str, r: int = 2):
    config = tiny_config()
    base = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=True)
    original = base.weight.detach().clone()
    method, values = build_settings(kind, {"targets": list(parts), "qkv_layout": layout, "r": r, **settings})
    rows = qkv_rows(config, layout)
    layer = method.make_adapter(base, [Part(p, rows[p]) for p in parts], values)
    return config, layer, original


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    model.apply(model._init_weights)
    return model


def install(model: GPT, variant: str, targets=ALL_TARGETS, r: int = 2, **extra) -> None:
    kind, settings = VARIANTS[variant]
    method, values = build_settings(kind, {"targets": targets, "r": r, **settings, **extra})
    method.apply(model, values)


# ---- output and gradients against the definitions -----------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_and_gradients_equal_the_dense_definition_on_fused_qkv(variant, layout):
    """q and v adapted (k passes through), each with its own adapter; float64 forward and backward."""
    kind, settings = VARIANTS[variant]
    parts = ("query", "value")
    config, layer, original = make_qkv(kind, settings, parts, layout)
    perturb(layer)
    layer.double()
    x = torch.randn(2, 3, config.n_embd, dtype=torch.double, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    rows = dense_qkv_rows(config, layout)
    bias = layer.base.bias.detach().double()
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad}
    x_ref = x.detach().clone().requires_grad_()
    expected = x_ref @ layer.base_weight().detach().double().T + bias  # the frozen base, every row
    for i, name in enumerate(parts):
        idx = torch.tensor(rows[name])
        w_p = layer.base_weight().detach().double()[idx]  # for PiSSA the residual, which the definition adapts
        if kind == "hra":
            w_new = w_p @ householder_chain(params[f"hra_u.{i}"], settings.get("apply_GS", False))
        else:
            a, b = params["lora_A"][i * layer.r : (i + 1) * layer.r], params[f"lora_B.{i}"]
            w_new = w_p + layer.scaling * b @ a
            if kind == "dora":  # the norm is a constant for the gradient (DoRA section 4.3, as PEFT)
                m = params[f"magnitude.{i}"]
                w_new = m[:, None] * w_new / w_new.detach().norm(dim=1, keepdim=True)
        expected = expected.index_copy(-1, idx, x_ref @ w_new.T + bias[idx])
    expected.backward(grad_y)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_pissa_takes_the_top_r_singular_triplets_and_leaves_w_unchanged(kind, layout):
    """Per part: s B A is the best rank-r approximation of W_p, the frozen rows are W_p minus it, A and B are
    scaled alike (A A^T = B^T B = diag(S_r)/s), and rows no part owns are untouched."""
    config, layer, original = make_qkv(kind, {"init": "pissa"}, ("query", "key"), layout, r=3)
    rows = dense_qkv_rows(config, layout)
    residual = layer.base_weight().detach().double()
    for i, name in enumerate(("query", "key")):
        idx = torch.tensor(rows[name])
        p = part_params(layer, i)
        approx = top_r(original[idx], 3)
        torch.testing.assert_close(layer.scaling * p["b"] @ p["a"], approx, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            residual[idx] + layer.scaling * p["b"] @ p["a"], original[idx].double(), atol=1e-6, rtol=0
        )
        s = torch.linalg.svdvals(original[idx].double())[:3] / layer.scaling
        torch.testing.assert_close(p["a"] @ p["a"].T, torch.diag(s), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p["b"].T @ p["b"], torch.diag(s), atol=1e-5, rtol=1e-5)
    v = torch.tensor(rows["value"])
    assert torch.equal(layer.base.weight[v], original[v])
    if kind == "dora":  # m starts at the row norms of W (residual + s B A), so W' = W
        torch.testing.assert_close(
            torch.cat(list(layer.magnitude)).double(), original[layer.rows].double().norm(dim=1), rtol=1e-5, atol=0
        )


# ---- on the whole model: init, merge, off switch, a step, counts ---------------------------------------------------
@pytest.mark.parametrize("variant", ["dora", "hra", "pissa", "dora-pissa"])
def test_at_init_the_model_is_the_base_model(variant):
    model = tiny_model()
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        base = model(idx)
        install(model, variant)
        torch.testing.assert_close(model(idx), base, rtol=0, atol=1e-5)


def test_hra_random_init_and_gram_schmidt_are_not_the_identity():
    model = tiny_model()
    idx = torch.randint(0, 259, (1, 8))
    with torch.no_grad():
        base = model(idx)
        install(model, "hra-gs", targets=["query", "value"])
        assert (model(idx) - base).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_the_adapter_model_and_the_off_switch_is_the_model_at_init(variant):
    """Merged logits equal the adapter model's; adapters off give the model at init, which for PiSSA is the
    original model (residual + s B0 A0), not the residual alone."""
    model = tiny_model()
    original = copy.deepcopy(model)
    install(model, variant)
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        at_init = model(idx)
        perturb(model)
        adapted = model(idx)
        with adapters_disabled(model):
            off = model(idx)
        before = original(idx)
        assert (adapted - off).abs().max() > 1e-2  # the adapter does something
        torch.testing.assert_close(off, before, rtol=0, atol=1e-5)
        if variant != "hra-gs":  # Gram-Schmidt'ed random reflections do not start at W
            torch.testing.assert_close(at_init, before, rtol=0, atol=1e-5)
        merge_adapters(model)
        plain = GPT(tiny_config())
        plain.load_state_dict(model.state_dict())  # a plain LitGPT state dict
        torch.testing.assert_close(plain(idx), adapted, rtol=1e-5, atol=1e-5)


def expected_trainable(kind: str, r: int, shapes: list[tuple[int, int]]) -> int:
    """Per adapted matrix (in, out): LoRA/PiSSA r (in + out), DoRA r (in + out) + out, HRA r in."""
    per = {"lora": lambda i, o: r * (i + o), "dora": lambda i, o: r * (i + o) + o, "hra": lambda i, o: r * i}[kind]
    return sum(per(i, o) for i, o in shapes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_counts_match_the_formulas_and_only_they_change_in_a_step(variant):
    model = tiny_model()
    c = model.config
    install(model, variant, targets=["query", "value", "mlp"], r=4)
    kind = VARIANTS[variant][0]
    q, v = c.n_head * c.head_size, c.n_query_groups * c.head_size
    i_s = c.intermediate_size
    shapes = [(c.n_embd, q), (c.n_embd, v), (c.n_embd, i_s), (c.n_embd, i_s), (i_s, c.n_embd)]
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == c.n_layer * expected_trainable(kind, 4, shapes)

    perturb(model)  # off the identity so every parameter gets a gradient
    before = {k: t.clone() for k, t in model.state_dict().items()}
    trainable = set(trainable_state_dict(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 259, (2, 10))
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).backward()
    opt.step()
    changed = {k for k, t in model.state_dict().items() if not torch.equal(t, before[k])}
    assert changed == trainable


# ---- Hugging Face PEFT on the tiny model's transformers twin --------------------------------------------------------
PEFT_TARGETS = {"query": "self_attn.q_proj", "value": "self_attn.v_proj", "mlp": None}
MLP = {"fc_1": "mlp.gate_proj", "fc_2": "mlp.up_proj", "proj": "mlp.down_proj"}


def hf_twin(model: GPT):
    """transformers' LlamaForCausalLM with the same weights (lit_peft.export.hf's config, litgpt's renaming)."""
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_peft.export.hf import llama_hf_config

    values = {k: v for k, v in llama_hf_config(model.config).items() if k not in ("architectures", "model_type")}
    config = LlamaConfig(**values, use_cache=False)
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).float()
    state: dict = {}
    copy_weights_llama(model.config, state, {k: v.clone() for k, v in model.state_dict().items()})
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def matched(model: GPT, peft_model) -> list[tuple[nn.Module, int, nn.Module]]:
    """(our adapter, its part index, PEFT's layer) for every adapted matrix."""
    out = []
    for name, layer in adapters(model):
        block = int(name.split(".")[2])
        prefix = f"base_model.model.model.layers.{block}."
        if name.endswith("attn.qkv"):
            for i, part in enumerate(layer.part_names):
                out.append((layer, i, peft_model.get_submodule(prefix + PEFT_TARGETS[part])))
        else:
            out.append((layer, 0, peft_model.get_submodule(prefix + MLP[name.rsplit(".", 1)[1]])))
    return out


def peft_tensors(kind: str, layer, i: int, theirs) -> list[tuple[nn.Parameter, slice, nn.Parameter]]:
    """(our parameter, the slice of it that is this matrix's, PEFT's parameter) for one adapted matrix."""
    whole = slice(None)
    if kind == "hra":
        return [(layer.hra_u[i], whole, theirs.hra_u["default"])]
    pairs = [
        (layer.lora_A, slice(i * layer.r, (i + 1) * layer.r), theirs.lora_A["default"].weight),
        (layer.lora_B[i], whole, theirs.lora_B["default"].weight),
    ]
    if kind == "dora":
        pairs.append((layer.magnitude[i], whole, theirs.lora_magnitude_vector["default"].weight))
    return pairs


PEFT_CASES = {
    "dora": ("dora", {}, lambda peft, mods: peft.LoraConfig(r=4, lora_alpha=8, target_modules=mods, use_dora=True)),
    "hra": ("hra", {}, lambda peft, mods: peft.HRAConfig(r=4, target_modules=mods)),
    "hra-gs": (
        "hra",
        {"apply_GS": True, "init": "random"},
        lambda peft, mods: peft.HRAConfig(r=4, apply_GS=True, init_weights=False, target_modules=mods),
    ),
    "pissa": (
        "lora",
        {"init": "pissa"},
        lambda peft, mods: peft.LoraConfig(r=4, lora_alpha=8, target_modules=mods, init_lora_weights="pissa"),
    ),
    "dora-pissa": (
        "dora",
        {"init": "pissa"},
        lambda peft, mods: peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=mods, init_lora_weights="pissa", use_dora=True
        ),
    ),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_equals_hugging_face_peft_and_one_step_moves_both_alike(case):
    """The same model and initial adapter weights in PEFT: same logits, same gradients, same logits after a step."""
    peft = pytest.importorskip("peft")
    kind, settings, peft_config = PEFT_CASES[case]
    model = tiny_model()
    hf = hf_twin(model)
    targets = ["query", "value", "mlp"]
    mods = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    scaling = {} if kind == "hra" else {"alpha": 8.0}
    method, values = build_settings(kind, {"targets": targets, "r": 4, **scaling, **settings})
    method.apply(model, values)
    theirs = peft.get_peft_model(hf, peft_config(peft, mods))
    pairs = matched(model, theirs)
    assert len(pairs) == 5 * model.config.n_layer
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        if case != "hra-gs":  # both start at the model (random Gram-Schmidt'ed reflections do not)
            torch.testing.assert_close(model(idx), theirs(input_ids=idx).logits, rtol=0, atol=1e-5)
        if kind == "dora":  # the same magnitudes at init: the row norms of W
            for layer, i, t in pairs:
                weight = t.lora_magnitude_vector["default"].weight
                torch.testing.assert_close(layer.magnitude[i], weight, rtol=1e-6, atol=0)
        if settings.get("init") == "pissa":  # PEFT's PiSSA: the same residual and the same A, B (one exact SVD)
            for layer, i, t in pairs:
                start = sum(layer.part_sizes[:i])
                rows = layer.rows[start : start + layer.part_sizes[i]]
                torch.testing.assert_close(layer.base.weight[rows], t.base_layer.weight, rtol=0, atol=1e-6)
                torch.testing.assert_close(
                    layer.scaling * layer.lora_B[i] @ layer.lora_A[i * 4 : (i + 1) * 4],
                    t.scaling["default"] * t.lora_B["default"].weight @ t.lora_A["default"].weight,
                    rtol=0,
                    atol=1e-6,
                )
        perturb(model)
        for layer, i, t in pairs:  # the same starting adapter on both sides
            for ours, part, p in peft_tensors(kind, layer, i, t):
                p.copy_(ours[part])
    logits, hf_logits = model(idx), theirs(input_ids=idx).logits
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-5)

    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (model, theirs)]
    for out in (logits, hf_logits):
        F.cross_entropy(out[:, :-1].reshape(-1, out.size(-1)), idx[:, 1:].reshape(-1)).backward()
    for layer, i, t in pairs:
        for ours, part, p in peft_tensors(kind, layer, i, t):
            scale = p.grad.abs().max()
            assert scale > 0
            torch.testing.assert_close(ours.grad[part], p.grad, rtol=1e-4, atol=1e-5 * scale)
    for opt in opts:
        opt.step()
    with torch.no_grad():
        after, hf_after = model(idx), theirs(input_ids=idx).logits
    assert (after - logits).abs().max() > 1e-3  # the step moved the model
    torch.testing.assert_close(after, hf_after, rtol=0, atol=1e-5)


# ---- PiSSA's randomized SVD, rebuilding a saved adapter, the DPO reference ------------------------------------------
def test_pissa_niter_is_reproducible_and_close_to_the_exact_top_r():
    """torch.svd_lowrank with a fixed seed on the CPU: the same A and B whatever the global random state (so a saved
    adapter rebuilds its residual), W unchanged, and s B A near the exact rank-r approximation when S has a gap."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(32, 32))
    s = torch.cat([torch.tensor([9.0, 7.0, 5.0]), 0.1 * torch.rand(29)])
    w = u[:, :32] @ torch.diag(s) @ v.T  # (48, 32), a clear gap after 3 singular values
    built = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = nn.Linear(32, 48, bias=False)
        with torch.no_grad():
            base.weight.copy_(w)
        method, values = build_settings("lora", {"r": 3, "init": "pissa", "pissa_niter": 2})
        built.append(method.make_adapter(base, [Part("all", torch.arange(48))], values))
    first, second = built
    assert torch.equal(first.lora_A, second.lora_A) and torch.equal(first.lora_B[0], second.lora_B[0])
    low_rank = first.scaling * first.lora_B[0].double() @ first.lora_A.double()
    torch.testing.assert_close(first.base.weight.double() + low_rank, w.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(low_rank, top_r(w, 3), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["pissa", "dora-pissa", "hra"])
def test_a_saved_adapter_rebuilds_the_same_model(variant):
    """As load_adapter_into: the base from its checkpoint, the method from the saved settings, then the trained weights
    (for PiSSA the residual is computed again from W: the same, also with pissa_niter)."""
    extra = {"pissa_niter": 1} if "pissa" in variant else {}
    model = tiny_model()
    install(model, variant, targets=["query", "value", "mlp"], **extra)
    perturb(model)
    saved = trainable_state_dict(model)
    again = tiny_model()  # the same base weights
    torch.manual_seed(123)  # another random state than training had
    install(again, variant, targets=["query", "value", "mlp"], **extra)
    assert set(trainable_state_dict(again)) == set(saved)
    again.load_state_dict(saved, strict=False)
    idx = torch.randint(0, 259, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=1e-6)


def test_dpo_reference_with_adapters_off_is_the_original_model_under_pissa():
    from types import SimpleNamespace

    from test_steps import pair_batch

    from lit_peft.tasks.dpo import DPO, reply_logps

    model = tiny_model()
    original = copy.deepcopy(model).eval()
    install(model, "pissa", targets=["query", "value", "mlp"])
    perturb(model)
    batch = pair_batch()
    task = DPO(reference="auto")
    task.attach(SimpleNamespace(model=model, device=torch.device("cpu"), trainer=SimpleNamespace(strategy=None)))
    assert task.mode == "adapters_off"
    with torch.no_grad():
        expected = reply_logps(original(batch["input_ids"]), batch["labels"])[0]
        policy = reply_logps(model(batch["input_ids"]), batch["labels"])[0]
        got = task.reference_logps(model, batch)[0]
    assert (policy - expected).abs().max() > 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-4)


# ---- HRA's orthogonality regulariser through the training step -----------------------------------------------------
def test_hra_regulariser_is_the_formula_and_is_added_once_per_optimizer_step():
    """orth_reg * sum ||I - U^T U||_F (column-normalised u) over adapted matrices; a step of two micro-batches takes
    the gradient of the token-weighted task loss plus the regulariser once, and logs it as train/regularizer."""
    import lightning as L
    from test_steps import one_step, sft_batch

    from lit_peft.tasks import SFT

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

    model = tiny_model()
    install(model, "hra", targets=["query", "value"], orth_reg=0.05)
    perturb(model)
    expected = 0.0
    for _, layer in adapters(model):
        for u in layer.hra_u:
            un = u.detach().double() / u.detach().double().norm(dim=0)
            expected += math.sqrt(((torch.eye(2, dtype=torch.double) - un.T @ un) ** 2).sum().item())
    assert regularization(model).item() == pytest.approx(0.05 * expected, rel=1e-6)
    assert regularization(tiny_model()) is None  # no adapters, no term

    reference = copy.deepcopy(model)
    batches = [sft_batch(3, seed=1), sft_batch(20, seed=2)]
    sums = [
        F.cross_entropy(reference(b["input_ids"])[0, :-1], b["labels"][0, 1:], ignore_index=-100, reduction="sum")
        for b in batches
    ]
    ((sums[0] + sums[1]) / 23 + regularization(reference)).backward()
    capture = Capture()
    trainer = one_step(model, SFT(), batches, callbacks=[capture])
    assert trainer.callback_metrics["train/regularizer"].item() == pytest.approx(0.05 * expected, rel=1e-5)
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(capture.grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


# ---- over a 4-bit base --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dora", "hra"])
def test_over_a_4bit_base_dora_and_hra_equal_the_dequantized_dense_math(variant):
    pytest.importorskip("bitsandbytes")
    from lit_peft.methods.quantize import dequantize_base, quantize_base

    model = tiny_model(n_embd=64, intermediate_size=128)  # widths: multiples of bitsandbytes' 64-wide blocks
    quantize_base(model, "nf4")
    install(model, variant, targets=["query", "value", "mlp"])
    perturb(model)
    dense = copy.deepcopy(model)
    assert dequantize_base(dense) == 2 * 5  # the same adapters over plain Linears holding the dequantized weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in dense.named_parameters():
        p.requires_grad_(name in trainable)
    idx = torch.randint(0, 259, (2, 10))
    results = []
    for net in (model, dense):
        logits = net(idx)
        logits.logsumexp(-1).mean().backward()
        results.append((logits, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}))
    (q_logits, q_grads), (d_logits, d_grads) = results
    torch.testing.assert_close(q_logits, d_logits, rtol=1e-5, atol=1e-5)
    assert q_grads.keys() == d_grads.keys() == trainable
    for name, g in q_grads.items():
        torch.testing.assert_close(g, d_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pissa_over_a_4bit_base_quantizes_the_residual_again():
    """QPiSSA: the SVD of the dequantized weight W_q, the residual W_q - s B A quantized again with the base's own
    settings; the model at init (and with adapters off) is Q(residual) + s B0 A0; merge gives Q(residual) + s B A."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from lit_peft.methods.quantize import dense_weight, is_quantized, quantize_base

    model = tiny_model(n_embd=64, intermediate_size=128)
    quantize_base(model, "nf4-dq")
    qkv = model.transformer.h[0].attn.qkv
    w_q = dense_weight(qkv).detach().clone()
    install(model, "pissa", targets=["query", "value", "mlp"], r=4)
    layer = model.transformer.h[0].attn.qkv
    assert is_quantized(layer.base) and layer.base.weight.quant_type == "nf4"
    assert layer.base.weight.compress_statistics  # double quantization kept
    residual = w_q.double().clone()
    residual[layer.rows] -= layer.scaling * layer.lora_dense()
    packed, state = quantize_4bit(
        residual.float(), blocksize=layer.base.weight.blocksize, quant_type="nf4", compress_statistics=True
    )
    torch.testing.assert_close(layer.base_weight(), dequantize_4bit(packed, state), rtol=0, atol=0)
    requantized = layer.base_weight().double() + 0
    requantized[layer.rows] += layer.scaling * layer.lora_dense()
    err_again = (requantized - w_q.double()).abs().max()  # the residual's quantization error, nothing else
    assert 0 < err_again < (w_q.double() - residual).abs().max()
    idx = torch.randint(0, 259, (2, 10))
    with torch.no_grad():
        at_init = model(idx)
        perturb(model)
        adapted = model(idx)
        with adapters_disabled(model):
            torch.testing.assert_close(model(idx), at_init, rtol=0, atol=1e-5)
        merge_adapters(model)
        torch.testing.assert_close(model(idx), adapted, rtol=1e-5, atol=1e-5)


# ---- settings: one-line errors that name the value and the valid choices ---------------------------------------------
@pytest.mark.parametrize(
    "method, values, message",
    [
        ("lora", {"init": "svd"}, "lora init='svd' is not valid; valid: default, pissa"),
        ("dora", {"r": 0}, "dora r must be a positive integer, got 0"),
        (
            "lora",
            {"init": "pissa", "pissa_niter": -1},
            "pissa_niter must be null (exact SVD) or an integer >= 0, got -1",
        ),
        ("lora", {"pissa_niter": 4}, "pissa_niter=4 needs init=pissa (init=default); set pissa_niter=null"),
        ("hra", {"init": "ortho"}, "hra init='ortho' is not valid; valid: paired, random"),
        (
            "hra",
            {"r": 3},
            "hra init=paired needs an even r (reflections cancel in pairs), got r=3; use an even r or init=random",
        ),
        (
            "hra",
            {"apply_GS": True},
            "hra apply_GS=true needs init=random: paired reflections are parallel, "
            "Gram-Schmidt cannot orthonormalise them",
        ),
        ("hra", {"orth_reg": -1}, "hra orth_reg must be a number >= 0, got -1"),
        (
            "hra",
            {"alpha": 2},
            "unknown setting 'alpha' for this method; valid settings: apply_GS, init, orth_reg, qkv_layout, r, targets",
        ),
    ],
)
def test_bad_settings_are_one_line_errors(method, values, message):
    with pytest.raises(ValueError) as err:
        build_settings(method, values)
    assert str(err.value) == message


def test_pissa_rank_above_a_part_is_a_one_line_error_naming_it():
    method, values = build_settings("lora", {"targets": ["key"], "r": 20, "init": "pissa"})
    with pytest.raises(ValueError) as err:
        method.apply(tiny_model(), values)
    assert str(err.value) == (
        "lora init=pissa needs r <= 16 here: r=20 is more than the rank of key of transformer.h.0.attn.qkv (16 x 32)"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiles_without_graph_breaks_and_runs_under_autocast(variant):
    """torch.compile (aot_eager, fullgraph: a graph break is an error) gives the eager output and gradients; under
    bf16 autocast the adapted Linear returns bfloat16 close to float32, with float32 gradients."""
    kind, settings = VARIANTS[variant]
    config, layer, _ = make_qkv(kind, settings, ("query", "value"), "interleaved")
    perturb(layer)
    x = torch.randn(2, 5, config.n_embd)
    results = []
    torch._dynamo.reset()
    for net in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        layer.zero_grad()
        y = net(x)
        y.pow(2).sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}))
    torch._dynamo.reset()
    (y, grads), (c_y, c_grads) = results
    torch.testing.assert_close(c_y, y, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
        assert low.dtype == layer.base(x).dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), y, rtol=5e-2, atol=5e-2)
    low.float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)
