"""The model families of conf/model's presets on tiny random configs derived from litgpt's own: Llama 3, Qwen2.5
(q/k/v biases), Gemma, Gemma 2, Phi-3 and Mistral. Every adapter method lands on the q, k and v rows the family's
attention reads, merging keeps the logits, the Hugging Face export loads in transformers with LitGPT's logits and
converts back through the hub path, and each chat template renders two turns exactly as written out here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from litgpt import GPT, Config
from litgpt.utils import save_config

from lit_peft.data.templates import LLAMA3_DATE, get_template, guess_template
from lit_peft.methods import adapters, build_settings, merge_adapters
from lit_peft.methods.lora import LoRALinear

# family -> (litgpt config name, overrides of the tiny shape). The tiny shape keeps everything else of the real
# config: rope base and Llama 3's rope adjustments, norm eps, Qwen's q/k/v biases, Gemma's embedding scaling and norm
# offset, Gemma 2's extra norms and softcapping, Phi-3's sliding window.
FAMILIES = {
    "llama3": ("Llama-3.2-1B-Instruct", {}),
    "qwen2.5": ("Qwen2.5-0.5B-Instruct", {}),
    "gemma": ("Gemma-2b", {"n_query_groups": 1}),  # multi-query attention, as the real one
    # Gemma 2 alternates sliding and global layers; a window of 4 and another attention scale make both count here.
    "gemma-2": (
        "Gemma-2-2b-it",
        {"sliding_window_size": 4, "sliding_window_indices": [1, 0], "attention_scores_scalar": 24},
    ),
    "phi-3": ("Phi-3-mini-4k-instruct", {"n_query_groups": 4, "sliding_window_size": 5}),  # MHA, as the real one
    "mistral": ("Mistral-7B-Instruct-v0.3", {}),
}
TINY_SHAPE = dict(
    n_layer=2,
    n_embd=64,
    n_head=4,
    n_query_groups=2,
    head_size=16,
    intermediate_size=96,
    vocab_size=128,
    padded_vocab_size=128,
    block_size=64,
)
METHODS = {
    "lora": {"r": 2, "alpha": 4.0},
    "oft": {"nb": 4},
    "ether": {"nb": 4},
    "etherplus": {"nb": 4},
    "etherplusHH": {"nb": 4},
}
ALL_TARGETS = ["query", "key", "value", "projection", "mlp", "head"]


def tiny(family: str) -> Config:
    name, overrides = FAMILIES[family]
    return Config.from_name(name, **{**TINY_SHAPE, **overrides})


def random_model(config: Config, seed: int = 0) -> GPT:
    """Weights of unit-scale activations: attention far from uniform, norms and biases away from their init, so
    every feature of the family changes the logits by much more than the tolerances below."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or "ln_f" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def qkv_rows(config: Config) -> dict[str, list[int]]:
    """Rows of q, k and v in LitGPT's fused qkv weight as its attention splits them: [q heads | k heads | v heads]."""
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    return {"query": list(range(q)), "key": list(range(q, q + kv)), "value": list(range(q + kv, q + 2 * kv))}


def part_definition(layer, i: int, w: torch.Tensor, b: torch.Tensor | None):
    """Part i's adapted (weight, bias) from the method's definition on that part's own matrix W_p:
    LoRA W_p + (alpha/r) B_p A_p; the multiplicative methods T_out W_p T_in (and T_out b_p)."""
    w = w.double()
    b = b.double() if b is not None else None
    if isinstance(layer, LoRALinear):
        a = layer.lora_A[i * layer.r : (i + 1) * layer.r].double()
        return w + layer.scaling * layer.lora_B[i].double() @ a, b
    if layer.t_in is not None:
        w = w @ layer.t_in[i].dense().double()
    if layer.t_out is not None:
        t = layer.t_out[i].dense().double()
        w, b = t @ w, (t @ b if b is not None else None)
    return w, b


def adapted_model(family: str, method: str, targets=ALL_TARGETS) -> GPT:
    model = random_model(tiny(family))
    m, settings = build_settings(method, {**METHODS[method], "targets": targets})
    m.apply(model, settings)
    torch.manual_seed(1)
    with torch.no_grad():  # every adapter away from the identity (LoRA's B starts at zero, ETHER+'s H at I)
        for _, layer in adapters(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_methods_adapt_the_right_qkv_rows_and_merge_to_the_same_logits(family, method):
    model = adapted_model(family, method)
    config = model.config
    rows = qkv_rows(config)
    x = torch.randn(2, 5, config.n_embd)
    for layer_index, block in enumerate(model.transformer.h):
        layer = block.attn.qkv
        assert layer.part_names == ["query", "key", "value"], f"layer {layer_index}"
        w, b = layer.base.weight.detach(), layer.base.bias
        assert (b is not None) == config.attn_bias  # Qwen2.5's q/k/v bias is there, and only there
        with torch.no_grad():
            y = layer(x).double()
        merged_w, merged_b = layer.merged_parameters()
        for i, part in enumerate(("query", "key", "value")):
            idx = torch.tensor(rows[part])
            w_p, b_p = part_definition(layer, i, w[idx], None if b is None else b.detach()[idx])
            assert not torch.allclose(w_p, w[idx].double(), atol=1e-3)  # the part is adapted
            expected = x.double() @ w_p.T + (b_p if b_p is not None else 0)
            torch.testing.assert_close(y[..., idx], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(merged_w[idx], w_p, rtol=1e-10, atol=1e-10)
            if b is not None:
                torch.testing.assert_close(merged_b[idx].double(), b_p, rtol=1e-10, atol=1e-10)
                if getattr(layer, "t_out", None) is None:  # LoRA and input-side transforms keep the bias itself
                    assert torch.equal(merged_b[idx].float(), b.detach()[idx])
    idx = torch.randint(0, config.padded_vocab_size, (2, 12))
    with torch.no_grad():
        adapted = model(idx)
        assert merge_adapters(model) == config.n_layer * 5 + 1  # qkv, proj, 3 MLP Linears per layer; the head
        plain = GPT(config).eval()
        plain.load_state_dict(model.state_dict())  # a plain LitGPT checkpoint of this family: same keys, same shapes
        torch.testing.assert_close(plain(idx), adapted, rtol=1e-4, atol=1e-4)  # fp32: merged in float64, rounded
    assert config.attn_bias == ("transformer.h.0.attn.qkv.bias" in plain.state_dict())


def test_tiny_configs_keep_what_makes_each_family():
    q = tiny("qwen2.5")
    assert q.attn_bias and not q.bias
    l3 = tiny("llama3")
    assert l3.rope_adjustments["factor"] == 32.0 and l3.rope_base == 500000
    g = tiny("gemma")
    assert g.scale_embeddings and g.mlp_class_name == "GemmaMLP" and not g.post_attention_norm
    g2 = tiny("gemma-2")
    assert g2.post_attention_norm and g2.post_mlp_norm and g2.attention_logit_softcapping == 50.0
    assert g2.final_logit_softcapping == 30.0 and g2.sliding_window_indices == [1, 0]
    p = tiny("phi-3")
    assert p.name.startswith("Phi-3") and p.sliding_window_indices == [1, 1] and p.n_query_groups == p.n_head


def write_checkpoint(model: GPT, folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "lit_model.pth")
    save_config(model.config, folder)
    return folder


HF_ARCHITECTURES = {
    "llama3": "LlamaForCausalLM",
    "qwen2.5": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma-2": "Gemma2ForCausalLM",
    "phi-3": "Phi3ForCausalLM",
    "mistral": "LlamaForCausalLM",
}
# A key of config.json that the family's logits depend on, and a wrong value for it: the export is compared at a
# tolerance these would break.
ABLATIONS = {
    "llama3": ("rope_scaling", None),  # Llama 3's rescaled low rotary frequencies
    "gemma-2": ("query_pre_attn_scalar", 16),
    "phi-3": ("sliding_window", None),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_export_of_a_merged_adapter_matches_litgpt_and_converts_back(family, tmp_path, monkeypatch):
    """LoRA on every Linear, merged, exported (lit_peft.export.hf, litgpt's own weight maps: Phi-3's fused qkv_proj
    and gate_up_proj, Gemma's norm offsets and embedding scale) and loaded by transformers: the merged LitGPT
    model's logits in fp32.
    The export then goes back through the hub download's conversion (lit_peft.checkpoints.hub.convert_hf_folder)."""
    from transformers import AutoModelForCausalLM

    from lit_peft.checkpoints.hub import convert_hf_folder
    from lit_peft.export.hf import export_hf
    from lit_peft.models.load import load_base

    model = adapted_model(family, "lora")
    config = model.config
    idx = torch.randint(0, config.padded_vocab_size, (2, 12))
    merge_adapters(model)
    with torch.no_grad():
        expected = model(idx)
    hf_dir = export_hf(write_checkpoint(model, tmp_path / "merged"), tmp_path / "hf")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert hf_config["architectures"] == [HF_ARCHITECTURES[family]]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, expected, rtol=0, atol=1e-4)
    if family in ABLATIONS:
        key, value = ABLATIONS[family]
        (hf_dir / "config.json").write_text(json.dumps({**hf_config, key: value}))
        wrong = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (wrong(idx).logits - expected).abs().max() > 1e-2
        (hf_dir / "config.json").write_text(json.dumps(hf_config))

    # Back through the download path: litgpt's converter, by the preset's config name. The converter sizes Phi-3's
    # fused matrices from the named config, so the name resolves to the tiny config here.
    stage = tmp_path / "stage" / "model"
    shutil.copytree(hf_dir, stage)
    from_name = Config.from_name.__func__
    monkeypatch.setattr(
        Config,
        "from_name",
        classmethod(lambda cls, name, **kw: tiny(family) if kw == {} else from_name(cls, name, **kw)),
    )
    convert_hf_folder(stage, FAMILIES[family][0])
    monkeypatch.undo()
    back = load_base(stage).eval()  # strict: every LitGPT key there, none left over
    with torch.no_grad():
        torch.testing.assert_close(back(idx), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- presets


# preset -> (litgpt config name, template, HF family of the export)
PRESETS = {
    "llama3.2-1b-instruct": ("Llama-3.2-1B-Instruct", "llama3", "llama"),
    "qwen2.5-0.5b-instruct": ("Qwen2.5-0.5B-Instruct", "chatml", "qwen2"),
    "gemma-2-2b-it": ("Gemma-2-2b-it", "gemma", "gemma2"),
    "gemma-2b": ("Gemma-2b", "gemma", "gemma"),
    "phi-3-mini-4k-instruct": ("Phi-3-mini-4k-instruct", "phi3", "phi3"),
    "mistral-7b-instruct-v0.3": ("Mistral-7B-Instruct-v0.3", "mistral", "llama"),
    "llama3.1-8b-instruct": ("Llama-3.1-8B-Instruct", "llama3", "llama"),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_name_a_litgpt_config_a_template_and_an_export(preset):
    from lit_peft.checkpoints.hub import _litgpt_configs, converter_name
    from lit_peft.export.hf import hf_family

    name, template, family = PRESETS[preset]
    cfg = yaml.safe_load((ROOT / "lit_peft" / "conf" / "model" / f"{preset}.yaml").read_text())
    assert cfg["key"] == preset and cfg["source"] == "hub" and cfg["template"] == template
    assert cfg["checkpoint_dir"] == f"checkpoints/{cfg['repo_id']}"
    get_template(cfg["template"], cfg["system_prompt"])
    # scripts/download.py: the preset's model_name, else litgpt's config for the repo id
    known = {f"{c['hf_config']['org']}/{c['hf_config']['name']}": c["name"] for c in _litgpt_configs()}
    assert (cfg.get("model_name") or known.get(cfg["repo_id"])) == name
    config = Config.from_name(name)
    assert hf_family(config) == family
    assert Config.from_name(converter_name(name)).name == name  # the converter gets the same config


def test_gemma_1_names_take_the_gemma_1_weight_map():
    """litgpt 0.5.13's converter picks its Gemma 2 weight map for any name starting "gemma-2", Gemma-2b included."""
    from lit_peft.checkpoints.hub import converter_name

    assert converter_name("Gemma-2b") == "google/gemma-2b"
    assert converter_name("Gemma-2b-it") == "google/gemma-2b-it"
    assert converter_name("Gemma-2-2b-it") == "Gemma-2-2b-it"
    assert converter_name("Llama-3.2-1B-Instruct") == "Llama-3.2-1B-Instruct"


def test_a_preset_with_a_renamed_repo_downloads_through_its_model_name(tmp_path, monkeypatch):
    """scripts/download.py model=llama3.1-8b-instruct: litgpt lists the repository under its former name, so the
    preset names the config. Mistral-style native weights (consolidated.safetensors) beside the Hugging Face ones are
    not fetched. The hub is faked at huggingface_hub's two calls; the file selection is huggingface_hub's own."""
    import types

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from lit_peft.export.hf import export_hf

    repo = export_hf(write_checkpoint(random_model(tiny("llama3")), tmp_path / "lit"), tmp_path / "repo")
    (repo / "consolidated.safetensors").write_bytes((repo / "model.safetensors").read_bytes())
    files = sorted(p.name for p in repo.iterdir())
    fetched: list[str] = []

    def repo_info(repo_id, token=None):
        assert repo_id == "meta-llama/Llama-3.1-8B-Instruct"
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, local_dir, token=None, allow_patterns=None, ignore_patterns=None):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            shutil.copy2(repo / name, Path(local_dir) / name)
            fetched.append(name)

    monkeypatch.setattr(huggingface_hub, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    target = tmp_path / "ckpt"
    from lit_peft.cli.download import main

    assert main(["model=llama3.1-8b-instruct", "--checkpoint-dir", str(target)]) == target
    assert sorted(fetched) == ["config.json", "model.safetensors"]
    assert yaml.safe_load((target / "model_config.yaml").read_text())["name"] == "Llama-3.1-8B-Instruct"
    assert (target / "lit_model.pth").is_file()


# ---------------------------------------------------------------- chat templates

CONVERSATION = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Germany?"},
    {"role": "assistant", "content": " Berlin. "},  # whitespace that the Llama 3, Gemma and Mistral templates trim
]
SYSTEM = {"role": "system", "content": "Be brief."}
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
L3_SYSTEM_HEAD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_DATE}\n\n"
)
# template -> (bos, eos, [without a system turn, with SYSTEM]), written out from each model's official template.
RENDERED = {
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        [
            L3_SYSTEM_HEAD + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd Germany?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nBerlin.<|eot_id|>",
            L3_SYSTEM_HEAD + "Be brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nAnd Germany?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nBerlin.<|eot_id|>",
        ],
    ),
    "gemma": (
        "<bos>",
        "<eos>",
        [
            "<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n"
            "<start_of_turn>user\nAnd Germany?<end_of_turn>\n<start_of_turn>model\nBerlin.<end_of_turn>\n",
            "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
            "<start_of_turn>model\nParis.<end_of_turn>\n"
            "<start_of_turn>user\nAnd Germany?<end_of_turn>\n<start_of_turn>model\nBerlin.<end_of_turn>\n",
        ],
    ),
    "phi3": (
        "<s>",
        "<|endoftext|>",
        [
            "<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n<|user|>\nAnd Germany?<|end|>\n"
            "<|assistant|>\n Berlin. <|end|>\n<|endoftext|>",
            "<|system|>\nBe brief.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n"
            "<|user|>\nAnd Germany?<|end|>\n<|assistant|>\n Berlin. <|end|>\n<|endoftext|>",
        ],
    ),
    "mistral": (
        "<s>",
        "</s>",
        [
            "<s>[INST] Capital of France?[/INST] Paris.</s>[INST] And Germany?[/INST] Berlin.</s>",
            "<s>[INST] Capital of France?[/INST] Paris.</s>[INST] Be brief.\n\nAnd Germany?[/INST] Berlin.</s>",
        ],
    ),
    "chatml": (  # Qwen2.5, whose template writes its default system prompt when the conversation has none
        "",
        "<|im_end|>",
        [
            f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd Germany?<|im_end|>\n"
            "<|im_start|>assistant\n Berlin. <|im_end|>\n",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
            "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd Germany?<|im_end|>\n"
            "<|im_start|>assistant\n Berlin. <|im_end|>\n",
        ],
    ),
}
# The prompt for the second reply (the conversation up to the second user turn, then the generation cue).
PROMPTS = {
    "llama3": L3_SYSTEM_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd Germany?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n"
    "<start_of_turn>user\nAnd Germany?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nCapital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n<|user|>\nAnd Germany?<|end|>\n"
    "<|assistant|>\n",
    "mistral": "<s>[INST] Capital of France?[/INST] Paris.</s>[INST] Be brief.\n\nAnd Germany?[/INST]",
}


@pytest.mark.parametrize("name", list(RENDERED))
def test_templates_render_two_turns_as_the_official_ones(name):
    """As a run with the preset renders them: its template with its system prompt (Qwen2.5's default one)."""
    bos, eos, (plain, with_system) = RENDERED[name]
    preset = next(p for p, (_, template, _) in PRESETS.items() if template == name)
    cfg = yaml.safe_load((ROOT / "lit_peft" / "conf" / "model" / f"{preset}.yaml").read_text())
    assert cfg["system_prompt"] == (QWEN_SYSTEM if name == "chatml" else None)
    template = get_template(cfg["template"], cfg["system_prompt"])
    assert "".join(t for t, _ in template.segments(CONVERSATION, bos, eos)) == plain
    assert "".join(t for t, _ in template.segments([SYSTEM, *CONVERSATION], bos, eos)) == with_system
    if name in PROMPTS:
        history = ([SYSTEM] if name == "mistral" else []) + CONVERSATION[:3]
        prompt = "".join(t for t, _ in template.segments(history, bos, eos)) + template.generation_prompt()
        assert prompt == PROMPTS[name]


# template -> the tokenizer's special tokens (bos, eos, then the template's own), what the loss covers.
TOKENIZERS = {
    "llama3": (
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "Paris.<|eot_id|>Berlin.<|eot_id|>",
    ),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "Paris.<end_of_turn>Berlin.<end_of_turn>"),
    "phi3": (["<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"], "Paris.<|end|> Berlin. <|end|>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "Paris.</s>Berlin.</s>"),
}


def byte_tokenizer(folder: Path, specials: list[str]) -> Path:
    """A byte-level tokenizer (one token per byte, no merges) with the family's special tokens as single ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from lit_peft.checkpoints.hub import write_tokenizer_files

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder.mkdir()
    write_tokenizer_files(folder, tok, None, specials[0], specials[1], specials[1], specials[1])
    return folder


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_template_ids_and_loss_targets(name, tmp_path):
    """Special tokens become single ids, in the order the template writes them; the loss covers exactly the replies
    and the token that ends each (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>, Mistral's </s>)."""
    from litgpt import Tokenizer

    from lit_peft.data.tokenize import encode_marked, special_strings

    specials, targets = TOKENIZERS[name]
    tokenizer = Tokenizer(byte_tokenizer(tmp_path / "tok", specials))
    bos, eos = special_strings(tokenizer)
    assert (bos, eos) == (specials[0], specials[1])
    marked = encode_marked(tokenizer, get_template(name).segments(CONVERSATION, bos, eos))
    text = RENDERED[name][2][0]
    decode = tokenizer.processor.decode  # litgpt's Tokenizer.decode leaves special tokens out
    assert decode(marked.ids, skip_special_tokens=False) == text
    by_id = dict(enumerate(specials))
    written = [by_id[i] for i in marked.ids if i in by_id]
    order = sorted((text.find(s, at), s) for s in specials for at in range(len(text)) if text.startswith(s, at))
    assert written == [s for _, s in order] and len(written) >= 7
    covered = decode([i for i, t in zip(marked.ids, marked.target, strict=True) if t], skip_special_tokens=False)
    assert covered == targets


@pytest.mark.parametrize(
    "text, template",
    [
        ('{"chat_template": "... <|start_header_id|> ... <|eot_id|>"}', "llama3"),
        ('{"chat_template": "... <start_of_turn>model ..."}', "gemma"),
        ('{"added_tokens_decoder": {"32001": {"content": "<|assistant|>"}, "32007": {"content": "<|end|>"}}}', "phi3"),
        ('{"added_tokens_decoder": {"5": {"content": "[AVAILABLE_TOOLS]"}}, "chat_template": "[INST]"}', "mistral"),
        ('{"chat_template": "<<SYS>> [INST] [/INST]"}', "llama2"),
        ('{"chat_template": "<|user|> <|assistant|> </s>"}', "zephyr"),
        ('{"chat_template": "<|im_start|>"}', "chatml"),
    ],
)
def test_templates_are_guessed_from_the_tokenizer(tmp_path, text, template):
    (tmp_path / "tokenizer_config.json").write_text(text)
    assert guess_template(tmp_path) == template
