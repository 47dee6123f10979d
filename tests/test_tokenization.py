"""Training ids are the joined text's ids for every tokenizer kind: byte-level BPE (SmolLM2), Llama-style tokenizers
whose tokenizer.json puts a "▁" in front of every encoded text (Llama-2's Prepend normalizer, Mistral's Metaspace),
and SentencePiece models (tokenizer.model). All tokenizers here are built in the test, offline."""

from __future__ import annotations

import io
import json

import pytest
from litgpt import Tokenizer

from lit_peft.data.preference import encode_pair
from lit_peft.data.templates import get_template, instruction_messages
from lit_peft.data.tokenize import (
    IGNORE_INDEX,
    _char_spans,
    encode_offsets,
    encode_segments,
    encode_text,
    special_strings,
)

U1, A1, U2, A2 = "Name a fruit.", "Apple.", "Another one?", "Pear, then plum."
CORPUS = [
    "Name a fruit. Apple. Another one? Pear, then plum. Below is an instruction that describes a task.",
    "Write a response that appropriately completes the request. The user asks and the assistant answers.",
    "System: be brief. Instruction: sort the numbers. Input: three, one, two. Response: one, two, three.",
]


def llama_hf_checkpoint(folder, kind: str):
    """tokenizer.json + tokenizer_config.json as Llama-2 ("prepend": normalizer Prepend("▁") + Replace(" ", "▁"),
    no pre-tokenizer) or Mistral/TinyLlama-style ("metaspace": Metaspace pre-tokenizer, prepend always) ship them:
    byte-fallback BPE with <unk>, <s>, </s>."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Learn merges within words only (as a large corpus would), then use the shipped pipeline.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    if kind == "prepend":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def sentencepiece_checkpoint(folder):
    """A tokenizer.model as Llama-1/2 ship it: BPE, byte fallback, identity normalization, dummy "▁" prefix."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="module", params=["prepend", "metaspace", "sentencepiece"])
def llama_tokenizer(request, tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp(request.param) / "Llama-2-test"
    if request.param == "sentencepiece":
        tokenizer = Tokenizer(sentencepiece_checkpoint(folder))
        assert tokenizer.backend == "sentencepiece"
    else:
        tokenizer = Tokenizer(llama_hf_checkpoint(folder, request.param))
        assert tokenizer.backend == "huggingface"
    assert special_strings(tokenizer) == ("<s>", "</s>")
    tokenizer.kind = request.param
    return tokenizer


def piece(tokenizer, i: int) -> str:
    if tokenizer.backend == "huggingface":
        return tokenizer.processor.id_to_token(i)
    return tokenizer.processor.id_to_piece(i)


TWO_TURNS = [
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]


@pytest.mark.parametrize("template", ["llama2", "zephyr", "alpaca", "chatml"])
def test_training_ids_are_the_joined_texts_ids_and_targets_start_at_the_reply(llama_tokenizer, template):
    tok = llama_tokenizer
    bos, eos = special_strings(tok)
    segments = get_template(template).segments(TWO_TURNS, bos, eos)
    text = "".join(t for t, _ in segments)
    example = encode_segments(tok, segments, 10_000)
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    assert ids == encode_text(tok, text)  # what chat feeds the model for the same conversation

    # Segment by segment the tokenizer puts a "▁" in front of every segment: other ids than chat's (Metaspace
    # leaves a segment that starts with a space as it is, which every Llama-2 segment does).
    per_segment = [t for s, _ in segments for t in encode_text(tok, s)]
    assert per_segment != ids or (tok.kind == "metaspace" and template == "llama2")

    # Targets: exactly the tokens covering each reply's characters; the first is the reply's first real token.
    _, offsets = encode_offsets(tok, text)
    starts = []
    at = 0
    for s, is_target in segments:
        if is_target:
            starts.append(at)
        at += len(s)
    targets = [t for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    firsts = [t for t in targets if t == 0 or labels[t - 1] == IGNORE_INDEX]
    assert len(firsts) == 2  # one run of targets per reply
    for start, t in zip(starts, firsts, strict=True):
        lo, hi = offsets[t]
        assert lo <= start < max(hi, lo + 1)  # the token covering the reply's first character
        assert offsets[t - 1][1] <= start  # and the token before it is all prompt
        reply = text[start:].lstrip(" ")
        assert piece(tok, ids[t]).replace("▁", " ").strip() and reply.startswith(
            piece(tok, ids[t]).replace("▁", " ").strip()
        )
    if template != "chatml":  # chatml ends a reply with <|im_end|>, plain text to this tokenizer
        assert sum(lab == tok.eos_id for lab in labels) == 2  # each reply's end token is a target


def test_llama2_reply_starts_with_its_word_piece_not_a_lone_space(llama_tokenizer):
    tok = llama_tokenizer
    bos, eos = special_strings(tok)
    segments = get_template("llama2").segments(instruction_messages(U1, output=A1), bos, eos)
    example = encode_segments(tok, segments, 10_000)
    first = int((example["labels"] != IGNORE_INDEX).nonzero()[0])
    assert piece(tok, int(example["input_ids"][first])).startswith("▁Apple")
    # The old per-segment encoding started the target with a spurious lone "▁" (Llama-2's Prepend normalizer
    # and SentencePiece's dummy prefix put one in front of " Apple. </s>").
    reply = encode_text(tok, segments[-1][0])
    if tok.kind != "metaspace":
        assert piece(tok, reply[0]) == "▁" and piece(tok, reply[1]).startswith("▁Apple")


def test_truncation_at_turn_boundaries_with_a_llama_tokenizer(llama_tokenizer):
    tok = llama_tokenizer
    bos, eos = special_strings(tok)
    segments = get_template("llama2").segments(TWO_TURNS, bos, eos)
    full = encode_segments(tok, segments, 10_000)["input_ids"].tolist()
    first_end = full.index(tok.eos_id) + 1  # the first reply ends with </s>
    assert len(full) > first_end + 3
    for limit in range(first_end, len(full)):
        cut = encode_segments(tok, segments, limit)
        assert cut["input_ids"].tolist() == full[:first_end]  # cut after the first whole turn
    first_target = int((encode_segments(tok, segments, 10_000)["labels"] != IGNORE_INDEX).nonzero()[0])
    inside = encode_segments(tok, segments, first_target + 2)  # only the first reply's start fits
    assert (inside["labels"] != IGNORE_INDEX).sum() == 2
    assert encode_segments(tok, segments, first_target) is None


def test_preference_sides_share_the_prompt_with_a_llama_tokenizer(llama_tokenizer):
    tok = llama_tokenizer
    prompt = [{"role": "user", "content": U1}]
    chosen, rejected = encode_pair(tok, get_template("llama2"), prompt, A1, "Rock, then a long speech.", 10_000)
    n = int((chosen["labels"] != IGNORE_INDEX).nonzero()[0])
    assert n == int((rejected["labels"] != IGNORE_INDEX).nonzero()[0])
    assert chosen["input_ids"][:n].tolist() == rejected["input_ids"][:n].tolist()
    bos, eos = special_strings(tok)
    text = "".join(
        t for t, _ in get_template("llama2").segments([*prompt, {"role": "assistant", "content": A1}], bos, eos)
    )
    assert chosen["input_ids"].tolist() == encode_text(tok, text)


def test_sentencepiece_byte_offsets_map_to_characters():
    """The byte-offset route (sentencepiece 0.1.99-0.2.1's immutable proto) agrees with the character offsets."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    text = "héllo wörld 日本語 — ok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text] * 5),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    for sample in (text, "ok € wörld"):  # "€" is unseen: three byte-fallback pieces inside one character
        try:
            pieces = proc.encode(sample, out_type="proto").pieces
        except Exception:  # needs protobuf
            pytest.skip("sentencepiece proto output needs protobuf")
        byte_spans = [(p.begin, p.end) for p in pieces]
        chars = _char_spans(sample, byte_spans)
        assert chars == [tuple(s) for s in proc.encode(sample, out_type="offset_mapping")["offsets"]]
        assert chars != byte_spans
