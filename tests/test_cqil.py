"""CQIL concurrent layer groups and self-distillation: each path against the definition written out by hand."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_RUN, run_cli, tiny_config
from litgpt import GPT
from litgpt.model import Block

from lit_peft.checkpoints.files import ARCH_FILE
from lit_peft.methods import build_settings
from lit_peft.models import cqil
from lit_peft.models.cqil import CQILSettings, cqil_disabled, original_model
from lit_peft.tasks.distill import Distill, distill_sums_chunked


def tiny_model(n_layer=6, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(n_layer=n_layer)).eval()
    # Random-init LitGPT blocks barely change the residual stream; make every layer matter.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def ids(seed=1, T=12):
    return torch.randint(0, 259, (2, T), generator=torch.Generator().manual_seed(seed))


def by_hand(model: GPT, idx: torch.Tensor, groups: list[list[int]], bypass: int = 0) -> torch.Tensor:
    """The rewired forward written out from the definition, with the blocks' own submodules."""
    T = idx.shape[1]
    cos, sin = model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0)
    x = model.transformer.wte(idx)
    first = {g[0]: g for g in groups}
    inside = {i for g in groups for i in g}
    for i, block in enumerate(model.transformer.h):
        if i in first:
            h, attns, out = x, [], x
            for j, b in enumerate(first[i]):
                blk = model.transformer.h[b]
                a = blk.post_attention_norm(blk.attn(blk.norm_1(h), cos, sin))
                extra = sum(attns[max(0, j - bypass) : j], torch.zeros_like(h)) if bypass else torch.zeros_like(h)
                f = h + a + blk.post_mlp_norm(blk.mlp(blk.norm_2(h + a + extra)))
                attns.append(a)
                out = out + (f - h)
            x = out
        elif i not in inside:
            x = Block.forward(block, x, cos, sin)
    return model.lm_head(model.transformer.ln_f(x))


@torch.no_grad()
def test_no_groups_and_switched_off_groups_are_the_base_model_exactly():
    model, base = tiny_model(), tiny_model()
    cqil.install(model, cqil.build_settings({"groups": None}, 6))
    assert torch.equal(model(ids()), base(ids()))
    cqil.install(model, CQILSettings(((1, 2), (3, 4))))
    assert not torch.equal(model(ids()), base(ids()))
    with cqil_disabled(model):
        assert torch.equal(model(ids()), base(ids()))


@torch.no_grad()
@pytest.mark.parametrize(
    "groups, bypass",
    [([[2, 3]], 0), ([[1, 2], [3, 4]], 0), ([[1, 2, 3]], 0), ([[1, 2, 3]], 1), ([[1, 2, 3]], 2), ([[0, 1], [4, 5]], 1)],
)
def test_groups_match_the_definition(groups, bypass):
    model = tiny_model()
    expected = by_hand(model, ids(), groups, bypass)
    cqil.install(model, cqil.build_settings({"groups": groups, "bypass": bypass}, 6))
    torch.testing.assert_close(model(ids()), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_two_member_group_is_h_plus_both_updates_from_the_blocks_themselves():
    model = tiny_model(n_layer=2)
    T = 12
    cos, sin = model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0)
    h = model.transformer.wte(ids())
    f1, f2 = (Block.forward(b, h, cos, sin) for b in model.transformer.h)
    expected = model.lm_head(model.transformer.ln_f(h + (f1 - h) + (f2 - h)))
    cqil.install(model, CQILSettings(((0, 1),)))
    torch.testing.assert_close(model(ids()), expected)


@torch.no_grad()
def test_batched_path_equals_the_simulation():
    model = tiny_model()
    cqil.install(model, CQILSettings(((1, 2), (3, 4, 5))))
    simulated = model(ids())
    cqil.set_mode(model, "batched")
    torch.testing.assert_close(model(ids()), simulated, rtol=1e-5, atol=1e-5)


def _distributed_worker(rank: int, world: int, port: int, bypass: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model()
    cqil.install(model, CQILSettings(((1, 2), (3, 4, 5)), bypass))
    cqil.set_mode(model, "distributed")
    with torch.no_grad():
        logits = model(ids())
        # KV-cache decoding: each rank's members keep their own caches.
        model.set_kv_cache(batch_size=2)
        prompt = ids()[:, :8]
        steps = [model(prompt, input_pos=torch.arange(8))[:, -1]]
        for t in range(8, 11):
            steps.append(model(ids()[:, t : t + 1], input_pos=torch.tensor([t]))[:, -1])
    if rank == 0:
        torch.save({"logits": logits, "decode": torch.stack(steps)}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("bypass", [0, 1])
def test_distributed_path_on_two_gloo_processes_equals_the_simulation(tmp_path, bypass):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_distributed_worker, args=(2, port, bypass, out), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out, weights_only=True)
    model = tiny_model()
    cqil.install(model, CQILSettings(((1, 2), (3, 4, 5)), bypass))
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids()), rtol=1e-5, atol=1e-5)
        full = model(ids())  # decoding step t predicts from the prefix: the full forward's position t
    torch.testing.assert_close(got["decode"], torch.stack([full[:, t] for t in range(7, 11)]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "groups, bypass, message",
    [
        ([[2, 3], [3, 4]], 0, "cqil group [3, 4] overlaps another group at layer 3"),
        ([[2, 4]], 0, "cqil group [2, 4] is not consecutive layers"),
        ([[5, 6]], 0, "cqil group [5, 6] is out of range: the model has layers 0..5"),
        ([[2]], 0, "cqil group [2] has 1 layer; a group needs at least 2"),
        ([[2, 3]], 2, "cqil.bypass=2 must be in 0..1"),
        ("pairs:1-4x", 0, "cqil.groups='pairs:1-4x' is not a preset"),
        ("pairs:1-3", 0, "layers 1..3 (3) are not groups of 2"),
    ],
)
def test_bad_groups_are_one_line_errors(groups, bypass, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cqil.build_settings({"groups": groups, "bypass": bypass}, 6)


def test_presets():
    assert cqil.parse_groups("pairs:12-27") == [[i, i + 1] for i in range(12, 28, 2)]
    assert cqil.parse_groups("triples:0-5") == [[0, 1, 2], [3, 4, 5]]
    assert cqil.parse_groups("size4:4-11") == [[4, 5, 6, 7], [8, 9, 10, 11]]


# ---------------------------------------------------------------- distillation


def test_distill_loss_equals_the_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])  # targets at positions 1,2 / 0,1
    T, alpha = 2.0, 0.7
    positions = [(0, 1), (0, 2), (1, 0), (1, 1)]
    kls, rkls = [], []
    for b, t in positions:
        p = torch.softmax(teacher[b, t] / T, -1)
        q = torch.softmax(student[b, t] / T, -1)
        kls.append((p * (p.log() - q.log())).sum())
        rkls.append((q * (q.log() - p.log())).sum())
    ce = sum(-torch.log_softmax(student[b, t], -1)[labels[b, t + 1]] for b, t in positions) / 4
    # the task's own sums over the target tokens, with heads that pass the "hidden states" through as logits
    head = SimpleNamespace(lm_head=torch.nn.Identity(), config=SimpleNamespace(final_logit_softcapping=None))
    sums = distill_sums_chunked(head, student, lambda h: h, teacher, labels, T, chunk=3)
    assert sums.kl.item() / 4 == pytest.approx(sum(kls).item() / 4, rel=1e-5)
    assert sums.ce.item() / 4 == pytest.approx(ce.item(), rel=1e-5)
    loss = Distill(alpha=alpha, temperature=T).combine(sums.kl, sums.ce) / 4
    assert loss.item() == pytest.approx(alpha * T**2 * sum(kls).item() / 4 + (1 - alpha) * ce.item(), rel=1e-5)
    reverse = distill_sums_chunked(head, student, lambda h: h, teacher, labels, T, "reverse", chunk=3)
    assert reverse.kl.item() / 4 == pytest.approx(sum(rkls).item() / 4, rel=1e-5)
    same = distill_sums_chunked(head, student, lambda h: h, student, labels, T, chunk=3)
    assert same.kl.item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher: no KL


def test_self_teacher_is_the_base_model_while_adapters_and_cqil_train():
    model, base = tiny_model(), tiny_model()
    cqil.install(model, CQILSettings(((2, 3), (4, 5))))
    method, settings = build_settings("lora", {"r": 4, "targets": ["query", "value", "mlp"]})
    method.apply(model, settings)
    model.train()
    task = Distill(teacher="self", alpha=1.0, temperature=2.0)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(task).values()) and task._teachers == []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = {"input_ids": ids(), "labels": ids()}
    first = None
    for _ in range(5):
        loss, m = task(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(task.teacher_logits(model, ids()), base(ids()))
    assert loss.item() < first  # the rewired student moves towards the original model
    assert model.training and model.cqil_enabled  # the teacher forward put everything back
    with torch.no_grad(), original_model(model):
        torch.testing.assert_close(model(ids()), base(ids()))


def test_self_teacher_needs_something_to_switch_off():
    class Module:
        model = tiny_model()

    with pytest.raises(ValueError, match="task.teacher=self needs an adapter method"):
        Distill().setup(Module(), None)


# ---------------------------------------------------------------- saved, merged, loaded, refused


def distill_run(tiny_checkpoint, out, *overrides: str):
    """finetune/run.py task=distill on the tiny model; `overrides` come last and win."""
    return run_cli(
        "finetune/run.py",
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={out}",
        "task=distill",
        *TINY_RUN,
        "data.val_size=8",
        *overrides,
    )


@pytest.fixture(scope="module")
def cqil_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cqil") / "run"
    res = distill_run(
        tiny_checkpoint,
        out,
        "task.alpha=1.0",
        "cqil.groups=[[0,1]]",
        "data.synthetic.num_examples=48",
        "method.targets=[query,value,mlp]",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_cqil_settings_travel_with_adapter_merge_and_loading(cqil_run, tiny_checkpoint, tmp_path):
    from lit_peft.export.hf import export_hf
    from lit_peft.export.merge import merge_checkpoint
    from lit_peft.inference.load import load_for_inference
    from lit_peft.models.load import load_base

    meta = json.loads((cqil_run / "adapter" / "adapter_config.json").read_text())
    assert meta["architecture"] == {"cqil": {"groups": [[0, 1]], "bypass": 0}}
    model, _, _ = load_for_inference(None, cqil_run / "adapter", tiny_checkpoint)
    assert model.cqil.groups == ((0, 1),)
    merged = merge_checkpoint(cqil_run / "adapter", tmp_path / "merged")
    assert json.loads((merged / ARCH_FILE).read_text())["cqil"]["groups"] == [[0, 1]]
    plain = load_base(merged).eval()
    assert plain.cqil.groups == ((0, 1),)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()), model(ids()), rtol=1e-5, atol=1e-5)
        base = load_base(tiny_checkpoint).eval()
        assert getattr(base, "cqil", None) is None  # the base checkpoint itself is untouched
    with pytest.raises(ValueError, match="is a CQIL model .* not a plain Llama"):
        export_hf(merged, tmp_path / "hf")
    res = run_cli("scripts/convert_lit_checkpoint.py", "--checkpoint-dir", str(merged), "--out", str(tmp_path / "hf2"))
    assert res.returncode == 2 and "not a plain Llama" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "hf2").exists()


def test_eval_compares_original_rewired_and_distilled(cqil_run, tmp_path):
    data = tmp_path / "data" / "llmfoundry_eval/world_knowledge"
    data.mkdir(parents=True)
    rows = [
        {"query": f"Question: {w}?", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i, w in enumerate("abcd")
    ]
    (data / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    res = run_cli(
        "eval/run.py",
        "--adapter",
        str(cqil_run / "adapter"),
        "--compare-base",
        "--tasks",
        "local_arc_easy",
        "--data-dir",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--log-samples",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == ["base", "rewired", "adapter"]
    ll = {k: [s["resps"][0][0][0] for s in v["samples"]["local_arc_easy"]] for k, v in report["models"].items()}
    assert ll["base"] != ll["rewired"]  # the rewiring changes the model; the base column is the original
    assert report["settings"]["architecture"] == {"groups": [[0, 1]], "bypass": 0}


@pytest.mark.parametrize("method", ["ether", "oft", "qlora"])
def test_distill_with_cqil_runs_with_other_methods(tiny_checkpoint, tmp_path, method):
    out = tmp_path / method
    extra = ["method.nb=4"] if method in ("ether", "oft") else []
    res = distill_run(
        tiny_checkpoint,
        out,
        "task.alpha=0.5",
        "cqil.groups=pairs:0-1",
        f"method={method}",
        *extra,
        "data.synthetic.num_examples=32",
        "trainer.max_steps=2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == ("lora" if method == "qlora" else method)  # qlora = lora over a 4-bit base
    assert meta["architecture"]["cqil"]["groups"] == [[0, 1]] and (meta["quantize"] is not None) == (method == "qlora")


def test_distill_from_a_checkpoint_teacher(tiny_checkpoint, tmp_path):
    out = tmp_path / "ckpt-teacher"
    res = distill_run(
        tiny_checkpoint,
        out,
        "task.alpha=1.0",
        "task.teacher=checkpoint",
        f"task.teacher_checkpoint={tiny_checkpoint}",
        "method=full",
        "optim.lr=1e-4",
        "data.synthetic.num_examples=32",
        "trainer.max_steps=2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out loss: 0.0000" in res.stdout  # the teacher is the student's own starting point: KL 0 at step 0
