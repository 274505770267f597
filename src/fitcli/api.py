"""The Python API: fit arrays or a config in this process, load a run directory, predict, sweep.

Everything goes through the same schema, validation, preparation, training loop and statistics
as `fitcli train` (`config`, `prepare.prepare`, `train.train`, `experiment.conclude`), so a fit
here and `fitcli train` on the same config give the same parameters to the last bit. Without
`run_dir=` or `out=` nothing touches the disk; with one, the run directory is written by
`experiment.execute`, exactly as `fitcli train` writes it. Errors are the CLI's exceptions
(`fitcli.errors`: `ConfigError`, `DataError`, ...) with the CLI's messages, never SystemExit.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fitcli.errors import DataError, InputError, RunStatus
from fitcli.rundir import files

if TYPE_CHECKING:
    import pandas as pd

    from fitcli.config import Config
    from fitcli.data import Dataset
    from fitcli.model import FitModel
    from fitcli.train import History

# Data given as arrays appear in the config as this file: the one a run directory holds them in,
# so a saved run's config.yaml reads them back from its own data.csv.
ARRAYS_FILE = files.DATA
BAND_LEVEL = 0.95


def _yaml_text(value: Any) -> str:
    """A Python value as the text of a `key=value` override (JSON is YAML's flow style)."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, np.generic):
        value = value.item()
    return json.dumps(value)


def _frame_columns(frame: Any, columns: Mapping[str, str | int] | None) -> dict[str, Any]:
    """x, y (and sigma) of a DataFrame by the `columns` mapping, as the config's data.columns:
    by name or 0-based index; default a column named x (y, sigma), else the first (second)."""
    names = [str(c) for c in frame.columns]
    spec = dict(columns or {})
    unknown = sorted(set(spec) - {"x", "y", "sigma"})
    if unknown:
        raise DataError(f"columns: unknown role {unknown[0]!r}; the roles are x, y and sigma")
    out: dict[str, Any] = {}
    for role, default in (("x", 0), ("y", 1), ("sigma", None)):
        want = spec.get(role)
        if want is None:
            if role in names:
                want = role
            elif default is not None and default < len(names):
                want = default
            else:
                continue
        if isinstance(want, int) and not isinstance(want, bool):
            if not 0 <= want < len(names):
                raise DataError(
                    f"columns.{role}: column index {want} is out of range; the DataFrame has "
                    f"{len(names)} columns (0 to {len(names) - 1})"
                )
            out[role] = frame.iloc[:, want]
        elif str(want) in names:
            out[role] = frame[frame.columns[names.index(str(want))]]
        else:
            raise DataError(
                f"columns.{role}: no column {want!r} in the DataFrame; its columns are "
                + ", ".join(map(repr, names))
            )
    if "y" not in out:
        raise DataError("columns.y: the DataFrame has no second column; name the y column")
    return out


def _resolve(
    config: str | os.PathLike[str] | Mapping[str, Any] | None,
    data: Any,
    columns: Mapping[str, str | int] | None,
    arrays: dict[str, Any],
    sections: dict[str, Any],
    overrides: Mapping[str, Any],
) -> tuple[Config, Dataset | None]:
    """The validated config (and data given in memory) of `fit`'s arguments: the config file or
    mapping, then the keyword sections, then the dotted overrides, all as `key=value` overrides
    so that every problem is reported as `fitcli train CONFIG key=value` reports it."""
    from fitcli.config import apply_values, config_from_dict, load_config
    from fitcli.data import dataset_from_arrays

    dataset = None
    given = {k: v for k, v in arrays.items() if v is not None}
    if data is not None and given:
        raise InputError("give the data either as data= or as x=/y=/sigma=, not both")
    if data is not None and hasattr(data, "columns") and hasattr(data, "iloc"):  # a DataFrame
        given = _frame_columns(data, columns)
    elif data is not None:
        if not isinstance(data, str | os.PathLike):
            raise InputError(
                f"data= takes a pandas DataFrame or a data file's path (got {type(data).__name__})"
            )
        section: dict[str, Any] = {"file": os.path.abspath(os.fspath(data))}
        if columns:
            section["columns"] = dict(columns)
        sections = {"data": section, **sections}
    elif columns:
        raise InputError("columns= names the columns of data= (a DataFrame or a file)")
    if given:
        if "x" not in given or "y" not in given:
            raise InputError("give both x= and y= (sigma= is optional)")
        dataset = dataset_from_arrays(given["x"], given["y"], given.get("sigma"))
        cols = {"x": "x", "y": "y", **({"sigma": "sigma"} if dataset.sigma is not None else {})}
        sections = {"data": {"file": ARRAYS_FILE, "columns": cols}, **sections}

    values = {**sections, **overrides}
    if config is None or isinstance(config, Mapping):
        # The values as they are: the override grammar's keys and checks without a YAML parse
        # of each value (the largest cost of a small fit's set-up).
        source = "<dict>" if config is not None else "<fit>"
        raw: Any = dict(config) if config is not None else {}
        if values:
            raw = apply_values(raw, values, source)
        cfg = config_from_dict(raw, source)
    else:  # as `fitcli train CONFIG key=value`: its messages name the file's lines
        texts = [f"{k}={_yaml_text(v)}" for k, v in values.items()]
        cfg = load_config(Path(os.fspath(config)), texts)
    if dataset is not None:
        cfg.data.file = ARRAYS_FILE  # relative: beside a saved run's config.yaml
    return cfg, dataset


def fit(
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    /,
    *,
    x: Any = None,
    y: Any = None,
    sigma: Any = None,
    data: Any = None,
    columns: Mapping[str, str | int] | None = None,
    expr: str | None = None,
    basis: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    init: Sequence[float] | None = None,
    optimizer: str | Mapping[str, Any] | None = None,
    loss: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    seed: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> FitResult:
    """Fit a model to data in this process and return a `FitResult`.

    `config`: a YAML config file or a config mapping (optional). The data: `x`, `y` (and
    `sigma`) as numpy arrays, torch tensors, pandas Series or lists; or `data` a pandas
    DataFrame (`columns={"x": "t", "y": "signal"}` names its columns as the config's
    `data.columns` does) or a data file's path. The model: `expr` with `params` (start values or
    `{value, min, max, vary}`), or `basis` with `init`. `optimizer` a name ("LM", "Adam", ...) or
    a mapping with its keyword arguments; without a config it is "LM". Any other config key is
    a keyword too, dotted keys by `**{"optimizer.lr": 0.05}`; all are validated as `fitcli
    train CONFIG key=value` validates them, with the same messages (a `fitcli.ConfigError`,
    `DataError`, ...).

    Nothing is written unless `run_dir` (exactly this run directory; an existing one only with
    `overwrite`, and only if it is a fitcli run directory) or `out` (a new run directory below
    this folder) is given: then the run directory `fitcli train` would write.
    """
    sections: dict[str, Any] = {}
    if expr is not None and basis is not None:
        raise InputError("give either expr= (expression model) or basis= (linear model)")
    if expr is not None:
        sections["model"] = {"expr": expr, **({"params": dict(params)} if params else {})}
    elif basis is not None:
        sections["model"] = {
            "basis": list(basis),
            **({"init": list(init)} if init is not None else {}),
        }
    else:
        if params:
            sections["model.params"] = dict(params)
        if init is not None:
            sections["model.init"] = list(init)
    if optimizer is None and config is None:
        optimizer = "LM"
    if optimizer is not None:
        sections["optimizer"] = (
            {"name": optimizer} if isinstance(optimizer, str) else dict(optimizer)
        )
    for key, value in (
        ("loss", loss),
        ("epochs", epochs),
        ("device", device),
        ("dtype", dtype),
        ("seed", seed),
    ):
        if value is not None:
            sections[key] = value
    arrays = {"x": x, "y": y, "sigma": sigma}
    cfg, dataset = _resolve(config, data, columns, arrays, sections, overrides)
    return fit_config(cfg, dataset, run_dir=run_dir, out=out, overwrite=overwrite)


def fit_config(
    cfg: Config,
    dataset: Dataset | None = None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Fit a validated `Config` (and data given in memory): the part of `fit` after the
    arguments are read. In memory unless `run_dir` or `out` is given."""
    from fitcli.experiment import small_data_threads

    n = None if dataset is None else dataset.n
    if run_dir is not None or out is not None or n is None:
        return _fit_config(cfg, dataset, run_dir, out, overwrite)
    # One torch thread for a small problem, as `experiment.finish_stats` takes for the
    # statistics: torch's kernels are serial there anyway, and on busy cores each parallel
    # region of a tiny op waits for a second thread far longer than the op takes.
    with small_data_threads(n):
        return _fit_config(cfg, dataset, run_dir, out, overwrite)


def _fit_config(
    cfg: Config,
    dataset: Dataset | None,
    run_dir: str | os.PathLike[str] | None,
    out: str | os.PathLike[str] | None,
    overwrite: bool,
) -> FitResult:
    from fitcli.prepare import prepare

    prep = prepare(cfg, dataset)
    if run_dir is not None or out is not None:
        from fitcli.experiment import execute, make_run_dir

        target = make_run_dir(
            cfg,
            Path(out if out is not None else "runs"),
            None if run_dir is None else Path(run_dir),
            overwrite,
        )
        execute(prep, target, command=_COMMAND)
        return load(target)
    from fitcli.experiment import conclude
    from fitcli.rundir.writer import base_summary
    from fitcli.train import train

    t0 = time.perf_counter()
    summary: dict[str, Any] = dict(base_summary(prep, None, _COMMAND))
    for key in ("command", "process"):  # what only a run directory's summary records
        summary.pop(key, None)
    result = train(prep.model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss)
    conclude(prep, result, summary, t0=t0)
    ds = prep.dataset
    return FitResult(
        summary=summary,
        config=cfg,
        x=ds.x,
        y=ds.y,
        sigma=ds.sigma,
        y_true=ds.y_true,
        _history=result.history,
        _run_model=prep.model,
        _dataset=dataset,
    )


# What a run directory written through the API records as its command (config.yaml, summary).
_COMMAND = ["python", "-c", "fitcli.fit(...)"]


def load(run_dir: str | os.PathLike[str]) -> FitResult:
    """Read a run directory (completed, diverged, interrupted, still running, from a sweep) into
    a `FitResult`; its model is rebuilt from the run's config so that `predict` works. A fault
    in the directory is a `fitcli.RunFileError` naming the file."""
    from fitcli.rundir.reader import read_run

    run = read_run(Path(run_dir))
    _, values = run.final_params
    summary = dict(run.summary)
    summary["params"] = {**summary["params"], **values}
    metrics = run.metrics
    return FitResult(
        summary=summary,
        config=run.cfg,
        x=run.data["x"],
        y=run.data["y"],
        sigma=run.data.get("sigma"),
        y_true=run.data.get("y_true"),
        run_dir=run.path,
        _metrics=metrics,
        _recorded=run.summary,
    )


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def points_of(x: Any, variables: Sequence[str]) -> np.ndarray:
    """New points for `predict`: n values of one variable (a 1-D array-like), or for a model of
    several `variables` an n x k float64 array from a mapping name -> values (a dict, a
    DataFrame with those columns: others are ignored) or an n x k array-like; checked as data
    are (finite numbers), a fault a DataError naming the variable."""
    from fitcli.data import as_column

    names = list(variables)
    if len(names) == 1:
        if isinstance(x, Mapping) and set(x) == set(names):
            x = x[names[0]]
        return as_column(x, "x")
    frame = hasattr(x, "columns") and hasattr(x, "iloc")
    if isinstance(x, Mapping) or frame:
        have = [str(k) for k in (x.columns if frame else x)]
        missing = [n for n in names if n not in have]
        extra = [] if frame else [k for k in have if k not in names]
        if missing or extra:
            fault = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"
            raise DataError(
                f"x: {fault}; the model's variables are {', '.join(names)} (got "
                f"{', '.join(have) or 'none'})"
            )
        cols = [as_column(x[n], f"x[{n!r}]") for n in names]
        sizes = {len(c) for c in cols}
        if len(sizes) > 1:
            counts = ", ".join(f"{n}: {len(c)}" for n, c in zip(names, cols, strict=True))
            raise DataError(f"x: the variables have different numbers of values ({counts})")
        return np.column_stack(cols)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise DataError(f"x: cannot be read as points: {exc}") from None
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise DataError(
            f"x: the model has the variables {', '.join(names)}; give x as a mapping of each "
            f"name to its values (or a DataFrame with those columns), or an n x {len(names)} "
            f"array (got shape {arr.shape})"
        )
    return np.column_stack([as_column(arr[:, k], f"x[{n!r}]") for k, n in enumerate(names)])


@dataclass
class FitResult:
    """The outcome of one fit (`fit`) or run directory (`load`): parameters, error bars,
    statistics and history; `predict`, `report`, `figure`, `save`, `to_dict`.

    `summary` holds what summary.json holds (`to_dict()` gives it JSON-clean); `config` is the
    validated config; `x`, `y` (`sigma`, `y_true`) the data fitted.
    """

    summary: dict[str, Any]
    config: Config
    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray | None = None
    y_true: np.ndarray | None = None
    run_dir: Path | None = None
    _history: History | None = field(default=None, repr=False)
    _run_model: FitModel | None = field(default=None, repr=False)
    _metrics: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _dataset: Dataset | None = field(default=None, repr=False)
    _recorded: dict[str, Any] | None = field(default=None, repr=False)
    _model: FitModel | None = field(default=None, repr=False)

    # -- parameters and statistics ---------------------------------------------------------------
    @property
    def params(self) -> dict[str, float]:
        """Fitted parameter values by name (fixed ones included), in the model's order."""
        return {k: _nan(v) for k, v in self.summary["params"].items()}

    @property
    def stderr(self) -> dict[str, float | None]:
        """Standard error of each parameter (None: fixed, at a bound, or undetermined)."""
        err = self.summary.get("stderr") or {}
        return {k: err.get(k) for k in self.summary["params"]}

    @property
    def covariance_params(self) -> list[str]:
        """The free parameters, in the order of `covariance`'s rows and columns."""
        return list(self.summary.get("covariance_params") or [])

    @property
    def covariance(self) -> np.ndarray | None:
        """Covariance matrix of the free parameters (`covariance_params` order); NaN where an
        entry is undefined; None when there are no error bars."""
        cov = self.summary.get("covariance")
        return None if cov is None else np.array([[_nan(v) for v in row] for row in cov])

    @property
    def correlation(self) -> np.ndarray | None:
        """Correlation matrix of the free parameters (`covariance_params` order), or None."""
        corr = self.summary.get("correlation")
        return None if corr is None else np.array([[_nan(v) for v in row] for row in corr])

    @property
    def uncertainty(self) -> dict[str, Any]:
        """The error bars' status ("ok", "at_bound", "singular", "not_converged", "failed"),
        its reason and the condition number of J^T J."""
        return dict(self.summary.get("uncertainty") or {})

    @property
    def rss(self) -> float | None:
        """Residual sum of squares (weighted when sigma is given)."""
        return self.summary.get("rss")

    @property
    def r2(self) -> float | None:
        """Coefficient of determination R²."""
        return self.summary.get("r2")

    @property
    def chi2_reduced(self) -> float | None:
        """RSS / (n - p)."""
        return self.summary.get("chi2_reduced")

    @property
    def aic(self) -> float | None:
        """Akaike information criterion, n log(RSS/n) + 2p."""
        return self.summary.get("aic")

    @property
    def bic(self) -> float | None:
        """Bayesian information criterion, n log(RSS/n) + log(n) p."""
        return self.summary.get("bic")

    @property
    def status(self) -> str:
        """completed, diverged, interrupted, failed (or running, for a run still going)."""
        return str(self.summary["status"])

    @property
    def converged(self) -> bool | None:
        """Whether the fit ended at a least-squares minimum (None: not known yet)."""
        return self.summary.get("converged")

    @property
    def reason(self) -> str | None:
        """Why the run stopped, and whether it converged."""
        return self.summary.get("reason")

    @property
    def history(self) -> pd.DataFrame | None:
        """Per-epoch loss, learning rate, elapsed seconds and parameter values, as a DataFrame
        (metrics.csv's columns); None for a run directory without metrics.csv yet."""
        import pandas as pd

        if self._metrics is not None:
            return pd.DataFrame({k: np.asarray(v) for k, v in self._metrics.items()})
        hist, model = self._history, self._run_model
        if hist is None or model is None:
            return None
        import torch

        raw = torch.tensor(hist.params, dtype=model.raw.dtype, device=model.raw.device)
        with torch.no_grad():
            values = model.full_vector(model.external(raw)).double().cpu().numpy()
        n = len(hist.losses)
        frame: dict[str, Any] = {
            "epoch": np.arange(n),
            "loss": np.asarray(hist.losses, dtype=np.float64),
            "lr": np.asarray(hist.lrs, dtype=np.float64),
            "elapsed_s": np.asarray(hist.elapsed, dtype=np.float64),
        }
        for k, name in enumerate(model.names):
            frame[name] = values.reshape(n, -1)[:, k]
        return pd.DataFrame(frame)

    # -- prediction --
    def _float64_model(self) -> FitModel:
        if self._model is None:
            import torch

            from fitcli.data import seed_streams
            from fitcli.model import build_model

            model = build_model(
                self.config.model,
                seed_streams(self.config.seed)["init"],
                torch.float64,
                self.config.data.variables,
            )
            self._model = model
        return self._model

    def _full(self) -> Any:
        import torch

        model = self._float64_model()
        params = self.params
        return torch.tensor([params[n] for n in model.names], dtype=torch.float64)

    def predict(
        self, x: Any, band: float | None = None, *, sigma: Any = None
    ) -> np.ndarray | dict[str, np.ndarray]:
        """The fitted model at `x` (any 1-D array-like), evaluated in float64 from the fitted
        parameters, as a numpy array. A model of several variables takes `x` as a mapping of
        each variable's name to its values (a dict of arrays, or a DataFrame with those
        columns), or as an n x k array with the variables' columns in the config's order.

        With `band` (a level, e.g. 0.95) a dict instead: `fit`, the confidence band of the curve
        `conf_lower_95`, `conf_upper_95` and, where it can be had, the prediction band of a new
        observation `pred_lower_95`, `pred_upper_95` (the suffix is the level in percent,
        `fitcli.bands.level_tag`: 0.995 gives `_99_5`). By the delta method with the exact
        Jacobian of the model at the fitted parameters and the fit's covariance
        (`fitcli.bands`): ``fit ± q sqrt(J C J^T)`` and ``fit ± q sqrt(J C J^T + s²)``,
        ``s² = RSS / (n - p)``, q Student's t quantile for n - p degrees of freedom. A fit
        weighted by sigma has an absolute covariance: q is the normal quantile, and a new
        observation's variance is its own sigma² (relative sigma, `data.absolute_sigma:
        false`: Student's t, and s² sigma²): give `sigma` at the new points for the
        prediction band. A ValueError says why when the fit has no usable covariance.
        """
        import torch

        from fitcli import bands
        from fitcli.data import as_column

        xs = points_of(x, self.config.data.variables)
        model = self._float64_model()
        if band is None:
            with torch.no_grad():
                fit_values = model.predict_full(self._full(), torch.from_numpy(xs))
            return fit_values.numpy().copy()
        level = float(band)
        if not 0 < level < 1:
            raise ValueError(f"band: the level must be between 0 and 1 (got {level})")
        noise = None if sigma is None else as_column(sigma, "sigma")
        try:
            weighted = self.sigma is not None
            absolute = weighted and self.config.data.absolute_sigma is not False
            cov = bands.covariance_of(self.summary, absolute=absolute, weighted=weighted)
            return bands.curve(model, self.params, xs, cov, [level], sigma=noise)
        except bands.NoBand as exc:
            raise ValueError(f"no band: {exc}") from None

    # -- intervals beyond the covariance --
    def intervals(
        self,
        method: str | None = None,
        level: float | Sequence[float] | None = None,
        *,
        samples: int | None = None,
        resampling: str | None = None,
        seed: int | None = None,
        walkers: int | None = None,
        steps: int | None = None,
        burn: int | None = None,
    ) -> dict[str, Any]:
        """Profile-likelihood, bootstrap or MCMC intervals of the free parameters
        (`fitcli.intervals`, `fitcli.mcmc`), as intervals.json holds them: per parameter its
        estimate and, per level, `lower` and `upper` (None: not reached within the parameter's
        bounds), the method, `elapsed_s`; MCMC adds its diagnostics (`r_hat`,
        `autocorr_time`, `effective_samples`, `converged`, `reason`) and the credible `band`.
        Defaults come from the config's `uncertainty` section (method `profile` where it says
        covariance); the seed from the config's seed. Least squares only."""
        import torch

        from fitcli import intervals

        spec = self.config.uncertainty
        method = method or (spec.method if spec.method != "covariance" else "profile")
        if method not in intervals.COMPUTED:
            raise InputError(f"method: {method!r} is not one of {', '.join(intervals.COMPUTED)}")
        intervals.check_loss(self.config.loss)
        model = self._float64_model()
        model.set_values(self.params)
        weights = None if self.sigma is None else torch.from_numpy(1.0 / self.sigma)
        prob = intervals.Problem(model, torch.from_numpy(self.x), torch.from_numpy(self.y), weights)
        return intervals.for_config(
            prob,
            self.config,
            method,
            weighted=self.sigma is not None,
            level=level,
            samples=samples,
            resampling=resampling,
            seed=seed,
            walkers=walkers,
            steps=steps,
            burn=burn,
        )

    # -- presentation --
    def report(self) -> str:
        """The table `fitcli train` prints at the end of a run, as text."""
        from fitcli import console

        return console.summary_text(self.summary)

    def _figure_dict(self) -> dict:
        from fitcli import plots

        variables = tuple(self.config.data.variables)
        if len(variables) > 1:  # the report's panels: observed and fitted against each variable
            fitted = self.predict(self.x)
            assert isinstance(fitted, np.ndarray)
            return plots.variables_figure(
                title=f"{html.escape(str(self.summary['name']))}: the final fit",
                variables=variables,
                x=self.x,
                y=self.y,
                y_fit=fitted,
            )
        lo, hi = float(np.min(self.x)), float(np.max(self.x))
        grid = np.linspace(lo, hi, files.FIT_GRID) if hi > lo else np.array([lo])
        order = np.argsort(self.x, kind="stable")
        curve = self.predict(grid)
        assert isinstance(curve, np.ndarray)  # without a band, predict gives the array
        s = self.summary
        return plots.snapshot_figure(
            name=str(s["name"]),
            epoch=int(s.get("epochs_run") or 0),
            epochs=int(s["epochs"]),
            loss=_nan(s.get("final_loss")),
            params=self.params,
            x=self.x[order],
            y=self.y[order],
            y_true=None if self.y_true is None else self.y_true[order],
            x_fit=grid,
            y_fit=curve,
            loss_name=str(s.get("loss", "mse")),
            sigma=None if self.sigma is None else self.sigma[order],
            labels=plots.axis_labels(self.config.report, s.get("columns")),
        )

    def figure(self) -> Any:
        """The final fit as a `plotly.graph_objects.Figure`: data, true curve when known, fit
        (several variables: observed and fitted against each, residuals beneath, as the report
        draws them)."""
        from fitcli import plots

        return plots.figure_object(self._figure_dict())

    def _repr_html_(self) -> str:
        """Notebooks: the report table and the figure (plotly.js from its CDN)."""
        from fitcli import plots

        table = f"<pre>{html.escape(self.report())}</pre>"
        return table + plots.fragment(self._figure_dict(), "cdn", div_id=f"fitcli-{id(self):x}")

    def __repr__(self) -> str:
        return f"FitResult({self.summary.get('name')!r}, {self.status}, params={self.params})"

    # -- files --
    def to_dict(self) -> dict[str, Any]:
        """summary.json's content: for a fit in memory, what `fitcli train` would have written,
        but for the fields of a run directory (`run_dir` None; no `command`, no `bands`: the files
        bands.csv holds are `predict(x, band=...)` here), and its own times."""
        return json.loads(files.dumps_json(self.summary))

    def save(self, run_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write this fit as a run directory (`fitcli plot`, `fitcli predict` and `load` read
        it) and return its path. A fit in memory is run again into it by `fitcli train`'s code
        (deterministic: the same parameters, checked); a loaded run directory is copied.
        An existing `run_dir` is replaced only with `overwrite`, and only if it is a fitcli run
        directory."""
        target = Path(run_dir)
        if self.run_dir is not None:
            from fitcli.errors import RunDirExistsError

            if target.exists():
                if not overwrite:
                    raise RunDirExistsError(f"{target} already exists; give another run_dir")
                files.claim_run_dir(target, overwrite=True)
                shutil.rmtree(target)
            shutil.copytree(self.run_dir, target)
            return target
        again = fit_config(self.config, self._dataset, run_dir=target, overwrite=overwrite)
        if again.params != self.params:  # pragma: no cover - a fit is deterministic
            raise RuntimeError(f"the fit written to {target} differs from this one")
        return target


# -- fitcli predict


def parse_x_spec(text: str) -> np.ndarray:
    """`start:stop:num` as numpy's linspace (num >= 1 points from start to stop, both included);
    an InputError naming the fault otherwise."""
    parts = text.split(":")
    hint = "give --x START:STOP:NUM, e.g. --x 0:10:101 (NUM points from START to STOP)"
    if len(parts) != 3:
        raise InputError(f"--x {text!r} is not START:STOP:NUM; {hint}")
    try:
        start, stop = float(parts[0]), float(parts[1])
    except ValueError:
        raise InputError(f"--x {text!r}: START and STOP must be numbers; {hint}") from None
    try:
        num = int(parts[2])
    except ValueError:
        raise InputError(f"--x {text!r}: NUM must be a whole number; {hint}") from None
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise InputError(f"--x {text!r}: START and STOP must be finite; {hint}")
    if not 1 <= num <= 10**7:
        raise InputError(f"--x {text!r}: NUM must be 1 to 10000000 (got {num}); {hint}")
    return np.linspace(start, stop, num)


def predict_run(
    run_dir: str | os.PathLike[str],
    *,
    x: str | None = None,
    x_file: str | os.PathLike[str] | None = None,
    band: float | None = BAND_LEVEL,
) -> tuple[dict[str, np.ndarray], str | None]:
    """`fitcli predict`: the columns (x, or the variables' names of a model of several, then
    fit and the bands where they can be had) of a run's fitted model at new points, and a note
    when the bands could not be computed."""
    from fitcli import bands

    if (x is None) == (x_file is None):
        raise InputError("give the new points as --x START:STOP:NUM or --x-file FILE (one of them)")
    result = load(run_dir)
    variables = result.config.data.variables
    if x is not None and len(variables) > 1:
        raise InputError(
            f"--x START:STOP:NUM gives points of one variable, and this run's model has "
            f"{len(variables)} ({', '.join(variables)}): give the new points as --x-file FILE "
            f"with the columns {', '.join(variables)}"
        )
    xs = parse_x_spec(x) if x is not None else _x_file_points(result.config, Path(x_file or ""))
    out = bands.point_columns(xs, variables)
    note = None
    if band:
        try:
            found = result.predict(xs, band=band)
        except ValueError as exc:
            note = str(exc)
        else:
            assert isinstance(found, dict)
            return {**out, **found}, note
    fit_values = result.predict(xs)
    assert isinstance(fit_values, np.ndarray)
    out["fit"] = fit_values
    return out, note


def _x_file_points(cfg: Config, path: Path) -> np.ndarray:
    """--x-file's points: the config's x column (one variable), or each variable's column as
    the config's data.columns.x names it, else the variable's own name (a file with the
    variables' names as its header, as `fitcli predict --out` and bands.csv write them)."""
    from fitcli.data import load_x_column, load_x_columns

    variables = cfg.data.variables
    spec = None if cfg.data.columns is None else cfg.data.columns.x
    if len(variables) == 1:
        return load_x_column(path, spec if isinstance(spec, str | int) else None)
    given: list[Any] = []
    if isinstance(spec, dict):
        given = list(spec.values())
    elif isinstance(spec, list):
        given = list(spec)
    wanted = []
    for k, name in enumerate(variables):
        column = given[k] if k < len(given) else None
        wanted.append((name, list(dict.fromkeys(c for c in (column, name) if c is not None))))
    return load_x_columns(path, wanted)


def write_prediction(path: Path, columns: Mapping[str, np.ndarray]) -> None:
    """--out FILE: the columns as CSV (floats by repr); an existing file is never replaced."""
    files.check_output_file(path, "--out")
    if path.exists():
        raise InputError(f"--out {path} already exists; remove it or give another file name")
    rows = zip(*(v.tolist() for v in columns.values()), strict=True)
    files.write_csv(path, list(columns), ([repr(v) for v in row] for row in rows))


# -- fitcli ci


def ci_run(
    run_dir: str | os.PathLike[str],
    method: str,
    level: float | Sequence[float] | None = None,
    *,
    samples: int | None = None,
    resampling: str | None = None,
    seed: int | None = None,
    walkers: int | None = None,
    steps: int | None = None,
    burn: int | None = None,
) -> dict[str, Any]:
    """`fitcli ci`: intervals of a completed run directory, written to its intervals.json and
    added to its summary.json (`intervals`); returns them. A run that is not completed (still
    running, interrupted, diverged, failed) is refused with an InputError (exit 2), and so is
    a fit whose intervals cannot be computed; nothing is written then."""
    from fitcli import intervals, liveness

    path = Path(run_dir)
    if method not in intervals.COMPUTED:
        raise InputError(f"--method {method!r}: give profile, bootstrap or mcmc")
    summary = files.read_summary(path)
    status = liveness.status_of(summary)
    if status != RunStatus.COMPLETED:
        raise InputError(
            f"{path}: the run is {status}; intervals need a completed run (wait for it to "
            "finish, or resume it with fitcli train --resume)"
        )
    result = load(path)
    try:
        doc = result.intervals(
            method,
            level,
            samples=samples,
            resampling=resampling,
            seed=seed,
            walkers=walkers,
            steps=steps,
            burn=burn,
        )
    except intervals.IntervalError as exc:
        raise InputError(f"{path}: {exc}") from None
    files.write_json(path / files.INTERVALS, doc)
    # The summary as it is now on disk (another `fitcli ci` may have written it meanwhile).
    summary = files.read_summary(path)
    summary["intervals"] = doc
    files.write_json(path / files.SUMMARY, summary)
    return doc


# -- sweeps


def _axis_text(values: Any) -> str:
    """An axis's values as the text of `key=a,b,c` (a string is taken as written: `range(...)`
    or `a,b`); each value quoted as JSON (YAML) when it holds a comma, a quote or a bracket."""
    if isinstance(values, str):
        return values
    if isinstance(values, range):
        return f"range({values.start}, {values.stop}, {values.step})"
    parts = []
    for v in values:
        if isinstance(v, str) and not any(c in v for c in ",\"'()[]{}:#"):
            parts.append(v)
        else:
            parts.append(_yaml_text(v))
    return ",".join(parts)


@dataclass
class SweepResult:
    """A finished sweep: its directory and one row per run (`runs`, a pandas DataFrame: the
    axes' values, status, converged, final loss, parameters, run directory)."""

    sweep_dir: Path
    runs: pd.DataFrame
    completed: int
    failed: int
    exit_code: int

    def load(self, index: int) -> FitResult:
        """The `FitResult` of run `index` (a row of `runs`), read from its run directory."""
        row = self.runs.loc[self.runs["index"] == index]
        if row.empty or not row["run_dir"].iloc[0]:
            raise InputError(f"run {index} of {self.sweep_dir} has no run directory")
        return load(row["run_dir"].iloc[0])

    def __iter__(self) -> Iterator[FitResult]:
        """Every run that has a run directory, as a `FitResult`."""
        for i, d in zip(self.runs["index"], self.runs["run_dir"], strict=True):
            if d:
                yield self.load(int(i))


class _NoStop:
    """The sweep's stop flag when no signal handler is installed (the API): never requested."""

    requested = False
    signal: str | None = None

    def arm(self) -> None:
        """Nothing to arm: Ctrl-C raises KeyboardInterrupt in the caller."""

    def interrupt(self) -> KeyboardInterrupt:
        """What to raise when asked to stop before anything ran."""
        return KeyboardInterrupt()


def sweep(
    config: str | os.PathLike[str],
    axes: Mapping[str, Any],
    *,
    out: str | os.PathLike[str] = "sweeps",
    workers: int = 0,
    scheduler: str | None = None,
    fail_fast: bool = False,
    plotlyjs: str = "directory",
    **overrides: Any,
) -> SweepResult:
    """Run `fitcli sweep CONFIG key=a,b ...`: every combination of `axes` (a mapping of dotted
    keys to a list of values, a `range`, or the CLI's text `"a,b"` / `"range(0, 5)"`) over the
    config file, with `overrides` (dotted keys via `**{...}`) fixed for every run. Writes a
    sweep directory below `out` (default ./sweeps), one run directory per run, as the command
    does; returns a `SweepResult`. `workers`, `scheduler` (Dask) and `fail_fast` as the
    command's options."""
    import pandas as pd

    from fitcli import sweep as sw

    assignments = [f"{k}={_yaml_text(v)}" for k, v in overrides.items()]
    assignments += [f"{k}={_axis_text(v)}" for k, v in axes.items()]
    options = sw.Options(workers, scheduler, fail_fast, plotlyjs)
    outcome = sw.start(
        Path(os.fspath(config)),
        assignments,
        resume=None,
        out=Path(out),
        options=options,
        stop=_NoStop(),
        command=["python", "-c", "fitcli.sweep(...)"],
    )
    assert isinstance(outcome, sw.Outcome)  # not a dry run
    rows = []
    for entry in outcome.to_json()["runs"]:
        row: dict[str, Any] = {"index": entry["index"], **entry["values"]}
        for key in ("status", "converged", "epochs_run", "final_loss", "rss", "r2", "reason"):
            row[key] = entry.get(key)
        row["run_dir"] = entry.get("run_dir") or ""
        for name, value in (entry.get("params") or {}).items():
            row[name] = _nan(value)
        for name, value in (entry.get("stderr") or {}).items():
            row[f"stderr_{name}"] = _nan(value)
        rows.append(row)
    return SweepResult(
        sweep_dir=outcome.sweep_dir,
        runs=pd.DataFrame(rows),
        completed=outcome.completed,
        failed=outcome.failed,
        exit_code=outcome.exit_code,
    )


__all__ = [
    "FitResult",
    "RunStatus",
    "SweepResult",
    "fit",
    "fit_config",
    "load",
    "parse_x_spec",
    "predict_run",
    "sweep",
    "write_prediction",
]
