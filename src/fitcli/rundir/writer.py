"""Writing a run directory: `RunWriter` (config, data, snapshots, metrics, params and state) and
the summary builders (`base_summary` and the fields of an interrupted run).

Imports torch (the snapshots evaluate the model on the grid).
"""

from __future__ import annotations

import contextlib
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fitcli.torchboot import import_torch

torch = import_torch()

from fitcli import __version__, liveness, optim
from fitcli.errors import RunDirError, RunStatus, exit_code_for
from fitcli.losses import name_of, resolve
from fitcli.rundir import files
from fitcli.rundir.summary import Summary
from fitcli.train import History, TrainResult

if TYPE_CHECKING:
    from fitcli.prepare import Prepared

FIT_GRID = files.FIT_GRID  # points on which the fitted curve is drawn


def data_form(ds: Any, copy_data: bool = False) -> str:
    """How a run directory holds its observations: "csv" (data.csv) up to
    `files.DATA_CSV_MAX_ROWS` rows; above, "file" for a data file (not copied: summary.json's
    `data_file` names it, with its size, and `data_digest` its content) unless `copy_data`, else
    "npz" (data.npz). Arrays given to the Python API are always data.csv: a saved run's
    config.yaml reads them from there (`api.ARRAYS_FILE`)."""
    from fitcli.data import ARRAYS

    if ds.n <= files.DATA_CSV_MAX_ROWS or ds.source == ARRAYS:
        return "csv"
    if ds.x.ndim == 2 or ds.rows is not None:
        return "csv"  # several variables, or rows left out: data.csv names its columns
    if ds.source != "synthetic" and ds.digest and not copy_data:
        return "file"
    return "npz"


def versions() -> Summary:
    return {
        "fitcli_version": __version__,
        "torch_version": str(torch.__version__),  # a plain str: TorchVersion pickles as torch
        "python_version": platform.python_version(),
    }


def plot_extras(ds: Any) -> dict[str, Any]:
    """What a snapshot page draws beyond one x: the variables' names (several), and the rows
    left out (`data.nan_policy: omit`, `data.range`); nothing for plain data."""
    extras: dict[str, Any] = {}
    if ds.x.ndim == 2:
        extras["variables"] = ds.variables
    if ds.left_out is not None and len(ds.left_out.y):
        extras["left_out"] = (ds.left_out.x, ds.left_out.y, ds.left_out.reason)
    return extras


class RunWriter:
    """Writes a run directory's files; the only place experiment code touches the disk.

    With `defer_state`, params.json and state.json are written once, by `flush`, instead of at
    every snapshot: their last versions are the same, and a run replayed from a finished
    computation (`fitcli sweep`) has nothing to resume from in between. The latest snapshot
    page is then drawn only once it is known whether it is the last (`bands` draws the last
    one with the final fit's bands), not drawn and then drawn again: the same pages, once each.
    """

    def __init__(
        self,
        run_dir: Path,
        prep: Prepared,
        plotlyjs: str,
        *,
        defer_state: bool = False,
        copy_data: bool = False,
    ) -> None:
        self.run_dir, self.prep, self.plotlyjs = run_dir, prep, plotlyjs
        self.defer_state = defer_state
        self.data_form = data_form(prep.dataset, copy_data)
        self._pending: dict | None = None  # the deferred save_state arguments
        self.snap_dir = run_dir / files.SNAPSHOTS
        self.snapshots: list[dict] = []
        epochs = prep.cfg.epochs
        self.width = len(str(epochs))
        ds = prep.dataset
        # The fit CSVs' template: (columns, header and `%r` rows, rows), made by `fit_csv`.
        self._fit_rows: tuple[int, str, int] | None = None
        x, y, y_true, sigma = ds.x, ds.y, ds.y_true, ds.sigma
        if ds.x.ndim == 2:
            # Several variables: a curve on a grid means nothing; the fit is kept at the data.
            self.grid = ds.x
            self.grid_t = prep.x
        else:
            lo, hi = float(np.min(ds.x)), float(np.max(ds.x))
            grid = np.linspace(lo, hi, FIT_GRID) if hi > lo else np.array([lo])
            self.grid = grid
            self.grid_t = torch.as_tensor(grid, dtype=prep.dtype).to(prep.device)
        # Snapshots draw the observations sorted by x: sort once here, not O(n log n) per snapshot
        # (a copy only when the data are unsorted; sorted data are passed as they are).
        if ds.x.ndim == 1 and not np.all(x[1:] >= x[:-1]):
            order = np.argsort(x, kind="stable")
            x, y = x[order], y[order]
            y_true = None if y_true is None else y_true[order]
            sigma = None if sigma is None else sigma[order]
        self.obs = (x, y, y_true)
        self.sigma = sigma
        from fitcli import plots

        self.labels = plots.axis_labels(prep.cfg.report, ds.names)
        # Set by execute and saved in state.json with every snapshot; None while LM's converged
        # snapshots are filled in, so that state.json stays at the real last epoch.
        self.history: History | None = None
        # The last snapshot page drawn by this writer: its entry, fitted curve and components,
        # which `bands` draws again with the final fit's bands.
        self._last_page: tuple[dict, np.ndarray, list[np.ndarray]] | None = None
        # With `defer_state`: the latest snapshot page, not drawn yet (see `_draw_held`).
        # The last snapshot's parameters, fitted curve, components and fit CSV: LM's filled
        # snapshots (`fill_converged_snapshots`) show the same fit again, computed once.
        self._curve: tuple[bytes, np.ndarray, list[np.ndarray], str] | None = None
        self._held: tuple[dict, np.ndarray, list[np.ndarray]] | None = None

    def resume(self, cfg_text: str | None, summary: dict, point: Any) -> None:
        """Continue this run directory from `point` (a `resume.ResumePoint`): snapshots past its
        epoch go, the summary says so."""
        self.snap_dir.mkdir(exist_ok=True)
        tidy_snapshots(self.run_dir, point.epoch)
        self.snapshots = list(point.snapshots)
        if cfg_text is not None:  # resumed with overrides: config.yaml is the config now
            files.atomic_write(self.run_dir / files.CONFIG, cfg_text)
        if self.plotlyjs == "directory":
            files.copy_plotly_js(self.run_dir)
        files.write_json(self.run_dir / files.SUMMARY, summary)

    def begin(self, cfg_text: str, summary: dict) -> None:
        self.snap_dir.mkdir(exist_ok=True)
        ds = self.prep.dataset
        files.atomic_write(self.run_dir / files.CONFIG, cfg_text)
        if self.data_form == "csv":
            files.write_data_csv(
                self.run_dir / files.DATA, ds.x, ds.y, ds.y_true, ds.sigma, ds.variables
            )
        elif self.data_form == "npz":
            files.write_data_npz(self.run_dir / files.DATA_NPZ, ds.x, ds.y, ds.y_true, ds.sigma)
        # "file": the data file itself is the run's data (summary.json's data_file)
        if ds.left_out is not None and len(ds.left_out.y):
            files.write_left_out_csv(self.run_dir / files.LEFT_OUT, ds.left_out, ds.variables)
        if self.plotlyjs == "directory":
            files.copy_plotly_js(self.run_dir)
        files.write_json(self.run_dir / files.SUMMARY, summary)

    def snapshot_name(self, epoch: int) -> str:
        return f"epoch-{epoch:0{self.width}d}.html"

    def _page(
        self,
        entry: dict,
        y_fit: np.ndarray,
        parts: list[np.ndarray],
        bands: dict | None = None,
    ) -> str:
        from fitcli import plots

        prep = self.prep
        return plots.snapshot_page(
            name=prep.cfg.name,
            note=entry.get("note"),
            sigma=self.sigma,
            labels=self.labels,
            epoch=entry["epoch"],
            epochs=prep.cfg.epochs,
            loss=entry["loss"],
            params=entry["params"],
            x=self.obs[0],
            y=self.obs[1],
            y_true=self.obs[2],
            x_fit=self.grid,
            y_fit=y_fit,
            loss_name=name_of(prep.cfg.loss),
            plotlyjs=self.plotlyjs,
            components=list(zip(prep.model.components, parts, strict=True)) or None,
            bands=bands,
            **plot_extras(prep.dataset),
        )

    def snapshot(self, epoch: int, loss: float, note: str | None = None) -> None:
        prep = self.prep
        params = prep.model.values()
        key = prep.model.raw.detach().cpu().numpy().tobytes()
        if self._curve is not None and self._curve[0] == key:
            _, y_fit, parts, fit_text = self._curve  # the same parameters: the same curve
        else:
            with torch.no_grad():
                y_fit = prep.model(self.grid_t).double().cpu().numpy()
            parts = [c.double().cpu().numpy() for c in prep.model.component_values(self.grid_t)]
            fit_text = self.fit_csv(y_fit, parts)
            self._curve = (key, y_fit, parts, fit_text)
        fname = self.snapshot_name(epoch)
        page_entry = {"epoch": epoch, "loss": loss, "params": params, "note": note}
        if self.defer_state:
            self._draw_held()  # the page before this one: not the last
            self._held = (page_entry, y_fit, parts)
        else:
            files.atomic_write(self.snap_dir / fname, self._page(page_entry, y_fit, parts))
        self._last_page = (page_entry, y_fit, parts)
        # The fitted curve itself, exactly: `fitcli plot` rebuilds this page from it (the model
        # cannot be re-evaluated bit for bit on another device, dtype or through bounds).
        fit_name = fname.removesuffix(".html") + ".csv"
        files.atomic_write(self.snap_dir / fit_name, fit_text)
        self.snapshots = [s for s in self.snapshots if s["epoch"] != epoch]
        entry = {"epoch": epoch, "loss": loss, "params": params, "file": fname, "fit": fit_name}
        self.snapshots.append(entry if note is None else {**entry, "note": note})
        if self.defer_state:
            if self.history is not None:
                self._pending = self._frozen_state(epoch)
            elif self._pending is None:
                self._pending = {}  # params.json still to write
            return
        self.write_params()
        if self.history is not None:
            # Last, so that a saved state always has its snapshot beside it (resume).
            self._save_state(epoch=epoch, model=prep.model, stepper=prep.stepper)

    def _draw_held(self, bands: dict | None = None) -> None:
        """Draw and write the snapshot page `snapshot` held back (with `defer_state`), if any."""
        held, self._held = self._held, None
        if held is not None:
            page = self._page(*held, bands)
            files.atomic_write(self.snap_dir / self.snapshot_name(held[0]["epoch"]), page)

    def fit_csv(self, y_fit: np.ndarray, components: list[np.ndarray] | None = None) -> str:
        """snapshots/epoch-N.csv: `x,y_fit` rows by repr, what csv.writer with `files.fmt`
        wrote (no float repr needs quoting), then `component_1, ...` when the model has
        components. The x cells are formatted once per run, into a `%r` template of the whole
        table (no float repr holds a `%`): each snapshot is then one `%` over its values."""
        columns = [y_fit, *(components or [])]
        if self._fit_rows is None or self._fit_rows[0] != len(columns):
            if self.grid.ndim == 2:
                xs = [",".join(map(repr, row)) for row in self.grid.tolist()]
            else:
                xs = [repr(v) for v in self.grid.tolist()]
            variables = self.prep.dataset.variables
            head = ",".join(variables) + ",y_fit" if self.grid.ndim == 2 else "x,y_fit"
            head += "".join(f",{files.component_column(k)}" for k in range(len(columns) - 1))
            cells = ",%r" * len(columns) + "\n"
            self._fit_rows = (len(columns), head + "\n" + cells.join(xs) + cells, len(xs))
        _, template, rows = self._fit_rows
        if len(y_fit) != rows:
            raise ValueError(f"fitted curve has {len(y_fit)} points, the grid {rows}")
        values = np.stack(columns, axis=1).ravel() if len(columns) > 1 else y_fit
        return template % tuple(values.tolist())

    def bands(self, summary: dict) -> None:
        """bands.csv (and bands_data.csv) of the finished run's final fit, and its last snapshot
        page drawn again with them when that page shows the final fit; summary["bands"] says
        what was written, or why there are no bands (`fitcli.bands.for_run`)."""
        try:
            self._bands(summary)
        finally:
            self._draw_held()  # no bands drawn on it: the last page as it is

    def _bands(self, summary: dict) -> None:
        import copy

        from fitcli import bands

        prep, ds = self.prep, self.prep.dataset
        levels = list(prep.cfg.report.levels)
        if not levels:
            summary["bands"] = {"levels": [], "skipped": "report.levels is empty"}
            return
        from fitcli.lm import one_thread

        model = prep.model
        try:
            if model.raw.dtype != torch.float64:
                model = copy.deepcopy(model).to(torch.float64)
            # Small tensors (the grid, the data points up to bands.DATA_POINTS_LIMIT): on busy
            # cores more threads only wait for each other.
            with one_thread():
                found = bands.for_run(
                    model,
                    summary,
                    self.grid,
                    ds.x,
                    ds.sigma,
                    levels,
                    ds.variables,
                    absolute_sigma=prep.cfg.data.absolute_sigma is not False,
                )
        except Exception as exc:  # the bands are a report, not the fit: say why they are missing
            found = bands.RunBands(
                None,
                None,
                {"levels": levels, "skipped": f"{type(exc).__name__}: {exc}"},
            )
        record = found.record
        if found.grid is not None:
            columns = found.grid
            self._bands_csv(self.run_dir / files.BANDS, columns)
            if found.points is not None:
                self._bands_csv(self.run_dir / files.BANDS_DATA, found.points)
            record["snapshot"] = None
            last = self._last_page
            final = summary.get("params")
            if (
                last is not None
                and self.snapshots
                and last[0]["epoch"] == self.snapshots[-1]["epoch"]
                and last[0]["params"] == final
            ):
                drawn = bands.band_set(columns, levels, found.points)
                if self._held is not None and self._held[0] is last[0]:
                    self._draw_held(drawn)  # drawn once, with its bands
                else:
                    page = self._page(last[0], last[1], last[2], drawn)
                    files.atomic_write(self.snap_dir / self.snapshot_name(last[0]["epoch"]), page)
                record["snapshot"] = last[0]["epoch"]
        summary["bands"] = record

    @staticmethod
    def _bands_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
        """x, fit and the band columns, exact: %.17g round-trips every float64 (as data.csv),
        so `fitcli plot` draws the bands it reads back exactly as the run drew them."""
        table = np.column_stack(list(columns.values()))
        row = ",".join(["%.17g"] * table.shape[1]) + "\n"
        body = (row * table.shape[0]) % tuple(table.ravel().tolist())
        files.atomic_write(path, ",".join(columns) + "\n" + body)

    def write_params(self) -> None:
        files.write_json(
            self.run_dir / files.SNAPSHOT_PARAMS,
            {"names": list(self.prep.model.names), "snapshots": self.snapshots},
        )

    def _save_state(self, **kw: Any) -> None:
        from fitcli.config import config_to_dict
        from fitcli.rundir.state import save_state

        history = kw.pop("history", self.history)
        save_state(self.run_dir, history=history, config=config_to_dict(self.prep.cfg), **kw)

    def _frozen_state(self, epoch: int) -> dict:
        """save_state's arguments at this snapshot, copied: the run moves on before `flush`."""
        import copy
        from types import SimpleNamespace

        from fitcli.train import History

        h, stepper = self.history, self.prep.stepper
        assert h is not None  # only snapshots with a history save state (see `snapshot`)
        frozen = SimpleNamespace(raw=self.prep.model.raw.detach().clone())
        if hasattr(stepper, "state_dict"):
            state = stepper.state_dict()
            if not getattr(stepper, "state_dicts_are_copies", False):
                state = copy.deepcopy(state)
            stepper = SimpleNamespace(state_dict=lambda: state)
        else:
            stepper = SimpleNamespace()
        history = History(h.losses[:epoch], h.lrs[:epoch], h.elapsed[:epoch], h.params[:epoch])
        return {"epoch": epoch, "model": frozen, "stepper": stepper, "history": history}

    def flush(self) -> None:
        """Write what `defer_state` held back: the latest snapshot page, params.json, then
        state.json (last: a saved state has its snapshot beside it)."""
        self._draw_held()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.write_params()
        if pending:
            self._save_state(**pending)

    def metrics(self, result: TrainResult, start_epoch: int = 0) -> None:
        hist = result.history
        model = self.prep.model
        names = list(model.names)
        raw = torch.tensor(hist.params, dtype=model.raw.dtype, device=model.raw.device)
        with torch.no_grad():
            values = (
                model.full_vector(model.external(raw)).double().cpu().tolist()
                if len(hist.params)
                else []
            )
        rows = []
        for k, (loss, lr, t, vals) in enumerate(
            zip(hist.losses, hist.lrs, hist.elapsed, values, strict=True)
        ):
            rows.append(
                [
                    start_epoch + k,
                    files.fmt(loss),
                    files.fmt(lr),
                    f"{t:.6f}",
                    *map(repr, vals),  # floats from tolist(): files.fmt without the calls
                ]
            )
        files.write_csv(
            self.run_dir / files.METRICS, ["epoch", "loss", "lr", "elapsed_s", *names], rows
        )

    def figures(self, summary: dict) -> None:
        """figures/fit.<format> and loss.<format> of a completed run whose config asks for them
        (`report.formats`), read back from the finished run directory as `fitcli plot --format`
        draws them. A failure leaves the run as it is and says how to draw them again."""
        formats = self.prep.cfg.report.formats
        if not formats or summary.get("status") != RunStatus.COMPLETED:
            return
        from fitcli.errors import FigureExportError, FitcliError
        from fitcli.figures import write_figures

        try:
            write_figures(self.run_dir, list(formats))
        except FitcliError as exc:
            failed = FigureExportError(
                f"the run in {self.run_dir} completed, but its figures were not written: {exc}; "
                f"`fitcli plot {self.run_dir} --format {formats[0]}` draws them"
            )
            failed.exit_code = exc.exit_code
            raise failed from None


def base_summary(
    prep: Prepared, run_dir: Path | None, command: list[str], *, data_form: str = "csv"
) -> Summary:
    """The summary a run starts with; `run_dir` None for a fit in memory (the Python API)."""
    cfg = prep.cfg
    ds = prep.dataset
    return {
        files.RUN_MARKER: files.RUN_SCHEMA,  # what marks a fitcli run directory (rundir/files.py)
        **versions(),
        "run_dir": None if run_dir is None else str(run_dir),
        "name": cfg.name,
        "status": RunStatus.RUNNING,
        "exit_code": None,
        "epochs": cfg.epochs,
        "epochs_run": 0,
        "final_loss": None,
        "loss": name_of(cfg.loss),
        "loss_options": resolve(cfg.loss).options,
        "optimizer": optim.split_spec(cfg.optimizer)[0],
        "params": prep.model.values(),
        "device": str(prep.device),
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        # The multi-start search that chose this run's start (`fitcli.starts`).
        **({"starts": prep.starts} if prep.starts is not None else {}),
        "n_points": prep.dataset.n,
        # A data file's column names by role: the plots' axis titles (`plots.axis_labels`).
        **({"columns": dict(prep.dataset.names)} if prep.dataset.names else {}),
        # Rows left out (`data.nan_policy: omit`, `data.range`), only when they may be.
        **({"rows": prep.dataset.rows} if prep.dataset.rows is not None else {}),
        **(
            {"omitted_lines": prep.dataset.omitted_lines}
            if prep.dataset.omitted_lines is not None
            else {}
        ),
        **({"variables": list(prep.dataset.variables)} if prep.dataset.x.ndim == 2 else {}),
        # How the model is composed (`fitcli.composition`): its components and its ties.
        **({"components": list(prep.model.components)} if prep.model.components else {}),
        **({"tied": dict(prep.model.tied)} if prep.model.tied else {}),
        # What resume compares a data file with (a file edited since cannot be resumed).
        **({"data_digest": ds.digest} if ds.digest else {}),
        # A large data file is not copied: the run reads it from here (`rundir.reader.read_data`).
        **({"data_file": {"path": ds.source, "size": ds.size}} if data_form == "file" else {}),
        "elapsed_s": 0.0,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        # Who writes the run while it runs (`liveness`): a run whose writer is gone is stale.
        # A fit in memory has no run to go stale (and reading /proc was a tenth of its set-up).
        **({"process": liveness.identity()} if run_dir is not None else {}),
    }


def interruption_fields(signal: str | None, when: str) -> Summary:
    """The summary fields of a run stopped by `signal` (None: not by a signal, e.g. --fail-fast)."""
    fields: Summary = {
        "status": RunStatus.INTERRUPTED,
        "exit_code": int(exit_code_for(RunStatus.INTERRUPTED, signal)),
        "reason": f"interrupted by {signal} {when}" if signal else f"interrupted {when}",
    }
    if signal:
        fields["signal"] = signal
    return fields


def failure_fields(exc: BaseException, elapsed_s: float, stopped_by: Any = None) -> Summary:
    """The summary fields of a run that `exc` ended while it was being written: failed, or,
    for a second stop signal (KeyboardInterrupt), interrupted at once by that signal
    (`stopped_by()`: which signal asked for the stop, when the exception does not say)."""
    fields: Summary = {
        "status": RunStatus.FAILED,
        "exit_code": int(exit_code_for(RunStatus.FAILED)),
        "converged": False,
        "elapsed_s": elapsed_s,
        "reason": str(exc) or type(exc).__name__,
    }
    if isinstance(exc, KeyboardInterrupt):
        by = getattr(exc, "signal", None) or (stopped_by() if stopped_by else None)
        fields.update(interruption_fields(by, "at once"))
    return fields


def tidy_snapshots(run_dir: Path, epoch: int) -> None:
    """Remove snapshot pages and fitted curves past `epoch`, and temporary files.

    A run killed between a snapshot page and its state leaves pages past the saved epoch: they are
    written again, identically, when the resumed run reaches them. Nothing at or before the
    saved epoch is removed: it cannot be rebuilt.
    """
    snap_dir = run_dir / files.SNAPSHOTS
    for path in [*run_dir.glob(".*.tmp-*"), *snap_dir.glob(".*.tmp-*")]:
        with contextlib.suppress(OSError):
            path.unlink()
    for page in [*snap_dir.glob("epoch-*.html"), *snap_dir.glob("epoch-*.csv")]:
        number = page.stem.removeprefix("epoch-")
        if number.isdigit() and int(number) > epoch:
            try:
                page.unlink()
            except OSError as exc:
                raise RunDirError(f"cannot remove the stale snapshot {page}: {exc}") from None
