"""4-bit bases, gradient checkpointing, and the same run under DDP (CPU, gloo) as in one process."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, run_cli, tiny_config
from litgpt import GPT, Config
from safetensors.torch import load_file
from test_run import TINY_RUN, scalars

from lit_peft.methods import METHODS, adapters, build_settings
from lit_peft.methods.quantize import dense_weight, quantize_base
from lit_peft.models.load import enable_gradient_checkpointing, install_method, load_adapter_into, load_base

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)  # the NF4 data type of the QLoRA paper


def wide_tiny_model(seed: int = 0) -> GPT:
    """A tiny model whose widths are multiples of bitsandbytes' 64-wide quantization blocks."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(n_embd=64, intermediate_size=128))
    model.apply(model._init_weights)
    return model


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq"])
def test_nf4_base_is_the_fp32_base_within_nf4_error(mode):
    model = wide_tiny_model()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantize_base(model, mode) == 2 * 5  # per block: qkv, attn.proj, fc_1, fc_2, mlp.proj
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        w, q = originals[name], dense_weight(module)
        blocks_w, blocks_q = w.reshape(-1, 64), q.reshape(-1, 64)  # 64-element quantization blocks
        absmax = blocks_w.abs().amax(1, keepdim=True)
        # nf4 rounds w/absmax to the nearest code: error <= half the widest gap between codes, times absmax.
        # Double quantization stores absmax itself in 8 bits: up to 1% of absmax more (|code| <= 1).
        bound = absmax * (NF4_CODE.diff().max() / 2 * 1.0001 + (0.01 if mode.endswith("dq") else 0.0)) + 1e-7
        assert ((blocks_q - blocks_w).abs() <= bound).all(), name
        assert (blocks_q - blocks_w).abs().max() > 0  # it really is quantized
    assert "lm_head" not in {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def quantized_adapter_model(method: str, mode: str = "nf4-dq"):
    model = wide_tiny_model()
    import dataclasses

    blocks = "nb" in {f.name for f in dataclasses.fields(METHODS[method].Settings)}  # ETHER/OFT: 4 blocks per Linear
    values = {"targets": ["query", "key", "value", "projection", "mlp"], **({"nb": 4} if blocks else {})}
    install_method(model, method, values, quantize=mode)
    return model


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"full"}))
def test_every_adapter_method_trains_over_a_4bit_base(method):
    model = quantized_adapter_model(method)
    assert all(type(layer.base).__name__ == "Linear4bit" for _, layer in adapters(model))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 259, (2, 10))
    for _ in range(2):
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed == trainable  # the 4-bit weights and their quantization state never move


def test_qlora_merge_gives_a_dequantized_checkpoint_with_the_adapter_outputs(tmp_path):
    from lit_peft.checkpoints.adapter import save_adapter
    from lit_peft.checkpoints.hub import create_tiny_checkpoint
    from lit_peft.models.load import trainable_state_dict

    ckpt = create_tiny_checkpoint(tmp_path / "tiny64", {**TINY, "n_embd": 64, "intermediate_size": 128})
    model = load_base(ckpt)
    _, settings = install_method(model, "lora", {"targets": ["query", "value", "mlp"]}, quantize="nf4-dq")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    meta = {"method": "lora", "settings": settings.to_dict(), "quantize": "nf4-dq", "base_checkpoint": str(ckpt)}
    adapter = save_adapter(tmp_path / "adapter", trainable_state_dict(model), meta)
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr[-2000:]
    merged = GPT(Config.from_file(tmp_path / "merged" / "model_config.yaml"))
    state = torch.load(tmp_path / "merged" / "lit_model.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())  # dense, dequantized
    merged.load_state_dict(state)
    idx = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        assert (merged(idx) - model(idx)).abs().max() <= 1e-5
        reloaded = load_base(ckpt)  # the saved adapter rebuilds the same quantized model
        load_adapter_into(reloaded, adapter)
        assert torch.equal(reloaded(idx), model(idx))


def test_quantize_is_refused_for_full_and_unknown_modes():
    with pytest.raises(ValueError, match="quantize=nf4 needs an adapter method: method=full"):
        install_method(wide_tiny_model(), "full", {}, quantize="nf4")
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'; valid: nf4, nf4-dq, fp4, fp4-dq or null"):
        install_method(wide_tiny_model(), "lora", {}, quantize="int3")


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = wide_tiny_model()
        method, settings = build_settings("etherplusHH", {"targets": ["query", "value", "mlp"], "nb": 2})
        method.apply(model, settings)
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(3)
        idx = torch.randint(0, 259, (2, 10))
        model(idx).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


DDP_RUN = [
    *TINY_RUN,
    "data.synthetic.num_examples=40",
    "data.val_size=8",
    "trainer.max_steps=3",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.accelerator=cpu",
    "data.shuffle=false",
    "method=lora",
    "method.dropout=0.0",
    "method.targets=[query,value,mlp]",
]

# Adapters train in float32 in every precision; bf16 activations round differently when the micro-batches differ.
DDP_TOLERANCE = {"32-true": (1e-4, 1e-6), "bf16-mixed": (2e-2, 1e-3), "bf16-true": (2e-2, 1e-3)}


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_ddp_on_two_cpu_processes_matches_one_process(tiny_checkpoint, tmp_path, precision):
    """Same global batch of examples with different target counts: 1 process x 2 micro-batches of 2 vs 2 gloo ranks x
    1 micro-batch of 2. The step's loss is the mean over the global batch's target tokens, so they train alike."""
    outs = {}
    for name, extra in (("single", []), ("ddp", ["strategy=ddp", "trainer.devices=2"])):
        out = tmp_path / name
        res = run_cli(
            "finetune/run.py",
            *DDP_RUN,
            f"model.checkpoint_dir={tiny_checkpoint}",
            f"out_dir={out}",
            f"precision={precision}",
            *extra,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        outs[name] = out
    meta = json.loads((outs["ddp"] / "adapter" / "adapter_config.json").read_text())
    assert len(meta["rank_digests"]) == 2 and len(set(meta["rank_digests"])) == 1  # both ranks hold the same weights
    single = load_file(str(outs["single"] / "adapter" / "adapter.safetensors"))
    ddp = load_file(str(outs["ddp"] / "adapter" / "adapter.safetensors"))
    assert single.keys() == ddp.keys()
    rtol, atol = DDP_TOLERANCE[precision]
    for k in single:
        assert single[k].dtype == ddp[k].dtype == torch.float32
        torch.testing.assert_close(ddp[k], single[k], rtol=rtol, atol=atol)
    assert any((single[k].abs() > 0).any() for k in single if "lora_B" in k)  # it trained
    losses = {name: [v for _, v in scalars(out)["train/loss"]] for name, out in outs.items()}
    assert len(losses["single"]) == 3
    torch.testing.assert_close(torch.tensor(losses["ddp"]), torch.tensor(losses["single"]), rtol=rtol, atol=atol)
    if precision != "32-true":
        return
    # The DDP checkpoint resumes in a single process.
    res = run_cli(
        "finetune/run.py",
        *DDP_RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={outs['ddp']}",
        "trainer.max_steps=4",
        "resume=true",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(outs["ddp"] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_on_gpu(tiny_checkpoint, tmp_path, strategy):
    """On GPUs (NCCL); tests/test_fsdp.py runs the same FSDP path on 2 CPU processes (gloo)."""
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA device (DeepSpeed does not run on CPU; FSDP's CPU runs are in test_fsdp.py)")
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    out = tmp_path / strategy
    res = run_cli(
        "finetune/run.py",
        *TINY_RUN,
        "data.synthetic.num_examples=48",
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={out}",
        f"strategy={strategy}",
        "trainer.accelerator=gpu",
        f"trainer.devices={min(2, torch.cuda.device_count())}",
        "precision=bf16-mixed",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("name", ["auto", "ddp", "fsdp", "deepspeed", "deepspeed3"])
def test_every_strategy_config_builds_its_lightning_strategy(name):
    from conftest import ROOT
    from omegaconf import OmegaConf

    from lit_peft.training.train import build_strategy

    cfg = OmegaConf.load(ROOT / "lit_peft" / "conf" / "strategy" / f"{name}.yaml")
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    strategy = build_strategy(cfg)
    if name == "auto":
        assert strategy == "auto"
        return
    expected = {"ddp": "DDPStrategy", "fsdp": "PeftFSDPStrategy"}.get(name, "DeepSpeedStrategy")
    assert type(strategy).__name__ == expected
    if name == "fsdp":
        from litgpt.model import Block

        assert strategy.wrap_classes == (Block,) and strategy.state_dict_type == "full"


@pytest.mark.parametrize("precision, method", [("bf16-true", "lora"), ("bf16-mixed", "qlora"), ("bf16-true", "ether")])
def test_half_precision_runs_keep_float32_adapters(tiny_checkpoint, tmp_path, precision, method):
    out = tmp_path / "run"
    extra = ["method.nb=4"] if method == "ether" else []
    res = run_cli(
        "finetune/run.py",
        *TINY_RUN,
        "data.synthetic.num_examples=48",
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={out}",
        f"precision={precision}",
        f"method={method}",
        *extra,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    weights = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["precision"] == precision and meta["quantize"] == ("nf4-dq" if method == "qlora" else None)
