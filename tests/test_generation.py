"""Batched generation (LitLM.generate_until) against one-at-a-time decoding with litgpt's generate_fn."""

from __future__ import annotations

import torch

PROMPTS = [
    "a",
    "Question: what next?\nAnswer:",
    "The quick brown fox",
    "x" * 200,  # longer than max_length - max_gen_toks: cut from the left
    "Hello, world. " * 3,
    "12345",
    "zz",
]


def _lm(checkpoint, batch_size, model=None):
    from litgpt import Tokenizer

    from lit_peft.inference.evaluation import LitLM
    from lit_peft.models.load import load_base

    return LitLM(model if model is not None else load_base(checkpoint), Tokenizer(checkpoint), batch_size=batch_size)


def _requests(items):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (context, kwargs), i) for i, (context, kwargs) in enumerate(items)]


@torch.inference_mode()
def _one_at_a_time(lm, context: str, gen_kwargs: dict) -> str:
    """The previous generate_until, one request alone: litgpt's generate_fn, greedy, EOS and stop strings."""
    from litgpt.generate.base import generate_fn
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    kwargs = normalize_gen_kwargs(dict(gen_kwargs), lm.max_gen_toks)
    eos = lm.lit_tokenizer.processor.decode([lm.eot_token_id], skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    budget = int(kwargs.pop("max_gen_toks"))
    prompt = torch.tensor(lm.tok_encode(context)[-(lm.max_length - budget) :])
    lm.model.set_kv_cache(batch_size=1, max_seq_length=len(prompt) + budget)
    ids, text = [], ""
    try:
        for token in generate_fn(
            lm.model,
            prompt,
            len(prompt) + budget,
            temperature=0.0,
            stop_tokens=([lm.eot_token_id],),
            include_prompt=False,
            include_eos=False,
        ):
            ids.extend(token.view(-1).tolist())
            text = lm.tok_decode(ids)
            if any(stop and stop in text for stop in until):
                break
    finally:
        lm.model.clear_kv_cache()
    for stop in filter(None, until):
        text = text.split(stop)[0]
    return text


def _stops_cutting(outputs: list[str]) -> list[str]:
    """One short printable stop string from inside each output that has one (cuts that row, maybe others)."""
    stops = []
    for text in outputs:
        for i in range(3, len(text) - 1):
            if text[i : i + 2].isascii() and text[i : i + 2].isprintable():
                stops.append(text[i : i + 2])
                break
    return sorted(set(stops))


def _check_equal(lm, items):
    got = lm.generate_until(_requests(items), disable_tqdm=True)
    expected = [_one_at_a_time(lm, context, kwargs) for context, kwargs in items]
    assert got == expected
    return got


def test_batched_greedy_equals_one_at_a_time(tiny_checkpoint):
    """Prompts of 1 to 104 tokens (the longest cut from the left) in padded batches of 3, shared stop strings that
    cut different rows at different steps, and three groups of settings (max_gen_toks 24, 9 and 16) in one call."""
    lm = _lm(tiny_checkpoint, batch_size=3)
    free = _check_equal(lm, [(p, {"until": [], "max_gen_toks": 24}) for p in PROMPTS])
    assert all(len(text) > 0 for text in free) and len(set(free)) == len(free)
    stops = _stops_cutting(free)
    assert len(stops) >= 3
    items = [(p, {"until": stops, "max_gen_toks": 24, "do_sample": False}) for p in PROMPTS]
    items += [(p, {"until": ["\n\n"], "max_gen_toks": 9}) for p in PROMPTS[:4]]
    items += [(p, {"until": stops[:1], "max_gen_toks": 16, "temperature": 0.0}) for p in PROMPTS[3:]]
    got = _check_equal(lm, items)
    cut = got[: len(PROMPTS)]
    assert sum(len(a) < len(b) for a, b in zip(cut, free, strict=True)) >= 3  # the stop strings did stop rows
    assert all(not any(s in text for s in stops) for text in cut)
    # max_gen_toks 9: at most 9 tokens (byte-level: at most 9 characters), though the same prompts ran on to 24 above
    assert all(0 < len(text) <= 9 for text in got[len(PROMPTS) : -4])


def test_eos_ends_one_row_while_the_batch_continues(tiny_checkpoint):
    lm = _lm(tiny_checkpoint, batch_size=len(PROMPTS))
    items = [(p, {"until": [], "max_gen_toks": 20}) for p in PROMPTS]
    free = lm.generate_until(_requests(items), disable_tqdm=True)
    # EOS takes the place of one character's token wherever the model would pick that character (its logit a hair
    # above the character's): rows that would write it end there, without it; the others run on.
    char = next(c for c in free[1][3:] if c.isascii() and c.isprintable())
    token = lm.tok_encode(char, add_special_tokens=False)[0]
    head = lm.model.lm_head.weight
    with torch.no_grad():
        head[lm.eot_token_id] = head[token] * 1.0001
    got = _check_equal(lm, items)
    assert got[1] == free[1].split(char)[0] and len(got[1]) >= 3
    ended = [g != f for g, f in zip(got, free, strict=True)]
    assert all(g == f.split(char)[0] for g, f, e in zip(got, free, ended, strict=True) if e)
    assert 0 < sum(ended) < len(PROMPTS)
    # The rows that ended left the batch: later decode steps run on the rows still generating only.
    rows = []
    lm.model.register_forward_pre_hook(lambda m, args: rows.append(args[0].size(0)))
    assert lm.generate_until(_requests(items), disable_tqdm=True) == got
    assert rows[0] == len(PROMPTS) and min(rows) == len(PROMPTS) - sum(ended) and rows == sorted(rows, reverse=True)


def test_batched_equals_one_at_a_time_with_a_lora_adapter(tiny_checkpoint):
    from lit_peft.models.load import install_method, load_base

    model = load_base(tiny_checkpoint)
    install_method(model, "lora", {"r": 4, "targets": ["query", "value", "mlp"]})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    lm = _lm(tiny_checkpoint, batch_size=4, model=model)
    items = [(p, {"until": ["\n\n"], "max_gen_toks": 16}) for p in PROMPTS]
    got = _check_equal(lm, items)
    base = _lm(tiny_checkpoint, batch_size=4).generate_until(_requests(items), disable_tqdm=True)
    assert sum(a != b for a, b in zip(got, base, strict=True)) >= len(PROMPTS) - 1  # the adapter is on


def test_chunked_prefill_and_batch_sizes_agree(tiny_checkpoint):
    """A prefill split into 5-column chunks, and batch sizes 1, 2 and 16, give the same text."""
    items = [(p, {"until": ["\n\n"], "max_gen_toks": 12}) for p in PROMPTS]
    expected = _lm(tiny_checkpoint, batch_size=1).generate_until(_requests(items), disable_tqdm=True)
    chunked = _lm(tiny_checkpoint, batch_size=4)
    chunked.prefill_tokens = 4 * 5
    calls = []
    chunked.model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    assert chunked.generate_until(_requests(items), disable_tqdm=True) == expected
    assert (4, 5) in calls and max(width for _, width in calls) == 5  # the prefill was chunked
    for batch_size in (2, 16):
        assert _lm(tiny_checkpoint, batch_size).generate_until(_requests(items), disable_tqdm=True) == expected


def test_requests_are_generated_in_batches(tiny_checkpoint):
    lm = _lm(tiny_checkpoint, batch_size=4)
    calls = []
    lm.model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    budget = 6
    lm.generate_until(_requests([(p, {"until": [], "max_gen_toks": budget}) for p in PROMPTS]), disable_tqdm=True)
    # 7 prompts in batches of 4 and 3: one prefill and budget - 1 decode steps each (no row ends early here).
    assert [rows for rows, _ in calls] == [4] * budget + [3] * budget
    assert len(calls) == 2 * budget


def test_sampling_with_top_k_1_is_greedy(tiny_checkpoint):
    """The sampled path (per-row litgpt `sample`) with one candidate must pick the greedy token."""
    lm = _lm(tiny_checkpoint, batch_size=4)
    greedy = lm.generate_until(_requests([(p, {"until": [], "max_gen_toks": 10}) for p in PROMPTS]), disable_tqdm=True)
    sampled = lm.generate_until(
        _requests(
            [(p, {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 0.8, "top_k": 1}) for p in PROMPTS]
        ),
        disable_tqdm=True,
    )
    assert sampled == greedy
