"""The training loop: pure, reports through callbacks, no printing and no files.

Convention: row k of the history (k = 0..epochs) is the state after k epochs: the parameters
after k optimizer steps and the loss at those parameters. The loss computed inside epoch k+1
(before its step) is exactly row k's loss, so only the last row costs an extra evaluation.
With mini-batches, row k's loss is the mean of epoch k+1's batch losses.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.nn.functional as F

from fitcli.errors import RunStatus

if TYPE_CHECKING:
    from fitcli.model import FitModel


class LossFunction(Protocol):
    """A torch.nn.functional loss: mean by default, per element with reduction="none"."""

    def __call__(
        self, input: torch.Tensor, target: torch.Tensor, /, *, reduction: str = ...
    ) -> torch.Tensor: ...


LOSSES: dict[str, LossFunction] = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "smooth_l1": F.smooth_l1_loss,
}


class Stepper(Protocol):
    """What `train` needs of an optimizer: `step()` runs one epoch and returns the loss at the
    parameters before it; `converged` is None while running and a reason once the optimizer has
    stopped by itself (LM).

    Members a stepper may have, which its callers look for with `getattr`/`hasattr` (a Protocol
    cannot declare a member optional):
    `lr()` the learning rate for metrics.csv (`train`; NaN without it); `state_dict()` and
    `load_state_dict(state)` what state.json saves and resume restores (`state`, the sweep's
    recording); `state_dicts_are_copies` True when `state_dict()` hands out objects that nothing
    changes later, so snapshots need not deep-copy them (`rundir.writer.RunWriter`); `failure` None,
    or why the optimizer cannot continue, and `summary_fields()` what summary.json records about
    how it ended (read for LM runs by `experiment` and by the sweep's recording).
    """

    def step(self) -> torch.Tensor: ...

    @property
    def converged(self) -> str | None: ...


@dataclass
class History:
    """Per-epoch record: loss, learning rate, elapsed seconds and parameter vectors."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    params: list[list[float]] = field(default_factory=list)


@dataclass
class TrainResult:
    status: str  # completed | diverged | interrupted
    epochs_run: int
    final_loss: float
    history: History
    reason: str | None = None


# A full batch on the CPU is computed in chunks of rows of about this many bytes per float
# tensor, when it spans at least two of them: each chunk's forward, loss and backward temporaries
# stay in the CPU's caches and the chunks' gradients add up in `raw.grad`. At large n the cost
# per point then stays flat instead of growing (every temporary a trip to main memory), and the
# autograd graph holds one chunk's tensors instead of the whole data set's.
FULL_BATCH_CHUNK_BYTES = 2 * 2**20


def full_batch_chunk_rows(n: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """Rows per chunk of a full-batch epoch, or None to compute it in one piece."""
    if device.type != "cpu":
        return None  # a GPU wants few, large kernels
    rows = FULL_BATCH_CHUNK_BYTES // (torch.finfo(dtype).bits // 8)
    return rows if n >= 2 * rows else None


class TorchStepper:
    """A torch.optim optimizer (and optional lr scheduler) over a full batch or mini-batches.

    With `rows_loss` (``rows_loss(yhat_rows, y_rows, rows) -> loss`` of a slice of the data, the
    same mean-reduced loss as `loss_fn` restricted to those rows) a large full batch on the CPU is
    computed in chunks (see FULL_BATCH_CHUNK_BYTES): the same gradient, summed in another order.
    """

    converged: str | None = None

    def __init__(
        self,
        model: FitModel,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        batch_size: int | None = None,
        shuffle_seed: int = 0,
        rows_loss: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.optimizer, self.scheduler = optimizer, scheduler
        self.n = x.shape[0]
        self.batch_size = batch_size if batch_size and batch_size < self.n else None
        self.generator = torch.Generator(device=x.device).manual_seed(shuffle_seed)
        self.needs_closure = isinstance(optimizer, torch.optim.LBFGS)
        self.forward = model.bind(x)
        self.rows_loss = rows_loss
        self.chunk_rows: int | None = None  # only for a full batch: `_one` ignores its arguments
        if rows_loss is not None and self.batch_size is None:
            self.chunk_rows = full_batch_chunk_rows(self.n, x.dtype, x.device)

    def _chunked_loss_backward(self) -> torch.Tensor:
        """The full-batch loss, with its gradient accumulated chunk by chunk into `.grad`."""
        n, size, rows_loss, model = self.n, self.chunk_rows, self.rows_loss, self.model
        assert size is not None and rows_loss is not None  # chunking is set up with both
        total: torch.Tensor | None = None
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            part = rows_loss(model.predict_rows(self.x, rows), self.y[rows], rows)
            part = part * ((rows.stop - rows.start) / n)
            part.backward()
            total = part.detach() if total is None else total + part.detach()
        assert total is not None  # chunking is for at least two chunks
        return total

    def _one(self, forward, yb) -> torch.Tensor:
        opt, loss_fn, chunked = self.optimizer, self.loss_fn, self.chunk_rows is not None

        def closure():
            opt.zero_grad(set_to_none=True)
            if chunked:
                return self._chunked_loss_backward()
            loss = loss_fn(forward(), yb)
            loss.backward()
            return loss

        if self.needs_closure:
            # LBFGS returns the closure's first loss, a tensor (torch annotates `float | None`).
            return cast(torch.Tensor, opt.step(closure))
        loss = closure()
        opt.step()
        return loss

    def step(self) -> torch.Tensor:
        if self.batch_size is None:
            loss = self._one(self.forward, self.y)  # graph already freed by backward()
        else:
            perm = torch.randperm(self.n, generator=self.generator, device=self.x.device)
            total = torch.zeros((), dtype=self.x.dtype, device=self.x.device)
            for start in range(0, self.n, self.batch_size):
                idx = perm[start : start + self.batch_size]
                forward = functools.partial(self.model.predict_rows, self.x, idx)
                total += self._one(forward, self.y[idx]).detach() * idx.numel()
            loss = total / self.n
        sched = self.scheduler
        if sched is not None:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(loss.item())
            else:
                sched.step()
        return loss

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0].get("lr", float("nan")))

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; a part left out keeps its fresh state (resume)."""
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


def snapshot_epochs(epochs: int, snapshots: int) -> list[int]:
    """Epoch 0 and every 1/snapshots of the run, rounded, without repeats: snapshots+1 of them."""
    return sorted({round(i * epochs / snapshots) for i in range(snapshots + 1)})


def train(
    model: FitModel,
    stepper: Stepper,
    *,
    epochs: int,
    evaluate_loss: Callable[[], float],
    snapshots_at: Iterable[int] = (),
    on_epoch: Callable[[int, float], bool] | None = None,
    on_snapshot: Callable[[int, float], None] | None = None,
    start_epoch: int = 0,
    history: History | None = None,
    sync_every: int | None = None,
) -> TrainResult:
    """Run `epochs` epochs of `stepper` on `model`; stop early on divergence or when asked.

    `on_epoch(epoch, loss)` is called after every epoch with the number of epochs done and the
    loss at the start of that epoch; returning True asks the loop to stop (Ctrl-C).
    `on_snapshot(epoch, loss)` is called at epoch 0 (before training) and after each epoch in
    `snapshots_at`, with the model holding that epoch's parameters.

    `sync_every`: how many epochs run between reads of the loss back to the host. On the CPU a
    read costs nothing and it is 1: divergence is seen in the epoch it happens. On CUDA a read
    stalls the device, so losses and parameters stay on the device for up to 64 epochs and are
    read in one go; a non-finite loss in that window still restores exactly the last finite
    state, so results are the same either way (only `on_epoch` arrives in bursts, and Ctrl-C
    takes effect at the end of the window).
    """
    if sync_every is None:
        sync_every = 1 if model.raw.device.type == "cpu" else 64
    hist = history if history is not None else History()
    snaps = set(snapshots_at)
    raw = model.raw
    t0 = time.perf_counter() - (hist.elapsed[-1] if hist.elapsed else 0.0)
    lr = getattr(stepper, "lr", lambda: float("nan"))
    status, reason, epoch = RunStatus.COMPLETED, None, start_epoch

    def restore_previous_row() -> None:
        # Row `epoch` is non-finite: go back to row epoch-1, the last finite state, and drop it
        # from the history (the final evaluation below records it again).
        nonlocal epoch
        if epoch > start_epoch:
            with torch.no_grad():
                raw.copy_(torch.tensor(hist.params[-1], dtype=raw.dtype, device=raw.device))
            for column in (hist.losses, hist.lrs, hist.elapsed, hist.params):
                column.pop()
            epoch -= 1

    if start_epoch == 0 and on_snapshot is not None and 0 in snaps:
        on_snapshot(0, evaluate_loss())

    def run_window(size: int) -> list[tuple[float, list[float], float, float]]:
        """(lr, parameters before the step, loss, elapsed) for each of `size` epochs."""
        if size == 1:  # read back at once: on the CPU a read costs nothing
            current_lr, before = lr(), raw.tolist()
            loss = stepper.step().item()
            return [(current_lr, before, loss, time.perf_counter() - t0)]
        lrs, befores, losses, stamps = [], [], [], []
        for _ in range(size):
            lrs.append(lr())
            befores.append(raw.detach().clone())
            losses.append(stepper.step().detach())
            stamps.append(time.perf_counter() - t0)
            if stepper.converged:
                break
        # One read for the whole window.
        rows, values = torch.stack(befores).tolist(), torch.stack(losses).tolist()
        return list(zip(lrs, rows, values, stamps, strict=True))

    while epoch < epochs:
        window = 1
        if sync_every > 1:
            window = min(sync_every, epochs - epoch)
            upcoming = [e for e in snaps if epoch < e <= epoch + window]
            if upcoming:  # a snapshot needs that epoch's state on the host
                window = min(upcoming) - epoch
        stop = False
        for current_lr, before, loss, stamp in run_window(window):
            # `loss` belongs to the parameters before this step: row `epoch` of the history.
            if not math.isfinite(loss):
                with torch.no_grad():
                    raw.copy_(torch.tensor(before, dtype=raw.dtype, device=raw.device))
                status, reason = RunStatus.DIVERGED, f"loss became {loss} in epoch {epoch + 1}"
                restore_previous_row()
                break
            hist.losses.append(loss)
            hist.lrs.append(current_lr)
            hist.elapsed.append(stamp)
            hist.params.append(before)
            epoch += 1
            if on_epoch is not None and on_epoch(epoch, loss):
                stop = True
        if status == RunStatus.DIVERGED:
            break
        if stepper.converged:
            status, reason = RunStatus.COMPLETED, stepper.converged
            break
        if stop:
            status, reason = RunStatus.INTERRUPTED, f"interrupted after epoch {epoch}"
            break
        if epoch in snaps and epoch < epochs and on_snapshot is not None:
            on_snapshot(epoch, evaluate_loss())

    final = evaluate_loss()
    if not math.isfinite(final) and status != RunStatus.DIVERGED:
        # The very last step blew up: fall back to the parameters before it.
        status, reason = RunStatus.DIVERGED, f"loss became {final} in epoch {epoch + 1}"
        restore_previous_row()
        final = evaluate_loss()
    hist.losses.append(final)
    hist.lrs.append(lr())
    hist.elapsed.append(time.perf_counter() - t0)
    hist.params.append(raw.detach().tolist())
    if on_snapshot is not None:
        on_snapshot(epoch, final)
    return TrainResult(
        status=status, epochs_run=epoch, final_loss=final, history=hist, reason=reason
    )
