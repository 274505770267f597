"""Typer commands: parse, call one core function, print, map errors to exit codes.

torch, plotly and the core modules are imported inside the commands so that `fitcli --help`
and `fitcli --version` answer without paying for them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fitcli import __version__
from fitcli.errors import (
    STOP_SIGNALS,
    ExitCode,
    FitcliError,
    Interrupted,
    RunStatus,
    exit_code_for,
)

# Help text is rich markup: a literal "[" before a letter (`[x, sin(x)]`) is written "\\[", or
# rich takes it for a tag and drops it. The group's help is the docstring of `_root`.
app = typer.Typer(
    name="fitcli",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class ProgressMode(StrEnum):
    auto = "auto"
    rich = "rich"
    plain = "plain"
    none = "none"


class PlotlyJS(StrEnum):
    directory = "directory"
    embed = "embed"
    cdn = "cdn"


class ImageFormat(StrEnum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fitcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Fit curves with PyTorch autograd from a YAML experiment.

    Exit codes: 0 completed, 1 failed (I/O or unexpected), 2 invalid input, 3
    diverged, 4 completed but not converged (only with --strict), 130
    interrupted (Ctrl-C), 143 by SIGTERM, 129 by SIGHUP.
    """


@contextlib.contextmanager
def errors_to_exit(debug: bool = False):
    """The one place exceptions become messages and exit codes."""
    from fitcli import console

    try:
        yield
    except typer.Exit:
        raise
    except FitcliError as exc:
        if debug:
            console.stderr.print_exception()
        console.error(str(exc))
        raise typer.Exit(int(exc.exit_code)) from None
    except KeyboardInterrupt as exc:
        by = getattr(exc, "signal", None)
        console.error(f"interrupted by {by}" if by else "interrupted")
        raise typer.Exit(int(exit_code_for(RunStatus.INTERRUPTED, by))) from None
    except Exception as exc:  # a bug or an environment fault: one line unless --debug
        if debug:
            console.stderr.print_exception()
        else:
            console.error(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        raise typer.Exit(int(ExitCode.FAILED)) from None


class StopFlag:
    """The first SIGINT (Ctrl-C), SIGTERM (a batch scheduler, `timeout`) or SIGHUP (the terminal
    closed) asks the loop to stop after this epoch; a second one of any of them stops at once
    (`Interrupted`). `signal` names the first: it decides the exit code (`exit_code_for`)."""

    def __init__(self, *, armed: bool = True) -> None:
        self.requested = False
        self.signal: str | None = None
        self.armed = armed  # False: nothing to save yet, so the first signal stops at once
        self._raised = False
        self._previous: dict[int, signal._HANDLER] = {}  # typeshed's alias; not evaluated

    def arm(self) -> None:
        """From now on a first signal asks to stop after the epoch (there is work to save)."""
        self.armed = True

    def _handler(self, signum, frame) -> None:
        if not self.armed and not self._raised:
            self.requested, self.signal, self._raised = True, signal.Signals(signum).name, True
            raise Interrupted(self.signal)
        if not self.requested:
            self.requested, self.signal = True, signal.Signals(signum).name
        elif not self._raised:
            self._raised = True
            raise Interrupted(self.signal or "SIGINT")
        # Later ones: the command is already ending; let it write the summary.

    def __enter__(self) -> StopFlag:
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)  # no SIGHUP on Windows
            if signum is None:
                continue
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def _late(self, signum, frame) -> None:
        # The command is done but the process still exits (output, torch's teardown): a second
        # signal now must neither kill it by the signal nor print a traceback; it exits at once.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(int(exit_code_for(RunStatus.INTERRUPTED, self.signal)))

    def _ignore(self) -> None:
        # Interpreter teardown resets Python-level handlers to the default (death by the
        # signal); an ignored signal stays ignored.
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        ending = self.requested and _IN_MAIN  # the fitcli process, stopping: nothing to restore
        for signum, previous in self._previous.items():
            signal.signal(signum, self._late if ending else previous)
        if ending:
            import atexit

            atexit.register(self._ignore)

    def interrupt(self) -> Interrupted:
        """What to raise when a stop was asked for before anything ran."""
        return Interrupted(self.signal or "SIGINT")


def _complete_keys(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of an override: the keys of the schema and of the config file already
    on the command line, each with its "=" (reads YAML only: no torch, instant)."""
    if "=" in incomplete:
        return []
    from fitcli.config import load_yaml, override_keys, read_config_text

    raw = None
    config = ctx.params.get("config")
    if config is not None:
        with contextlib.suppress(Exception):  # completion never fails; the schema's keys remain
            raw = load_yaml(read_config_text(config), str(config))
    return [f"{k}=" for k in override_keys(raw) if k.startswith(incomplete)]


ConfigArg = Annotated[
    Path, typer.Argument(help="The experiment's YAML config file.", show_default=False)
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides `key.path=value` (values read as YAML), "
        "e.g. optimizer.lr=0.05 epochs=2000.",
        show_default=False,
        autocompletion=_complete_keys,
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Exit 4 when a run completed but did not converge (summary.json converged: false).",
    ),
]


@app.command()
def train(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="The experiment's YAML config file (with --resume: none, only overrides).",
            show_default=False,
        ),
    ] = None,
    overrides: OverridesArg = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Parent folder of the new run directory.")
    ] = Path("runs"),
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", help="Use exactly this run directory (must not exist)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing --run-dir (only a fitcli run directory)."
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print summary.json to stdout and nothing else.")
    ] = False,
    progress: Annotated[
        ProgressMode,
        typer.Option("--progress", help="Progress on stderr: rich bar, plain lines, or none."),
    ] = ProgressMode.auto,
    plotlyjs: Annotated[
        PlotlyJS,
        typer.Option(
            "--plotlyjs",
            help="plotly.js: one copy in the "
            "run directory, embedded in every page, or from "
            "the CDN.",
        ),
    ] = PlotlyJS.directory,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue this interrupted run directory from its last snapshot, in place "
            "(its own config plus any overrides; data and model cannot change).",
            show_default=False,
        ),
    ] = None,
    copy_data: Annotated[
        bool,
        typer.Option(
            "--copy-data",
            help="Copy a data file of more than 100,000 rows into the run directory "
            "(data.npz; data.csv for grouped data) instead of recording its path, size and "
            "digest (a resumed run keeps its own).",
        ),
    ] = False,
    strict: StrictOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a model on the experiment's data and write a run directory.

    Shows live progress on stderr, then a summary table and the run directory on
    stdout (or only summary.json with --json). Exit 0 completed, 2 invalid
    input, 3 diverged, 130 interrupted (143 SIGTERM, 129 SIGHUP), 1 failed; with
    --strict, 4 completed but not converged.
    """
    from fitcli import console

    # Ctrl-C is caught from the start: before the run directory exists it ends the command
    # (exit 130, 143 or 129, nothing written); after, the loop stops at the end of the epoch.
    with errors_to_exit(debug), StopFlag() as stop:
        from fitcli.errors import strict_exit_code
        from fitcli.resume import start

        begun = start(
            config,
            overrides or [],
            resume=resume,
            out=out,
            run_dir=run_dir,
            overwrite=overwrite,
            stop=stop,
        )
        for note in begun.notes:
            console.warn(f"resume: {note}")
        cfg, command = begun.prep.cfg, ["fitcli", *sys.argv[1:]]
        with console.Progress(progress.value, cfg.epochs, cfg.name) as bar:
            summary = begun.execute(
                plotlyjs=plotlyjs.value,
                command=command,
                stop=stop,
                progress=bar.update,
                copy_data=copy_data,
            )
        if json_out:
            console.print_json(summary)
        else:
            console.summary_table(summary)
            found = summary.get("intervals") or {}
            if "params" in found:
                console.intervals_table(found)
            elif "error" in found:
                console.warn(f"intervals: {found['error']}")
        code = strict_exit_code(summary["exit_code"], summary.get("converged"), strict)
        if code:
            raise typer.Exit(code)


@app.command()
def check(config: ConfigArg, overrides: OverridesArg = None, debug: DebugOpt = False) -> None:
    """Validate a config (and its data) and print the resolved config; runs nothing."""
    with errors_to_exit(debug):
        from fitcli.config import config_to_dict, dump_yaml, load_config

        cfg = load_config(config, overrides or [])  # before torch: bad input fails fast
        from fitcli.prepare import prepare

        prep = prepare(cfg)
        d = config_to_dict(cfg)
        d["device"] = str(prep.device)
        sys.stdout.write(dump_yaml(d))
        from fitcli import console

        console.plain_err(
            f"ok: {config} is valid ({prep.dataset.n} points, "
            f"{len(prep.model.free_names)} free parameters: "
            f"{', '.join(prep.model.free_names)})"
        )


@app.command()
def schema() -> None:
    """Print the JSON Schema of the config, for editors' YAML completion."""
    import json

    from fitcli.config import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def plot(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="One run directory, or several to compare.", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="The page to write: default RUN_DIR/report.html for one run, compare.html "
            "for several.",
        ),
    ] = None,
    open_page: Annotated[
        bool, typer.Option("--open", help="Open the page in the browser afterwards.")
    ] = False,
    plotlyjs: Annotated[
        PlotlyJS,
        typer.Option(
            "--plotlyjs",
            help="plotly.js: one copy in the run directory (beside --out when comparing), "
            "embedded in every page, or from the CDN.",
        ),
    ] = PlotlyJS.directory,
    formats: Annotated[
        list[ImageFormat] | None,
        typer.Option(
            "--format",
            help="Write static figures instead of the report: RUN_DIR/figures/fit.FORMAT and "
            "loss.FORMAT (repeat for several formats). Needs Chrome or Chromium.",
            show_default=False,
        ),
    ] = None,
    dpi: Annotated[
        int | None,
        typer.Option(
            "--dpi",
            min=10,
            max=2400,
            help="PNG resolution in dots per inch (default 300); SVG and PDF are vector.",
            show_default=False,
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(
            "--width",
            min=50,
            max=10000,
            help="Figure width in CSS pixels, 1/96 inch (default 700): its size in SVG and PDF.",
            show_default=False,
        ),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option(
            "--height",
            min=50,
            max=10000,
            help="Figure height in CSS pixels, 1/96 inch (default 500).",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Rebuild a run's snapshots and write its report.html (several runs: one comparison page).

    Works on finished, diverged, interrupted and still-running runs. Prints the
    page written. With --format, writes the final fit (residuals beneath) and the
    loss curve as static figures in RUN_DIR/figures/ instead, and prints them.
    Exit 0 written, 2 a run directory's file is missing, truncated or garbled
    (named), or no Chrome/Chromium for --format.
    """
    from fitcli import console

    with errors_to_exit(debug):
        from fitcli import report

        if formats:
            _plot_figures(run_dirs, formats, out, open_page, dpi, width, height)
            return
        sized = [o for o, v in (("--dpi", dpi), ("--width", width), ("--height", height)) if v]
        if sized:
            from fitcli.errors import InputError

            raise InputError(f"{', '.join(sized)} size static figures: add --format png|svg|pdf")
        if len(run_dirs) == 1:
            written = report.write_report(run_dirs[0], out=out, plotlyjs=plotlyjs.value)
            console.plain_err(f"rebuilt {len(written.snapshots)} snapshot pages")
        else:
            target = out if out is not None else Path("compare.html")
            written = report.write_compare(run_dirs, target, plotlyjs=plotlyjs.value)
        console.plain_out(f"{written.page}\n")
        if open_page:
            import webbrowser

            webbrowser.open(written.page.resolve().as_uri())


def _plot_figures(
    run_dirs: list[Path],
    formats: list[ImageFormat],
    out: Path | None,
    open_page: bool,
    dpi: int | None,
    width: int | None,
    height: int | None,
) -> None:
    """`fitcli plot RUN_DIR --format ...`: the run's static figures."""
    from fitcli import console, export
    from fitcli.errors import InputError
    from fitcli.figures import write_figures

    if len(run_dirs) != 1:
        raise InputError("--format draws the figures of one run directory; give only one")
    if out is not None or open_page:
        raise InputError(
            "--out and --open are for the HTML report; --format writes RUN_DIR/figures/"
        )
    written = write_figures(
        run_dirs[0],
        [f.value for f in formats],
        width=width or export.WIDTH,
        height=height or export.HEIGHT,
        dpi=dpi or export.DPI,
    )
    each = written.each_s
    console.plain_err(
        f"drew {len(each)} figures in {written.start_s + sum(each):.1f} s (the browser started "
        f"in {written.start_s:.1f} s, then {sum(each) / max(1, len(each)):.2f} s a figure)"
    )
    console.plain_out("".join(f"{p}\n" for p in written.paths))


@app.command()
def predict(
    run_dir: Annotated[
        Path, typer.Argument(help="The run directory whose fit to evaluate.", show_default=False)
    ],
    x: Annotated[
        str | None,
        typer.Option("--x", help="New points START:STOP:NUM, as numpy's linspace (0:10:101)."),
    ] = None,
    x_file: Annotated[
        Path | None,
        typer.Option(
            "--x-file",
            help="New points from a table: its x column as in the config (several variables: "
            "each variable's column as in the config, or named as the variable).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the columns as CSV here (never replaced)."),
    ] = None,
    band: Annotated[
        float,
        typer.Option("--band", help="Level of the confidence and prediction bands; 0: none."),
    ] = 0.95,
    json_out: Annotated[
        bool, typer.Option("--json", help='Print {"x": [...], "fit": [...], bands} only.')
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Evaluate a run's fitted model at new points, with confidence and prediction bands.

    Prints a table (or JSON with --json), or writes CSV with --out; the columns
    are x (a model of several variables: the variables' names, points from
    --x-file), fit and, where the fit has error bars, conf_lower_95,
    conf_upper_95, pred_lower_95 and pred_upper_95. Exit 0 done, 2 invalid input
    or not a run directory.
    """
    from fitcli import console

    with errors_to_exit(debug):
        from fitcli.api import predict_run, write_prediction

        columns, note = predict_run(run_dir, x=x, x_file=x_file, band=band or None)
        if note is not None:
            console.warn(f"no bands: {note}")
        if out is not None:
            write_prediction(out, columns)
            console.plain_err(f"wrote {len(columns['fit'])} points to {out}")
        elif json_out:
            console.print_json({k: v.tolist() for k, v in columns.items()})
        else:
            console.columns_table(columns)


class CIMethod(StrEnum):
    profile = "profile"
    bootstrap = "bootstrap"
    mcmc = "mcmc"


class Resampling(StrEnum):
    residual = "residual"
    case = "case"


@app.command()
def ci(
    run_dir: Annotated[
        Path, typer.Argument(help="The completed run directory.", show_default=False)
    ],
    method: Annotated[
        CIMethod,
        typer.Option(
            "--method",
            help="Profile likelihood (lmfit's F-test), bootstrap, or mcmc (emcee's posterior).",
        ),
    ] = CIMethod.profile,
    level: Annotated[
        list[float] | None,
        typer.Option("--level", help="Confidence level in (0, 1); repeat for several."),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", help="Bootstrap resamples (default: the config's, 1000)."),
    ] = None,
    resampling: Annotated[
        Resampling | None,
        typer.Option("--resampling", help="Bootstrap: resample residuals or data rows."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Bootstrap or MCMC seed (default: from the config's seed)."),
    ] = None,
    walkers: Annotated[
        int | None,
        typer.Option("--walkers", help="MCMC walkers (default: the config's, or max(32, 4p))."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="MCMC steps of each walker (default: the config's, 5000)."),
    ] = None,
    burn: Annotated[
        int | None,
        typer.Option("--burn", help="MCMC steps left out at the start (default: steps / 4)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print intervals.json to stdout and nothing else.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Profile-likelihood, bootstrap or MCMC intervals of a completed run's parameters.

    Writes RUN_DIR/intervals.json, adds the intervals to summary.json, and prints
    a table (asymmetric ends as -lower/+upper from the estimate) or, with --json,
    intervals.json. Exit 0 written, 2 not a completed run directory or invalid
    input.
    """
    from fitcli import console

    with errors_to_exit(debug):
        from fitcli.api import ci_run
        from fitcli.errors import InputError

        if samples is not None and samples < 10:
            raise InputError(f"--samples must be at least 10 (got {samples})")
        if steps is not None and steps < 100:
            raise InputError(f"--steps must be at least 100 (got {steps})")
        doc = ci_run(
            run_dir,
            method.value,
            level or None,
            samples=samples,
            resampling=None if resampling is None else resampling.value,
            seed=seed,
            walkers=walkers,
            steps=steps,
            burn=burn,
        )
        if json_out:
            console.print_json(doc)
        else:
            console.intervals_table(doc)
            console.plain_err(f"wrote {run_dir / 'intervals.json'}")


@app.command()
def graph(
    config: ConfigArg,
    overrides: OverridesArg = None,
    html_out: Annotated[
        Path | None,
        typer.Option("--html", help="Also write the graph as an interactive HTML page."),
    ] = None,
    plotlyjs: Annotated[
        PlotlyJS,
        typer.Option(
            "--plotlyjs",
            help="plotly.js of the --html page: embedded (one file to share), beside it, or "
            "from the CDN.",
        ),
    ] = PlotlyJS.embed,
    debug: DebugOpt = False,
) -> None:
    """Show the autograd graph of one loss evaluation, from the loss down to parameters and data.

    A tree in the terminal, or an interactive figure with --html.
    """
    from fitcli import console

    with errors_to_exit(debug):
        from fitcli.config import load_config
        from fitcli.graph import autograd_graph, write_html
        from fitcli.prepare import prepare

        prep = prepare(load_config(config, overrides or []))
        g = autograd_graph(prep)
        console.graph_tree(g)
        if html_out is not None:
            write_html(g, html_out, plotlyjs=plotlyjs.value)
            console.plain_err(f"wrote {html_out}")


@app.command()
def sweep(
    config: Annotated[
        Path | None,
        typer.Argument(help="The base YAML config (none with --resume).", show_default=False),
    ] = None,
    axes: Annotated[
        list[str] | None,
        typer.Argument(
            help="`key=a,b,c` or `key=range(start, stop[, step])` makes an axis, `key=value` a "
            "fixed override; the sweep is the Cartesian product of the axes. Commas inside "
            "quotes, (), [] or {} stay in their value: model.basis=\\[x, sin(x)] or "
            "'name=\"sine, v2\"' is one value.",
            show_default=False,
            autocompletion=_complete_keys,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Parent folder of the new sweep directory.")
    ] = Path("sweeps"),
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Run what is missing or unfinished in this sweep directory."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Local worker processes (default: this process).")
    ] = 0,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            envvar="FITCLI_DASK_SCHEDULER",
            help="Dask scheduler address (tcp://host:8786), or `local` for a local cluster.",
        ),
    ] = None,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first run that does not complete.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the runs (as fitcli train commands) only.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with every run's summary.")
    ] = False,
    progress: Annotated[
        ProgressMode, typer.Option("--progress", help="Progress of the sweep on stderr.")
    ] = ProgressMode.auto,
    plotlyjs: Annotated[
        PlotlyJS, typer.Option("--plotlyjs", help="plotly.js for the runs' pages.")
    ] = PlotlyJS.directory,
    strict: StrictOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train every combination of the axes; one run directory each, under one sweep directory.

    Runs that differ only in learning rate, seed, noise or starting values train
    together as one batched tensor program. Exit 0 when every run completed, 1
    when any did not, 2 invalid input, 130 interrupted (143 SIGTERM, 129
    SIGHUP); with --strict, 4 when every run completed but some did not
    converge.
    """
    from fitcli import console

    # A stop signal is caught from the start: before the sweep directory is made it ends the
    # command at once (planning a large grid takes a while, and nothing is written yet); after,
    # the runs stop at the end of their epoch and the sweep directory records them.
    with errors_to_exit(debug), StopFlag(armed=False) as stop:
        from fitcli import sweep as sw

        options = sw.Options(workers, scheduler, fail_fast, plotlyjs.value, strict=strict)
        outcome = sw.start(
            config,
            axes or [],
            resume=resume,
            out=out,
            options=options,
            stop=stop,
            command=["fitcli", *sys.argv[1:]],
            dry_run=dry_run,
            progress=lambda n, label: console.SweepProgress(progress.value, n, label),
        )
        if not isinstance(outcome, sw.Outcome):  # --dry-run: the runs as fitcli train commands
            for line in outcome:
                console.plain_out(line + "\n")
            return
        if json_out:
            console.print_json(outcome.to_json())
        else:
            console.plain_err(
                f"{outcome.completed} of {len(outcome.rows)} runs completed, "
                f"{outcome.failed} did not"
            )
            console.plain_out(f"{outcome.sweep_dir}\n")
        if outcome.exit_code:
            raise typer.Exit(outcome.exit_code)


class RunsFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def runs(
    paths: Annotated[
        list[Path], typer.Argument(help="Run directories, or folders to search below.")
    ],
    fmt: Annotated[RunsFormat, typer.Option("--format", help="Output format.")] = RunsFormat.table,
    sort: Annotated[
        str | None,
        typer.Option("--sort", help="Sort by a column: name, status, epochs, final_loss, time_s."),
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="Only runs with this status.")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """List the run directories found below PATHS (from train and sweep alike)."""
    from fitcli import console

    with errors_to_exit(debug):
        from fitcli.runs import COLUMNS, collect, render_csv, render_json, sort_rows

        rows, skipped = collect(paths)
        for path, why in skipped:
            console.warn(f"skipped {path}: {why}")
        if status is not None:
            rows = [r for r in rows if r["status"] == status]
        rows = sort_rows(rows, sort)
        if fmt == RunsFormat.csv:
            console.plain_out(render_csv(rows))
        elif fmt == RunsFormat.json:
            sys.stdout.write(render_json(rows))
        else:
            console.runs_table([{**r, **r["display"]} for r in rows], list(COLUMNS))


@app.command()
def shapes(
    name: Annotated[
        str | None,
        typer.Argument(
            help="One lineshape to show in full (default: list them all).", show_default=False
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON and nothing else.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the lineshapes callable in expressions, or show one: its formula,
    parameters, defaults and what the start-value guess takes each parameter for.

    Exit 0 shown, 2 no lineshape of that name.
    """
    from fitcli import console

    with errors_to_exit(debug):
        from fitcli import shapes as registry

        if name is None:
            if json_out:
                console.print_json(
                    {
                        "shapes": [registry.describe(s) for s in registry.SHAPES.values()],
                        "unavailable": registry.UNAVAILABLE,
                    }
                )
            else:
                console.shapes_table(list(registry.SHAPES.values()), registry.UNAVAILABLE)
            return
        shape = registry.lookup(name)
        if json_out:
            console.print_json(registry.describe(shape))
        else:
            console.shape_detail(shape)


_IN_MAIN = False  # set by `main`: this is the fitcli process, not a caller of `app`


def main() -> None:
    global _IN_MAIN
    _IN_MAIN = True
    # One program name however it is started (`fitcli`, `python -m fitcli.cli`): the usage
    # lines, and the variable the shell completion scripts set (_FITCLI_COMPLETE).
    try:
        app(prog_name="fitcli")
    except SystemExit as done:
        _exit_now(done)
    _exit_now(SystemExit(0))


def _exit_now(done: SystemExit) -> None:
    """End the process with `done`'s exit status without tearing the interpreter down.

    Once torch is imported, the interpreter's own teardown (freeing every module and object
    one by one) takes longer than most fits: about half a second on a busy 2-core machine.
    Nothing in it is fitcli's: every file is written and closed by then. So the exit handlers
    run (multiprocessing, logging, ...), stdout and stderr are flushed, and the process ends;
    with another thread still running, a profiler or tracer (cProfile, coverage: they write
    their results at exit), or anything unexpected, the ordinary exit instead.
    """
    import atexit
    import threading

    code = done.code
    if code is not None and not isinstance(code, int):
        raise done  # a message to print: Python's own exit does that
    if sys.getprofile() is not None or sys.gettrace() is not None:
        raise done
    jit = sys.modules.get("fitcli.lm_jit")
    if jit is not None:
        jit.stop_helpers()  # the compiled fits' idle helper threads
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        raise done
    try:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException:
        raise done from None
    os._exit(code or 0)


if __name__ == "__main__":
    main()
