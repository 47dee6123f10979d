"""DPO and continued pretraining: losses against hand computations, the adapters-off reference, entry-point runs."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_RUN, run_cli, shared_data, tiny_config
from conftest import scalars as logged_scalars
from litgpt import GPT

from lit_peft.methods import adapters, build_settings
from lit_peft.tasks.dpo import DPO, dpo_losses, reply_logps

RUN = TINY_RUN


def test_dpo_loss_matches_the_formula_by_hand():
    pc, pr = torch.tensor([-10.0, -7.0]), torch.tensor([-12.0, -6.0])
    rc, rr = torch.tensor([-11.0, -7.5]), torch.tensor([-11.5, -6.5])
    beta = 0.5
    # z = (pc - rc) - (pr - rr): pair 0: 1 - (-0.5) = 1.5; pair 1: 0.5 - 0.5 = 0
    z = [1.5, 0.0]
    sig = [-math.log(1 / (1 + math.exp(-beta * x))) for x in z]
    losses, m = dpo_losses(pc, pr, rc, rr, beta)
    assert losses.tolist() == pytest.approx(sig)
    assert losses.mean().item() == pytest.approx(sum(sig) / 2)
    eps = 0.1
    smooth = [(1 - eps) * s - eps * math.log(1 / (1 + math.exp(beta * x))) for s, x in zip(sig, z, strict=True)]
    assert dpo_losses(pc, pr, rc, rr, beta, eps)[0].mean().item() == pytest.approx(sum(smooth) / 2)
    ipo = [(x - 1 / (2 * beta)) ** 2 for x in z]
    assert dpo_losses(pc, pr, rc, rr, beta, loss="ipo")[0].mean().item() == pytest.approx(sum(ipo) / 2)
    assert m["rewards_chosen"].item() == pytest.approx(beta * (1.0 + 0.5) / 2)
    assert m["rewards_rejected"].item() == pytest.approx(beta * (-0.5 + 0.5) / 2)
    assert m["reward_accuracy"].item() == 0.5  # pair 0 prefers chosen, pair 1 is a tie
    assert m["reward_margin"].item() == pytest.approx(beta * 1.5 / 2)


def test_reply_logps_sum_the_reply_tokens_log_probs():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    sums, counts = reply_logps(logits, labels)
    logp = F.log_softmax(logits, -1)
    expected0 = logp[0, 1, 3] + logp[0, 2, 4]
    expected1 = logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]
    torch.testing.assert_close(sums.double(), torch.stack([expected0, expected1]).double())
    assert counts.tolist() == [2, 4]


def pair_batch(vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[1, 10:] = -100  # padding on one row
    return {"input_ids": ids, "labels": labels, "index": torch.tensor([0, 1])}


@pytest.mark.parametrize(
    "name, values", [("lora", {"r": 4}), ("etherplus", {"nb": 2}), ("etherplusHH", {"nb": 2}), ("oft", {"nb": 4})]
)
def test_dpo_with_adapters_starts_at_log2_and_the_reference_is_the_untouched_base(name, values):
    torch.manual_seed(0)
    config = tiny_config()
    base = GPT(config).eval()
    model = GPT(config).eval()
    model.load_state_dict(base.state_dict())
    method, settings = build_settings(name, {**values, "targets": ["query", "value", "mlp"]})
    method.apply(model, settings)
    task = DPO(beta=0.1)
    batch = pair_batch()
    loss, metrics = task(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # identity at init: policy = reference
    # The reference forward ran with adapters off and put every adapter back on.
    assert all(layer.enabled for _, layer in adapters(model))
    ref_sums, _ = task.reference_logps(model, batch)
    torch.testing.assert_close(ref_sums, reply_logps(base(batch["input_ids"]), batch["labels"])[0])
    # Train the adapter a little: the policy moves, the reference (base) does not, and the base weights stay frozen.
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        loss, _ = task(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task(model, batch)[0].item() < math.log(2)
    torch.testing.assert_close(task.reference_logps(model, batch)[0], ref_sums)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_dpo_reference_modes_for_full_finetuning():
    with pytest.raises(ValueError, match="task.reference=adapters_off needs an adapter method"):
        DPO(reference="adapters_off").resolve_mode(GPT(tiny_config()))
    assert DPO().resolve_mode(GPT(tiny_config())) == "precompute"
    with pytest.raises(ValueError, match="unknown task.loss 'kto'; valid: sigmoid, ipo"):
        DPO(loss="kto")


# ---------------------------------------------------------------- through the entry point


def finetune(tiny_checkpoint, out, *overrides):
    return run_cli("finetune/run.py", *RUN, f"model.checkpoint_dir={tiny_checkpoint}", f"out_dir={out}", *overrides)


def scalars(out):
    """tag -> the logged values in step order."""
    return {tag: [v for _, v in points] for tag, points in logged_scalars(out).items()}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    rows = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"No {w}."} for w in "abcdefghijklmnopqrst"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_run_with_lora_logs_rewards_and_starts_at_log2(tiny_checkpoint, tmp_path, pairs_file):
    out = tmp_path / "dpo"
    res = finetune(tiny_checkpoint, out, "task=dpo", "data=pairs", f"data.path={pairs_file}", "data.val_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    s = scalars(out)
    assert s["val/loss"][0] == pytest.approx(math.log(2), abs=1e-5)  # validate_first: adapters start as identity
    for name in ("train/reward_accuracy", "train/reward_margin", "train/rewards_chosen", "val/reward_accuracy"):
        assert name in s, sorted(s)
    assert (out / "adapter" / "adapter.safetensors").is_file()


def test_dpo_full_finetuning_precomputes_the_reference_and_keeps_it_on_resume(tiny_checkpoint, tmp_path, pairs_file):
    out = tmp_path / "full"
    args = ["task=dpo", "data=pairs", f"data.path={pairs_file}", "data.val_size=4", "method=full", "optim.lr=1e-3"]
    res = finetune(tiny_checkpoint, out, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert scalars(out)["val/loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    table = ckpt["task_state"]["reference_table"]
    assert table.shape == (20, 2, 2) and (table[:, :, 1] > 0).all()  # every pair, both sides, token counts
    res = finetune(tiny_checkpoint, out, *args, "trainer.max_steps=6", "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    again = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert again["global_step"] == 6
    torch.testing.assert_close(again["task_state"]["reference_table"], table)  # not recomputed from trained weights


def identical_pairs(n_pairs: int, identical: set[int]) -> list[dict]:
    """Flat pairs; those in `identical` have the same reply on both sides (or the same but for outer whitespace)."""
    rows = []
    for i in range(n_pairs):
        chosen = f"{i}!"
        rejected = (chosen if i % 2 else f"  {chosen}\n") if i in identical else f"No {i}."
        rows.append({"prompt": f"Say {i}.", "chosen": chosen, "rejected": rejected})
    return rows


def preference_module(checkpoint, rows):
    from litgpt import Tokenizer

    from lit_peft.data.preference import PreferenceDataModule
    from lit_peft.data.templates import get_template

    return PreferenceDataModule(
        Tokenizer(checkpoint), get_template("chatml"), lambda: rows, "pairs", "p.jsonl", 96, 2, 2, 0
    )


def test_dpo_pairs_with_identical_replies_are_skipped_and_counted_in_the_held_out_line(tiny_checkpoint, capsys):
    dm = preference_module(tiny_checkpoint, identical_pairs(12, {1, 4, 7}))
    dm.setup()
    assert len(dm.train) + len(dm.val) == 9
    assert all(not torch.equal(x["chosen"]["input_ids"], x["rejected"]["input_ids"]) for x in dm.all_examples())
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("skipped 3 of 12 records that cannot be used (3 identical replies), e.g. p.jsonl: record")
    assert out[-1] == (
        f"held-out set: {len(dm.val)} examples from 2 records (data.val_size=2, data.split_seed=0); training: "
        f"{len(dm.train)} examples; skipped 3 pairs whose chosen and rejected replies are identical"
    )
    dm = preference_module(tiny_checkpoint, identical_pairs(6, {0}))  # one: singular
    dm.setup()
    assert capsys.readouterr().out.rstrip().endswith("; skipped 1 pair whose chosen and rejected replies are identical")
    dm = preference_module(tiny_checkpoint, identical_pairs(6, set()))  # none: the line as it was
    dm.setup()
    assert capsys.readouterr().out.rstrip().endswith(f"training: {len(dm.train)} examples")

    dm = preference_module(tiny_checkpoint, identical_pairs(5, set(range(5))))
    with pytest.raises(ValueError) as info:
        dm.setup()
    assert str(info.value).startswith(
        "p.jsonl: none of 5 records gives a training example (a reply to learn): 5 cannot be used (5 identical replies;"
    )


def test_dpo_run_skips_identical_pairs_and_keeps_the_datasets_progress_bar_off_the_console(tiny_checkpoint, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in identical_pairs(16, {2, 5})))
    out = tmp_path / "dpo"
    res = finetune(tiny_checkpoint, out, "task=dpo", "data=pairs", f"data.path={path}", "data.val_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    held_out = [line for line in res.stdout.splitlines() if line.startswith("held-out set:")]
    assert len(held_out) == 1, res.stdout
    counts = re.fullmatch(
        r"held-out set: (\d+) examples from 4 records \(data.val_size=4, data.split_seed=0\); training: (\d+) "
        r"examples; skipped 2 pairs whose chosen and rejected replies are identical",
        held_out[0],
    )
    assert counts and int(counts[1]) + int(counts[2]) == 14, held_out[0]
    assert "Generating train split" not in res.stdout + res.stderr  # datasets' bar goes to run.log
    assert "Generating train split" in (out / "run.log").read_text()

    path.write_text("".join(json.dumps(r) + "\n" for r in identical_pairs(8, set(range(8)))))
    res = finetune(tiny_checkpoint, tmp_path / "none", "task=dpo", "data=pairs", f"data.path={path}", "data.val_size=2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert res.stderr.startswith(f"error: {path}: none of 8 records gives a training example"), res.stderr
    assert "8 identical replies" in res.stderr


def test_full_dpo_on_two_ddp_ranks_starts_at_log2_with_the_single_process_reference(
    tiny_checkpoint, tmp_path, pairs_file
):
    """Every rank computes a share of the reference table; the table is summed across ranks, so rank 0 does not train
    on pairs whose rows another rank filled (before: zeros there, and a step-0 loss far from log 2)."""
    args = [
        "task=dpo",
        "data=pairs",
        f"data.path={pairs_file}",
        "data.val_size=4",
        "method=full",
        "trainer.max_steps=2",
        "trainer.validate_first=false",
        "trainer.accelerator=cpu",
    ]
    runs = {}
    for name, extra in (("single", []), ("ddp", ["strategy=ddp", "trainer.devices=2"])):
        out = tmp_path / name
        res = finetune(tiny_checkpoint, out, *args, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = out
    tables = {n: torch.load(o / "checkpoints" / "last.ckpt", weights_only=True)["task_state"] for n, o in runs.items()}
    single, ddp = tables["single"]["reference_table"], tables["ddp"]["reference_table"]
    assert (single[:, :, 1] > 0).all() and (single[:, :, 0] < 0).all()  # every pair, both sides
    torch.testing.assert_close(ddp, single, rtol=1e-5, atol=1e-4)
    for out in runs.values():
        assert scalars(out)["train/loss"][0] == pytest.approx(math.log(2), abs=1e-5)


def test_pretrain_run_logs_perplexity(tiny_checkpoint, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The {i}th line of plain text for pretraining.\n" for i in range(400)))
    out = tmp_path / "pt"
    res = finetune(tiny_checkpoint, out, "task=pretrain", "data=text", f"data.path={corpus}", "data.val_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    s = scalars(out)
    assert s["val/ppl"][0] == pytest.approx(math.exp(s["val/loss"][0]), rel=1e-4)
    assert s["val/loss"][-1] < s["val/loss"][0]


def test_streaming_pretrain_run(tiny_checkpoint, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 8}) + "\n" for i in range(200)))
    out = tmp_path / "st"
    res = finetune(
        tiny_checkpoint,
        out,
        "task=pretrain",
        "data=text",
        f"data.path={corpus}",
        "data.streaming=true",
        "data.val_size=4",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((out / "tokens").glob("tokens-*.bin"))


def test_task_and_data_mismatch_is_a_one_line_error(tiny_checkpoint, tmp_path):
    out = tmp_path / "bad"
    res = finetune(tiny_checkpoint, out, "task=dpo", "data=text", "data.path=x.txt")
    assert res.returncode == 2
    message = "task=dpo trains on preference data; data.format=text is text"
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=pretrain"], "task=pretrain trains on text data; data.format=alpaca is conversation data"),
        (["task=dpo", "data=pairs", "data.path=p.jsonl", "task.loss=kto"], "unknown task.loss 'kto'"),
    ],
)
def test_task_settings_and_data_kinds_are_checked_before_the_run(overrides, message):
    """The same check finetune/run.py makes before Hydra writes anything (the path through the entry point is above)."""
    from hydra import compose, initialize_config_dir

    from lit_peft.cli.validate import validate_config

    with initialize_config_dir(config_dir=str(ROOT / "lit_peft" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*RUN, *overrides])
    cfg.out_dir = "/nonexistent/out"  # Hydra's runtime folder is not known outside a run
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert str(err.value).startswith(message), str(err.value)


def test_sft_on_lima_multi_turn_through_the_entry_point(tiny_checkpoint, tmp_path):
    lima = shared_data("lima/lima.json")
    out = tmp_path / "lima"
    res = finetune(tiny_checkpoint, out, "data=lima", f"data.path={lima}", "data.max_examples=40", "data.val_size=8")
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------- the output head a chunk of target positions at a time


def float64_adapted_model() -> GPT:
    """The tiny model with LoRA on query, value, MLP and the head (moved off its identity start), in float64."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    method, settings = build_settings("lora", {"r": 4, "targets": ["query", "value", "mlp", "head"]})
    method.apply(model, settings)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def gradients(model: GPT) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def full_logps(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """log p(token | prefix) of every next token from the full (B, T, V) logits: (B, T-1, V)."""
    return F.log_softmax(model(ids)[:, :-1].double(), dim=-1)


@pytest.mark.parametrize("chunk", [5, 1000])  # chunks that do not divide the 26 targets, and one
def test_chunked_head_losses_and_gradients_equal_the_full_logits_definitions(chunk):
    from lit_peft.methods import adapters_disabled
    from lit_peft.tasks.distill import Distill
    from lit_peft.tasks.sft import SFT

    model = float64_adapted_model()
    batch = pair_batch(vocab=259)
    ids, labels = batch["input_ids"], batch["labels"]
    targets = labels[:, 1:]
    mask = targets != -100
    picked = lambda logps: logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # noqa: E731

    # SFT: the mean cross-entropy over the target tokens
    sft = SFT()
    sft.head_chunk = chunk
    loss, _ = sft(model, batch)
    loss.backward()
    got = gradients(model)
    expected = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert got.keys() == (want := gradients(model)).keys() and any(n.startswith("lm_head.") for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)

    # DPO: summed reply log-probabilities of the policy against those of the adapters-off reference
    dpo = DPO(beta=0.5, reference="adapters_off")
    dpo.head_chunk = chunk
    loss, _ = dpo(model, batch)
    loss.backward()
    got = gradients(model)
    sums = picked(full_logps(model, ids)).sum(-1)
    with torch.no_grad(), adapters_disabled(model):
        ref = picked(full_logps(model, ids)).sum(-1)
    z = (sums[:2] - ref[:2]) - (sums[2:] - ref[2:])
    expected = -F.logsigmoid(0.5 * z).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    want = gradients(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)

    # Distillation from the model itself with adapters off: alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE
    alpha, temperature = 0.3, 2.0
    distill = Distill(alpha=alpha, temperature=temperature)
    distill.head_chunk = chunk
    loss, metrics = distill(model, batch)
    loss.backward()
    got = gradients(model)
    student_logits = model(ids)[:, :-1]
    with torch.no_grad(), adapters_disabled(model):
        teacher_logits = model(ids)[:, :-1]
    s, t = (F.log_softmax(x / temperature, -1) for x in (student_logits, teacher_logits))
    kl = ((t.exp() * (t - s)).sum(-1) * mask).sum()
    ce = -picked(F.log_softmax(student_logits, -1)).sum()
    n = mask.sum()
    expected = (alpha * temperature**2 * kl + (1 - alpha) * ce) / n
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["teacher_ce"], -picked(F.log_softmax(teacher_logits, -1)).sum() / n)
    want = gradients(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def test_the_chunked_head_never_sees_more_positions_than_a_chunk():
    """Forward and backward (which recomputes the chunks' logits): at most `chunk` rows reach the head at once."""
    from lit_peft.tasks.sft import SFT

    model = float64_adapted_model()
    batch = pair_batch(vocab=259)
    rows = []
    model.lm_head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1].numel()))
    sft = SFT()
    sft.head_chunk = 5
    loss, _ = sft(model, batch)
    loss.backward()
    targets = int((batch["labels"][:, 1:] != -100).sum())  # 26: only target positions reach the head
    assert rows[0] == 0  # the model's own forward hands its head no positions
    # each chunk once in forward and once recomputed in backward, but the last (backward starts with it): 1 row
    assert max(rows) == 5 and sum(rows) == 2 * targets - 1


def test_the_low_rank_clone_loss_with_a_chunked_head_equals_the_full_logits_one():
    import torch.nn.functional as F

    from lit_peft.models.lrc import LowRankClone, LRCSettings
    from lit_peft.tasks.lrc import LowRankCloneTask

    torch.manual_seed(0)
    clone = LowRankClone(GPT(tiny_config()), LRCSettings(16)).double()
    batch = pair_batch(vocab=259)
    results = []
    for chunk in (5, 1000):  # 1000: every target position in one chunk
        task = LowRankCloneTask(temperature=3.0, kl_reduction="token")
        task.head_chunk = chunk
        loss, metrics = task(clone, batch)
        loss.backward()
        results.append((loss, metrics, gradients(clone)))
    (loss, metrics, got), (expected, expected_metrics, want) = results
    torch.testing.assert_close(loss, expected)
    for k in ("ce", "kl", "teacher_ce"):
        torch.testing.assert_close(metrics[k], expected_metrics[k], msg=k)
    assert got.keys() == want.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    # the head's parts against their definitions on the full (B, T, V) logits
    ids, targets = batch["input_ids"], batch["labels"][:, 1:]
    mask = targets != -100
    with torch.no_grad():
        student, teacher = clone.student(ids)[:, :-1], clone.teacher(ids)[:, :-1]
    s, t = (F.log_softmax(x / 3.0, -1) for x in (student, teacher))
    picked = lambda logps: -(logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum() / mask.sum()  # noqa: E731
    torch.testing.assert_close(metrics["ce"], picked(F.log_softmax(student, -1)))
    torch.testing.assert_close(metrics["teacher_ce"], picked(F.log_softmax(teacher, -1)))
    torch.testing.assert_close(metrics["kl"], ((t.exp() * (t - s)).sum(-1) * mask).sum() / mask.sum())
