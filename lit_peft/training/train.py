"""The fine-tuning recipe: a resolved config in, a trained adapter (or model) and tensorboard logs out."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from litgpt import Tokenizer
from omegaconf import DictConfig, OmegaConf

from lit_peft import __version__
from lit_peft.checkpoints.files import write_json
from lit_peft.checkpoints.hub import prepare_checkpoint
from lit_peft.console import info, run_logging
from lit_peft.data.datamodule import SFTDataModule, record_loader
from lit_peft.data.preference import PreferenceDataModule
from lit_peft.data.templates import get_template
from lit_peft.data.text import TextDataModule
from lit_peft.errors import ConfigError
from lit_peft.models.load import enable_gradient_checkpointing, load_base, load_config, precision_dtype
from lit_peft.tasks import check_data_kind, get_task
from lit_peft.training.batches import accumulation_steps, world_size
from lit_peft.training.callbacks import AtomicCheckpointIO, ExportAdapter
from lit_peft.training.compile import uncompile_blocks
from lit_peft.training.fsdp import check_resume_strategy
from lit_peft.training.lit_module import FineTuneModule, NonFiniteError, example_record
from lit_peft.training.memory import JobMemory
from lit_peft.training.precision import precision_plugin
from lit_peft.training.resume import (
    FinalCheckpoint,
    Preemption,
    RunIdentity,
    RunRecord,
    check_identity,
    checkpoint_path,
    data_fingerprint,
    export_step,
    finished,
    load_checkpoint,
    missing_outputs,
    resume_checkpoint,
    run_identity,
)
from lit_peft.training.run_folder import HELDOUT_FILE, claim, lock_run_folder, release_run_folder, write_run_metrics
from lit_peft.training.signals import SIGNALS
from lit_peft.training.summary import run_summary, step_progress_bar


def build_strategy(cfg: DictConfig) -> Any:
    """A Lightning strategy object from `conf/strategy/*.yaml` (`_target_`), or a name such as 'auto'."""
    if "_target_" in cfg:
        return instantiate(cfg, _convert_="all")
    return cfg.get("name", "auto")


def build_datamodule(
    cfg: DictConfig, tokenizer: Tokenizer, template, task, out_dir: Path, max_seq_length: int | None = None
) -> L.LightningDataModule:
    """The DataModule for the data format's kind (conversation, text or preference pairs), checked against the task;
    `max_seq_length` (the model's context when data.max_seq_length is above it) overrides the setting."""
    d = OmegaConf.to_container(cfg.data, resolve=True)
    if max_seq_length is not None:
        d["max_seq_length"] = max_seq_length
    kind = check_data_kind(str(cfg.task.name), task, str(d["format"]))
    common = dict(
        max_seq_length=int(d["max_seq_length"]),
        micro_batch_size=int(cfg.trainer.micro_batch_size),
        val_size=d["val_size"],
        seed=int(cfg.seed),
        split_seed=int(d.get("split_seed", 0)),
        num_workers=int(d.get("num_workers", 0)),
        shuffle=bool(d.get("shuffle", True)),
    )
    if kind == "text":
        return TextDataModule(
            tokenizer,
            d.get("path"),
            d["format"],
            split=d.get("split", "train"),
            columns=d.get("columns") or {},
            separator=d.get("separator"),
            val_split=d.get("val_split", "auto"),
            document_separator=d.get("document_separator"),
            streaming=bool(d.get("streaming", False)),
            cache_dir=d.get("cache_dir") or out_dir / "tokens",
            **common,
        )
    load, source = record_loader(d, int(d.get("split_seed", 0)))  # synthetic data: the same records for every seed
    if kind == "preference":
        share = float(d.get("prompt_min_share", 0.5))
        return PreferenceDataModule(
            tokenizer,
            template,
            load,
            d["format"],
            source,
            max_examples=d.get("max_examples"),
            prompt_min_share=share,
            **common,
        )
    return SFTDataModule(tokenizer, template, load, d["format"], source, max_examples=d.get("max_examples"), **common)


def train(cfg: DictConfig, accepted: Callable[[], None] | None = None, defaults: dict | None = None) -> dict[str, Any]:
    """Run one fine-tuning job. Returns paths of what it wrote and the final metrics.

    The run holds its folder's lock while it lives (training.run_folder); `accepted` is called once the folder and
    the settings are accepted (finetune/run.py writes Hydra's record then); `defaults` are the shipped config's values
    (a key a checkpoint predates is equal to unset when it is at its default).

    Several jobs may run one after another in one process (Hydra's basic launcher, joblib workers): the peak memory
    is this job's (`JobMemory`, started here), and nothing of the job stays alive after it returns (its model,
    module and trainer are collected here; with trainer.compile, dynamo's caches are cleared).
    """
    memory = JobMemory().start()
    out_dir = Path(cfg.out_dir)
    owner = launch_rank() == 0  # the other ranks of a run (its DDP/FSDP processes) write into rank 0's folder
    if owner:
        lock_run_folder(out_dir)
    try:
        with run_logging(out_dir, verbose=bool(cfg.get("verbose", False)), rank=launch_rank()):
            return _train(cfg, accepted if owner else None, defaults, owner, memory)
    finally:
        if owner:
            release_run_folder(out_dir)
        memory.stop()
        release_job(bool(cfg.trainer.get("compile")))


def release_job(compiled: bool) -> None:
    """After a job: collect what it built (Lightning's trainer, callbacks and module form reference cycles, so they
    would otherwise wait for a later garbage collection, holding the model), and with `compiled` reset dynamo, whose
    cached graphs of the job's blocks would otherwise add up over the jobs of a process (and hit its recompile
    limit). Its caches are the process's: a job of a sweep owns its process."""
    import gc

    if compiled:
        torch._dynamo.reset()
    gc.collect()


@dataclasses.dataclass
class Start:
    """Where a run starts: its identity, the checkpoint it resumes from (None: fresh) and what that one says."""

    identity: dict[str, Any]
    record: RunRecord
    resume_from: Path | None = None
    resumed_step: int | None = None
    reexport: bool = False  # a finished run whose export at its last step was cut short
    done: bool = False  # finished, with everything written: nothing to do


def _start(cfg: DictConfig, checkpoint_dir: Path, export_name: str, owner: bool, defaults: dict | None) -> Start:
    """Claim the run folder (rank 0) and decide what to resume: a checkpoint of the same run, or none."""
    out_dir, t, started = Path(cfg.out_dir), cfg.trainer, time.perf_counter()
    ckpt_dir = out_dir / "checkpoints"
    config = OmegaConf.to_container(cfg, resolve=True)
    peeked = _peek_checkpoint(ckpt_dir, cfg.get("resume"))  # read once: its identity, then its contents to resume
    previous = peeked[1].get("lit_peft_run") if peeked else None
    identity = run_identity(config, checkpoint_dir, data_fingerprint(config.get("data") or {}, previous))
    if owner:  # rank 0 decides for the run's folder; the other ranks follow
        note = claim(out_dir, cfg.get("resume"), bool(cfg.get("overwrite", False)), identity_digest(identity))
        if note:
            info(note)
    resume_from = resume_checkpoint(cfg.get("resume"), ckpt_dir)
    check_resume_strategy(resume_from, cfg.strategy)  # a sharded checkpoint needs strategy=fsdp
    if resume_from is None:
        return Start(identity, RunRecord(started))
    saved = peeked[1] if peeked and peeked[0] == resume_from else load_checkpoint(resume_from)
    start = Start(identity, RunRecord(started, saved), resume_from, int(saved.get("global_step", 0)))
    check_identity(saved.get("lit_peft_run"), identity, resume_from, defaults)
    if finished(saved, t.max_steps, t.max_epochs):
        missing = missing_outputs(out_dir, export_name, start.resumed_step)
        if not missing:
            info(
                f"already finished: {resume_from} is at step {start.resumed_step} (trainer.max_steps={t.max_steps}); "
                "nothing was changed (raise trainer.max_steps to train on)"
            )
            start.done = True
            return start
        info(f"finished at step {start.resumed_step}; completing what its run did not write: {', '.join(missing)}")
        # decided before anything is written, so every rank takes the same decision (the export is collective)
        start.reexport = export_step(out_dir / export_name) != start.resumed_step
    return start


def _context_length(cfg: DictConfig, checkpoint_dir: Path) -> int:
    """data.max_seq_length, cut to the model's context (said when it is)."""
    block_size = load_config(checkpoint_dir).block_size
    max_seq_length = int(cfg.data.max_seq_length)
    if max_seq_length > block_size:
        info(
            f"data.max_seq_length={max_seq_length} is above the model's context of {block_size} tokens "
            f"({checkpoint_dir.name}): examples are cut to {block_size}"
        )
    return min(max_seq_length, block_size)


def _adapter_meta(cfg: DictConfig, built: Any, checkpoint_dir: Path) -> dict[str, Any]:
    """What the export records beside the weights: the method and its settings, the base, the prompt, the config."""
    return {
        **built.meta,
        "quantize": cfg.get("quantize"),
        "base_checkpoint": str(checkpoint_dir.resolve()),  # the adapter is used from other folders too
        "template": cfg.model.template,
        "system_prompt": cfg.model.get("system_prompt"),
        "lit_peft_version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _checkpointing(t: DictConfig, ckpt_dir: Path) -> ModelCheckpoint:
    keep = int(t.get("keep_last_checkpoints") or 0)
    return ModelCheckpoint(
        dirpath=ckpt_dir,
        save_last=True,  # last.ckpt, always this run's: no last-v1.ckpt beside a stale one
        enable_version_counter=False,
        save_top_k=keep,  # and the newest `keep` step checkpoints, step-000012.ckpt
        monitor="step" if keep else None,
        mode="max",
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.save_every_n_steps,
    )


def _trainer(cfg: DictConfig, out_dir: Path, accumulate: int, logger: Any, callbacks: list[L.Callback]) -> L.Trainer:
    t = cfg.trainer
    strategy = build_strategy(cfg.strategy)
    precision = precision_plugin(str(cfg.precision), strategy)  # keeps adapters float32 under -true half precision
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=None if precision else cfg.precision,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        max_epochs=t.max_epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[*callbacks, *([step_progress_bar()] if t.progress_bar else [])],
        plugins=[AtomicCheckpointIO(), *([precision] if precision else [])],
        default_root_dir=out_dir,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,  # FineTuneModule logs the parameter table a fine-tuner reads instead
        deterministic=t.get("deterministic", False),
        use_distributed_sampler=False,  # the DataModule shards by rank itself, in the same order as one process
    )


def _fit(trainer: L.Trainer, module: FineTuneModule, data: Any, start: Start, final: FinalCheckpoint) -> None:
    """trainer.fit; a non-finite stop names the last good checkpoint and keeps the folder that holds it."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(start.resume_from) if start.resume_from else None)
    except NonFiniteError as e:
        last = final.saved_step if final.saved_step is not None else start.resumed_step
        where = f"the last good checkpoint is {final.path} (step {last})" if last else "no checkpoint was written"
        stopped = ConfigError(f"{e}; {where}")
        stopped.keep_output = True  # the folder holds what was trained before the failure
        raise stopped from None
    finally:
        SIGNALS.deferred = False
    SIGNALS.honour()  # a stop request noted in the loop: its step is checkpointed; the entry point exits 3


def _train(
    cfg: DictConfig,
    accepted: Callable[[], None] | None,
    defaults: dict | None,
    owner: bool = True,
    memory: JobMemory | None = None,
) -> dict[str, Any]:
    out_dir, t = Path(cfg.out_dir), cfg.trainer
    ckpt_dir = out_dir / "checkpoints"
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    accumulate = accumulation_steps(int(t.global_batch_size), int(t.micro_batch_size), world_size(t))
    task = get_task(cfg.task.name, **{k: v for k, v in cfg.task.items() if k != "name"})
    checkpoint_dir = prepare_checkpoint(cfg.model)
    export_name = task.export_name(cfg.method.name)
    start = _start(cfg, checkpoint_dir, export_name, owner, defaults)
    if start.done:
        export_dir = out_dir / export_name
        return {"out_dir": str(out_dir), "export": str(export_dir), "initial": {}, "final": {}, "log_dir": None}
    if accepted is not None:
        accepted()

    # the model with its method (or the task's own model), the data, the LightningModule
    max_seq_length = _context_length(cfg, checkpoint_dir)
    base = load_base(checkpoint_dir, max_seq_length=max_seq_length)
    built = task.build_model(base, cfg, precision_dtype(str(cfg.precision)))
    model = built.model
    if t.get("gradient_checkpointing"):
        enable_gradient_checkpointing(built.trunk)
    template = get_template(cfg.model.template, cfg.model.get("system_prompt"))
    data = build_datamodule(cfg, Tokenizer(checkpoint_dir), template, task, out_dir, max_seq_length)
    data.setup("fit")  # fail fast on bad data, before anything is written
    module = FineTuneModule(
        model,
        task,
        instantiate(cfg.optim),
        warmup_steps=int(cfg.schedule.warmup_steps),
        min_lr_ratio=float(cfg.schedule.min_lr_ratio),
        save_full_state=built.full,
        max_nonfinite_skips=int(t.get("max_nonfinite_skips") or 0),
        compile=t.get("compile", False),
        memory=memory,
    )

    # Lightning: checkpoints, the run's records, preemption, the export
    meta = _adapter_meta(cfg, built, checkpoint_dir)
    export = ExportAdapter(
        out_dir, meta, checkpoint_dir, full=built.full, every_n_steps=t.save_every_n_steps, name=export_name
    )
    final_checkpoint = FinalCheckpoint(ckpt_dir / "last.ckpt")
    final_checkpoint.saved_step = start.resumed_step  # a resumed run's checkpoint is not written again at its step
    callbacks = [
        _checkpointing(t, ckpt_dir),
        RunIdentity(start.identity),
        start.record,
        final_checkpoint,
        Preemption(final_checkpoint),
        export,
    ]
    logger = build_logger(cfg.logger)
    trainer = _trainer(cfg, out_dir, accumulate, logger, callbacks)
    if logger:  # before anything saves the logger (hparams.yaml is written once), for the HParams tab
        logger.log_hyperparams(hyperparameters(cfg))

    # validate, train, validate
    initial_examples = None  # per-example losses before training: this run's, or a resumed run's first segment's
    if t.validate_first and start.resume_from is None:  # a resumed run keeps the first segment's (none: empty)
        trainer.validate(module, datamodule=data, verbose=False)
        start.record.initial = held_out(trainer)
        initial_examples = held_out_examples(module)
        if trainer.is_global_zero and initial_examples is not None:  # kept also if the run stops before its end
            write_json(out_dir / HELDOUT_FILE, {"initial": initial_examples})
    elif start.resume_from is not None:
        initial_examples = earlier_examples(out_dir)
    _fit(trainer, module, data, start, final_checkpoint)
    if start.reexport:
        export.export(trainer, module)
    if t.validate_last and module.validated_at != trainer.global_step:  # not again at the same step (same weights)
        trainer.validate(module, datamodule=data, verbose=False)

    metrics = _metrics(cfg, trainer, module, data, start, held_out(trainer))
    if trainer.is_global_zero:
        _write_results(cfg, out_dir, metrics, initial_examples, held_out_examples(module), logger, trainer)
        paths = {
            export_name: str(export.target),
            "checkpoint": str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else None,
            "logs": logger.log_dir if logger else None,
            "run.log": str(out_dir / "run.log"),
        }
        info(run_summary(metrics, built.settings, paths))
    uncompile_blocks(model)
    return {
        "out_dir": str(out_dir),
        "export": str(export.target),
        "initial": metrics["initial"],
        "final": metrics["final"],
        "metrics": metrics,
        "log_dir": logger.log_dir if logger else None,
    }


def _metrics(
    cfg: DictConfig, trainer: L.Trainer, module: FineTuneModule, data: Any, start: Start, final: dict[str, float]
) -> dict[str, Any]:
    """metrics.json's content (training.run_folder.RUN_METRICS_KEYS)."""
    model = module.model
    peak, peak_kind = module.memory.read()
    return {
        "status": "ok",
        "method": cfg.method.name,
        "task": cfg.task.name,
        "initial": start.record.initial,
        "final": final,
        "held_out_examples": len(data.val) if data.val is not None else 0,
        "steps": trainer.global_step,
        "tokens": module.tokens_seen,
        "wall_time_s": round(start.record.wall_time_s(), 3),  # all segments of a resumed run
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "config_digest": identity_digest({k: v for k, v in start.identity.items() if k != "data"}),
    }


def _write_results(
    cfg: DictConfig,
    out_dir: Path,
    metrics: dict[str, Any],
    initial_examples: dict | None,
    final_examples: dict | None,
    logger: Any,
    trainer: L.Trainer,
) -> None:
    """metrics.json, the per-example held-out losses, and the logger's HParams (rank 0)."""
    write_run_metrics(out_dir, **metrics)
    if initial_examples is not None or final_examples is not None:
        write_json(out_dir / HELDOUT_FILE, {"initial": initial_examples, "final": final_examples})
    if logger and metrics["final"]:  # the HParams tab ranks runs by these (no hp_metric: see build_logger)
        logger.log_hyperparams(
            hyperparameters(cfg), metrics=hparams_metrics(metrics["final"]), step=trainer.global_step
        )
        logger.finalize("success")  # flushed and closed, as Lightning leaves it after a stage


def held_out_examples(module: FineTuneModule) -> dict[str, list] | None:
    """The last validation's per-example losses and weights, in the held-out set's order (None: none recorded)."""
    rows = module.held_out_examples
    return example_record(rows) if rows is not None else None


def earlier_examples(out_dir: Path) -> dict[str, list] | None:
    """A resumed run's per-example losses before training, as its first segment wrote them (None if it did not)."""
    import json

    try:
        return json.loads((out_dir / HELDOUT_FILE).read_text()).get("initial")
    except (OSError, ValueError, AttributeError):
        return None


def build_logger(node: DictConfig | None) -> Any:
    """The logger from cfg.logger (`_target_`). TensorBoard's is built without Lightning's default hp_metric (a
    constant -1 the HParams tab would rank every run by): the run logs its final held-out metrics there instead."""
    if not node:
        return None
    kwargs: dict[str, Any] = {}
    target = node.get("_target_")
    if target and "default_hp_metric" not in node:
        from hydra.utils import get_class
        from lightning.pytorch.loggers import TensorBoardLogger

        try:
            if issubclass(get_class(str(target)), TensorBoardLogger):
                kwargs["default_hp_metric"] = False
        except (ImportError, AttributeError, TypeError, ValueError):
            pass  # instantiate below says what is wrong
    return instantiate(node, **kwargs)


def hparams_metrics(final: dict[str, float]) -> dict[str, float]:
    """The final held-out metrics as HParams metrics: val/loss -> hparams/val_loss, val/ppl -> hparams/val_ppl, ..."""
    return {f"hparams/{k.replace('/', '_')}": v for k, v in final.items()}


def held_out(trainer: L.Trainer) -> dict[str, float]:
    """The validation metrics Lightning holds after a validation (val/loss, val/ppl, val/<task metric>)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, flattened to `group.key: value` with values TensorBoard can show."""
    from lit_peft.training.resume import flatten

    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


def _peek_checkpoint(ckpt_dir: Path, resume: Any) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `resume` names and its contents (memory-mapped), before resume_checkpoint checks it is whole;
    None when there is none or it cannot be read (resume_checkpoint then says why)."""
    path = checkpoint_path(resume, ckpt_dir)
    if path is None or not path.exists():
        return None
    try:
        return path, load_checkpoint(path)
    except Exception:
        return None


def identity_digest(identity: dict[str, Any]) -> str:
    import hashlib
    import json

    from lit_peft.training.resume import identity_key

    return hashlib.sha256(json.dumps(identity_key(identity), sort_keys=True).encode()).hexdigest()[:16]


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 in a single process and before any launch)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0)
