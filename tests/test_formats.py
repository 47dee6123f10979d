"""Multi-turn formats, turn-boundary truncation, preference pairs (pretraining text: test_text_data.py)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import shared_data
from litgpt import Tokenizer

from lit_peft.data.datamodule import SFTDataModule, record_loader
from lit_peft.data.formats import (
    FORMATS,
    PREFERENCE_FORMATS,
    DataError,
    Preference,
    SkipRecord,
    check_conversation,
    check_preference,
    format_kind,
    load_records,
)
from lit_peft.data.preference import PreferenceDataModule, encode_pair
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
    chosen, rejected = encode_pair(tokenizer, get_template("chatml"), pairs[0].prompt, A1, "Rock.", 10_000)
    ids, mask = hand_mask(tokenizer, *by_hand("chatml", [(U1, A1)], bos, eos))
    ids, mask = ids[:-1], mask[:-1]  # a scored side ends with the reply's end token (no separator after it)
    assert chosen["input_ids"].tolist() == ids and (chosen["labels"] != IGNORE_INDEX).tolist() == mask
    prompt_len = mask.index(True)
    assert rejected["input_ids"][:prompt_len].tolist() == ids[:prompt_len]
    assert targets(tokenizer, rejected) == "Rock.<|im_end|>"
    # Too long by the longer reply: the shared prompt loses tokens from the left, down to prompt_min_share of the
    # length; with share 0 the replies stay whole, with share 0.5 the prompt keeps half and the replies are cut.
    reply_len = max(len(encode_text(tokenizer, f"{r}<|im_end|>")) for r in (A1, "Rock."))  # the longer reply
    limit = reply_len + 3
    for share, kept in ((0.0, 3), (0.5, limit // 2)):
        stats = Counter()
        sides = encode_pair(tokenizer, get_template("chatml"), pairs[0].prompt, A1, "Rock.", limit, share, stats)
        for side in sides:
            assert side["input_ids"][:kept].tolist() == ids[prompt_len - kept : prompt_len]
            assert (side["labels"][:kept] == IGNORE_INDEX).all() and side["labels"][kept] != IGNORE_INDEX
            assert len(side["input_ids"]) <= limit
        assert stats == Counter(cut_prompt=1, cut_reply=int(share > 0))


def targets(tokenizer, side) -> str:
    return tokenizer.processor.decode(
        side["input_ids"][side["labels"] != IGNORE_INDEX].tolist(), skip_special_tokens=False
    )


def shared_prompt(chosen, rejected) -> list[int]:
    """The prompt ids of a pair, checking that both sides have the same ones."""
    n = int((chosen["labels"] != IGNORE_INDEX).nonzero()[0])
    assert n == int((rejected["labels"] != IGNORE_INDEX).nonzero()[0])
    assert chosen["input_ids"][:n].tolist() == rejected["input_ids"][:n].tolist()
    return chosen["input_ids"][:n].tolist()


def test_a_pairs_two_sides_share_one_prompt_at_every_length(tokenizer):
    template = get_template("chatml", "Be brief.")
    prompt = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
    chosen_text, rejected_text = "Pear.", "Pear, then plum, then a very long list of every other fruit there is."
    full = encode_pair(tokenizer, template, prompt, chosen_text, rejected_text, 10_000)
    whole_prompt = shared_prompt(*full)
    replies = [full[i]["input_ids"][len(whole_prompt) :].tolist() for i in (0, 1)]
    total = len(whole_prompt) + max(map(len, replies))
    for limit in range(2, total + 3):
        for share in (0.0, 0.25, 0.5, 0.9):
            chosen, rejected = encode_pair(tokenizer, template, prompt, chosen_text, rejected_text, limit, share)
            kept = shared_prompt(chosen, rejected)
            assert kept == whole_prompt[len(whole_prompt) - len(kept) :]  # the prompt's end (TRL's keep_end)
            if limit >= total:
                assert len(kept) == len(whole_prompt)
            else:  # the most prompt that leaves the longer reply whole, and at least the share
                room_for_reply = limit - max(map(len, replies))
                assert len(kept) == min(len(whole_prompt), max(room_for_reply, int(share * limit), 1), limit - 1)
            for side, reply in zip((chosen, rejected), replies, strict=True):
                assert len(side["input_ids"]) <= limit
                assert side["input_ids"][len(kept) :].tolist() == reply[: limit - len(kept)]  # the reply's start
                assert (side["labels"][len(kept) :] != IGNORE_INDEX).all()
    stats = Counter()
    assert encode_pair(tokenizer, template, prompt, chosen_text, rejected_text, 1, stats=stats) is None
    assert stats == Counter(dropped=1)
    with pytest.raises(ValueError, match=r"prompt_min_share=1.0 must be in \[0, 1\)"):
        encode_pair(tokenizer, template, prompt, chosen_text, rejected_text, 64, prompt_min_share=1.0)


def test_real_preference_pairs_share_their_prompt(tokenizer, capsys):
    path = shared_data("llamafactory_demo/dpo_en_demo.json")
    load, source = record_loader({"path": str(path)}, seed=0)
    records = load()[:60]
    dm = PreferenceDataModule(
        tokenizer, get_template("chatml"), lambda: records, "sharegpt_pairs", source, 512, 2, 8, 0
    )
    dm.setup()
    assert len(dm.train) + len(dm.val) == 60
    for pair in dm.train + dm.val:
        kept = shared_prompt(pair["chosen"], pair["rejected"])
        assert max(len(pair[s]["input_ids"]) for s in ("chosen", "rejected")) <= 512
        assert len(kept) >= 1
    # Record 2 of the file (1 prompt token on the chosen side and 45 on the rejected one before): one shared prompt,
    # at least half the length, or whole.
    pair = PREFERENCE_FORMATS["sharegpt_pairs"](records[2], source, 2)
    full = encode_pair(tokenizer, get_template("chatml"), pair.prompt, pair.chosen, pair.rejected, 10**6)
    cut = encode_pair(tokenizer, get_template("chatml"), pair.prompt, pair.chosen, pair.rejected, 512)
    whole, kept = shared_prompt(*full), shared_prompt(*cut)
    assert kept == whole[len(whole) - len(kept) :] and len(kept) >= min(len(whole), 256)
    out = capsys.readouterr().out
    assert "pairs' shared prompts from the left and" in out and "of 60 pairs' shared prompts" in out


def test_hh_rlhf_file_pairs_and_earlier_assistant_turns_are_context(tokenizer):
    from lit_peft.data.datamodule import record_loader

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


# ---------------------------------------------------------------- one rule for broken conversations

BROKEN = {
    "empty reply": [{"role": "user", "content": U1}, {"role": "assistant", "content": "  "}],
    "empty user turn": [
        {"role": "user", "content": U1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": A2},
    ],
    "two user turns": [
        {"role": "user", "content": U1},
        {"role": "user", "content": U2},
        {"role": "assistant", "content": A2},
    ],
    "no final reply": [
        {"role": "user", "content": U1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": U2},
    ],
    "reply first": [{"role": "assistant", "content": A1}, {"role": "user", "content": U2}],
}


def as_record(fmt: str, messages: list[dict]) -> dict:
    """A conversation written in one of the record formats."""
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "guanaco":
        return {
            "text": "".join(f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
        }
    assert fmt == "guanaco-llama2"
    text, i = "", 0
    while i < len(messages):  # [INST] user [/INST] reply </s>, pairs in order
        user = messages[i]["content"] if messages[i]["role"] == "user" else ""
        i += messages[i]["role"] == "user"
        reply = messages[i]["content"] if i < len(messages) and messages[i]["role"] == "assistant" else ""
        i += i < len(messages) and messages[i]["role"] == "assistant"
        text += f"<s>[INST] {user} [/INST] {reply} </s>"
    return {"text": text}


@pytest.mark.parametrize(
    "fmt, case",
    [
        (fmt, case)
        for fmt in ("messages", "sharegpt", "guanaco", "guanaco-llama2")
        for case in BROKEN
        # Llama-2's [INST] shape cannot write two user turns in a row or a reply before the first user turn.
        if not (fmt == "guanaco-llama2" and case in ("two user turns", "reply first"))
    ],
)
def test_one_rule_skips_broken_conversations_in_every_format(fmt, case):
    messages = FORMATS[fmt.split("-")[0]](as_record(fmt, BROKEN[case]), "d.jsonl", 7)
    with pytest.raises(SkipRecord, match=r"d.jsonl: record 7: "):
        check_conversation(messages, "d.jsonl", 7)


def test_both_guanaco_shapes_agree_and_a_good_conversation_passes():
    good = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}]
    for case in (good, BROKEN["empty reply"], BROKEN["empty user turn"]):
        shapes = [FORMATS["guanaco"](as_record(f, case), "d", 0) for f in ("guanaco", "guanaco-llama2")]
        assert shapes[0] == shapes[1] == [{**m, "content": m["content"].strip()} for m in case]
    assert check_conversation([{"role": "system", "content": "S"}, *good], "d", 0)[1:] == good
    with pytest.raises(SkipRecord, match="turn 2 is a system turn"):
        check_conversation([*good, {"role": "system", "content": "S"}, *good], "d", 0)
    pair = Preference(good[:1], A1, "")
    with pytest.raises(SkipRecord, match="record 0: the rejected reply is empty"):
        check_preference(pair, "d", 0)
    with pytest.raises(SkipRecord, match="ends with an assistant turn, not with the user's"):
        check_preference(Preference(good, A1, A2), "d", 0)


@pytest.mark.parametrize(
    "fmt, rel, expected",
    [
        ("alpaca", "alpaca/alpaca_5000.json", {2335: "empty assistant turn", 4658: "empty assistant turn"}),
        (
            "guanaco",
            "oasst_guanaco/guanaco-llama2-1k.train.jsonl",
            {434: "empty user turn", 510: "empty user turn", 899: "empty assistant turn"},
        ),
    ],
)
def test_real_files_skip_their_broken_conversations(fmt, rel, expected):
    records = load_records(str(shared_data(rel)))
    skipped = {}
    for i, r in enumerate(records):
        try:
            check_conversation(FORMATS[fmt](r, rel, i), rel, i)
        except SkipRecord as e:
            skipped[i] = e.reason
    assert skipped == expected


def test_real_hh_rlhf_skips_broken_pairs():
    rel = "hh_rlhf/harmless-base_test.jsonl.gz"
    records = load_records(str(shared_data(rel)))
    skipped = {}
    for i, r in enumerate(records):
        try:
            check_preference(PREFERENCE_FORMATS["hh_rlhf"](r, rel, i), rel, i)
        except SkipRecord as e:
            skipped[i] = e.reason
    broken = {i for i, reason in skipped.items() if reason == "roles do not alternate"}
    assert broken == {667, 763, 1319, 1849}  # two Human (or Assistant) turns in a row
    assert {i for i, reason in skipped.items() if reason == "empty reply"} == {86, 516, 925, 1103}
    assert len(skipped) == 13  # and 5 whose two dialogues differ before the last reply


# ---------------------------------------------------------------- length reports


def test_records_dropped_or_cut_for_length_are_reported(tokenizer, capsys):
    two = {"messages": TWO_TURNS["messages"]["messages"]}
    records = [
        {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "y"}]},  # dropped
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "z" * 80}]},  # cut inside
        two,  # the second turn does not fit: cut after the first
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fits"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},  # skipped
    ] * 2
    limit = 60
    bos, eos = special_strings(tokenizer)
    segments = get_template("chatml").segments(two["messages"], bos, eos)
    assert (
        len(encode_text(tokenizer, "".join(t for t, _ in segments[:3])))
        < limit
        < len(encode_text(tokenizer, "".join(t for t, _ in segments[:7])))
    )
    dm = SFTDataModule(tokenizer, get_template("chatml"), lambda: records, "messages", "d.jsonl", limit, 2, 2, 0)
    dm.setup()
    assert len(dm.train) + len(dm.val) == 6
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"skipped 2 of 10 records that cannot be used \(2 empty assistant turn\), e\.g\. d\.jsonl: record [49]: "
        r"turn 1 \(assistant\) is empty",
        out[0],
    )
    assert out[1:] == [
        "d.jsonl: dropped 2 of 10 records: no target token fits in max_seq_length=60",
        "d.jsonl: cut 4 of 10 records at max_seq_length=60: 2 inside their first reply, 2 after the last whole turn "
        "that fits",
        f"held-out set: {len(dm.val)} examples from 2 records (data.val_size=2, data.split_seed=0); training: "
        f"{len(dm.train)} examples",
    ]


def test_lima_reports_what_it_drops_and_cuts(tokenizer, capsys):
    rel = "lima/lima.json"
    records = load_records(str(shared_data(rel)))[790:850]  # holds the file's records 806 and 841
    limit = 1024
    bos, eos = special_strings(tokenizer)
    dropped = cut = 0
    for i, r in enumerate(records):  # by hand: the prompt before the first reply, and the text up to each reply's end
        segments = get_template("chatml").segments(FORMATS["lima"](r, rel, i), bos, eos)
        first = next(k for k, (_, target) in enumerate(segments) if target)
        last = max(k for k, (_, target) in enumerate(segments) if target)
        if len(encode_text(tokenizer, "".join(t for t, _ in segments[:first]))) >= limit:
            dropped += 1
        elif len(encode_text(tokenizer, "".join(t for t, _ in segments[: last + 1]))) > limit:
            cut += 1
    assert dropped >= 2 and cut > 0
    dm = SFTDataModule(tokenizer, get_template("chatml"), lambda: records, "lima", rel, limit, 2, 2, 0)
    dm.setup()
    out = capsys.readouterr().out
    assert f"{rel}: dropped {dropped} of 60 records: no target token fits in max_seq_length=1024" in out
    assert f"{rel}: cut {cut} of 60 records at max_seq_length=1024" in out
    assert len(dm.train) + len(dm.val) == 60 - dropped
