"""Templates, loss masks, loading and splitting of instruction data."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TINY_RUN, run_cli, shared_data
from litgpt import Tokenizer

from lit_peft.data.datamodule import SFTDataModule, record_loader
from lit_peft.data.formats import DataError, get_format, load_records
from lit_peft.data.synthetic import synthetic_records
from lit_peft.data.templates import get_template, instruction_messages
from lit_peft.data.tokenize import IGNORE_INDEX, collate, encode_segments, special_strings


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer(tiny_checkpoint)


def decode(tokenizer, ids) -> str:
    return tokenizer.processor.decode(ids.tolist(), skip_special_tokens=False)


def targets_text(tokenizer, example) -> str:
    keep = example["labels"] != IGNORE_INDEX
    return decode(tokenizer, example["input_ids"][keep])


@pytest.mark.parametrize(
    "template, expected_prompt_end",
    [
        ("chatml", "<|im_start|>assistant\n"),
        ("alpaca", "### Response:\n"),
        ("llama2", " [/INST]"),
        ("zephyr", "<|assistant|>\n"),
    ],
)
def test_only_the_response_and_its_end_token_are_targets(tokenizer, template, expected_prompt_end):
    bos, eos = special_strings(tokenizer)
    messages = instruction_messages("Sort the numbers.", "3, 1, 2", "1, 2, 3")
    segments = get_template(template, "Be brief.").segments(messages, bos, eos)
    example = encode_segments(tokenizer, segments, max_seq_length=512)
    text = decode(tokenizer, example["input_ids"])
    assert "Be brief." in text and "3, 1, 2" in text
    target = targets_text(tokenizer, example)
    assert target.endswith(eos) and target[: -len(eos)].strip() == "1, 2, 3"
    # Everything before the response is masked, and the prompt ends with the template's assistant cue.
    first_target = int((example["labels"] != IGNORE_INDEX).nonzero()[0])
    assert decode(tokenizer, example["input_ids"][:first_target]).endswith(expected_prompt_end)
    assert (example["labels"][:first_target] == IGNORE_INDEX).all()


def test_chatml_renders_like_the_model_chat_template(tokenizer, tiny_checkpoint):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    messages = [{"role": "system", "content": "S"}, *instruction_messages("Hi there", output="Hello!")]
    bos, eos = special_strings(tokenizer)
    rendered = "".join(t for t, _ in get_template("chatml").segments(messages, bos, eos))
    assert rendered == hf.apply_chat_template(messages, tokenize=False)


def test_truncation_keeps_examples_with_a_target_and_drops_the_rest(tokenizer):
    bos, eos = special_strings(tokenizer)
    segments = get_template("chatml").segments(instruction_messages("x" * 50, output="yes"), bos, eos)
    assert encode_segments(tokenizer, segments, max_seq_length=20) is None  # the cut falls inside the prompt
    full = encode_segments(tokenizer, segments, max_seq_length=1000)
    cut = encode_segments(tokenizer, segments, max_seq_length=len(full["input_ids"]) - 2)
    assert len(cut["input_ids"]) == len(full["input_ids"]) - 2
    assert (cut["labels"] != IGNORE_INDEX).sum() > 0


def test_collate_pads_right_and_masks_padding():
    batch = collate(
        [
            {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
            {"input_ids": torch.tensor([8]), "labels": torch.tensor([-100])},
        ],
        pad_id=2,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


def make_module(tokenizer, load, **kw):
    args = dict(record_format="alpaca", source="test", max_seq_length=128, micro_batch_size=4, val_size=3, seed=1)
    return SFTDataModule(tokenizer, get_template("chatml"), load, **{**args, **kw})


def test_the_held_out_set_depends_on_the_split_seed_only(tokenizer):
    """A seed sweep, or another max_examples, keeps one held-out set; data.split_seed draws another."""
    records = synthetic_records(40, seed=3)

    def split(seed=1, split_seed=0, max_examples=None):
        dm = make_module(tokenizer, lambda: records, seed=seed)
        dm.split_seed, dm.max_examples = split_seed, max_examples
        dm.setup()
        return [x["input_ids"].tolist() for x in dm.val], len(dm.train)

    held, n_train = split()
    assert n_train == 37 and len(held) == 3  # val_size 3 of 40 records
    assert split(seed=2)[0] == held and split(max_examples=10) == (held, 10)
    assert split(split_seed=1)[0] != held


def test_synthetic_outputs_are_correct():
    for r in synthetic_records(200, seed=0):
        if r["instruction"].startswith("Sort these numbers"):
            nums = [int(n) for n in r["input"].split(", ")]
            assert r["output"] == ", ".join(map(str, sorted(nums)))
        elif r["instruction"].startswith("Add the two"):
            a, b = r["input"].split(" + ")
            assert int(r["output"]) == int(a) + int(b)


def test_missing_field_names_file_record_and_field(tmp_path, tokenizer):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}]))
    load, source = record_loader({"path": str(path)}, seed=0)
    dm = make_module(tokenizer, load, source=source, val_size=1)
    with pytest.raises(DataError, match=rf"{path}: record \d has no field 'output'"):
        dm.setup()


def test_no_usable_example_is_an_error(tokenizer):
    records = [{"instruction": "x" * 300, "output": "y"}] * 5
    dm = make_module(tokenizer, lambda: records, max_seq_length=16)
    with pytest.raises(
        DataError, match="none of 5 records gives an example with a target token within max_seq_length=16"
    ):
        dm.setup()


def test_missing_local_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="data file not found: ./nope.json"):
        load_records("./nope.json")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_records(str(tmp_path / "d.txt"))


def test_jsonl_and_column_mapping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(3)))
    records = load_records(str(path), columns={"instruction": "prompt", "output": "completion"})
    assert [(r["instruction"], r["output"]) for r in records] == [("p0", "c0"), ("p1", "c1"), ("p2", "c2")]


def test_real_alpaca_file_loads_and_masks(tokenizer):
    path = shared_data("alpaca/alpaca_5000.json")
    load, source = record_loader({"path": str(path)}, seed=0)
    dm = make_module(tokenizer, load, source=source, max_examples=200, val_size=0.02, max_seq_length=256)
    dm.setup()
    # the held-out share is of the whole file (100 of 5000 records), the training records are capped at 200
    assert 90 < len(dm.val) <= 100 and 180 < len(dm.train) <= 200
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 256
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()


def test_generation_prompts_cue_the_assistant(tokenizer):
    assert get_template("chatml").generation_prompt() == "<|im_start|>assistant\n"
    assert get_template("zephyr").generation_prompt() == "<|assistant|>\n"
    # For alpaca and llama2 the user segment already ends with the cue.
    bos, eos = special_strings(tokenizer)
    for name, cue in (("alpaca", "### Response:\n"), ("llama2", "[/INST]")):
        template = get_template(name)
        text = "".join(t for t, _ in template.segments([{"role": "user", "content": "hi"}], bos, eos))
        assert (text + template.generation_prompt()).endswith(cue)


STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@pytest.mark.parametrize("fmt", ["alpaca", "dolly"])
def test_alpaca_template_renders_the_stanford_prompts_exactly(tokenizer, fmt):
    from lit_peft.data.formats import FORMATS

    bos, eos = special_strings(tokenizer)
    template = get_template("alpaca")
    names = {"alpaca": ("input", "output"), "dolly": ("context", "response")}[fmt]
    for given, prompt in (("", STANFORD_NO_INPUT), ("3, 1, 2", STANFORD_INPUT)):
        record = {"instruction": "Sort the numbers.", names[0]: given, names[1]: "1, 2, 3"}
        messages = FORMATS[fmt](record, "d.json", 0)
        segments = template.segments(messages, bos, eos)
        expected = prompt.format(instruction="Sort the numbers.", input=given)
        assert "".join(t for t, _ in segments) == f"{bos}{expected}1, 2, 3{eos}\n\n"
        assert [t for t, target in segments if target] == [f"1, 2, 3{eos}"]
        # Other templates see the instruction and the input as one user text.
        assert messages[0]["content"] == ("Sort the numbers.\n\n3, 1, 2" if given else "Sort the numbers.")
        chatml = "".join(t for t, _ in get_template("chatml").segments(messages, bos, eos))
        assert f"<|im_start|>user\n{messages[0]['content']}<|im_end|>" in chatml and "### Input" not in chatml
    # A system prompt replaces the preamble.
    custom = get_template("alpaca", "Be brief.").segments(instruction_messages("Hi", "there", "Yo"), bos, eos)
    assert custom[0][0] == f"{bos}Be brief.\n\n"


def test_a_hub_name_that_cannot_be_reached_gives_the_offline_hint(monkeypatch):
    import datasets

    def closed_client(*args, **kwargs):  # what datasets raises without network, once its HTTP client gave up
        try:
            raise FileNotFoundError("Dataset tatsu-lab/alpaca is not cached in None")
        except FileNotFoundError:
            raise RuntimeError("Cannot send a request, as the client has been closed.") from None

    def offline(*args, **kwargs):  # with HF_HUB_OFFLINE=1
        raise ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub (OfflineModeIsEnabled)")

    for fake, kind in ((closed_client, "RuntimeError"), (offline, "ConnectionError")):
        monkeypatch.setattr(datasets, "load_dataset", fake)
        with pytest.raises(DataError) as info:
            load_records("tatsu-lab/alpaca")
        message = str(info.value)
        assert message.startswith(f"could not load data set 'tatsu-lab/alpaca' from the hub ({kind}: ")
        assert message.endswith("offline, or a misspelled name? pass data.path=<local file>") and "\n" not in message

    def bad_split(*args, **kwargs):  # the hub answered: no offline hint
        raise ValueError("Unknown split \"tets\". Should be one of ['train'].")

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(DataError, match=r"tatsu-lab/alpaca: could not read data set: Unknown split") as info:
        load_records("tatsu-lab/alpaca", split="tets")
    assert "offline" not in str(info.value)


def test_a_hub_name_offline_for_real(monkeypatch):
    """No network on test machines: the real `datasets` call, in offline mode so that it does not wait for retries."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"could not load data set 'lit-peft-tests/no-such-set' from the hub \("):
        load_records("lit-peft-tests/no-such-set")


def test_a_misnamed_column_names_itself_and_the_files_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(3)))
    with pytest.raises(DataError) as info:
        load_records(str(path), columns={"instruction": "prompt", "output": "complete"})
    assert str(info.value) == (
        f"{path}: data.columns names a column the file does not have (output: 'complete'); "
        "the file's fields: prompt, completion"
    )


def test_empty_replies_are_skipped_not_trained_as_a_bare_end_token(tokenizer, capsys):
    records = [{"instruction": f"Say {i}.", "input": "", "output": "" if i in (2, 5) else str(i)} for i in range(12)]
    dm = make_module(tokenizer, lambda: records)
    dm.setup()
    examples = dm.train + dm.val
    assert len(examples) == 10
    for ex in examples:
        assert targets_text(tokenizer, ex) != "<|im_end|>"  # every target has reply text before the end token
    assert "skipped 2 of 12 records that cannot be used (2 empty assistant turn)" in capsys.readouterr().out


# ---------------------------------------------------------------- a bad local file: one line naming the file and where

ALPACA_LINE = b'{"instruction": "Say a.", "output": "a"}\n'
FILE_PROBLEMS = {  # file name -> (its bytes, what the error says after "<file>: ")
    "latin1.jsonl": (
        ALPACA_LINE + b'{"instruction": "caf\xe9", "output": "b"}\n',
        r"line 2 \(byte 61\): not valid UTF-8 \(byte 0xe9: invalid continuation byte\)",
    ),
    "latin1.json": (b'[{"instruction": "a", "output": "b"},\n {"instruction": "\xe9", "output": "b"}]\n', r"line 2 \("),
    "latin1.csv": (b"instruction,output\nSay a.,a\ncaf\xe9,b\n", r"line 3 \(byte 31\): not valid UTF-8 \(byte 0xe9"),
    "truncated.jsonl": (
        ALPACA_LINE + b'{"instruction": "caf\xc3',
        r"line 2 \(byte 61\): not valid UTF-8 \(byte 0xc3: unexpected end of data\)",
    ),
    "malformed.jsonl": (
        ALPACA_LINE * 2 + b'{"instruction": "a", "output": }\n' + ALPACA_LINE,
        "line 3: invalid JSON: ",
    ),
    "unquoted.jsonl": (ALPACA_LINE + b"{instruction: 'a'}\n", "line 2: invalid JSON: Expecting property name"),
    "list-line.jsonl": (ALPACA_LINE + b"[1, 2]\n", r"line 2 is a JSON list, expected a record"),
    "malformed.json": (b'[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]', "line 2 column"),
    "empty.jsonl": (b"", "the file is empty; expected one JSON record per line"),
    "empty.json": (b"", "the file is empty; expected a JSON list of records"),
    "empty.csv": (b"", "the file is empty; expected a header line"),
    "empty.parquet": (b"", "the file is empty; expected a Parquet table"),
    "blank.jsonl": (b"\n \n\n", "the file holds only blank lines"),
    "header-only.csv": (b"instruction,output\n", "the file holds a header line and no records"),
    "corrupt.jsonl.gz": (b"\x1f\x8b\x08\x00junk", "cannot be decompressed"),
}


@pytest.mark.parametrize("name", sorted(FILE_PROBLEMS))
def test_a_bad_local_file_is_one_line_naming_the_file_and_the_line(tmp_path, name):
    content, message = FILE_PROBLEMS[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert re.search(message, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_utf8_in_a_compressed_file_and_in_a_folder_is_named_too(tmp_path):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(ALPACA_LINE + b'{"instruction": "caf\xe9", "output": "b"}\n'))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 2 \(byte 61 of the decompressed data\)"):
        load_records(str(path))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(ALPACA_LINE * 3)
    (folder / "b.jsonl").write_bytes(ALPACA_LINE + b"{oops\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'b.jsonl'))}: line 2: invalid JSON"):
        load_records(str(folder))


def test_a_malformed_jsonl_through_the_entry_point_is_one_line_on_stderr(tiny_checkpoint, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(ALPACA_LINE * 3 + b'{"instruction": "a", "output": \n' + ALPACA_LINE * 8)
    out = tmp_path / "run"
    res = run_cli(
        "finetune/run.py",
        *TINY_RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={out}",
        "data=alpaca",
        f"data.path={path}",
        "data.val_size=2",
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr == f"error: {path}: line 4: invalid JSON: Expecting value (column 32): " + (
        '\'{"instruction": "a", "output":\'\n'
    )
    assert "Failed to load JSON" not in res.stdout and "Generating train split" not in res.stdout


# ---------------------------------------------------------------- numbers in text fields are their text


def test_numbers_in_text_fields_are_their_text_and_wrong_shapes_stay_refused(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "numbers.csv"  # a CSV column is read as text: 007 and 1.50 keep their digits
    csv.write_text("instruction,input,output\nAdd 3 and 4.,,7\nPad 7.,,007\nHalve 3.,,1.50\nZero.,,0\n")
    assert [r["output"] for r in load_records(str(csv))] == ["7", "007", "1.50", "0"]
    dm = make_module(tokenizer, lambda: load_records(str(csv)), val_size=1)
    dm.setup()
    assert sorted(targets_text(tokenizer, x).removesuffix("<|im_end|>") for x in dm.train + dm.val) == sorted(
        ["7", "007", "1.50", "0"]
    )
    jsonl = tmp_path / "numbers.jsonl"  # JSON numbers: str(value)
    jsonl.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": v}) + "\n" for i, v in enumerate([1, 20, -3]))
    )
    parquet = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"instruction": ["One.", "Two.", "Three."], "output": [1, 2, 3]}), parquet)
    alpaca = get_format("alpaca")
    assert [alpaca(r, "x", i)[-1]["content"] for i, r in enumerate(load_records(str(jsonl)))] == ["1", "20", "-3"]
    jsonl.write_text("".join(json.dumps({"instruction": "Halve 5.", "output": v}) + "\n" for v in [2.5, 0.125]))
    assert [alpaca(r, "x", i)[-1]["content"] for i, r in enumerate(load_records(str(jsonl)))] == ["2.5", "0.125"]
    assert [alpaca(r, "x", i)[-1]["content"] for i, r in enumerate(load_records(str(parquet)))] == ["1", "2", "3"]
    messages = get_format("messages")
    assert messages({"messages": [{"role": "user", "content": 2}]}, "x", 0)[0]["content"] == "2"
    for bad, kind in (([1, 2], "list"), ({"a": 1}, "dict"), (True, "bool")):
        with pytest.raises(DataError, match=f"x: record 0 field 'output' is {kind}, expected a string"):
            alpaca({"instruction": "a", "output": bad}, "x", 0)
    with pytest.raises(DataError, match=r"field 'messages\[0\].content' is list"):
        messages({"messages": [{"role": "user", "content": ["a"]}]}, "x", 0)


# ---------------------------------------------------------------- records with no reply to learn


@pytest.mark.parametrize(
    "fmt, record",
    [
        ("messages", {"messages": [{"role": "system", "content": "Be brief."}]}),
        ("messages", {"messages": [{"role": "system", "content": "A."}, {"role": "system", "content": "B."}]}),
        ("messages", {"messages": []}),
        ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}]}),
    ],
)
def test_conversations_without_an_assistant_reply_are_skipped_and_counted_not_blamed_on_length(
    tokenizer, capsys, fmt, record
):
    dm = make_module(tokenizer, lambda: [record] * 6, record_format=fmt, source="d.jsonl", max_seq_length=1024)
    with pytest.raises(DataError) as info:
        dm.setup()
    message = str(info.value)
    assert message.startswith(
        "d.jsonl: none of 6 records gives a training example (a reply to learn): 6 cannot be used "
        "(6 no user or assistant turn; e.g. d.jsonl: record "
    ), message
    assert "max_seq_length" not in message

    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    good = (
        {"messages": turns}
        if fmt == "messages"
        else {"conversations": [{"from": t["role"], "value": t["content"]} for t in turns]}
    )
    dm = make_module(tokenizer, lambda: [record] * 2 + [good] * 6, record_format=fmt, source="d.jsonl", val_size=3)
    dm.setup()
    assert len(dm.train) + len(dm.val) == 6
    assert "skipped 2 of 8 records that cannot be used (2 no user or assistant turn)" in capsys.readouterr().out


def test_skipped_and_too_long_records_are_both_named_when_none_is_left(tokenizer):
    records = [{"instruction": "x" * 300, "output": "y"}] * 3 + [{"instruction": "a", "output": ""}] * 2
    dm = make_module(tokenizer, lambda: records, max_seq_length=16, source="d.json")
    with pytest.raises(DataError) as info:
        dm.setup()
    assert str(info.value).startswith("d.json: none of 5 records gives a training example (a reply to learn): 2 ")
    assert str(info.value).endswith("the other 3 keep no target token within max_seq_length=16")


# ---------------------------------------------------------------- data.split_seed


@pytest.mark.parametrize("value", ["abc", -1, 1.5, True, 2**32])
def test_a_bad_split_seed_names_the_key(value):
    from omegaconf import OmegaConf

    from lit_peft.cli.validate import check_rules, show

    with pytest.raises(ValueError) as info:
        check_rules(OmegaConf.create({"data": {"split_seed": value}}))
    assert str(info.value) == (f"data.split_seed={show(value)} is not valid; expected an integer in [0, {2**32 - 1}]")
    check_rules(OmegaConf.create({"data": {"split_seed": 7}}))
