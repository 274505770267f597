"""Config to tensors: validate a config against torch and the data, and build the run.

`prepare` builds data, model, loss and optimizer on their device and writes nothing, so bad
input never leaves a half-written run directory (`experiment.execute` writes it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fitcli.torchboot import import_torch

if TYPE_CHECKING:
    import torch

    from fitcli.config import Config
else:
    torch = import_torch()

from fitcli import optim
from fitcli.data import Dataset, check_dtype_range, make_dataset, point_text, seed_streams
from fitcli.errors import ConfigError, DataError, DeviceError
from fitcli.losses import Loss, resolve
from fitcli.model import FitModel, build_model, check_finite_start
from fitcli.train import TorchStepper


def resolve_device(spec: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda`/`cuda:N` must exist here (else exit 2)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device: {spec!r} was asked for but CUDA is not available on this machine "
            "(use device: auto or cpu)"
        )
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(
            f"device: {spec!r} does not exist; this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


@dataclass
class Prepared:
    """Everything a run needs, validated and on its device; nothing written yet."""

    cfg: Config
    dataset: Dataset
    model: FitModel
    device: torch.device
    dtype: torch.dtype
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    stepper: Any  # a train.Stepper: TorchStepper or lm_optim.LMStepper (probed with getattr)
    lm: bool
    # A fresh stepper for the model's current parameters (what a multi-start search trains each
    # start with), and the search's record once one has chosen the start (`fitcli.starts`).
    new_stepper: Callable[[], Any] | None = None
    starts: dict | None = None

    def evaluate_loss(self) -> float:
        with torch.no_grad():
            return float(self.loss_fn(self.model(self.x), self.y))


def prepare(cfg: Config, dataset: Dataset | None = None) -> Prepared:
    """Validate the config against torch and the data, and build data, model and optimizer.

    `dataset`: observations given in memory (`data.dataset_from_arrays`, the Python API) in
    place of those the config's data section describes."""
    problems = optim.validate(cfg)
    if problems:
        raise ConfigError(problems)
    if cfg.report.formats:  # before any work: the figures at the end need a browser
        from fitcli.export import find_browser

        find_browser()
    device = resolve_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    seeds = seed_streams(cfg.seed)
    if dataset is None:
        dataset = make_dataset(cfg)
    check_dtype_range(dataset, cfg.dtype)
    if cfg.model.expr is not None:
        from fitcli.guess import resolve as resolve_guesses

        if dataset.x.ndim > 1 and (
            cfg.model.guess or any(p.value == "guess" for p in (cfg.model.params or {}).values())
        ):
            raise ConfigError(
                "model.params: guess needs one independent variable; with several "
                f"({', '.join(dataset.variables)}), give each parameter a start value"
            )
        # `guess` values become numbers: the run (and its config.yaml) starts from them.
        cfg = resolve_guesses(cfg, dataset.x, dataset.y)
    x = torch.as_tensor(dataset.x, dtype=dtype).to(device)
    y_obs = torch.as_tensor(dataset.y, dtype=dtype).to(device)
    weights = None
    if dataset.sigma is not None:
        weights = torch.as_tensor(1.0 / dataset.sigma, dtype=dtype).to(device)
    model = build_model(cfg.model, seeds["init"], dtype, dataset.variables)
    if device.type != "cpu":  # built on the CPU: moving it there would only walk its tensors
        model = model.to(device)
    check_finite_start(model, x, dataset.x)
    if dataset.group is not None:
        from fitcli.grouped_run import prepare_grouped

        return prepare_grouped(cfg, dataset, model, device, dtype)  # type: ignore[return-value]
    loss = resolve(cfg.loss)
    check_loss_data(loss, cfg, dataset, model, x)
    base = loss.torch_function()
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if weights is None:
        loss_fn, y = base, y_obs

        def rows_loss(yhat, yw, rows):
            return base(yhat, yw)

    else:
        # Weighted residuals (y - yhat) / sigma, as curve_fit(sigma=...) does.
        w = weights

        def weighted_loss(yhat, yw):
            return base(yhat * w, yw)

        loss_fn = weighted_loss

        def rows_loss(yhat, yw, rows):
            return base(yhat * w[rows], yw)

        y = y_obs * w
    name, kwargs = optim.split_spec(cfg.optimizer)
    lm = optim.is_lm(name)

    def new_stepper() -> Any:
        if lm:
            from fitcli.lm_optim import LMStepper

            return LMStepper(model, x, y_obs, weights, kwargs, loss=loss)
        opt = optim.build_optimizer(cfg.optimizer, [model.raw])
        sched = optim.build_scheduler(cfg.scheduler, opt)
        return TorchStepper(
            model,
            x,
            y,
            loss_fn,
            opt,
            sched,
            batch_size=cfg.batch_size,
            shuffle_seed=seeds["shuffle"],
            rows_loss=rows_loss,
        )

    stepper = new_stepper()
    return Prepared(
        cfg, dataset, model, device, dtype, x, y, weights, loss_fn, stepper, lm, new_stepper
    )


def _y_column(cfg: Config, dataset: Dataset) -> str:
    """Where y comes from, for a message: the data file and its column, or synthetic data."""
    if cfg.data.file is None:
        return f"data.target ({cfg.data.target})"
    col = cfg.data.columns.y if cfg.data.columns is not None else None
    which = "the second column" if col is None else f"column {col!r}"
    return f"{cfg.data.file}, {which} (y)"


def check_loss_data(
    loss: Loss, cfg: Config, dataset: Dataset, model: FitModel, x: torch.Tensor
) -> None:
    """The data and the starting model a likelihood loss can work with (exit 2 otherwise):
    poisson needs counts y >= 0 and a model > 0 at the start, bce y in [0, 1]; neither takes
    sigmas, since the likelihood sets each point's variance."""
    import numpy as np

    name = loss.name
    if name not in ("poisson", "bce"):
        return
    if dataset.sigma is not None:
        raise ConfigError(
            f"loss: {name} is a likelihood whose variance follows from the model; it takes no "
            "sigma column: remove data.columns.sigma, or use a least-squares or robust loss"
        )
    y = dataset.y
    if name == "poisson":
        bad = np.flatnonzero(y < 0)
        if bad.size:
            k = int(bad[0])
            raise DataError(
                f"loss: poisson fits counts, but {_y_column(cfg, dataset)} has y = {y[k]:g} < 0 "
                f"at {point_text(dataset.x, k, dataset.variables)} ({bad.size} negative "
                "value(s)); use a least-squares loss"
            )
        with torch.no_grad():
            mu = model(x).detach().to(torch.float64).cpu().numpy()
        low = np.flatnonzero(~(mu > 0))
        if low.size:
            k = int(low[0])
            what = "model.basis" if model.kind == "basis" else "model.expr"
            raise DataError(
                f"{what}: loss poisson needs a positive model (the expected count), but it is "
                f"{mu[k]:g} at {point_text(dataset.x, k, dataset.variables)} with the starting "
                "parameters "
                f"{model.values()}; change the starting values, or write the model as exp(...)"
            )
    else:
        bad = np.flatnonzero((y < 0) | (y > 1))
        if bad.size:
            k = int(bad[0])
            raise DataError(
                f"loss: bce needs y in [0, 1] (a label or a probability), but "
                f"{_y_column(cfg, dataset)} has y = {y[k]:g} at "
                f"{point_text(dataset.x, k, dataset.variables)} "
                f"({bad.size} value(s) outside [0, 1])"
            )


__all__ = ["Prepared", "check_loss_data", "prepare", "resolve_device"]
