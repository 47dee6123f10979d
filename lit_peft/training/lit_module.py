"""The LightningModule: a LitGPT GPT with a method installed, trained on a task's loss."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from lit_peft.compat import should_accumulate
from lit_peft.data.steps import batch_units, unpack_units
from lit_peft.errors import UserError
from lit_peft.methods import regularization
from lit_peft.tasks import ExampleLosses, Task
from lit_peft.training.compile import compile_blocks
from lit_peft.training.fsdp import plain_name
from lit_peft.training.memory import JobMemory

COUNT_NAMES = {"tokens": "target_tokens", "pairs": "pairs", "sequences": "sequences", "positions": "positions"}


def warmup_cosine(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0 to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def sharded_grad_norm(wrapped: nn.Module, module: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients of an FSDP-sharded model, the same value on every rank.

    FSDP's own `clip_grad_norm_` reduces the shards across ranks but covers only its root's subtree, so it is called
    with an infinite bound (it measures, scales nothing) on every root (one when the whole model is wrapped);
    parameters outside any FSDP unit are replicated and counted once. A collective: every rank joins it, also one
    whose shards hold no gradient (no trainable element, or a skipped step).
    """
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    roots = FSDP.fsdp_modules(wrapped, root_only=True) or FSDP.fsdp_modules(module, root_only=True)
    managed = {id(p) for r in roots for p in r.parameters()}
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    device = grads[0].device if grads else next(iter(module.parameters()), torch.zeros(())).device
    total = torch.zeros((), device=device)
    with warnings.catch_warnings():  # FSDP warns on a rank without gradients; the rank still takes part
        warnings.filterwarnings("ignore", message=".*with no gradients.*")
        for r in roots:
            total = total + r.clip_grad_norm_(float("inf")).float().to(device) ** 2
    for p in module.parameters():
        if p.grad is not None and id(p) not in managed:
            total = total + p.grad.float().pow(2).sum()
    return total.sqrt()


def clip_sharded_grad_norm_(wrapped: nn.Module, module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of an FSDP-sharded model (`sharded_grad_norm`, a collective); returns the norm
    before clipping. Every local gradient is scaled by the same factor."""
    total = sharded_grad_norm(wrapped, module)
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in module.parameters():
        if p.grad is not None:
            p.grad.mul_(factor.to(p.grad.device, p.grad.dtype))
    return total


class NonFiniteError(UserError):
    """A non-finite loss, gradient or weight; the run stops at that step (train() names the last good checkpoint)."""

    keep_output = True  # the run folder holds the last good checkpoint: a failed run must not remove it

    def __init__(
        self, step: int, loss: float | None, allowed: int, weights: list[str] | None = None, gradient: bool = False
    ) -> None:
        self.step = step
        if weights:
            what = f"weights ({', '.join(weights[:2])}{', ...' if len(weights) > 2 else ''})"
        else:
            what = f"gradient (loss {loss:.4g})" if gradient else f"loss ({loss})"
        hint = (
            f"after {allowed} skipped step(s) (trainer.max_nonfinite_skips={allowed})"
            if allowed
            else "(trainer.max_nonfinite_skips=N skips up to N such steps)"
        )
        super().__init__(f"non-finite {what} at step {step}, nothing of it was saved {hint}")


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (torch CPU and CUDA, Python, NumPy) as plain tensors and ints."""
    import random

    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": pos, "gauss": (has_gauss, cached)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], *n["gauss"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective when distributed)."""
    import torch.distributed as dist

    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


class WeightedMeans:
    """Running sums of value x weight and of weight per name, for means that are exact across batches and ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # name -> [sum of value x weight, sum of weight]

    def add(self, name: str, value: torch.Tensor, weight: torch.Tensor | float) -> None:
        weight = torch.as_tensor(weight, dtype=torch.float64, device=value.device)
        pair = torch.stack([value.detach().double() * weight, weight])
        self.sums[name] = self.sums[name] + pair if name in self.sums else pair

    def reduce(self, strategy) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (sum of value x weight, sum of weight)} over everything added on every rank (a collective: every
        rank calls it with the same names). Clears the sums."""
        names = sorted(self.sums)
        if not names:
            return {}
        device = self.sums[names[0]].device
        total = strategy.reduce(torch.stack([self.sums[n].to(device) for n in names]), reduce_op="sum")
        self.sums = {}
        return {n: (t[0], t[1]) for n, t in zip(names, total, strict=True)}

    def means(self, strategy) -> dict[str, torch.Tensor]:
        """{name: sum(value x weight) / sum(weight)}, leaving out names whose weights sum to 0."""
        return {n: (vw / w).float() for n, (vw, w) in self.reduce(strategy).items() if w > 0}


def loss_standard_error(loss: torch.Tensor, weight: torch.Tensor) -> float | None:
    """The standard error of the held-out loss L = sum_i l_i / sum_i w_i (example i: its loss sum l_i over its w_i
    units, e.g. target tokens), a ratio estimator, by the delta method over the m examples:

        SE = sqrt(sum_i (l_i - L w_i)^2 / (m (m - 1))) / mean(w)

    (with unit weights: the sample standard deviation over sqrt(m)); lit_peft.stats.weighted_mean_se, which the sweep
    report uses too. None with fewer than 2 examples or no unit.
    """
    from lit_peft.stats import weighted_mean_se

    sums, w = loss.double(), weight.double()
    means = torch.where(w > 0, sums / w.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(sums))
    return weighted_mean_se(means.tolist(), w.tolist())


def example_record(rows: torch.Tensor) -> dict[str, list]:
    """Per-example rows (m, 2) of [loss sum, weight] as heldout_losses.json holds them: {"loss": [each example's
    mean loss l_i / w_i (0 for an example without a unit)], "weight": [its units w_i]}."""
    sums, weights = rows[:, 0].tolist(), rows[:, 1].tolist()
    return {
        "loss": [s / w if w > 0 else 0.0 for s, w in zip(sums, weights, strict=True)],
        "weight": [int(w) if float(w).is_integer() else w for w in weights],
    }


def gather_examples(local: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Every rank's per-example rows (n, k), in the held-out set's order (a collective when distributed).

    The validation loader gives rank r the examples r, r + W, r + 2W, ... of the set (a DistributedSampler without
    shuffling, padding the last round with the first examples again): so the ranks' rows are interleaved and the
    padding cut off at `size`, the set's length.
    """
    import torch.distributed as dist

    local = local.detach().cpu()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    if len({len(p) for p in parts}) == 1:  # the sampler's equal shards
        rows = torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])  # (n W, k): row r + i W is rank r's i-th
    else:  # another loader's layout: rank by rank
        rows = torch.cat(parts)
    return rows[:size] if size is not None else rows


class FineTuneModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        save_full_state: bool = False,
        max_nonfinite_skips: int = 0,
        compile: bool | str = False,
        memory: JobMemory | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.optimizer_factory = optimizer
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        # Adapter runs keep only trainable weights in Lightning checkpoints; the frozen base comes from its own folder.
        self.save_full_state = save_full_state
        self.trainable_float32 = not save_full_state  # adapters train in float32 under half precision
        self.strict_loading = save_full_state
        self.max_nonfinite_skips, self.nonfinite_skipped = max_nonfinite_skips, 0
        self.compile_backend = "inductor" if compile is True else compile or None  # trainer.compile
        self.tokens_seen = 0  # real (non-padding) tokens of every optimizer step so far, all ranks; kept on resume
        self._rng_to_restore: dict[str, Any] | None = None  # this rank's RNG state from a checkpoint, set at step 1
        self._step_start: float | None = None
        self._train_sums: WeightedMeans | None = None  # the current optimizer step's metrics, over its micro-batches
        self._step_units: torch.Tensor | None = None
        self._parameter_kinds: dict[str, tuple[int, int]] | None = None  # {kind: (trainable, total)}, from setup()
        # This job's peak memory; train() starts it at the job's beginning (unstarted: the process's lifetime peak).
        self.memory = memory if memory is not None else JobMemory()
        # The last validation: its global step, and its examples' [loss sum, weight] rows (m, 2) in the held-out set's
        # order (None when the task records none).
        self.validated_at: int | None = None
        self.held_out_examples: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def on_train_start(self) -> None:
        from lit_peft.console import info
        from lit_peft.training.summary import parameter_kinds, parameter_table

        kinds = self._parameter_kinds or parameter_kinds(self.model)  # counted before FSDP sharded the parameters
        trainable, total = sum(t for t, _ in kinds.values()), sum(n for _, n in kinds.values())
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)
        if self.trainer.is_global_zero:
            info(parameter_table(self.model, kinds))  # the summary a fine-tuner reads, per kind of module

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # after the loader has started: the stream continues where it was saved
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if self._step_start is None:
            self._step_start = time.perf_counter()

    def setup(self, stage: str) -> None:
        # Before Lightning restores a checkpoint and before the strategy wraps the model: what the task takes from the
        # untrained weights (e.g. DPO's frozen reference copy) is taken from them, also when a run resumes.
        self.task.attach(self)
        if self._parameter_kinds is None:  # whole parameters: a sharding strategy has not split them yet
            from lit_peft.training.summary import parameter_kinds

            self._parameter_kinds = parameter_kinds(self.model)
        if self.compile_backend:  # the model's blocks; what attach copied (DPO's frozen reference) runs eager
            compile_blocks(self.model, self.compile_backend)

    def on_fit_start(self) -> None:
        self.memory.device = self.device
        self.task.setup(self, self.trainer.datamodule)

    def on_validation_start(self) -> None:
        self.memory.device = self.device
        self.task.setup(self, self.trainer.datamodule)  # also for a validation before training (idempotent)

    # ---------------------------------------------------------------- training

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The micro-batch's share of the step's loss, normalised by the units of the whole global batch.

        With `step_units` (data/steps.py) the micro-batches' losses add up, over the step and the ranks, to the global
        batch's mean; Lightning divides what this returns by the accumulation and DDP averages the gradients over the
        ranks, so it is scaled by both. Without them (a loader that is not a StepBatches), each micro-batch is
        normalised by its own units and the step is their mean.
        """
        packed = batch.get("step_units")
        totals = unpack_units(packed) if packed is not None else None
        loss, metrics = self.task(self.model, batch, totals)
        reg = regularization(self.model)  # the method's own loss term (HRA's orth_reg), added once per optimizer step
        local = batch_units(batch)
        if self._train_sums is None:
            self._train_sums = WeightedMeans()
        self._train_sums.add("loss", loss, 1.0)  # shares of the step's loss (or, without step units, batch means)
        if reg is not None:
            self._train_sums.add("regularizer", reg, 1.0)
        self._step_units = packed
        for name, value in metrics.items():
            self._train_sums.add(name, value, local[self.task.metric_units.get(name, self.task.unit)])
        self._tokens = getattr(self, "_tokens", 0) + int(local["positions"])  # real tokens, not padding
        if totals is None:
            return loss if reg is None else loss + reg
        return loss * self.trainer.accumulate_grad_batches * self.trainer.world_size + (0 if reg is None else reg)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step about to be taken: its loss and metrics over the global batch, and the learning rate it uses."""
        if self._train_sums is None:
            return
        sums = self._train_sums.reduce(self.trainer.strategy)
        self._train_sums = None
        shares, count = sums.pop("loss")
        loss = shares if self._step_units is not None else shares / count
        grad_norm = self._grad_norm()
        if not self._finite_step(loss, grad_norm):
            return
        self.log("train/loss", loss.float(), prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False, sync_dist=False)
        for name, (vw, w) in sums.items():
            if w > 0:
                self.log(f"train/{name}", (vw / w).float(), on_step=True, on_epoch=False, sync_dist=False)
        if self._step_units is not None:
            counts = unpack_units(self._step_units)
            for unit in dict.fromkeys([self.task.unit, *self.task.metric_units.values()]):
                self.log(f"train/{COUNT_NAMES[unit]}", counts[unit].float(), on_step=True, on_epoch=False)
            self.tokens_seen += int(counts["positions"])  # every rank's real tokens of this step
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), prog_bar=True, on_step=True, on_epoch=False)

    def _grad_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients before clipping (under FSDP over every rank's shards: a collective)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy):
            return sharded_grad_norm(self.trainer.strategy.model, self)
        grads = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros(())

    def _finite_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step's loss and gradients are finite (on every rank). If not: skip the step (no gradient, so
        the optimizer leaves every weight as it is) while `max_nonfinite_skips` allows, else stop the run."""
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return True
        step = self.trainer.global_step
        if self.nonfinite_skipped >= self.max_nonfinite_skips:
            raise NonFiniteError(step, float(loss), self.max_nonfinite_skips, gradient=bool(torch.isfinite(loss)))
        self.nonfinite_skipped += 1
        for p in self.parameters():
            p.grad = None
        self.print(
            f"step {step}: non-finite loss ({float(loss)}) or gradient; step skipped "
            f"({self.nonfinite_skipped} of trainer.max_nonfinite_skips={self.max_nonfinite_skips})"
        )
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)
        return False

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if should_accumulate(self.trainer):
            return
        elapsed = time.perf_counter() - (self._step_start or time.perf_counter())
        tokens = getattr(self, "_tokens", 0) * self.trainer.world_size
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/step_time_s", elapsed, on_step=True, on_epoch=False)
        self.log("train/peak_memory_bytes", float(self.memory.read()[0]), on_step=True, on_epoch=False)
        self._step_start, self._tokens = None, 0

    # ---------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_sums = WeightedMeans()
        self._val_examples: list[torch.Tensor] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        examples = ExampleLosses()
        loss, metrics = self.task(self.model, batch, examples=examples)
        local = batch_units(batch)
        self._val_sums.add("loss", loss, local[self.task.unit])
        for name, value in metrics.items():
            self._val_sums.add(name, value, local[self.task.metric_units.get(name, self.task.unit)])
        if examples.loss is not None:
            self._val_examples.append(torch.stack([examples.loss, examples.weight], -1).cpu())  # (B, 2)
        return loss

    def on_validation_epoch_end(self) -> None:
        """Held-out means over every unit of the validation set on every rank (not means of batch means), and the
        loss's standard error over the examples (`loss_standard_error`) as val/loss_se."""
        means = self._val_sums.means(self.trainer.strategy)
        for name, value in means.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=False)
        if self.task.perplexity:
            key = self.task.perplexity if isinstance(self.task.perplexity, str) else "loss"
            if key in means:
                self.log("val/ppl", torch.exp(means[key]), sync_dist=False)
        self.held_out_examples = rows = self._gather_held_out()
        if rows is not None:
            se = loss_standard_error(rows[:, 0], rows[:, 1])
            if se is not None:
                self.log("val/loss_se", se, sync_dist=False)
        self.validated_at = self.trainer.global_step

    def _gather_held_out(self) -> torch.Tensor | None:
        """Every rank's per-example [loss sum, weight] rows (m, 2), in the held-out set's order (a collective when
        distributed: every rank's task records them or none does)."""
        examples, self._val_examples = self._val_examples, []
        if not examples:
            return None
        loader = self.trainer.val_dataloaders
        try:
            size = len(loader.dataset)
        except (AttributeError, TypeError):
            size = None
        return gather_examples(torch.cat(examples).double(), size)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UserError("nothing to train: the method left no parameter with requires_grad=True")
        if self.trainable_float32 and any(p.dtype != torch.float32 for p in params):
            # Only where no TrainableFloat32Precision converted the module (FSDP, DeepSpeed bring their own precision
            # plugins): adapters keep float32 weights so that small updates are not rounded away.
            for p in params:
                p.data = p.data.float()
        optimizer = self.optimizer_factory(params)
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.warmup_steps, int(max_steps), self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_algorithm != "value":
            # Lightning's FSDP precision plugin refuses norm clipping (found on a GPU run of tests/test_scale.py).
            clip_sharded_grad_norm_(self.trainer.strategy.model, self, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:  # never write non-finite weights (every rank checks the same replicated weights)
            raise NonFiniteError(self.trainer.global_step, None, self.max_nonfinite_skips, weights=bad)
        checkpoint["task_state"] = self.task.state_dict()
        checkpoint["rng_states"] = gather_rng_states()  # one per rank: dropout draws differ with the data's shapes
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        checkpoint["tokens_seen"] = self.tokens_seen
        if not self.save_full_state:
            # Only the adapter: the frozen base comes from its own folder. Keys are filtered (not re-read from the
            # parameters), since under FSDP the strategy has already gathered them from the shards.
            keep = {f"model.{plain_name(n)}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if plain_name(k) in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.task.load_state_dict(checkpoint.get("task_state") or {})
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        states = checkpoint.get("rng_states") or []
        if states:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._rng_to_restore = states[rank] if rank < len(states) else states[0]
