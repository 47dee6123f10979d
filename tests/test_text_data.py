"""Continued-pretraining text: packing (in memory and streamed), the token cache's key, the split by document,
the document separator and pre-tokenized ids."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import shared_data
from litgpt import Tokenizer

import lit_peft.data.text as text
from lit_peft.data.formats import DataError
from lit_peft.data.text import TextDataModule, document_separator_id, document_tokens, iter_documents, pack
from lit_peft.data.tokenize import encode_text

BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer(tiny_checkpoint)


def corpus(tmp_path, n_docs=23):
    docs = [f"Document {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) for i in range(n_docs)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def module(tokenizer, path, tmp_path=None, fmt="text", **kwargs):
    kwargs = dict(dict(max_seq_length=BLOCK, micro_batch_size=2, val_size=4, seed=0), **kwargs)
    if tmp_path is not None:
        kwargs.update(streaming=True, cache_dir=tmp_path / "cache")
    dm = TextDataModule(tokenizer, str(path), fmt, **kwargs)
    dm.setup()
    return dm


def rows(dataset) -> list[list[int]]:
    return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]


def all_tokens(dm) -> list[list[int]]:
    return rows(dm.train) + rows(dm.val)


def test_packing_places_every_token_once_and_streaming_gives_the_same_blocks(tokenizer, tmp_path):
    path, docs = corpus(tmp_path)
    sep = tokenizer.token_to_id("<|endoftext|>")
    stream = [t for d in docs for t in [*encode_text(tokenizer, d), sep]]  # by hand: documents joined by the separator
    blocks = list(pack(document_tokens(iter_documents(str(path)), tokenizer), BLOCK))
    assert [t for b in blocks for t in b] == stream[: len(blocks) * BLOCK]
    assert len(stream) - len(blocks) * BLOCK < BLOCK  # only the final remainder is dropped

    for val_split in ("block", "document"):
        memory = module(tokenizer, path, val_split=val_split)
        streamed = module(tokenizer, path, tmp_path, val_split=val_split)
        assert streamed.token_file().is_file()
        for a, b in ((memory.train, streamed.train), (memory.val, streamed.val)):
            assert len(a) > 0 and rows(a) == rows(b)
            assert all(torch.equal(a[i]["labels"], a[i]["input_ids"]) for i in range(len(a)))
    block = module(tokenizer, path, val_split="block")
    assert len(block.train) + len(block.val) == len(blocks)
    assert sorted(block.train.indices + block.val.indices) == list(range(len(blocks)))  # disjoint, complete


def test_document_split_holds_out_whole_documents_in_their_own_stream(tokenizer, tmp_path):
    # Document d is made of token d + 3 only, so every block says which documents it holds.
    path = tmp_path / "ids.jsonl"
    lengths = [5 + (d * 7) % 23 for d in range(40)]
    path.write_text("".join(json.dumps({"input_ids": [d + 3] * n}) + "\n" for d, n in enumerate(lengths)))
    sep = document_separator_id(tokenizer)
    for streaming in (None, tmp_path):
        dm = module(tokenizer, path, streaming, fmt="tokens", val_size=0.2)  # auto: enough documents
        val_docs = {t - 3 for b in rows(dm.val) for t in b if t != sep}
        train_docs = {t - 3 for b in rows(dm.train) for t in b if t != sep}
        assert len(val_docs) >= 2 and not val_docs & train_docs  # no validation block shares a training document
        held = text.held_out_documents(np.array(lengths) + 1, BLOCK, 0.2, 0)
        assert val_docs <= set(np.flatnonzero(held).tolist())
        n_blocks = (sum(lengths) + len(lengths)) // BLOCK
        assert round(0.2 * n_blocks) <= len(dm.val) <= 2 * round(0.2 * n_blocks)  # about val_size of the blocks
        # the two streams are the held-out and the other documents in order, each cut into whole blocks
        val_stream = [t for d in np.flatnonzero(held) for t in [d + 3] * lengths[d] + [sep]]
        assert [t for b in rows(dm.val) for t in b] == val_stream[: len(dm.val) * BLOCK]
        assert len(val_stream) - len(dm.val) * BLOCK < BLOCK
        train_stream = [t for d in np.flatnonzero(~held) for t in [d + 3] * lengths[d] + [sep]]
        assert [t for b in rows(dm.train) for t in b] == train_stream[: len(dm.train) * BLOCK]


def test_auto_split_falls_back_to_blocks_with_a_note_and_bad_choices_fail(tokenizer, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a single long document " * 40)
    dm = module(tokenizer, one)  # val_split=auto, one document
    out = capsys.readouterr().out
    assert "data.val_split=auto" in out and "has 1 document(s)" in out and "holding out random blocks" in out
    assert len(dm.val) == 4 and isinstance(dm.val, torch.utils.data.Subset)
    with pytest.raises(
        DataError, match=r"data.val_split=document: 1 of 1 documents fill \d+ validation block\(s\) and"
    ):
        module(tokenizer, one, val_split="document")
    three = tmp_path / "three.txt"
    three.write_text("\n".join(f"document {d} " + "is long " * 60 for d in range(3)))  # ~30 blocks each
    dm = module(tokenizer, three, val_size=2, separator="\n")  # auto: one document would hold out ~15x too much
    assert "over 2x the 2 of val_size=2 and over 10% of all" in capsys.readouterr().out and len(dm.val) == 2
    dm = module(tokenizer, three, val_size=2, separator="\n", val_split="document")  # asked for: accepted
    assert len(dm.val) > 10 and len(dm.train) > 10
    with pytest.raises(DataError, match=r"data.val_split='docs' is not a split; valid choices: auto, document, block"):
        module(tokenizer, one, val_split="docs")


def test_token_cache_follows_the_corpus_content_and_the_tokenizer(tokenizer, tiny_checkpoint, tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("To be, or not to be, that is the question. " * 30)
    first = module(tokenizer, path, tmp_path)
    old_file, old_blocks = first.token_file(), all_tokens(first)
    again = module(tokenizer, path, tmp_path)
    assert again.token_file() == old_file and all_tokens(again) == old_blocks  # unchanged corpus: reused

    stat = path.stat()
    path.write_text("Whether 'tis nobler in the mind to suffer. " * 30)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # edited in place, even within the same tick
    edited = module(tokenizer, path, tmp_path)
    assert edited.token_file() != old_file
    assert all_tokens(edited) == all_tokens(module(tokenizer, path))  # the new text, as the in-memory path reads it

    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_text("first book " * 40)
    before = module(tokenizer, folder, tmp_path)
    before_file, before_blocks = before.token_file(), all_tokens(before)
    (folder / "sub").mkdir()
    (folder / "sub/b.txt").write_text("second book " * 40)
    after = module(tokenizer, folder, tmp_path)
    assert after.token_file() != before_file
    assert len(all_tokens(after)) > len(before_blocks) and all_tokens(after) == all_tokens(module(tokenizer, folder))

    # Another tokenizer with the same vocabulary size (two tokens' ids swapped) gets its own token file.
    other_dir = tmp_path / "other" / tiny_checkpoint.name
    shutil.copytree(tiny_checkpoint, other_dir)
    spec = json.loads((other_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other_dir / "tokenizer.json").write_text(json.dumps(spec))
    other = Tokenizer(other_dir)
    assert other.vocab_size == tokenizer.vocab_size
    theirs = module(other, folder, tmp_path)
    assert theirs.token_file() != after.token_file() and all_tokens(theirs) != all_tokens(after)
    assert all_tokens(theirs) == all_tokens(module(other, folder))


def test_hub_sets_are_keyed_by_their_revision(tokenizer, tmp_path, monkeypatch):
    import datasets

    revision = {"hash": "abc123"}
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path: type("B", (), dict(revision))())
    dm = TextDataModule(tokenizer, "org/corpus", "text", BLOCK, 2, 4, 0, streaming=True, cache_dir=tmp_path)
    first = dm.token_file()
    revision["hash"] = "def456"
    assert dm.token_file() == first  # resolved once per run
    updated = TextDataModule(tokenizer, "org/corpus", "text", BLOCK, 2, 4, 0, streaming=True, cache_dir=tmp_path)
    assert updated.token_file() != first

    def offline(path):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    offline_dm = TextDataModule(tokenizer, "org/corpus", "text", BLOCK, 2, 4, 0, streaming=True, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"could not load data set 'org/corpus' \(ConnectionError\); offline\?"):
        offline_dm.token_file()


def test_pretokenized_ids_outside_the_vocabulary_name_the_record(tokenizer, tmp_path):
    n = text.vocabulary_size(tokenizer)
    path = tmp_path / "ids.jsonl"
    for bad in (n, 70000, -1):
        path.write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps({"input_ids": [7, bad, 8]}) + "\n")
        for streaming in (None, tmp_path):
            with pytest.raises(
                DataError, match=rf"ids.jsonl: record 1 field 'input_ids' holds token id {bad}, .*0 to {n - 1}"
            ):
                module(tokenizer, path, streaming, fmt="tokens")


def test_documents_are_joined_with_the_document_separator(tokenizer, tmp_path):
    endoftext, im_end = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.eos_id == im_end != endoftext
    assert document_separator_id(tokenizer) == endoftext  # the tokenizer has a document separator: not the chat end
    assert document_separator_id(tokenizer, "<|im_end|>") == im_end
    with pytest.raises(DataError, match=r"data.document_separator='<\|eot\|>' is not a token .*<\|endoftext\|>"):
        document_separator_id(tokenizer, "<|eot|>")

    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"input_ids": [8, endoftext]}) + "\n")
    toks = list(document_tokens(iter_documents(str(ids), "tokens"), tokenizer))
    assert toks == [[5, 6, 7, endoftext], [8, endoftext]]  # the separator once, never twice
    toks = list(document_tokens(iter_documents(str(ids), "tokens"), tokenizer, im_end))
    assert toks == [[5, 6, 7, im_end], [8, endoftext, im_end]]
    dm = module(
        tokenizer, ids, fmt="tokens", val_split="block", val_size=1, max_seq_length=2, document_separator="<|im_end|>"
    )
    assert sorted(t for b in all_tokens(dm) for t in b) == sorted([5, 6, 7, im_end, 8, endoftext])[:6]


def test_text_sources_txt_folders_separators(tokenizer, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/one.txt").write_text("first doc<|endoftext|>second doc")
    (tmp_path / "a/two.txt").write_text("third doc")
    docs = ["".join(d) for d in iter_documents(str(tmp_path / "a"), separator="<|endoftext|>")]
    assert docs == ["first doc", "second doc", "third doc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 1 has no field 'text'"):
        list(iter_documents(str(bad)))


def test_long_txt_documents_stream_in_pieces_that_tokenize_like_the_whole(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "TEXT_CHUNK_CHARS", 64)
    body = "".join(f"line {i} of a long document\n" for i in range(40))
    path = tmp_path / "long.txt"
    path.write_text(body + "\n\n" + body)
    docs = list(iter_documents(str(path), separator="\n\n"))
    assert len(docs) == 2 and all(len(d) > 3 for d in docs)  # handed on in pieces
    assert "".join(docs[0]) + "\n\n" + "".join(docs[1]) == path.read_text()


def test_shared_corpora_split_by_document_alike_in_memory_and_streamed(tokenizer, tmp_path):
    c4 = shared_data("llamafactory_demo/c4_demo.jsonl")
    kwargs = dict(max_seq_length=256, val_size=0.05)
    memory, streamed = module(tokenizer, c4, **kwargs), module(tokenizer, c4, tmp_path, **kwargs)
    assert isinstance(memory.val, text.ListBlocks) and len(memory.val) > 0  # auto: 300 documents, split by document
    assert rows(memory.val) == rows(streamed.val) and rows(memory.train)[::50] == rows(streamed.train)[::50]
    stories = shared_data("tinystories/tinystories_sample.txt")
    docs = list(iter_documents(str(stories), separator="<|endoftext|>"))
    assert len(docs) == 5 and not any("<|endoftext|>" in "".join(d) for d in docs)


def sentencepiece_tokenizer(folder, corpus: list[str]) -> Tokenizer:
    """A Llama-2-style tokenizer.model (</s> ends documents) trained here on `corpus`, offline."""
    import io

    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return Tokenizer(folder)


def test_sentencepiece_tokenizers_join_with_eos_and_key_the_cache(tmp_path):
    words = ["lorem ipsum dolor sit amet", "the quick brown fox jumps over the lazy dog"]
    one = sentencepiece_tokenizer(tmp_path / "one", [words[0]] * 50 + [words[1]] * 5)
    two = sentencepiece_tokenizer(tmp_path / "two", [words[1]] * 50 + [words[0]] * 5)
    assert one.backend == "sentencepiece" and one.vocab_size == two.vocab_size
    assert document_separator_id(one) == one.eos_id == one.token_to_id("</s>")
    with pytest.raises(DataError, match=r"data.document_separator='<\|endoftext\|>' is not a token .*</s>"):
        document_separator_id(one, "<|endoftext|>")
    path, _ = corpus(tmp_path, n_docs=30)
    a, b = module(one, path, tmp_path), module(two, path, tmp_path)
    assert a.token_file() != b.token_file() and all_tokens(a) != all_tokens(b)
    assert isinstance(a.val, text.DocumentBlocks) and rows(a.val) == rows(module(one, path).val)


# ---------------------------------------------------------------- a bad corpus file: one line naming the file and where


def latin1_txt(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"".join(b"line %d of a long document\n" % i for i in range(40)) + b"caf\xe9 au lait\nmore\n")
    return path


TEXT_PROBLEMS = {  # file name -> (its bytes, what the error says after "<file>: ")
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"line 2 \(byte 28\): not valid UTF-8 \(byte 0xe9"),
    "latin1.csv": (b"text\nok\ncaf\xe9\n", r"line 3 \(byte 11\): not valid UTF-8"),
    "malformed.jsonl": (
        b'{"text": "ok"}\n{"text": "a"\n{"text": "b"}\n',
        "line 2: invalid JSON: Expecting ',' delimiter",
    ),
    "empty.jsonl": (b"", "the file is empty; expected one JSON record per line"),
    "empty.txt": (b"", "the file is empty; expected text"),
    "latin1.txt": (b"ok\n\xff\n", r"line 2 \(byte 3\): not valid UTF-8 \(byte 0xff: invalid start byte\)"),
}


@pytest.mark.parametrize("name", sorted(TEXT_PROBLEMS))
@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_corpus_file_is_one_line_naming_the_file_and_the_line(tokenizer, tmp_path, name, streaming):
    content, message = TEXT_PROBLEMS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        module(tokenizer, path, tmp_path if streaming else None)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_invalid_utf8_deep_in_a_txt_file_and_in_a_folder_names_the_file_and_line(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "TEXT_CHUNK_CHARS", 64)  # the bad byte lies chunks into the file
    path = latin1_txt(tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 41 \(byte 1073\): not valid UTF-8"):
        list(iter_documents(str(path)))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n")
    (folder / "b.txt").write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'b.txt'))}: the file is empty"):
        list(iter_documents(str(folder)))


def test_numbers_in_the_text_field_are_their_text(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"text": v}) + "\n" for v in [1, 22, 333]))
    assert ["".join(d) for d in iter_documents(str(path))] == ["1", "22", "333"]
    csv = tmp_path / "numbers.csv"
    csv.write_text("text\n007\n1.50\n")
    assert ["".join(d) for d in iter_documents(str(csv))] == ["007", "1.50"]
    path.write_text(json.dumps({"text": ["a", "list"]}) + "\n")
    with pytest.raises(DataError, match=r"numbers.jsonl: record 0 field 'text' is list, expected text"):
        list(iter_documents(str(path)))
