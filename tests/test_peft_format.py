"""PEFT-format LoRA both ways, checked against PEFT itself; the Hugging Face export keeps tied embeddings tied.

Export: our LoRA (every target, both qkv layouts) -> scripts/export_peft.py -> transformers + PeftModel.from_pretrained
over the HF export gives our adapter model's logits. Import: a LoRA made by peft.get_peft_model on the HF export ->
scripts/import_peft.py -> our adapter gives PeftModel's logits. Settings lit-peft cannot hold are refused in one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from lit_peft.checkpoints.adapter import save_adapter
from lit_peft.checkpoints.files import save_lit_checkpoint
from lit_peft.models.load import install_method, load_adapter_into, load_base, trainable_state_dict

ALL_TARGETS = ["query", "key", "value", "projection", "mlp", "head"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python <script> <args>` in this process (its imports are paid once): status, stdout, stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    sys.argv = [str(ROOT / script), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


@pytest.fixture(scope="module")
def hf_export(tiny_checkpoint, tmp_path_factory):
    from lit_peft.export.hf import export_hf

    return export_hf(tiny_checkpoint, tmp_path_factory.mktemp("hf") / "tiny-hf")


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def lora_adapter(checkpoint, folder, layout="concatenated", targets=ALL_TARGETS):
    """Our LoRA with every weight random and non-zero, saved as finetune/run.py saves it; and the adapted model."""
    model = load_base(checkpoint)
    _, settings = install_method(model, "lora", {"r": 4, "alpha": 6.0, "targets": targets, "qkv_layout": layout})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    meta = {"method": "lora", "settings": settings.to_dict(), "base_checkpoint": str(checkpoint)}
    return save_adapter(folder, trainable_state_dict(model), meta), model.eval()


IDX = torch.randint(0, 259, (2, 14), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_our_lora_exports_to_peft_with_the_same_logits(tiny_checkpoint, hf_export, tmp_path, layout):
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter, model = lora_adapter(tiny_checkpoint, tmp_path / "adapter", layout)
    name = [] if layout == "concatenated" else ["--base-model-name-or-path", "org/tiny"]
    res = cli("scripts/export_peft.py", "--adapter", adapter, "--out", tmp_path / "peft", *name)
    assert res.returncode == 0, res.stderr[-2000:]

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 6.0, 0.0)
    # the flag's, else the base checkpoint's path (the tiny model has no conf/model/ hub id)
    assert config["base_model_name_or_path"] == (name[1] if name else str(tiny_checkpoint.resolve()))
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS)
    keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys and len(keys) == 2 * (7 * 2 + 1)
    if layout == "interleaved":  # a part's rows spread over q/k/v: stacked LoRAs, alpha/rank kept
        assert config["rank_pattern"] and all(
            config["alpha_pattern"][m] / k == 6.0 / 4 for m, k in config["rank_pattern"].items()
        )

    base = hf_model(hf_export)
    with torch.no_grad():
        plain = base(IDX).logits
        peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        ours = model(IDX)
        assert (plain - ours).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(peft(IDX).logits, ours, rtol=0, atol=1e-4)

    # and back, for both layouts: the very same settings and tensors
    res = cli(
        "scripts/import_peft.py", "--adapter", tmp_path / "peft", "--out", tmp_path / "back", "--model", tiny_checkpoint
    )
    assert res.returncode == 0, res.stderr[-2000:]
    original, again = (
        load_file(str(adapter / "adapter.safetensors")),
        load_file(str(tmp_path / "back" / "adapter.safetensors")),
    )
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    settings = json.loads((tmp_path / "back" / "adapter_config.json").read_text())["settings"]
    assert settings == json.loads((adapter / "adapter_config.json").read_text())["settings"]


TARGET_SETS = [
    ALL_TARGETS,
    ["query"],
    ["key"],
    ["value", "key"],
    ["query", "value", "mlp.proj"],
    ["mlp"],
    ["head", "mlp.fc_2", "projection"],
    ["mlp.fc_1", "mlp.fc_2", "mlp.proj"],
]


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["-".join(t) for t in TARGET_SETS])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_every_export_imports_back_as_the_same_adapter(tiny_checkpoint, tmp_path, layout, targets):
    """Export -> import gives back our adapter: the same settings, weights and merged model, for every layout and
    set of targets (an interleaved part reaching several of q/k/v is a stacked LoRA with PEFT's rank_pattern)."""
    from safetensors.torch import load_file

    from lit_peft.export.peft import EXPORT_SETTINGS, export_peft, import_peft
    from lit_peft.methods import merge_adapters

    adapter, model = lora_adapter(tiny_checkpoint, tmp_path / "adapter", layout, targets)
    peft = export_peft(adapter, tmp_path / "peft")
    config = json.loads((peft / "adapter_config.json").read_text())
    exported = load_file(str(peft / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in exported.items() if k.endswith("lora_B.weight"))  # no zero LoRA
    qkv = {"query", "key", "value"} & set(targets)
    assert bool(config["rank_pattern"]) is (layout == "interleaved" and len(qkv) > 1)

    original = load_file(str(adapter / "adapter.safetensors"))
    meta = json.loads((adapter / "adapter_config.json").read_text())
    back = import_peft(peft, tmp_path / "back", tiny_checkpoint)
    again = load_file(str(back / "adapter.safetensors"))
    imported = json.loads((back / "adapter_config.json").read_text())
    assert imported["settings"] == meta["settings"] and imported["imported_from"]["zero_lora"] == []
    assert original.keys() == again.keys()
    for k in original:
        torch.testing.assert_close(again[k], original[k], rtol=0, atol=1e-6)

    reloaded = load_base(tiny_checkpoint).eval()
    load_adapter_into(reloaded, back)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDX), model(IDX), rtol=0, atol=1e-6)
        merge_adapters(reloaded), merge_adapters(model)
    merged, expected = reloaded.state_dict(), model.state_dict()
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)

    # without the settings file our export writes beside it: the same adapter from the PEFT files alone (the layout
    # shows wherever q/k/v are targeted: an interleaved part's rows fall into several of q/k/v_proj on this model)
    (peft / EXPORT_SETTINGS).unlink()
    plain = import_peft(peft, tmp_path / "plain", tiny_checkpoint)
    assert load_file(str(plain / "adapter.safetensors")).keys() == original.keys()
    settings = json.loads((plain / "adapter_config.json").read_text())["settings"]
    assert settings["qkv_layout"] == (layout if qkv else "concatenated")
    assert {**settings, "targets": None, "qkv_layout": None} == {
        **meta["settings"],
        "targets": None,
        "qkv_layout": None,
    }


def peft_adapter(hf_dir, folder, **lora):
    """A LoRA made by PEFT on the HF export, every lora_A/lora_B random, saved by PEFT; and the PeftModel."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model(hf_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(folder))
    return folder, model.eval()


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 16, "target_modules": HF_TARGETS},
        # rsLoRA (alpha / sqrt r), two of q/k/v, one layer only: the other layer's q and v get a zero LoRA
        {
            "r": 2,
            "lora_alpha": 3,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "layers_to_transform": [1],
        },
    ],
    ids=["all", "rslora-some"],
)
def test_a_peft_lora_imports_with_peft_logits(tiny_checkpoint, hf_export, tmp_path, lora):
    from lit_peft.export.merge import merge_checkpoint

    folder, peft = peft_adapter(hf_export, tmp_path / "peft", **lora)
    res = cli("scripts/import_peft.py", "--adapter", folder, "--out", tmp_path / "ours", "--model", tiny_checkpoint)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["settings"]["r"] == lora["r"]
    assert meta["base_checkpoint"] == str(tiny_checkpoint.resolve())

    model = load_base(tiny_checkpoint).eval()
    load_adapter_into(model, tmp_path / "ours")
    with torch.no_grad():
        expected = peft(IDX).logits
        with peft.disable_adapter():
            assert (peft(IDX).logits - expected).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(model(IDX), expected, rtol=0, atol=1e-4)
        if "layers_to_transform" in lora:  # scripts/merge.py reads it too
            merged = merge_checkpoint(tmp_path / "ours", tmp_path / "merged")
            torch.testing.assert_close(load_base(merged)(IDX), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "lora, targets",
    [
        (
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
            ["query", "value", "mlp.proj"],
        ),
        ({"r": 3, "lora_alpha": 5, "target_modules": ["gate_proj", "up_proj", "down_proj"]}, ["mlp"]),
        # a rank_pattern our LoRA holds (every module at r=4, alpha/r kept): PEFT's config r is not the modules' r
        (
            {
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["k_proj", "o_proj", "up_proj"],
                "rank_pattern": {"k_proj": 4, "o_proj": 4, "up_proj": 4},
                "alpha_pattern": {"k_proj": 8, "o_proj": 8, "up_proj": 8},
            },
            ["key", "projection", "mlp.fc_2"],
        ),
    ],
    ids=["q-v-down", "mlp", "rank-pattern"],
)
def test_an_import_holds_exactly_the_modules_of_the_peft_adapter(tiny_checkpoint, hf_export, tmp_path, lora, targets):
    """No widening to whole kinds: PEFT's trainable parameter count, and a re-export writes exactly PEFT's tensors."""
    from safetensors.torch import load_file

    from lit_peft.export.peft import export_peft, import_peft

    folder, peft = peft_adapter(hf_export, tmp_path / "peft", **lora)
    ours = import_peft(folder, tmp_path / "ours", tiny_checkpoint)
    settings = json.loads((ours / "adapter_config.json").read_text())["settings"]
    assert settings["targets"] == targets and settings["r"] == max([lora["r"], *lora.get("rank_pattern", {}).values()])
    assert settings["alpha"] / settings["r"] == lora["lora_alpha"] / lora["r"]
    model = load_base(tiny_checkpoint).eval()
    load_adapter_into(model, ours)
    trainable, _ = peft.get_nb_trainable_parameters()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(v.numel() for v in load_file(str(ours / "adapter.safetensors")).values()) == trainable
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), peft(IDX).logits, rtol=0, atol=1e-4)

    again = export_peft(ours, tmp_path / "again")
    original = load_file(str(folder / "adapter_model.safetensors"))
    exported = load_file(str(again / "adapter_model.safetensors"))
    assert exported.keys() == original.keys()
    for k in original:
        torch.testing.assert_close(exported[k], original[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad input


def test_only_lora_exports_and_a_missing_adapter_is_named(tiny_checkpoint, tmp_path):
    model = load_base(tiny_checkpoint)
    _, settings = install_method(model, "oft", {"nb": 4})
    meta = {"method": "oft", "settings": settings.to_dict(), "base_checkpoint": str(tiny_checkpoint)}
    oft = save_adapter(tmp_path / "oft", trainable_state_dict(model), meta)
    one_line_error(
        cli("scripts/export_peft.py", "--adapter", oft, "--out", tmp_path / "o"), "method=oft", "scripts/merge.py"
    )
    one_line_error(
        cli("scripts/export_peft.py", "--adapter", tmp_path / "none", "--out", tmp_path / "o"), "no adapter at"
    )
    assert not (tmp_path / "o").exists()


def test_peft_settings_we_cannot_hold_are_refused(tiny_checkpoint, hf_export, tmp_path):
    from safetensors.torch import load_file, save_file

    good, _ = peft_adapter(hf_export, tmp_path / "good", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])

    def edited(name, **changes):
        folder = shutil.copytree(good, tmp_path / name)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    def refused(adapter, *fragments, model=tiny_checkpoint):
        out = tmp_path / "out"
        one_line_error(cli("scripts/import_peft.py", "--adapter", adapter, "--out", out, "--model", model), *fragments)
        assert not out.exists()

    refused(edited("dora", use_dora=True), "use_dora=True", "valid: use_dora=False")
    refused(edited("bias", bias="all"), "bias='all'", "valid: bias='none'")
    refused(edited("save", modules_to_save=["lm_head"]), "modules_to_save=['lm_head']")
    refused(edited("ia3", peft_type="IA3"), "peft_type 'IA3'", "valid: LORA")
    refused(edited("pissa", init_lora_weights="pissa"), "init_lora_weights='pissa'")
    copied = edited("copied")
    weights = load_file(str(copied / "adapter_model.safetensors"))
    save_file(
        {**weights, "base_model.model.lm_head.base_layer.weight": torch.randn(320, 32)},
        str(copied / "adapter_model.safetensors"),
    )
    refused(copied, "carries its own lm_head.weight")
    ranks, _ = peft_adapter(
        hf_export, tmp_path / "ranks", r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}
    )
    refused(ranks, "different r per module", "r=2", "r=4")
    # without --model, base_model_name_or_path must name a LitGPT checkpoint (here it is the HF export)
    res = cli("scripts/import_peft.py", "--adapter", good, "--out", tmp_path / "out")
    one_line_error(res, f"base_model_name_or_path {str(hf_export)!r} is not a LitGPT checkpoint", "--model")
    named = edited("named", base_model_name_or_path=str(tiny_checkpoint))
    res = cli("scripts/import_peft.py", "--adapter", named, "--out", tmp_path / "named-ours")
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "named-ours" / "adapter_config.json").read_text())
    assert meta["base_checkpoint"] == str(tiny_checkpoint.resolve())
    refused(tmp_path / "missing", "no PEFT adapter at")
    refused(good, "--model", "no such checkpoint folder", model=tmp_path / "nowhere")
    (good / "adapter_model.safetensors").unlink()
    refused(good, "no PEFT adapter weights", "adapter_model.safetensors")


# ------------------------------------------------------------------------- Hugging Face export: tied embeddings


def test_tied_embeddings_export_tied_and_untied_stay_untied(tiny_checkpoint, hf_export, tmp_path):
    import os

    from safetensors import safe_open

    from lit_peft.export.hf import export_hf

    state = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # two equal copies, as LitGPT keeps SmolLM2's
    tied_ckpt = save_lit_checkpoint(tmp_path / "tied", state, tiny_checkpoint)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        tied = export_hf(tied_ckpt, tmp_path / "tied-hf")
    assert stdout.getvalue() == ""  # nothing printed on the way

    head = state["lm_head.weight"]
    unique = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
    for folder, is_tied in ((tied, True), (hf_export, False)):
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is is_tied
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            assert ("lm_head.weight" in keys) is not is_tied
            stored = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
        assert stored == unique + (0 if is_tied else head.numel())
    assert hf_model(tied).num_parameters() == unique
    size = os.path.getsize(tied / "model.safetensors")
    assert 4 * unique < size < 4 * unique + 4096  # float32 tensors once, plus the header
    assert os.path.getsize(hf_export / "model.safetensors") - size > 4 * head.numel() - 512
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tied)(IDX).logits, load_base(tied_ckpt)(IDX), rtol=1e-5, atol=1e-5)
