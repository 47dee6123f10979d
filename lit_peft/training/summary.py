"""What a run prints about itself: the parameter table, the step progress bar and the closing summary block."""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------------------------------------- parameter summary


def parameter_kinds(model: Any) -> dict[str, tuple[int, int]]:
    """{kind: (trainable, total)} over the model's unique parameters: adapter (what a method added), norms,
    embeddings, head, and the base's other weights ("linear")."""
    kinds: dict[str, list[int]] = {}
    adapter_prefixes = _adapter_prefixes(model)
    for name, p in model.named_parameters():
        kind = _kind(name, adapter_prefixes)
        counts = kinds.setdefault(kind, [0, 0])
        counts[1] += p.numel()
        if p.requires_grad:
            counts[0] += p.numel()
    order = ("adapter", "linear", "norms", "embeddings", "head", "other")
    return {k: (kinds[k][0], kinds[k][1]) for k in order if k in kinds}


def _adapter_prefixes(model: Any) -> list[str]:
    from lit_peft.methods import adapters

    return [f"{name}." for name, _ in adapters(model)]


def _kind(name: str, adapter_prefixes: list[str]) -> str:
    for prefix in adapter_prefixes:
        if name.startswith(prefix):
            return "linear" if name[len(prefix) :].startswith("base.") else "adapter"
    leaf = name.rsplit(".", 2)
    if any("norm" in part or part.startswith("ln_") for part in leaf[:-1]):
        return "norms"
    if "wte" in name or "embed" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    return "linear" if name.endswith(("weight", "bias")) else "other"


def parameter_table(model: Any, kinds: dict[str, tuple[int, int]] | None = None) -> str:
    """The model summary a fine-tuner reads: trainable and total parameters and the share, per kind of module
    (`kinds`: `parameter_kinds(model)` counted earlier, e.g. before a sharding strategy split the parameters)."""
    kinds = kinds if kinds is not None else parameter_kinds(model)
    trainable = sum(t for t, _ in kinds.values())
    total = sum(n for _, n in kinds.values())
    lines = [f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.3f}%)"]
    width = max(len(f"{total:,}"), 9)
    lines.append(f"  {'kind':<11}{'trainable':>{width}}  {'total':>{width}}  share")
    for kind, (t, n) in kinds.items():
        lines.append(f"  {kind:<11}{t:>{width},}  {n:>{width},}  {100 * t / max(n, 1):5.1f}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- progress bar


def step_progress_bar() -> Any:
    """Lightning's rich progress bar, counting optimizer steps (of max_steps) instead of micro-batches."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        @property
        def total_train_batches(self) -> int | float:
            trainer = self.trainer
            if trainer.max_steps is not None and trainer.max_steps > 0:
                return trainer.max_steps
            return trainer.estimated_stepping_batches

        def _get_train_description(self, current_epoch: int) -> str:
            description = "steps"
            if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
                description += f" (epoch {current_epoch + 1}/{self.trainer.max_epochs})"
            return f"{description:{len(self.validation_description)}}"

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.train_progress_bar_id is None or self.progress is None:
                super().on_train_epoch_start(trainer, pl_module)
            else:  # one bar for the whole run: its total is in steps, not per epoch
                self.progress.update(
                    self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch)
                )
            self._update(self.train_progress_bar_id, trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not self.is_disabled and self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()

        def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)  # the rest is in tensorboard and run.log
            shown: dict[str, Any] = {}
            if "train/loss" in metrics:
                shown["loss"] = metrics["train/loss"]
            tokens = getattr(pl_module, "tokens_seen", None)
            if tokens:
                shown["tokens"] = f"{int(tokens):,}"
            return shown

    return StepProgressBar(leave=True)


# ---------------------------------------------------------------------------------------------------- run summary


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} TiB"


# How the peak memory was measured (metrics.json's peak_memory_kind: lit_peft.training.memory.JobMemory), in words.
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA max allocated, this job",
    "cpu_job_peak_rss": "peak resident, this job",
    "cpu_job_sampled_rss": "peak resident, this job, sampled every 20 ms",
    "cpu_max_rss": "peak resident of the process, all its jobs so far",
}


def run_summary(metrics: dict[str, Any], settings: dict[str, Any], paths: dict[str, str | None]) -> str:
    """The block printed at the end of a run: what ran, what it cost, what it reached, where it went."""
    shown = ", ".join(f"{k}={_short(v)}" for k, v in settings.items() if k != "qkv_layout" and v is not None)
    rows = [("method", f"{metrics.get('method')} ({shown})" if shown else str(metrics.get("method")))]
    rows.append(("task", str(metrics.get("task"))))
    wall = float(metrics.get("wall_time_s") or 0.0)
    tokens = int(metrics.get("tokens") or 0)
    rate = f", {tokens / wall:,.0f} tokens/s" if wall > 0 and tokens else ""
    rows.append(("steps", f"{metrics.get('steps')} ({tokens:,} tokens, {wall:,.1f} s{rate})"))
    peak = metrics.get("peak_memory_bytes")
    if peak:
        kind = MEMORY_KINDS.get(str(metrics.get("peak_memory_kind")), "")
        rows.append(("peak memory", f"{human_bytes(float(peak))}{f' ({kind})' if kind else ''}"))
    initial, final = metrics.get("initial") or {}, metrics.get("final") or {}
    if "val/loss" in final:
        before = f"{_loss_and_se(initial)} -> " if "val/loss" in initial else ""
        line = f"{before}{_loss_and_se(final)}"
        if "val/ppl" in final:
            ppl_before = f"{initial['val/ppl']:.3f} -> " if "val/ppl" in initial else ""
            line += f" (perplexity {ppl_before}{final['val/ppl']:.3f}"
            line += f"; {metrics.get('held_out_examples', 0)} examples)"
        rows.append(("held-out loss", line))
    rows.append(
        (
            "trainable",
            f"{int(metrics.get('trainable_params') or 0):,} of {int(metrics.get('total_params') or 0):,} parameters",
        )
    )
    for key, value in paths.items():
        if value:
            rows.append((key, str(value)))
    return "summary\n" + "\n".join(f"  {k}: {v}" for k, v in rows)


def _loss_and_se(held_out: dict[str, float]) -> str:
    """'2.1232 ± 0.0312': the held-out loss and its standard error (val/loss_se) when there is one."""
    se = held_out.get("val/loss_se")
    return f"{held_out['val/loss']:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)
