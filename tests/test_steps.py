"""An optimizer step is one mean over its global batch: token-weighted losses, step metrics and lr, DPO's reference."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from litgpt import GPT

from lit_peft.data.steps import StepBatches, batch_units
from lit_peft.methods import build_settings
from lit_peft.models import cqil
from lit_peft.models.cqil import CQILSettings
from lit_peft.tasks import SFT
from lit_peft.tasks.dpo import DPO, reply_logps
from lit_peft.training.lit_module import FineTuneModule, warmup_cosine


def sft_batch(n_targets: int, seed: int, T: int = 40) -> dict[str, torch.Tensor]:
    """One row whose last `n_targets` positions are targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 259, (1, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, T - n_targets :] = ids[:, T - n_targets :]
    return {"input_ids": ids, "labels": labels}


class FixedData(L.LightningDataModule):
    """The given micro-batches as a training loader with step units, as SplitDataModule.train_dataloader makes."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        strategy = self.trainer.strategy
        return StepBatches(self.batches, self.trainer.accumulate_grad_batches, lambda t: strategy.reduce(t, "sum"))


class Capture(L.Callback):
    """The gradients the first optimizer step uses."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}


def one_step(model, task, batches, lr=0.1, warmup=2, callbacks=()):
    module = FineTuneModule(
        model, task, lambda params: torch.optim.SGD(params, lr=lr), warmup_steps=warmup, save_full_state=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=FixedData(batches))
    return trainer


def test_a_two_micro_batch_step_is_the_token_weighted_mean_and_logs_what_it_used():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    reference = GPT(tiny_config())
    reference.load_state_dict(model.state_dict())
    batches = [sft_batch(2, seed=1), sft_batch(30, seed=2)]  # 2 and 30 target tokens

    # The definition: cross-entropy summed over all 32 target tokens of the step, divided by 32.
    sums = []
    for b in batches:
        logits = reference(b["input_ids"])
        sums.append(F.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100, reduction="sum"))
    expected = (sums[0] + sums[1]) / 32
    expected.backward()
    mean_of_means = (sums[0] / 2 + sums[1] / 30) / 2

    capture = Capture()
    trainer = one_step(model, SFT(), batches, callbacks=[capture])
    m = trainer.callback_metrics
    assert m["train/loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - mean_of_means.item()) > 1e-3  # the two definitions differ on these batches
    assert m["train/target_tokens"].item() == 32
    for name, p in reference.named_parameters():
        torch.testing.assert_close(capture.grads[name], p.grad, rtol=1e-4, atol=1e-7)
    # lr: the rate the step used (warmup step 0 of 2), not the one the scheduler set after it.
    assert m["train/lr"].item() == pytest.approx(0.1 * warmup_cosine(2, 1, 0.1)(0))


def test_step_batches_sum_the_units_of_a_window_and_keep_the_short_last_one():
    batches = [sft_batch(n, seed=n) for n in (2, 30, 5, 7, 11)]
    out = list(StepBatches(batches, accumulate=2))
    assert [int(b["step_units"][0]) for b in out] == [32, 32, 12, 12, 11]
    assert [int(b["step_units"][1]) for b in out] == [2, 2, 2, 2, 1]  # sequences
    assert all(torch.equal(o["input_ids"], b["input_ids"]) for o, b in zip(out, batches, strict=True))
    assert int(batch_units(batches[0])["positions"]) == 40  # every position up to the last target


def pair_batch(seed=0, pairs=2, T=12, vocab=259):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * pairs, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "index": torch.arange(pairs)}


def test_dpo_loss_of_a_step_is_the_mean_over_its_pairs():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    method, settings = build_settings("lora", {"r": 4, "targets": ["query", "value"]})
    method.apply(model, settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    task = DPO(beta=0.5)
    a, b = pair_batch(seed=1, pairs=1), pair_batch(seed=2, pairs=3)
    totals = {k: batch_units(a)[k] + batch_units(b)[k] for k in batch_units(a)}
    shares = task(model, a, totals)[0] + task(model, b, totals)[0]
    whole = {k: torch.cat([a[k][:1], b[k][:3], a[k][1:], b[k][3:]]) for k in ("input_ids", "labels")}
    whole["index"] = torch.arange(4)
    torch.testing.assert_close(shares, task(model, whole)[0])  # 4 pairs, each weighing 1/4


def test_dpo_switches_dropout_off_by_default_in_the_policy_passes():
    batch = pair_batch()
    for disable in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny_config())
        method, settings = build_settings("lora", {"r": 4, "dropout": 0.5, "targets": ["query", "value"]})
        method.apply(model, settings)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        task = DPO(disable_dropout=disable)
        task.attach(SimpleNamespace(model=model))
        model.train()
        first, second = (reply_logps(model(batch["input_ids"]), batch["labels"])[0] for _ in range(2))
        assert torch.equal(first, second) == disable  # deterministic passes only without dropout


def cqil_lora_model() -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    base = GPT(tiny_config(n_layer=4))
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(3.0)  # make every layer matter
    model = GPT(tiny_config(n_layer=4))
    model.load_state_dict(base.state_dict())
    cqil.install(model, CQILSettings(((1, 2),)))
    method, settings = build_settings("lora", {"r": 4, "targets": ["query", "value", "mlp"]})
    method.apply(model, settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model.eval(), base.eval()


class Examples:
    """The piece of a preference DataModule that DPO's precompute reads."""

    def __init__(self, batch):
        self.batch = batch

    def all_examples(self):
        return [0, 1]

    def _loader(self, examples, shuffle):
        return [self.batch]


@pytest.mark.parametrize("mode", ["adapters_off", "precompute", "copy"])
def test_every_dpo_reference_mode_is_the_original_model_with_cqil_undone(mode):
    model, base = cqil_lora_model()
    batch = pair_batch()
    with torch.no_grad():
        expected = reply_logps(base(batch["input_ids"]), batch["labels"])[0]
        rewired = reply_logps(model(batch["input_ids"]), batch["labels"])[0]
    assert not torch.allclose(expected, rewired, atol=1e-3)  # adapters and CQIL do change the model
    task = DPO(reference=mode)
    module = SimpleNamespace(model=model, device=torch.device("cpu"), trainer=SimpleNamespace(strategy=None))
    task.attach(module)
    if mode == "precompute":
        task.table = task.precompute(model, Examples(batch), torch.device("cpu"))
    got = task.reference_logps(model, batch)[0]
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-4)


def test_dpo_copy_reference_on_resume_is_the_base_not_the_restored_weights(tmp_path):
    torch.manual_seed(0)
    base = GPT(tiny_config())
    batches = [pair_batch(seed=s) for s in range(4)]

    def run(max_steps, ckpt_path=None):
        model = GPT(tiny_config())
        model.load_state_dict(base.state_dict())  # every run starts from the base checkpoint, as train() loads it
        task = DPO(reference="copy")
        module = FineTuneModule(model, task, lambda p: torch.optim.SGD(p, lr=1.0), save_full_state=True)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=FixedData(batches), ckpt_path=ckpt_path)
        return trainer, module, task

    trainer, module, _ = run(2)
    trained = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    assert any(not torch.equal(trained[n], p) for n, p in base.named_parameters())  # it trained
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    _, resumed, task = run(3, ckpt_path=str(tmp_path / "last.ckpt"))
    for name, p in task.frozen.named_parameters():
        assert torch.equal(p, base.get_parameter(name)), name  # the reference is the base, not step 2's weights
