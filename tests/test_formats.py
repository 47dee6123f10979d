"""Multi-turn formats, turn-boundary truncation, preference pairs (pretraining text: test_text_data.py)."""

from __future__ import annotations

import pytest
from conftest import shared_data
from litgpt import Tokenizer

from lit_peft.data.formats import FORMATS, PREFERENCE_FORMATS, DataError, format_kind
from lit_peft.data.preference import PreferenceDataModule, encode_reply
from lit_peft.data.templates import ALPACA_SYSTEM, get_template
from lit_peft.data.tokenize import IGNORE_INDEX, encode_segments, encode_text, special_strings

U1, A1, U2, A2 = "Name a fruit.", "Apple.", "Another one?", "Pear, then plum."

# The same two exchanges in every multi-turn format users bring.
TWO_TURNS = {
    "lima": {"instruction": U2, "output": A2, "history": [[U1, A1]]},
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": U1},
            {"from": "gpt", "value": A1},
            {"from": "human", "value": U2},
            {"from": "gpt", "value": A2},
        ]
    },
    "messages": {
        "messages": [
            {"role": "user", "content": U1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": U2},
            {"role": "assistant", "content": A2},
        ]
    },
    "guanaco": {"text": f"### Human: {U1}### Assistant: {A1}### Human: {U2}### Assistant: {A2}"},
    "guanaco-llama2": {"text": f"<s>[INST] {U1} [/INST] {A1} </s><s>[INST] {U2} [/INST] {A2} </s>"},
}
ONE_TURN = {
    "alpaca": {"instruction": U1, "input": "", "output": A1},
    "dolly": {"instruction": U1, "context": "", "response": A1},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer(tiny_checkpoint)


def by_hand(template: str, turns: list[tuple[str, str]], bos: str, eos: str) -> tuple[str, list[str]]:
    """The whole text each template writes, and the reply spans the loss covers, written out by hand."""
    if template == "chatml":
        text = "".join(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for u, a in turns)
        return text, [f"{a}<|im_end|>" for _, a in turns]
    if template == "llama2":
        return "".join(f"{bos}[INST] {u} [/INST] {a} {eos}" for u, a in turns), [f" {a} {eos}" for _, a in turns]
    assert template == "alpaca"
    text = f"{bos}{ALPACA_SYSTEM}\n\n" + "".join(
        f"### Instruction:\n{u}\n\n### Response:\n{a}{eos}\n\n" for u, a in turns
    )
    return text, [f"{a}{eos}" for _, a in turns]


def hand_mask(tokenizer, text: str, targets: list[str]) -> tuple[list[int], list[bool]]:
    """Token ids of the whole text and, from the tokenizer's character offsets, which tokens fall in a reply span."""
    encoding = tokenizer.processor.encode(text, add_special_tokens=False)
    spans, start = [], 0
    for t in targets:
        at = text.index(t, start)
        spans.append((at, at + len(t)))
        start = at + len(t)
    mask = [any(a <= lo and hi <= b for a, b in spans) for lo, hi in encoding.offsets]
    return encoding.ids, mask


@pytest.mark.parametrize("template", ["chatml", "llama2", "alpaca"])
@pytest.mark.parametrize("fmt", [*TWO_TURNS, *ONE_TURN])
def test_each_format_renders_the_template_with_loss_on_every_reply_only(tokenizer, template, fmt):
    record = TWO_TURNS.get(fmt) or ONE_TURN[fmt]
    messages = FORMATS[fmt.split("-")[0]](record, "data.jsonl", 0)
    bos, eos = special_strings(tokenizer)
    example = encode_segments(tokenizer, get_template(template).segments(messages, bos, eos), 10_000)
    turns = [(U1, A1), (U2, A2)] if fmt in TWO_TURNS else [(U1, A1)]
    ids, mask = hand_mask(tokenizer, *by_hand(template, turns, bos, eos))
    assert example["input_ids"].tolist() == ids
    assert (example["labels"] != IGNORE_INDEX).tolist() == mask
    assert sum(mask) > len(turns)  # every reply has target tokens


def test_truncation_keeps_whole_turns_and_never_an_empty_target(tokenizer):
    bos, eos = special_strings(tokenizer)
    template = get_template("chatml")
    messages = FORMATS["sharegpt"](TWO_TURNS["sharegpt"], "d", 0)
    segments = template.segments(messages, bos, eos)
    full = encode_segments(tokenizer, segments, 10_000)
    first_turn_end = len(encode_text(tokenizer, "".join(t for t, _ in segments[:3])))  # ... "Apple.<|im_end|>"
    second_turn_end = len(encode_text(tokenizer, "".join(t for t, _ in segments[:7])))  # ... "plum.<|im_end|>"
    assert (
        encode_segments(tokenizer, segments, second_turn_end)["input_ids"].tolist() == full["input_ids"][:-1].tolist()
    )
    for limit in range(first_turn_end, second_turn_end):
        cut = encode_segments(tokenizer, segments, limit)
        assert len(cut["input_ids"]) == first_turn_end  # the second turn does not fit whole: cut after the first
        assert cut["input_ids"].tolist() == full["input_ids"][:first_turn_end].tolist()
    # When not even the first reply fits, the reply is cut inside, keeping what fits; with no reply token, no example.
    prompt_len = len(encode_text(tokenizer, "".join(t for t, _ in segments[:2])))
    inside = encode_segments(tokenizer, segments, prompt_len + 2)
    assert (inside["labels"] != IGNORE_INDEX).sum() == 2
    assert encode_segments(tokenizer, segments, prompt_len) is None


@pytest.mark.parametrize(
    "fmt, record, message",
    [
        ("sharegpt", {"conversation": []}, "data.jsonl: record 3 has no field 'conversations'"),
        ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "field 'conversations[0]' has role 'alien'"),
        ("messages", {"messages": [{"role": "user"}]}, "field 'messages[0]' needs 'role' and 'content'"),
        ("lima", {"instruction": "a", "output": "b", "history": [["only one"]]}, "'history[0]' must be a [user"),
        ("dolly", {"instruction": "a"}, "record 3 has no field 'response'"),
        ("guanaco", {"text": "plain text"}, "neither '### Human: ..."),
    ],
)
def test_bad_records_name_the_file_the_record_and_the_field(fmt, record, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(")):
        FORMATS[fmt](record, "data.jsonl", 3)


def test_shared_multi_turn_files_load(tokenizer):
    for fmt, rel in (("lima", "lima/lima.json"), ("guanaco", "oasst_guanaco/guanaco-llama2-1k.train.jsonl")):
        from lit_peft.data.formats import load_records

        records = load_records(str(shared_data(rel)))
        convs = [FORMATS[fmt](r, rel, i) for i, r in enumerate(records)]
        assert max(sum(m["role"] == "assistant" for m in c) for c in convs) >= 2  # real multi-turn records


# ---------------------------------------------------------------- preference pairs


def test_preference_formats_agree_on_one_pair(tokenizer):
    hh = {"chosen": f"\n\nHuman: {U1}\n\nAssistant: {A1}", "rejected": f"\n\nHuman: {U1}\n\nAssistant: Rock."}
    lf = {
        "conversations": [{"from": "human", "value": U1}],
        "chosen": {"from": "gpt", "value": A1},
        "rejected": {"from": "gpt", "value": "Rock."},
    }
    flat = {"prompt": U1, "chosen": A1, "rejected": "Rock."}
    pairs = [
        PREFERENCE_FORMATS[f](r, "p.json", 0) for f, r in (("hh_rlhf", hh), ("sharegpt_pairs", lf), ("pairs", flat))
    ]
    assert pairs[0] == pairs[1] == pairs[2]
    assert (
        format_kind("hh_rlhf") == "preference"
        and format_kind("text") == "text"
        and format_kind("lima") == "conversation"
    )
    bos, eos = special_strings(tokenizer)
    side = encode_reply(tokenizer, get_template("chatml"), pairs[0].prompt, A1, 10_000)
    ids, mask = hand_mask(tokenizer, *by_hand("chatml", [(U1, A1)], bos, eos))
    ids, mask = ids[:-1], mask[:-1]  # a scored side ends with the reply's end token (no separator after it)
    assert side["input_ids"].tolist() == ids and (side["labels"] != IGNORE_INDEX).tolist() == mask
    # Too long: the prompt loses tokens from the left, the reply is kept whole.
    short = encode_reply(tokenizer, get_template("chatml"), pairs[0].prompt, A1, sum(mask) + 3)
    assert len(short["input_ids"]) == sum(mask) + 3 and (short["labels"] != IGNORE_INDEX).sum() == sum(mask)


def test_hh_rlhf_file_pairs_and_earlier_assistant_turns_are_context(tokenizer):
    from lit_peft.data.module import record_loader

    path = shared_data("hh_rlhf/harmless-base_test.jsonl.gz")
    load, source = record_loader({"path": str(path)}, seed=0)
    dm = PreferenceDataModule(tokenizer, get_template("chatml"), load, "hh_rlhf", source, 512, 2, 8, 0, max_examples=60)
    dm.setup()
    assert len(dm.train) + len(dm.val) > 40
    ex = dm.train[0]
    for side in ("chosen", "rejected"):
        text = tokenizer.processor.decode(
            ex[side]["input_ids"][ex[side]["labels"] != IGNORE_INDEX].tolist(), skip_special_tokens=False
        )
        assert text.endswith("<|im_end|>") and text.count("<|im_end|>") == 1  # only the last reply is scored
