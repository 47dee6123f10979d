"""The automatic route choices are functions of shapes (and device), and these are their decisions: the ETHER
family's input side (direct vs low-rank, a cost model fitted on a CPU) and a Low-Rank Clone's projected Linears
(factored vs generated weight, a multiply-add count)."""

from __future__ import annotations

import pytest

from lit_peft.methods.transform import low_rank_route_is_cheaper
from lit_peft.models.lrc import factored_route_is_cheaper

# SmolLM2-135M's Linears: (in, out, reflections per group, rows per group)
QKV = (576, 960, [1, 1, 1], [576, 192, 192])
QUERY = (576, 576, [1], [576])
UP = (576, 1536, [1], [1536])
DOWN = (1536, 576, [1], [576])


def ether_low_rank(tokens: int, linear: tuple, nb: int, device: str = "cpu") -> bool:
    i, o, ks, rows = linear
    skinny = 3 * sum(k * nb * r for k, r in zip(ks, rows, strict=True))
    return low_rank_route_is_cheaper(tokens, i, o, ks, skinny, device)


@pytest.mark.parametrize("linear", [QKV, QUERY, UP, DOWN])
@pytest.mark.parametrize("nb", [1, 4, 32])
def test_short_batches_take_the_direct_route(linear, nb):
    assert not ether_low_rank(256, linear, nb)


def test_a_fused_qkv_takes_the_low_rank_route_sooner_than_one_part():
    assert ether_low_rank(1024, QKV, 32) and not ether_low_rank(1024, QUERY, 32)
    assert ether_low_rank(512, QKV, 1) and not ether_low_rank(512, QKV, 4)  # a small nb: a cheaper low-rank route


def test_long_batches_take_the_low_rank_route_except_wide_outputs_at_many_blocks():
    assert all(ether_low_rank(4096, linear, nb) for linear in (QKV, QUERY, DOWN) for nb in (1, 4, 32))
    assert ether_low_rank(4096, UP, 4) and not ether_low_rank(4096, UP, 32)


@pytest.mark.parametrize("linear", [QKV, QUERY, UP, DOWN])
@pytest.mark.parametrize("nb", [1, 4, 32])
def test_once_cheaper_the_low_rank_route_stays_cheaper_for_longer_batches(linear, nb):
    choices = [ether_low_rank(2**p, linear, nb) for p in range(6, 18)]
    assert choices == sorted(choices)  # False ... False True ... True


def test_off_the_cpu_the_direct_route_is_chosen():
    assert ether_low_rank(4096, QKV, 1) and not ether_low_rank(4096, QKV, 1, device="cuda")


def test_a_transform_linear_asks_the_function_and_compute_overrides_it():
    import torch
    from conftest import tiny_config
    from litgpt import GPT

    from lit_peft.methods import adapters, build_settings
    from lit_peft.models.load import install_method

    model = GPT(tiny_config())
    install_method(model, "ether", build_settings("ether", {"targets": ["query", "value"], "nb": 4})[1].to_dict())
    (name, layer), *_ = list(adapters(model))
    ks = [len(t.signs) for t in layer.t_in]
    skinny = 3 * sum(k * t.nb * s for k, t, s in zip(ks, layer.t_in, layer.part_sizes, strict=True))
    for tokens in (1, 64, 10**6):
        want = low_rank_route_is_cheaper(tokens, layer.base.in_features, layer.base.out_features, ks, skinny)
        assert layer.low_rank_is_cheaper(tokens) == want, (name, tokens)
    layer.compute = "direct"
    assert not layer.low_rank_is_cheaper(10**6)
    layer.compute = "low_rank"
    assert layer.low_rank_is_cheaper(1)
    assert torch.is_tensor(layer.base.weight)


def test_the_clone_head_goes_through_the_teacher_width_on_small_batches_only():
    vocab, teacher, student = 49152, 576, 384
    assert factored_route_is_cheaper("in", 256, vocab, teacher, student, 1, train=True)
    assert factored_route_is_cheaper("in", 4096, vocab, teacher, student, 1, train=True)
    assert not factored_route_is_cheaper("in", 4096, vocab, teacher, student, 1, train=False)  # no backward to pay
    assert not factored_route_is_cheaper("in", 65536, vocab, teacher, student, 1, train=True)


def test_square_and_fused_clone_layers_generate_their_weight_on_long_batches():
    assert factored_route_is_cheaper("in", 256, 576, 576, 384, 1, train=True)
    assert not factored_route_is_cheaper("in", 256, 960, 576, 384, 3, train=True)  # a fused qkv: three projections
    assert factored_route_is_cheaper("out", 256, 576, 576, 384, 1, train=True)
    assert not factored_route_is_cheaper("out", 4096, 576, 576, 384, 1, train=True)
