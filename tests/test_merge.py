"""scripts/merge.py for every registered method: merged checkpoint = adapter model; plain LitGPT; no double merge."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import run_cli
from litgpt import GPT, Config

from lit_peft.checkpoints.adapter import save_adapter
from lit_peft.checkpoints.files import CHECKPOINT_FILES
from lit_peft.methods import METHODS
from lit_peft.models.load import install_method, load_adapter_into, load_base, trainable_state_dict

ADAPTER_METHODS = sorted(set(METHODS) - {"full"})


def trained_adapter(tiny_checkpoint, tmp_path, method: str):
    """An adapter whose every parameter is away from its initial value, saved as finetune/run.py saves it."""
    model = load_base(tiny_checkpoint)
    values = {
        "targets": ["query", "key", "value", "projection", "mlp", "head"],
        **({"nb": 4} if "nb" in METHODS[method].Settings.__dataclass_fields__ else {}),  # ETHER/OFT: 4 blocks
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


# ---------------------------------------------------------------- dtype and prompt format of the merged model


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint stored in bfloat16 (as a bf16 download or a bf16-true full run writes it)."""
    from lit_peft.checkpoints.files import save_lit_checkpoint

    state = torch.load(tiny_checkpoint / "lit_model.pth", weights_only=True)
    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    return save_lit_checkpoint(out, {k: v.bfloat16() for k, v in state.items()}, tiny_checkpoint)


def sft_adapter(checkpoint, folder, **meta_overrides):
    """A LoRA adapter as finetune/run.py writes it before system_prompt was recorded at the top level: the system
    prompt is only in the resolved training config."""
    model = load_base(checkpoint)
    _, settings = install_method(model, "lora", {"r": 4, "targets": ["query", "value", "mlp"]})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    meta = {
        "method": "lora",
        "settings": settings.to_dict(),
        "base_checkpoint": str(checkpoint),
        "template": "chatml",
        "config": {"precision": "32-true", "model": {"system_prompt": "Be brief."}, "data": {"format": "alpaca"}},
        **meta_overrides,
    }
    return save_adapter(folder, trainable_state_dict(model), meta)


def test_merging_a_bf16_checkpoint_keeps_bf16_unless_dtype_says_otherwise(bf16_checkpoint, tmp_path):
    from lit_peft.inference.load import load_for_inference

    adapter = sft_adapter(bf16_checkpoint, tmp_path / "adapter")
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"dtype: bfloat16 (stored in {bf16_checkpoint / 'lit_model.pth'})" in res.stdout
    state = torch.load(out / "lit_model.pth", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    record = json.loads((out / "lit_peft_merge.json").read_text())
    assert record["dtype"] == "bfloat16"
    # The merged model computes what base + adapter computes in the same dtype (one bf16 rounding of each weight).
    adapted, _, _ = load_for_inference(None, adapter, bf16_checkpoint)
    assert next(adapted.parameters()).dtype == torch.bfloat16
    plain = GPT(Config.from_file(out / "model_config.yaml"))
    plain.load_state_dict(state)
    plain = plain.to(torch.bfloat16).eval()
    idx = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        diff = (plain(idx).float() - adapted(idx).float()).abs().max()
        base = load_base(bf16_checkpoint, dtype="auto").eval()
        assert (base(idx).float() - adapted(idx).float()).abs().max() > 20 * diff  # the adapter matters

    out32 = tmp_path / "merged32"
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out32), "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dtype: float32 (--dtype float32)" in res.stdout
    state32 = torch.load(out32 / "lit_model.pth", weights_only=True)
    assert {v.dtype for v in state32.values()} == {torch.float32}
    assert json.loads((out32 / "lit_peft_merge.json").read_text())["dtype"] == "float32"
    size, size32 = (out / "lit_model.pth").stat().st_size, (out32 / "lit_model.pth").stat().st_size
    assert size < 0.6 * size32
    merged_keys = [k for k in state if "attn.qkv" in k or "mlp" in k]
    for k in merged_keys:  # the same merge, in float32: the adapter's delta is not rounded away
        torch.testing.assert_close(state32[k].bfloat16(), state[k], rtol=1e-2, atol=1e-2)
    assert any(not torch.equal(state32[k], state32[k].bfloat16().float()) for k in merged_keys)


def test_bad_dtype_is_a_one_line_error_and_writes_nothing(bf16_checkpoint, tmp_path):
    adapter = sft_adapter(bf16_checkpoint, tmp_path / "adapter")
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp8")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unknown --dtype 'fp8'; valid: auto, float32, bfloat16, float16"
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out), "--template", "chatgpt")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: unknown template 'chatgpt'; valid templates:")
    assert not out.exists()


def test_merged_record_carries_the_adapters_template_and_system_prompt(tiny_checkpoint, tmp_path):
    adapter = sft_adapter(tiny_checkpoint, tmp_path / "adapter")
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((tmp_path / "m" / "lit_peft_merge.json").read_text())
    assert (record["template"], record["system_prompt"], record["instruction_tuned"]) == ("chatml", "Be brief.", True)
    assert f"prompt format: template chatml, system prompt 'Be brief.' (adapter {adapter})" in res.stdout
    assert record["dtype"] == "float32"  # a float32 base stays float32

    # Flags override what the adapter recorded; --system '' records no system turn.
    res = run_cli(
        "scripts/merge.py", "--adapter", str(adapter), "--out", str(tmp_path / "m2"), "--template", "zephyr",
        "--system", "",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((tmp_path / "m2" / "lit_peft_merge.json").read_text())
    assert (record["template"], record["system_prompt"]) == ("zephyr", None)
    assert "template zephyr (flag --template), no system prompt (flag --system)" in res.stdout

    # A top-level system_prompt (what training writes now) wins over the config's.
    newer = sft_adapter(tiny_checkpoint, tmp_path / "newer", system_prompt="Answer in French.")
    res = run_cli("scripts/merge.py", "--adapter", str(newer), "--out", str(tmp_path / "m3"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "m3" / "lit_peft_merge.json").read_text())["system_prompt"] == "Answer in French."


def test_a_4bit_adapter_computes_and_merges_in_its_training_precision(tmp_path):
    from conftest import TINY

    from lit_peft.checkpoints.hub import create_tiny_checkpoint
    from lit_peft.inference.load import load_for_inference
    from lit_peft.methods.quantize import is_quantized

    ckpt = create_tiny_checkpoint(tmp_path / "tiny64", {**TINY, "n_embd": 64, "intermediate_size": 128})
    model = load_base(ckpt)
    _, settings = install_method(model, "lora", {"targets": ["query", "value"]}, quantize="nf4", compute_dtype=None)
    meta = {
        "method": "lora",
        "settings": settings.to_dict(),
        "quantize": "nf4",
        "base_checkpoint": str(ckpt),
        "config": {"precision": "bf16-true"},
    }
    adapter = save_adapter(tmp_path / "adapter", trainable_state_dict(model), meta)
    loaded, _, _ = load_for_inference(None, adapter, ckpt)
    quantized = [m for m in loaded.modules() if is_quantized(m)]
    assert quantized and {m.compute_dtype for m in quantized} == {torch.bfloat16}
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.float32}  # as in training
    loaded32, _, _ = load_for_inference(None, adapter, ckpt, dtype="float32")
    assert {m.compute_dtype for m in loaded32.modules() if is_quantized(m)} == {torch.float32}

    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dtype: bfloat16 (the 4-bit adapter's training precision bf16-true)" in res.stdout
    state = torch.load(tmp_path / "merged" / "lit_model.pth", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


def test_overwrite_swaps_in_a_whole_merged_folder_with_its_record(tiny_checkpoint, tmp_path, monkeypatch):
    """--overwrite replaces an earlier merge only once the new one (weights and lit_peft_merge.json) is complete,
    in one rename, and leaves no hidden folder behind."""
    from lit_peft.checkpoints import files as io
    from lit_peft.export.merge import merge_checkpoint

    adapter, _ = trained_adapter(tiny_checkpoint, tmp_path, "lora")
    out = tmp_path / "merged"
    merge_checkpoint(adapter, out)
    (out / "from-the-first-merge.txt").write_text("x")
    staged = []
    real = io.publish
    monkeypatch.setattr(
        io, "publish", lambda s, p, replace=True: staged.append(sorted(os.listdir(s))) or real(s, p, replace)
    )
    with pytest.raises(ValueError, match="already exists; pick a new folder or pass --overwrite"):
        merge_checkpoint(adapter, out)
    merge_checkpoint(adapter, out, overwrite=True)
    assert len(staged) == 1 and {"lit_model.pth", "lit_peft_merge.json", "model_config.yaml"} <= set(staged[0])
    assert not (out / "from-the-first-merge.txt").exists() and (out / "lit_peft_merge.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


# ---------------------------------------------------------------- what of the base folder the merged folder holds


def test_merged_folder_holds_only_the_checkpoint_files_never_a_linked_secret(tiny_checkpoint, tmp_path):
    """A merged folder is meant to be shared: of the base it takes the known checkpoint files (config, tokenizer,
    records) and nothing else: not a symlink to a secret outside, not a .env, not a stray file."""
    base = tmp_path / "ckpts" / "tiny-random"
    shutil.copytree(tiny_checkpoint, base)
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_text("TOKEN=hunter2\n")
    (base / "notes.txt").symlink_to(os.path.relpath(secret, base))
    (base / ".env").write_text("API_KEY=hunter2\n")
    (base / "stray.txt").write_text("a file nobody meant to share\n")
    (base / "notes-dir").mkdir()
    adapter, _ = trained_adapter(base, tmp_path, "lora")
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    copied = {p.name for p in base.iterdir() if p.name in CHECKPOINT_FILES}
    assert copied >= {"model_config.yaml", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} == copied | {"lit_model.pth", "lit_peft_merge.json"}
    assert not any(p.is_symlink() for p in out.iterdir())
    assert not any(b"hunter2" in p.read_bytes() for p in out.iterdir())
    # the merged model still loads and chats
    res = run_cli(
        "chat/base.py", "--checkpoint-dir", str(out), "--temperature", "0", "--max-new-tokens", "4", stdin="hi\n"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout.splitlines()) == 1


def test_a_base_whose_checkpoint_file_is_a_link_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    """A known file that is a symbolic link (wherever it points) is never followed: one line, nothing written,
    before the model is loaded."""
    base = tmp_path / "ckpts" / "tiny-random"
    shutil.copytree(tiny_checkpoint, base)
    elsewhere = tmp_path / "outside" / "tokenizer_config.json"
    elsewhere.parent.mkdir()
    shutil.move(base / "tokenizer_config.json", elsewhere)
    (base / "tokenizer_config.json").symlink_to(elsewhere)
    adapter, _ = trained_adapter(base, tmp_path, "lora")
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(adapter), "--out", str(out))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: {base / 'tokenizer_config.json'} is a symbolic link (to {elsewhere});")
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


# ---------------------------------------------------------------- a hand-edited adapter_config.json, named in one line


def _edit_meta(adapter, edit):
    path = adapter / "adapter_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))
    return path


def _drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _settings(**changes):
    return lambda m: {**m, "settings": {**m["settings"], **changes}}


VALID_METHODS = ", ".join(sorted(METHODS))
BAD_ADAPTER_CONFIGS = {
    "a-list": (lambda m: [m], "holds a list, not a JSON object"),
    "a-string": (lambda m: "lora", "holds a string, not a JSON object"),
    "no-method": (_drop("method"), f'has no "method"; valid methods: {VALID_METHODS}'),
    "unknown-method": (lambda m: {**m, "method": "loraa"}, f'unknown method "loraa"; valid methods: {VALID_METHODS}'),
    "method-not-a-string": (lambda m: {**m, "method": ["lora"]}, 'unknown method ["lora"]; valid methods:'),
    "no-settings": (_drop("settings"), "'settings' is missing; expected an object of method lora's settings"),
    "settings-a-list": (lambda m: {**m, "settings": [8]}, "'settings' is [8] (a list); expected an object"),
    "r-a-string": (_settings(r="8"), 'settings.r="8" is not valid for method lora; expected an integer'),
    "alpha-a-string": (_settings(alpha="16"), 'settings.alpha="16" is not valid for method lora; expected a number'),
    "targets-a-string": (
        _settings(targets="query"),
        'settings.targets="query" is not valid for method lora; expected a',
    ),
    "unknown-setting": (_settings(rank=8), "unknown setting 'rank' for this method; valid settings:"),
    "bad-value": (_settings(r=0), "lora r must be a positive integer, got 0"),
    "base-not-a-path": (lambda m: {**m, "base_checkpoint": 5}, "'base_checkpoint' is 5; expected a folder path"),
    "config-a-list": (lambda m: {**m, "config": []}, "'config' is []; expected an object"),
}


@pytest.fixture
def lora_adapter(tiny_checkpoint, tmp_path):
    return trained_adapter(tiny_checkpoint, tmp_path, "lora")[0]


@pytest.mark.parametrize("case", sorted(BAD_ADAPTER_CONFIGS))
def test_a_hand_edited_adapter_config_is_one_line_naming_it_and_nothing_is_merged(lora_adapter, tmp_path, case):
    edit, message = BAD_ADAPTER_CONFIGS[case]
    path = _edit_meta(lora_adapter, edit)
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(lora_adapter), "--out", str(out))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(f"error: {path}") and message in res.stderr, res.stderr
    assert not out.exists() and not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_an_adapter_without_its_weights_is_one_line_naming_it(lora_adapter, tmp_path):
    (lora_adapter / "adapter.safetensors").unlink()
    out = tmp_path / "merged"
    res = run_cli("scripts/merge.py", "--adapter", str(lora_adapter), "--out", str(out))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    expected = f"{lora_adapter / 'adapter.safetensors'} is missing"
    assert res.stderr.startswith(f"error: {lora_adapter / 'adapter_config.json'}: ") and expected in res.stderr
    assert not out.exists()
