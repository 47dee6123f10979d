"""Low-Rank Clone: generated weights, clone losses and the folded student against their definitions (dense matrices)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, run_cli, tiny_config
from litgpt import GPT

from lit_peft.methods.qkv import qkv_rows
from lit_peft.models.lrc import SITES, LowRankClone, LRCSettings, ProjectedLinear, load_clone_weights
from lit_peft.tasks.lrc import LowRankCloneTask


def teacher_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1, so that copying the wrong ones shows
                p.uniform_(0.5, 1.5)
    return model.eval()


def set_compute(model: LowRankClone, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, ProjectedLinear):
            m.compute = mode


@pytest.mark.parametrize("mode", ["generated", "factored"])
@pytest.mark.parametrize("tie", [False, True])
def test_identity_projections_at_teacher_width_give_the_teachers_logits_exactly(mode, tie):
    teacher = teacher_model()
    if tie:
        teacher.lm_head.weight = teacher.transformer.wte.weight
    clone = LowRankClone(teacher, LRCSettings(32, init="identity", tie_embedding_projection=tie)).eval()
    set_compute(clone, mode)
    idx = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(clone(idx), teacher(idx))


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_generated_weights_follow_the_definition_and_only_projections_and_norms_train():
    teacher = teacher_model()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    clone = LowRankClone(teacher, LRCSettings(16, tie_embedding_projection=False))
    t, s = teacher.transformer.h[1], clone.student.transformer.h[1]
    rows = qkv_rows(teacher.config)
    w_qkv = t.attn.qkv.weight.double()
    p = {k: v.double() for k, v in s.attn.qkv.proj.items()}
    expected = torch.cat([w_qkv[rows[k]] @ p[k] for k in ("query", "key", "value")])  # W_t @ P per part
    torch.testing.assert_close(s.attn.qkv.weight.double(), expected)
    p_o = s.attn.proj.proj["all"].double()
    torch.testing.assert_close(s.attn.proj.weight.double(), p_o.T @ t.attn.proj.weight.double())  # P^T @ W_t
    p_d = s.mlp.proj.proj["all"].double()
    torch.testing.assert_close(s.mlp.proj.weight.double(), p_d.T @ t.mlp.proj.weight.double())
    p_e = clone.student.transformer.wte.proj.double()
    torch.testing.assert_close(
        clone.student.transformer.wte.weight.double(), teacher.transformer.wte.weight.double() @ p_e
    )
    assert (
        s.attn.qkv.weight.shape == (64, 16) and s.mlp.fc_1.weight.shape == (64, 16) and s.norm_1.weight.shape == (16,)
    )

    trainable = {n for n, q in clone.named_parameters() if q.requires_grad}
    assert all(n.startswith("student.") for n in trainable)
    assert {n.rpartition(".")[2] for n in trainable} == {"query", "key", "value", "all", "proj", "weight"}
    assert all(
        ".proj." in n or n.endswith(("wte.proj", "norm_1.weight", "norm_2.weight", "ln_f.weight")) for n in trainable
    )
    # one optimizer step on the clone loss changes projections and norms, never a teacher weight
    task = LowRankCloneTask()
    idx = torch.randint(0, 320, (2, 20))
    loss, _ = task(clone, {"input_ids": idx, "labels": idx})
    loss.backward()
    torch.optim.SGD([q for q in clone.parameters() if q.requires_grad], lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(s.norm_1.weight, torch.ones(16)) and s.attn.qkv.proj["key"].grad.abs().sum() > 0


def test_clone_losses_kl_and_ce_equal_their_definitions_by_hand():
    teacher = teacher_model()
    clone = LowRankClone(teacher, LRCSettings(16, tie_embedding_projection=True))
    task = LowRankCloneTask(temperature=3.0, aux_scale=0.5, kl_weight=0.7, ce_weight=1.3)
    idx = torch.randint(1, 320, (3, 20))
    labels = idx.clone()
    labels[0, 14:] = -100  # right padding: positions after the last target are not real
    labels[1, :5] = -100  # a prompt: not a target, but real
    eps = teacher.config.norm_eps

    inputs: dict[tuple[str, str, int], torch.Tensor] = {}  # LitGPT's own module inputs, by (model, module, layer)
    hooks = []
    for who, gpt in (("t", teacher), ("s", clone.student)):
        for i, block in enumerate(gpt.transformer.h):
            for key, module in (("block", block), ("attn_y", block.attn.proj), ("mlp", block.mlp)):
                hooks.append(
                    module.register_forward_pre_hook(lambda m, a, k=(who, key, i): inputs.__setitem__(k, a[0]))
                )
    loss, metrics = task(clone, {"input_ids": idx, "labels": labels})
    for h in hooks:
        h.remove()

    real = torch.ones(3, 20, dtype=torch.bool)
    real[0, 14:] = False

    def mse(a, b):
        return ((a - b).pow(2).sum(-1) * real).sum() / (real.sum() * a.size(-1))

    expected = dict.fromkeys(SITES, 0.0)
    rows = qkv_rows(teacher.config)
    for i, (tb, sb) in enumerate(zip(teacher.transformer.h, clone.student.transformer.h, strict=True)):
        ht = rms(inputs[("t", "block", i)], tb.norm_1.weight, eps)
        hs = rms(inputs[("s", "block", i)], sb.norm_1.weight, eps)
        for site, part in (("attn_q", "query"), ("attn_k", "key"), ("attn_v", "value")):
            w = tb.attn.qkv.weight[rows[part]]
            expected[site] += mse(hs @ (w @ sb.attn.qkv.proj[part]).T, ht @ w.T)
        w_o = tb.attn.proj.weight
        expected["attn_o"] += mse(inputs[("s", "attn_y", i)] @ w_o.T, inputs[("t", "attn_y", i)] @ w_o.T)
        mt, ms = inputs[("t", "mlp", i)], inputs[("s", "mlp", i)]
        g_t, u_t = mt @ tb.mlp.fc_1.weight.T, mt @ tb.mlp.fc_2.weight.T
        g_s = ms @ (tb.mlp.fc_1.weight @ sb.mlp.fc_1.proj["all"]).T
        u_s = ms @ (tb.mlp.fc_2.weight @ sb.mlp.fc_2.proj["all"]).T
        expected["mlp_gate"] += mse(g_s, g_t)
        expected["mlp_up"] += mse(u_s, u_t)
        p_d = sb.mlp.proj.proj["all"]
        out_t = (F.silu(g_t) * u_t) @ tb.mlp.proj.weight.T
        out_s = (F.silu(g_s) * u_s) @ (p_d.T @ tb.mlp.proj.weight).T
        expected["mlp_out"] += mse(out_s, out_t @ p_d)
    for site in SITES:
        torch.testing.assert_close(metrics[f"clone_{site}"], expected[site].detach(), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        ts, ss = teacher(idx)[:, :-1] / 3.0, clone(idx)[:, :-1] / 3.0
    pt, ps = ts.softmax(-1), ss.softmax(-1)
    target = labels[:, 1:] != -100
    kl = ((pt * (pt.log() - ps.log())).sum(-1) * target).sum() / 3  # summed over target tokens, per sequence
    ce = F.cross_entropy(clone(idx)[:, :-1].reshape(-1, 320), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(metrics["kl"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ce"], ce.detach(), rtol=1e-5, atol=1e-6)
    total = 1.3 * ce + 0.7 * kl + 0.5 * sum(expected.values())
    torch.testing.assert_close(loss.detach(), total.detach(), rtol=1e-5, atol=1e-5)

    off = LowRankCloneTask(temperature=3.0, clone_sites=["attn_q", "mlp_out"], kl_reduction="token")
    _, m = off(clone, {"input_ids": idx, "labels": labels})
    assert {k for k in m if k.startswith("clone_")} == {"clone_attn_q", "clone_mlp_out"}
    torch.testing.assert_close(m["kl"], kl * 3 / target.sum(), rtol=1e-5, atol=1e-7)


def test_bad_lrc_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown task.clone_sites entry 'attn_x'; valid: attn_q"):
        LowRankCloneTask(clone_sites=["attn_x"])
    with pytest.raises(ValueError, match="unknown lrc.init 'eye'; valid: random, identity"):
        LRCSettings(16, init="eye")
    with pytest.raises(ValueError, match="lrc.target_hidden_size=64 is larger than the teacher's hidden size 32"):
        LowRankClone(teacher_model(), LRCSettings(64))


def test_lrc_run_convert_and_reload_give_the_training_time_students_logits(tiny_checkpoint, tmp_path):
    """task=lrc through the entry point on instruction data (2 DDP ranks), fold with the script, load the student."""
    out = tmp_path / "run"
    args = [*TINY_RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out}"]
    ddp = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.micro_batch_size=1"]
    res = run_cli("finetune/run.py", *args, "task=lrc", "method=full", "lrc.target_hidden_size=16", *ddp)
    assert res.returncode == 0, res.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kl", "train/clone", "train/clone_mlp_out", "val/ppl", "val/teacher_ce"} <= tags
    meta = json.loads((out / "lrc" / "adapter_config.json").read_text())
    assert meta["lrc"]["target_hidden_size"] == 16
    assert len(meta["rank_digests"]) == 2 and len(set(meta["rank_digests"])) == 1  # 2 gloo ranks, same weights

    student_dir = tmp_path / "student"
    res = run_cli("scripts/convert_lrc.py", "--clone", str(out / "lrc"), "--out", str(student_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    from lit_peft.checkpoints.adapter import load_adapter
    from lit_peft.models.load import load_base

    student = load_base(student_dir).eval()
    assert student.config.n_embd == 16 and student.config.head_size == 8 and student.config.intermediate_size == 64
    clone = LowRankClone(load_base(tiny_checkpoint), LRCSettings.from_dict(meta["lrc"])).eval()
    load_clone_weights(clone, load_adapter(out / "lrc")[0], "run")
    idx = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        trained = clone(idx)
        assert not torch.allclose(trained, clone.teacher(idx), atol=1e-2)
        torch.testing.assert_close(student(idx), trained, rtol=1e-5, atol=1e-5)

    again = run_cli("scripts/convert_lrc.py", "--clone", str(out / "lrc"), "--out", str(student_dir))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    # an adapter trained on the converted student merges like on any other base
    res = run_cli("finetune/run.py", *TINY_RUN, f"model.checkpoint_dir={student_dir}", f"out_dir={tmp_path / 'sft'}")
    assert res.returncode == 0, res.stderr[-3000:]
    from lit_peft.export.merge import merge_checkpoint
    from lit_peft.inference.load import load_for_inference

    merged = load_base(merge_checkpoint(tmp_path / "sft" / "adapter", tmp_path / "merged")).eval()
    adapted, _, _ = load_for_inference(None, tmp_path / "sft" / "adapter", student_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), adapted(idx), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="holds a Low-Rank Clone's projections, not an adapter"):
        merge_checkpoint(out / "lrc", tmp_path / "merged2")


def test_lrc_config_errors_name_the_fix():
    from omegaconf import OmegaConf

    from lit_peft.models.lrc import clone_settings

    def cfg(**over):
        base = {"task": {"name": "lrc"}, "method": {"name": "full"}, "lrc": {"target_hidden_size": 16}}
        base.update(over)
        base.setdefault("strategy", {"name": "auto"})
        return OmegaConf.create(base)

    assert clone_settings(cfg()).target_hidden_size == 16
    for over, message in (
        ({"method": {"name": "lora"}}, "method=lora does not apply"),
        ({"lrc": {"target_hidden_size": None}}, "task=lrc needs lrc.target_hidden_size"),
        ({"task": {"name": "sft"}}, "lrc.target_hidden_size=16 applies to task=lrc, not task=sft"),
        ({"strategy": {"_target_": "lit_peft.training.fsdp.fsdp"}}, "shards the teacher"),
        ({"cqil": {"groups": "pairs:0-1"}}, "cqil.groups must be null"),
        ({"lrc": {"target_hidden_size": 16, "width": 3}}, "unknown setting 'width' under lrc"),
    ):
        with pytest.raises(ValueError, match=message):
            clone_settings(cfg(**over))


def test_lrc_on_pretokenized_text_with_a_4bit_teacher_converts_and_exports_to_transformers(tiny_checkpoint, tmp_path):
    pytest.importorskip("bitsandbytes")
    corpus = tmp_path / "tokens.jsonl"
    gen = torch.Generator().manual_seed(0)
    corpus.write_text(
        "".join(
            json.dumps({"input_ids": torch.randint(3, 259, (90,), generator=gen).tolist()}) + "\n" for _ in range(40)
        )
    )
    out = tmp_path / "run"
    res = run_cli(
        "finetune/run.py",
        *TINY_RUN,
        f"model.checkpoint_dir={tiny_checkpoint}",
        f"out_dir={out}",
        "task=lrc",
        "method=full",
        "lrc.target_hidden_size=24",
        "quantize=nf4",
        "data=text",
        "data.format=tokens",
        f"data.path={corpus}",
        "data.val_size=4",
        "trainer.max_steps=2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    student_dir = tmp_path / "student"
    res = run_cli("scripts/convert_lrc.py", "--clone", str(out / "lrc"), "--out", str(student_dir))
    assert res.returncode == 0, res.stderr[-3000:]

    from lit_peft.checkpoints.adapter import load_adapter
    from lit_peft.export.hf import export_hf
    from lit_peft.methods.quantize import quantize_base
    from lit_peft.models.load import load_base

    weights, meta = load_adapter(out / "lrc")
    assert meta["quantize"] == "nf4"
    teacher = load_base(tiny_checkpoint)
    quantize_base(teacher, "nf4")
    clone = LowRankClone(teacher, LRCSettings.from_dict(meta["lrc"])).eval()
    load_clone_weights(clone, weights, "run")
    student = load_base(student_dir).eval()
    idx = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(student(idx), clone(idx), rtol=1e-5, atol=1e-5)  # the 4-bit teacher's weights

    from transformers import AutoModelForCausalLM

    export_hf(student_dir, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert hf.config.hidden_size == 24 and hf.config.head_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, student(idx), rtol=1e-5, atol=1e-5)
