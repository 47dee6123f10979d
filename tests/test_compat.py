"""The private APIs lit_peft.compat wraps still behave as it assumes: an upgrade that moves one fails here, by name,
before it fails a run."""

from __future__ import annotations

import torch
from torch import nn

from lit_peft import compat


def test_should_accumulate_is_true_inside_an_accumulation_window_only(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(compat.should_accumulate(trainer))

    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False, callbacks=[Watch()],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(BoringModel())
    assert seen == [True, False, True, False, True, False]


def test_a_compiled_call_replaces_the_forward_and_goes_away():
    layer = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    assert compat.compiled_call(layer) is None
    compat.set_compiled_call(layer, lambda *args, **kwargs: "compiled")
    assert layer(x) == "compiled" and compat.compiled_call(layer) is not None
    compat.set_compiled_call(layer, None)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_hydras_basic_sweeper_splits_as_the_sweeper_and_the_report_expect():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = compat.basic_sweeper()
    overrides = OverridesParser.create().parse_overrides(["a=1,2", "b=x"])
    assert sweeper.split_arguments(overrides, None) == [[["a=1", "b=x"], ["a=2", "b=x"]]]
    assert list(sweeper.split_overrides_to_chunks([["a=1"], ["a=2"], ["a=3"]], 2)) == [[["a=1"], ["a=2"]], [["a=3"]]]


def test_a_failed_hydra_jobs_exception_is_read_without_raising():
    from hydra.core.utils import JobReturn, JobStatus

    error = ValueError("bad")
    job = JobReturn(status=JobStatus.FAILED, _return_value=error)
    assert compat.job_exception(job) is error
    assert compat.job_exception(JobReturn(status=JobStatus.COMPLETED, _return_value=1.5)) == 1.5


def test_the_rich_progress_bar_has_what_the_step_bar_overrides():
    from lightning.pytorch.callbacks import RichProgressBar

    bar = RichProgressBar()
    assert hasattr(bar, "train_progress_bar_id") and hasattr(bar, "progress")
    for name in ("_update", "_update_metrics", "_get_train_description", "_initialize_train_progress_bar_id"):
        assert callable(getattr(bar, name)), name
