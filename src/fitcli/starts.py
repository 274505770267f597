"""Multi-start: `starts: N` fits from N starting points and keeps the best.

Start 0 is the config's own; the others are a scrambled Sobol sequence seeded from the config's
seed (`data.seed_streams`), mapped into each free parameter's range: uniformly between two
bounds, and on a log scale otherwise (the distance to a single bound, or the value itself when
unbounded, times 10**u with u uniform in [-SPREAD_DECADES, SPREAD_DECADES]).

Each start is trained as the run would be, for the run's epochs, without writing anything; with
an elementwise torch optimizer (no scheduler, full batch) all starts are one tensor program with a
leading start dimension, otherwise (Levenberg-Marquardt, LBFGS, ...) they run one after another.
The run itself is then the best start trained again from its starting point through the ordinary
training loop, so its history, snapshots, state and resume are those of a single run from that
start: the run directory shows the best start. The search's record goes into summary.json's
`starts` (`count`, `losses`, `best`, `reached_best`, `start`); a resumed run keeps it and never
searches again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fitcli.model import ParamInfo
    from fitcli.prepare import Prepared

# Log-scale spread of a start around a parameter's own, in decades either way.
SPREAD_DECADES = 2.0
# Starts whose final losses are within this relative distance of the best count as reaching it.
REACHED_RTOL = 1e-9
# Optimizers whose update is elementwise: a batch of starts is a batch of independent fits.
BATCHABLE = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
# At most this many floats per [starts, points] tensor in a batched search; above, one by one.
BATCH_ELEMENTS = 2**24


def _inside(value: float, lo: float | None, hi: float | None) -> float:
    """`value` moved strictly inside (lo, hi) when rounding put it on or past a bound."""
    if lo is not None and value <= lo:
        value = float(np.nextafter(lo, math.inf))
    if hi is not None and value >= hi:
        value = float(np.nextafter(hi, -math.inf))
    return value


def spread(info: ParamInfo, u: float) -> float:
    """The value of parameter `info` for a quasi-random coordinate u in [0, 1)."""
    lo, hi, v = info.min, info.max, info.value
    if lo is not None and hi is not None:
        return _inside(lo + (hi - lo) * u, lo, hi)
    t = 2.0 * u - 1.0
    factor = 10.0 ** (SPREAD_DECADES * t)
    if lo is not None:
        return _inside(lo + (v - lo) * factor, lo, None)
    if hi is not None:
        return _inside(hi - (hi - v) * factor, None, hi)
    if v != 0.0:
        return v * factor
    # A start at zero: magnitudes 10**-D to 10**D on either side.
    return math.copysign(10.0 ** (SPREAD_DECADES * (2.0 * abs(t) - 1.0)), t)


def draw_starts(infos: tuple[ParamInfo, ...], count: int, seed: int) -> list[dict[str, float]]:
    """`count` starts of the free parameters by name: the given one first, then Sobol draws."""
    import torch

    free = [i for i in infos if i.vary]
    first = {i.name: i.value for i in free}
    if count <= 1 or not free:
        return [dict(first) for _ in range(count)]
    engine = torch.quasirandom.SobolEngine(len(free), scramble=True, seed=seed % 2**63)
    points = engine.draw(count - 1, dtype=torch.float64).tolist()
    return [first] + [
        {i.name: spread(i, u) for i, u in zip(free, row, strict=True)} for row in points
    ]


def record(losses: list[float | None], starts: list[dict[str, float]]) -> dict[str, Any]:
    """summary.json's `starts`: count, each start's final loss (null: not finite), the best's
    index and start, and how many ended within REACHED_RTOL of it."""
    finite = [(v, k) for k, v in enumerate(losses) if v is not None]
    if not finite:
        best = 0
        reached = 0
    else:
        low, best = min(finite)
        reached = sum(1 for v, _ in finite if abs(v - low) <= REACHED_RTOL * abs(low))
    return {
        "count": len(losses),
        "losses": losses,
        "best": best,
        "reached_best": reached,
        "start": starts[best],
    }


def search(
    prep: Prepared, stop: Callable[[], BaseException | None] | None = None
) -> dict[str, Any]:
    """Train every start of `prep.cfg.starts`, then leave `prep` at the best one's start with a
    fresh stepper and its record in `prep.starts` (also returned). `stop()`, asked between two
    epochs, returns the exception that ends the search (a stop signal came) or None."""
    from fitcli.data import seed_streams

    cfg, model = prep.cfg, prep.model
    starts = draw_starts(model.infos, cfg.starts, seed_streams(cfg.seed)["starts"])
    given = model.values()
    if _batchable(prep):
        losses = _batched(prep, starts, stop)
    else:
        losses = [_one(prep, start, stop) for start in starts]
    out = record(losses, starts)
    model.set_values({**given, **starts[out["best"]]})
    assert prep.new_stepper is not None  # `prepare` gives every run one
    prep.stepper = prep.new_stepper()
    prep.starts = out
    return out


def _check(stop: Callable[[], BaseException | None] | None) -> None:
    exc = stop() if stop is not None else None
    if exc is not None:
        raise exc


def _finite_at(prep: Prepared) -> bool:
    import torch

    with torch.no_grad():
        return bool(torch.isfinite(prep.model(prep.x)).all())


def _one(
    prep: Prepared, start: dict[str, float], stop: Callable[[], BaseException | None] | None
) -> float | None:
    """One start trained as the run would be; its final loss (None: not finite there)."""
    from fitcli.train import train

    prep.model.set_values({**prep.model.values(), **start})
    if not _finite_at(prep):
        return None
    assert prep.new_stepper is not None  # `prepare` gives every run one
    stepper = prep.new_stepper()

    def on_epoch(epoch: int, loss: float) -> bool:
        _check(stop)
        return False

    result = train(
        prep.model,
        stepper,
        epochs=prep.cfg.epochs,
        evaluate_loss=prep.evaluate_loss,
        on_epoch=on_epoch,
    )
    if getattr(stepper, "failure", None) is not None or not math.isfinite(result.final_loss):
        return None
    return result.final_loss


def _batchable(prep: Prepared) -> bool:
    from fitcli import optim

    cfg = prep.cfg
    name, kwargs = optim.split_spec(cfg.optimizer)
    if prep.lm or name not in BATCHABLE or kwargs.get("foreach") or kwargs.get("fused"):
        return False
    if cfg.scheduler is not None or cfg.batch_size is not None:
        return False
    return cfg.starts * prep.dataset.n <= BATCH_ELEMENTS


def _batched(
    prep: Prepared, starts: list[dict[str, float]], stop: Callable[[], BaseException | None] | None
) -> list[float | None]:
    """All starts as one tensor program: a leading start dimension on the parameters, each
    start's loss the mean over its own row, one optimizer stepping all rows elementwise.
    A start whose loss stops being finite keeps the last finite one, as `train` would."""
    import torch

    from fitcli import optim
    from fitcli.losses import resolve
    from fitcli.model import to_internal

    model, cfg = prep.model, prep.cfg
    free = [i for i in model.infos if i.vary]
    raw0 = torch.tensor(
        [[to_internal(i, s[i.name]) for i in free] for s in starts],
        dtype=model.raw.dtype,
        device=model.raw.device,
    )
    leaf = torch.nn.Parameter(raw0)
    opt = optim.build_optimizer(cfg.optimizer, [leaf])
    base = resolve(cfg.loss).torch_function()
    w = prep.weights

    def losses_at(raw: torch.Tensor) -> torch.Tensor:
        yhat = model.predict(raw, prep.x)
        if w is not None:
            yhat = yhat * w
        return base(yhat, prep.y.expand_as(yhat), reduction="none").mean(-1)

    last = torch.full((len(starts),), math.nan, dtype=torch.float64)
    alive = torch.ones(len(starts), dtype=torch.bool, device=leaf.device)
    kept = leaf.detach().clone()  # each start's last parameters with a finite loss
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        loss = losses_at(leaf)
        with torch.no_grad():
            alive &= torch.isfinite(loss)
            kept[alive] = leaf.detach()[alive]
            last = torch.where(alive.cpu(), loss.detach().double().cpu(), last)
        if not bool(alive.any()):
            break
        # A start that is no longer finite adds nothing and stays where it last was.
        torch.where(alive, loss, torch.zeros_like(loss)).sum().backward()
        opt.step()
        with torch.no_grad():
            leaf[~alive] = kept[~alive]
        _check(stop)
    with torch.no_grad():
        final = losses_at(leaf)
        alive &= torch.isfinite(final)
        last = torch.where(alive.cpu(), final.double().cpu(), last)
    return [v if math.isfinite(v) else None for v in last.tolist()]
