"""Templates, loss masks, loading and splitting of instruction data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_data
from litgpt import Tokenizer

from lit_peft.data.formats import DataError, load_records
from lit_peft.data.module import SFTDataModule, record_loader
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
