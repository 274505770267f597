"""The only module that imports rich: progress, tables and messages, all on stderr except the
summary table and run directory (stdout), which `--json` replaces."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from fitcli.errors import RunStatus
from fitcli.text import printable  # the one sanitiser: everything printed here goes through it

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def _markup(text: str) -> str:
    """`text` for a place rich reads as markup (a progress column), shown literally."""
    return escape(printable(text))


def _literal(text: Any) -> Any:
    """A table cell or label as rich text shown literally: no markup, no control characters."""
    from rich.text import Text

    return Text(printable(str(text)))


def error(message: str) -> None:
    """A one-paragraph error on stderr, no traceback."""
    # escape: a message quoting `[x, sin(x)]` or `fitcli[dask]` must not be read as markup
    stderr.print(
        f"[bold red]error:[/] {escape(printable(message, allow=chr(10)))}",
        markup=True,
        highlight=False,
        emoji=False,
    )


def warn(message: str) -> None:
    stderr.print(
        f"[yellow]warning:[/] {escape(printable(message, allow=chr(10)))}",
        markup=True,
        emoji=False,
    )


def plain_err(message: str) -> None:
    stderr.print(printable(message, allow="\n"), markup=False, emoji=False)


def plain_out(text: str) -> None:
    """Text for stdout as it is (lines of a listing, a path), control characters escaped."""
    sys.stdout.write(printable(text, allow="\n"))
    sys.stdout.flush()


def _rich_bar(*fields: str) -> Any:
    """A rich progress bar on stderr: description, bar, done/total, `fields`, elapsed, ETA;
    redrawn four times a second from rich's own thread."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        refresh_per_second=4,
        transient=False,
        get_time=time.perf_counter,
    )


class Progress:
    """Progress of one training run: rich bar, plain periodic lines, or nothing.

    `update(epoch, loss)` is called every epoch from the training loop, so it only stores values;
    rich renders them from its own refresh thread a few times a second, and the plain mode prints
    at most one line every `plain_every` seconds.
    """

    def __init__(self, mode: str, total: int, label: str, *, plain_every: float = 5.0) -> None:
        if mode == "auto":
            mode = "rich" if stderr.is_terminal else "plain"
        self.mode, self.total, self.label = mode, total, label
        self.epoch, self.loss, self.start_epoch = 0, float("nan"), 0
        self.plain_every = plain_every
        self._t0 = time.perf_counter()
        self._next_plain = self._t0 + plain_every
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._t0 = time.perf_counter()
        if self.mode == "rich":
            self._progress = _rich_bar("loss {task.fields[loss]}", "{task.fields[rate]}")
            self._progress.__enter__()
            self._task = self._progress.add_task(
                _markup(self.label), total=self.total, loss="-", rate="", completed=self.start_epoch
            )
            # Pull the latest values right before each render instead of on every epoch.
            live = self._progress.live
            original = live.get_renderable

            def fresh():
                self._sync()
                return original()

            live.get_renderable = fresh
        elif self.mode == "plain":
            plain_err(f"{self.label}: training {self.total} epochs")
        return self

    def _sync(self) -> None:
        if self._progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        done = self.epoch - self.start_epoch
        rate = f"{done / elapsed:,.0f} ep/s" if elapsed > 0 and done else ""
        self._progress.update(self._task, completed=self.epoch, loss=f"{self.loss:.6g}", rate=rate)

    def update(self, epoch: int, loss: float) -> None:
        self.epoch, self.loss = epoch, loss
        if self.mode == "plain":
            now = time.perf_counter()
            if now >= self._next_plain:
                self._next_plain = now + self.plain_every
                self._plain_line(now)

    def _plain_line(self, now: float) -> None:
        elapsed = now - self._t0
        done = self.epoch - self.start_epoch
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.epoch) / rate if rate > 0 else float("nan")
        plain_err(
            f"{self.label}: epoch {self.epoch}/{self.total} loss {self.loss:.6g} "
            f"{rate:,.0f} ep/s eta {eta:,.1f}s"
        )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._sync()
            self._progress.__exit__(None, None, None)
        elif self.mode == "plain":
            self._plain_line(time.perf_counter())


def summary_text(summary: dict, *, width: int = 100) -> str:
    """The end-of-run table (`summary_table`) as plain text, for `FitResult.report()`."""
    import io

    buffer = io.StringIO()
    out = Console(
        file=buffer, width=width, highlight=False, soft_wrap=True, color_system=None, emoji=False
    )
    summary_table(summary, out=out)
    return buffer.getvalue()


def summary_table(summary: dict, *, out: Console | None = None) -> None:
    """The end-of-run table on stdout (or `out`): parameters (± standard error when known),
    loss, time."""
    from rich.table import Table

    out = stdout if out is None else out

    status = summary["status"]
    colour = {
        RunStatus.COMPLETED: "green",
        RunStatus.DIVERGED: "red",
        RunStatus.INTERRUPTED: "yellow",
    }.get(status, "red")
    table = Table(
        title=f"{_markup(summary['name'])}: [{colour}]{status}[/]",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("parameter")
    stderrs = summary.get("stderr") or {}
    has_err = any(v is not None for v in stderrs.values())
    truth = summary.get("truth") or {}
    distance = summary.get("truth_distance") or {}
    # Like a fit report: value ± standard error (relative), and the truth when it is known.
    table.add_column("value ± stderr" if has_err else "value", justify="right", no_wrap=True)
    if has_err:
        table.add_column("rel. err", justify="right", no_wrap=True)
    if truth:
        table.add_column("truth", justify="right", no_wrap=True)
        table.add_column("(fit-truth)/σ", justify="right", no_wrap=True)
    tied = summary.get("tied") or {}
    for name, value in summary["params"].items():
        err = stderrs.get(name)
        text = f"{value:.8g}" if value is not None else "-"
        row = [f"{name} = {tied[name]}" if name in tied else name]
        if has_err:
            row.append(f"{text} ± {err:.3g}" if err is not None else f"{text} ± -")
            rel = abs(err / value) if err is not None and value else None
            row.append(f"({rel:.2%})" if rel is not None else "")
        else:
            row.append(text)
        if truth:
            t, d = truth.get(name), distance.get(name)
            row.append(f"{t:.8g}" if t is not None else "-")
            row.append(f"{d:+.2f}" if d is not None else "-")
        table.add_row(*map(_literal, row))
    if summary["params"]:
        out.print(table, markup=True)
    else:  # every parameter per group: the title alone, the values are in groups.csv
        out.print(f"{_markup(summary['name'])}: [{colour}]{status}[/]", markup=True)
    loss = summary.get("final_loss")
    lines = []
    groups = summary.get("groups")
    if groups is not None:
        count = groups if isinstance(groups, int) else len(groups)  # --json: the rows
        per = summary.get("per_group_params") or []
        where = summary.get("groups_file") or "groups.csv"
        counts = [f"{summary.get('groups_converged', 0):,} converged"]
        if summary.get("groups_completed"):
            counts.append(f"{summary['groups_completed']:,} completed without converging")
        if summary.get("groups_failed"):
            counts.append(f"{summary['groups_failed']:,} failed")
        lines.append(
            f"groups      {count:,}: {', '.join(counts)}"
            + (f"; per group ({', '.join(per)}) in {where}" if per else "")
        )
    lines += [
        f"final loss  {loss:.8g}" if loss is not None else "final loss  -",
        f"epochs      {summary['epochs_run']} in {summary['elapsed_s']:.2f} s "
        f"on {summary['device']} ({summary['dtype']})",
    ]
    if summary.get("optimum_loss") is not None:
        gap = summary.get("gap")
        tail = f"  (gap {gap:.3g}: final loss relative to it)" if gap is not None else ""
        lines.append(f"optimum     {summary['optimum_loss']:.8g}{tail}")
    if summary.get("rss") is not None:
        fit = f"fit         RSS {summary['rss']:.6g}"
        if summary.get("r2") is not None:
            fit += f"  R² {summary['r2']:.6g}"
        if summary.get("chi2_reduced") is not None:
            fit += f"  reduced χ² {summary['chi2_reduced']:.6g}"
        lines.append(fit + f"  ({summary['n_points']} points, {summary['n_params']} free)")
    unc = summary.get("uncertainty")
    if unc and unc.get("status") != "ok":
        why = unc.get("reason", "")
        told = why and why in (summary.get("reason") or "")  # the stopped line says why
        lines.append(f"error bars  {unc['status']}" + ("" if told else f": {why}"))
    if summary.get("reason"):
        lines.append(f"stopped     {summary['reason']}")
    if summary.get("run_dir") is not None:  # None: a fit in memory (the Python API)
        lines.append(f"run dir     {summary['run_dir']}")
    for line in lines:
        out.print(printable(line), markup=False, highlight=False, emoji=False)


def columns_table(columns: dict[str, Any]) -> None:
    """`fitcli predict`: numeric columns side by side on stdout, 10 significant digits."""
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for name in columns:
        table.add_column(name, justify="right")
    for row in zip(*(v.tolist() for v in columns.values()), strict=True):
        table.add_row(*(f"{v:.10g}" for v in row))
    _print_whole(table)


def intervals_table(doc: dict[str, Any]) -> None:
    """`fitcli ci` (and `fitcli train` with uncertainty.method): each parameter's interval per
    level, with its ends' distances from the estimate, -below/+above, so that an asymmetric
    interval shows as such; then the method, its time and its notes."""
    from rich.table import Table

    def num(v: Any) -> str:
        return "n/a" if v is None else f"{v:.6g}"

    table = Table(show_edge=False, pad_edge=False)
    for name in ("parameter", "estimate", "level", "lower", "upper", "-/+ from estimate"):
        table.add_column(name, justify="left" if name == "parameter" else "right")
    for name, entry in doc["params"].items():
        est = entry["estimate"]
        for k, iv in enumerate(entry["intervals"]):
            lo, hi = iv.get("lower"), iv.get("upper")
            minus = "n/a" if lo is None else f"-{est - lo:.4g}"
            plus = "n/a" if hi is None else f"+{hi - est:.4g}"
            table.add_row(
                name if k == 0 else "",
                num(est) if k == 0 else "",
                f"{iv['level']:g}",
                num(lo),
                num(hi),
                f"{minus} / {plus}",
            )
    _print_whole(table)
    what = doc["method"]
    if what == "bootstrap":
        what += f" ({doc['resampling']} resampling, {doc['samples']} samples, seed {doc['seed']})"
    if what == "mcmc":
        what += (
            f" ({doc['walkers']} walkers, {doc['steps']} steps, burn {doc['burn']}, "
            f"seed {doc['seed']})"
        )
    plain_out(f"intervals   {what} in {doc['elapsed_s']:.3g} s\n")
    if doc["method"] == "mcmc":
        diag = doc["params"].values()
        rhats = [d["r_hat"] for d in diag]
        taus = [d["autocorr_time"] for d in diag]
        rhat = "n/a" if None in rhats else f"{max(rhats):.4g}"
        tau = "n/a" if None in taus else f"{max(taus):.3g}"
        plain_out(
            f"chains      max R-hat {rhat}, max autocorrelation time {tau} steps, "
            f"acceptance {doc['acceptance_fraction']:.2f}\n"
        )
        if doc["converged"]:
            plain_out(f"            {doc['reason']}\n")
    for note in doc.get("notes") or []:
        warn(f"intervals: {note}")


def _print_whole(table: Any) -> None:
    """A table on stdout; without a terminal (a pipe, a file) at its full width, never cut."""
    out = stdout
    if not stdout.is_terminal:
        from rich.measure import Measurement

        wide = Measurement.get(stdout, stdout.options.update(max_width=10**6), table).maximum
        out = Console(width=wide, highlight=False, soft_wrap=True)
    out.print(table, markup=False, highlight=False, emoji=False)


def print_json(obj: Any) -> None:
    """The only stdout output with --json."""
    from fitcli.rundir.files import dumps_json

    sys.stdout.write(dumps_json(obj))
    sys.stdout.flush()


class SweepProgress:
    """One bar for a whole sweep: runs done of total, how many did not complete, ETA."""

    def __init__(self, mode: str, total: int, label: str, *, plain_every: float = 5.0) -> None:
        if mode == "auto":
            mode = "rich" if stderr.is_terminal else "plain"
        self.mode, self.total, self.label = mode, total, label
        self.done, self.failed = 0, 0
        self.plain_every = plain_every
        self._next_plain = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> SweepProgress:
        if self.mode == "rich":
            self._progress = _rich_bar("runs, {task.fields[failed]} not completed")
            self._progress.__enter__()
            self._task = self._progress.add_task(_markup(self.label), total=self.total, failed=0)
        elif self.mode == "plain":
            plain_err(f"{self.label}: {self.total} runs")
            self._next_plain = time.perf_counter() + self.plain_every
        self._t0 = time.perf_counter()
        return self

    def update(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed
        if self._progress is not None:
            self._progress.update(self._task, completed=done, failed=failed)
        elif self.mode == "plain" and time.perf_counter() >= self._next_plain:
            self._next_plain = time.perf_counter() + self.plain_every
            self._plain_line()

    def _plain_line(self) -> None:
        plain_err(
            f"{self.label}: {self.done}/{self.total} runs, {self.failed} not completed, "
            f"{time.perf_counter() - self._t0:.1f}s"
        )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
        elif self.mode == "plain":
            self._plain_line()


def runs_table(rows: list[dict], columns: list[str]) -> None:
    """`fitcli runs`: one line per run directory on stdout."""
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    right = ("epochs", "final_loss", "time_s")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    for row in rows:
        table.add_row(*(_literal(row.get(c, "")) for c in columns))
    _print_whole(table)  # a pipe or a file: whole values, however long the lines get


def graph_tree(graph: Any) -> None:
    """The autograd graph as a tree on stdout, from the loss to the leaves; a node reached a
    second time (the graph is a DAG) is shown once and then as a reference to its number."""
    from rich.text import Text
    from rich.tree import Tree

    styles = {"op": "bold", "param": "bold red", "data": "green"}
    marks = {"op": "", "param": "  [requires grad]", "data": "  [data, no grad]"}

    def label(nid: int, ref: bool = False) -> Text:
        node = graph.nodes[nid]
        t = Text(f"#{nid} ", style="dim")
        t.append(printable(node.label), style=styles.get(node.kind, ""))
        if ref:
            t.append(f"  -> see #{nid} above", style="dim italic")
            return t
        t.append(marks.get(node.kind, ""), style=styles.get(node.kind, ""))
        if node.detail:
            t.append(f"  ({printable(node.detail)})", style="dim")
        return t

    shown: set[int] = set()
    root = Tree(label(graph.root))
    shown.add(graph.root)
    stack = [(root, c) for c in reversed(graph.children[graph.root])]
    while stack:  # iterative: deep graphs must not hit the recursion limit
        parent, nid = stack.pop()
        if nid in shown:
            parent.add(label(nid, ref=True))
            continue
        shown.add(nid)
        branch = parent.add(label(nid))
        stack.extend((branch, c) for c in reversed(graph.children[nid]))
    stdout.print(root, markup=False, highlight=False, emoji=False)


def _wide(renderable: Any) -> Console:
    """stdout, or for a pipe or a file a console as wide as `renderable` (no wrapped cells)."""
    if stdout.is_terminal:
        return stdout
    from rich.measure import Measurement

    wide = Measurement.get(stdout, stdout.options.update(max_width=10**6), renderable).maximum
    return Console(width=wide, highlight=False, soft_wrap=True)


def shapes_table(shapes: list[Any], unavailable: dict[str, str]) -> None:
    """`fitcli shapes`: one line per lineshape on stdout: its signature and what it is."""
    from rich.table import Table

    from fitcli.shapes import signature

    table = Table(show_edge=False, pad_edge=False)
    table.add_column("lineshape", no_wrap=True)
    table.add_column("meaning")
    for shape in shapes:
        table.add_row(_literal(signature(shape)), _literal(shape.summary))
    _wide(table).print(table, markup=False, highlight=False, emoji=False)
    lines = [f"{len(shapes)} lineshapes; `fitcli shapes NAME` shows one in full."]
    lines += [f"not yet available: {name} ({why})" for name, why in unavailable.items()]
    for line in lines:
        stdout.print(printable(line), markup=False, highlight=False, emoji=False)


def shape_detail(shape: Any) -> None:
    """`fitcli shapes NAME`: the signature, meaning, formula and each parameter's guess role."""
    from rich.table import Table

    from fitcli.shapes import signature

    head, _, math_text = shape.doc.partition("\n")
    lines = [signature(shape), "", head, "", f"  {math_text}", "", "formula (fitcli):"]
    lines += [f"  {shape.formula}", ""]
    for line in lines:
        stdout.print(printable(line), markup=False, highlight=False, emoji=False)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("parameter", "default", "guess role"):
        table.add_column(col)
    for arg in shape.args[1:]:
        role = shape.roles[arg]
        default = shape.defaults.get(arg)
        text = "-" if default is None else f"{default:g}" if isinstance(default, float) else default
        what = role.kind
        if role.kind in ("width", "area", "height") and role.factor != 1.0:
            what += f" (factor {role.factor:.6g})"
        if role.start is not None:
            what += f", start {role.start:g}"
        if role.note:
            what += f": {role.note}"
        table.add_row(_literal(arg), _literal(text), _literal(what))
    _wide(table).print(table, markup=False, highlight=False, emoji=False)
