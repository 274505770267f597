"""Run directories: unique atomic creation, artifacts written atomically and read back."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from fitcli.errors import NotRunDirError, RunDirError, RunDirExistsError, RunFileError

SUMMARY = "summary.json"
CONFIG = "config.yaml"
DATA = "data.csv"
DATA_NPZ = "data.npz"
METRICS = "metrics.csv"
SNAPSHOTS = "snapshots"
SNAPSHOT_PARAMS = "snapshots/params.json"
PLOTLY_JS = "plotly.min.js"
STATE_JSON = "state.json"
REPORT = "report.html"
LEFT_OUT = "left_out.csv"  # rows read but not fitted (data.nan_policy: omit, data.range)
FIGURES = "figures"  # static figures for papers: fit.<format> and loss.<format> (fitcli.figures)
GROUPS = "groups.csv"  # a grouped run's rows, one per group (`fitcli.grouped_run`)
INTERVALS = "intervals.json"  # profile or bootstrap intervals (`fitcli ci`, uncertainty.method)
BANDS = "bands.csv"  # confidence and prediction bands of the final fit (`fitcli.bands`)
BANDS_DATA = "bands_data.csv"  # the same at the data points, for a fit with a sigma column
FIT_GRID = 1000  # points of the fitted curve in each snapshot (snapshots/epoch-N.csv)


MAX_COMPONENTS = 500  # an expression has at most fitcli.expr.MAX_NODES nodes, so fewer terms


def component_column(k: int) -> str:
    """The column of component k (0-based) in snapshots/epoch-N.csv: component_1, ..."""
    return f"component_{k + 1}"


DATA_CSV_ROWS = 1 << 14  # rows of data.csv formatted at a time
# Up to this many observations a run directory holds them as data.csv (text people open); above
# it, as data.npz (the same float64 columns, binary: written in a fraction of the time), or, for
# a data file, as a reference to that file (path, size and digest in summary.json) unless
# `fitcli train --copy-data` asks for a copy (`rundir.writer.data_form`).
DATA_CSV_MAX_ROWS = 100_000
DATA_COLUMNS = ("x", "y", "y_true", "sigma")  # what data.csv and data.npz may hold, in order

# What makes a directory a fitcli run directory: a summary.json that says so. Every summary
# fitcli writes (rundir.writer.base_summary) carries RUN_MARKER with the run directory's schema
# version; summaries written before the marker are recognised by fitcli's three version fields.
RUN_MARKER: Final = "fitcli_run"  # Final: a literal key of the typed Summary
RUN_SCHEMA = 1
LEGACY_FIELDS = ("fitcli_version", "torch_version", "python_version")
# Everything fitcli writes in a run directory; --overwrite deletes nothing else.
RUN_FILES = frozenset(
    {
        CONFIG,
        DATA,
        DATA_NPZ,
        METRICS,
        SUMMARY,
        STATE_JSON,
        PLOTLY_JS,
        REPORT,
        LEFT_OUT,
        GROUPS,
        INTERVALS,
        BANDS,
        BANDS_DATA,
    }
)
SNAPSHOT_FILE = re.compile(r"^(?:params\.json|epoch-[0-9]+\.(?:html|csv))$")
FIGURE_FILE = re.compile(r"^(?:fit|loss)\.(?:png|svg|pdf)$")
_TEMP_FILE = re.compile(r"^\.(.+)\.tmp-[0-9]+-[0-9a-f]{6}$")  # atomic_write's temporary names

MiB = 1 << 20
# The most bytes a run file of each kind can hold; bigger is not read (`read_run_file`). data.csv
# and metrics.csv hold what the config allows (10^8 points, 10^9 epochs): readers that know the
# run's row count pass a tighter bound (`csv_limit`).
FILE_LIMITS = {
    SUMMARY: 16 * MiB,
    INTERVALS: 16 * MiB,
    CONFIG: 1 * MiB,  # what `fitcli train` reads of a config (config.MAX_FILE_BYTES)
    SNAPSHOT_PARAMS: 64 * MiB,
    PLOTLY_JS: 64 * MiB,
    STATE_JSON: 4096 * MiB,
    DATA: 16384 * MiB,
    DATA_NPZ: 4096 * MiB,  # 10^8 rows of 4 float64 columns are 3.2 GB
    METRICS: 4096 * MiB,
    BANDS_DATA: 128 * MiB,  # bands.DATA_POINTS_LIMIT rows of up to 42 columns
}
SNAPSHOT_LIMIT = 4 * MiB  # snapshots/epoch-N.csv (FIT_GRID rows) and .html
OTHER_LIMIT = 64 * MiB


def slug(name: str) -> str:
    """A file-system-safe version of a run name (letters, digits, '.', '_' and '-')."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return (s or "run")[:60]


def command_comment(command: list[str]) -> str:
    """The `# command: ...` line of config.yaml and sweep.yaml: the command line on one line,
    every line break or control character in it escaped (`\\r`, NEL and U+2028 end a YAML line:
    written raw, the rest of the command would become YAML keys)."""
    from fitcli.text import printable

    return "# command: " + printable(" ".join(command)) + "\n"


def _raise_os(exc: OSError, path: Path, what: str) -> None:
    reason = exc.strerror or str(exc)
    raise RunDirError(f"cannot {what} {path}: {reason}") from None


def create_run_dir(out: Path, name: str, *, now: float | None = None) -> Path:
    """Make a new, unique `<name>-<YYYYmmdd-HHMMSS>-<4 hex>` directory under `out`, atomically.

    `os.mkdir` either creates the directory or fails, so parallel runs can never share one.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"cannot create run directories in {out}: it is a file") from None
    except OSError as exc:
        _raise_os(exc, out, "create")
    if not out.is_dir():
        raise RunDirError(f"cannot create run directories in {out}: it is not a directory")
    for _ in range(1000):
        path = out / f"{slug(name)}-{stamp}-{secrets.token_hex(2)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _raise_os(exc, path, "create")
        return path
    raise RunDirError(f"cannot find a free run directory name in {out}")  # pragma: no cover


def is_run_summary(doc: Any) -> bool:
    """Whether a parsed summary.json is fitcli's: it carries RUN_MARKER (a schema version), or,
    written before the marker existed, fitcli's three version fields and a run's status."""
    if not isinstance(doc, dict):
        return False
    if RUN_MARKER in doc:
        mark = doc[RUN_MARKER]
        return type(mark) is int and mark >= 1
    return all(isinstance(doc.get(k), str) for k in LEGACY_FIELDS) and all(
        k in doc for k in ("status", "epochs_run", "params")
    )


def read_summary(run_dir: Path) -> dict:
    """The summary.json of a fitcli run directory: the one test of "is this a run directory".

    RunFileError (exit 2) names what is wrong: no summary.json, one that cannot be read (not a
    regular file, too big, not JSON) or one that is not fitcli's.
    """
    path = Path(run_dir) / SUMMARY
    if not os.path.lexists(path):
        raise RunFileError(f"{path}: missing, so {run_dir} is not a fitcli run directory")
    doc = read_run_json(Path(run_dir), SUMMARY)
    if not is_run_summary(doc):
        raise RunFileError(
            f"{run_dir}: not a fitcli run directory ({SUMMARY} is not a fitcli run summary: no "
            f"{RUN_MARKER!r} marker)"
        )
    return doc


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a fitcli run directory (`read_summary` accepts it)."""
    try:
        read_summary(path)
    except RunFileError:
        return False
    return True


_SUBFOLDERS = {SNAPSHOTS: SNAPSHOT_FILE, FIGURES: FIGURE_FILE}  # what fitcli writes in each


def _fitcli_name(name: str, inside: str | None = None) -> bool:
    temp = _TEMP_FILE.match(name)
    if temp:
        name = temp.group(1)
    return bool(_SUBFOLDERS[inside].match(name)) if inside else name in RUN_FILES


def foreign_entries(path: Path) -> list[str]:
    """What in the folder `path` fitcli did not write, by relative name (a folder ends in "/"):
    anything but RUN_FILES, snapshots/ with its pages, curves and params.json, figures/ with
    fit.<format> and loss.<format>, and the temporary names of these; a link, FIFO or device of
    any name is foreign (fitcli writes regular files)."""
    out: list[str] = []

    def scan(folder: str, prefix: str, inside: str | None) -> None:
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_file(follow_symlinks=False) and _fitcli_name(e.name, inside):
                    continue
                if not inside and e.name in _SUBFOLDERS and e.is_dir(follow_symlinks=False):
                    scan(e.path, f"{e.name}/", e.name)
                    continue
                out.append(prefix + e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))

    scan(str(path), "", None)
    return out


def _refuse(head: str, entries: list[str]) -> NotRunDirError:
    shown = ", ".join(entries[:10]) + (
        f" and {len(entries) - 10} more" if len(entries) > 10 else ""
    )
    return NotRunDirError(
        f"{head}: --overwrite would have deleted {shown}. It replaces only a fitcli run "
        "directory holding nothing but what fitcli writes: move those away or choose another "
        "--run-dir"
    )


def replaceable(path: Path, *, own: bool = False) -> Path:
    """The folder that replacing `path` would delete (the one a link points to), once it is
    known to be safe: a fitcli run directory (`read_summary`) holding nothing fitcli did not
    write (`foreign_entries`), or an empty folder; never the working folder, one above it or
    the home folder. Anything else is a NotRunDirError (exit 2) listing what would be lost.

    `own`: the caller named the folder inside a directory of its own (a sweep's run directory),
    so one holding only what fitcli writes is replaced even when its summary is unreadable.
    """
    real = Path(os.path.realpath(path))
    if not real.exists():
        raise NotRunDirError(
            f"{path} is a link to {real}, which does not exist; refusing to replace it"
        )
    if not real.is_dir():
        raise NotRunDirError(
            f"{path} is a file, not a fitcli run directory; --overwrite never replaces it: "
            "choose another --run-dir"
        )
    try:
        here = Path.cwd().resolve()
    except OSError:  # the working folder was deleted: nothing can be it or hold it
        here = Path("/nonexistent-working-folder")
    if real == here or real in here.parents:
        raise NotRunDirError(
            f"{path} is the working folder or holds it; --overwrite never replaces it: choose "
            "another --run-dir"
        )
    if real == Path.home().resolve():
        raise NotRunDirError(f"{path} is the home folder; --overwrite never replaces it")
    try:
        foreign = foreign_entries(real)
        everything = sorted(e.name for e in os.scandir(real))
    except OSError as exc:
        _raise_os(exc, real, "read")
    try:
        read_summary(real)
    except RunFileError as exc:
        if not [n for n in everything if not _TEMP_FILE.match(n)]:
            return real  # empty (or a killed write's temporary files): nothing to lose
        if own and not foreign:
            return real
        why = str(exc).removeprefix(f"{real}: ").removeprefix("not a fitcli run directory ")
        if why.startswith("(") and why.endswith(")"):
            why = why[1:-1]
        if not os.path.lexists(real / SUMMARY):
            why = f"no {SUMMARY}"
        raise _refuse(f"{path} is not a fitcli run directory ({why})", everything) from None
    if foreign:
        raise _refuse(f"{path} holds what fitcli did not write", foreign)
    return real


def _trash(real: Path) -> Path:
    return real.with_name(f".{real.name}.old-{secrets.token_hex(4)}")


def claim_run_dir(path: Path, *, overwrite: bool, own: bool = False) -> Path:
    """Create exactly `path`; an existing one is replaced only with overwrite and only if it is a
    fitcli run directory (never a folder a user made for something else; `replaceable`)."""
    target = path
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise RunDirExistsError(
                f"run directory {path} already exists; pass --overwrite to replace it, or choose "
                "another --run-dir"
            )
        # Through a link, what it points to is replaced and the link kept.
        target = replaceable(path, own=own)
        # Move it aside first so a failure below never leaves a half-deleted directory.
        trash = _trash(target)
        try:
            target.rename(trash)
            shutil.rmtree(trash)
        except OSError as exc:
            _raise_os(exc, path, "replace")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir()
    except FileExistsError:
        raise RunDirError(f"run directory {path} was created by someone else meanwhile") from None
    except OSError as exc:
        _raise_os(exc, path, "create")
    return path


def install_run_dir(
    path: Path,
    files: dict[str, bytes | None],
    links: dict[str, Path] | None = None,
    *,
    own: bool = False,
) -> Path:
    """Write a whole run directory at once: `files` (relative POSIX path -> bytes; a path ending
    in "/" with None is a directory) and `links` (relative path -> a file hard-linked, else
    copied) go into a hidden folder beside `path`, which is then renamed to `path`. A reader, a
    crash or Ctrl-C sees the complete directory or none of it; an existing fitcli run directory
    at `path` is replaced, anything else is refused (`replaceable`, with `own`)."""
    existed = path.exists() or path.is_symlink()
    target = replaceable(path, own=own) if existed else path
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        tmp.mkdir()
        for rel, data in files.items():
            dest = tmp.joinpath(*rel.rstrip("/").split("/"))
            if data is None:
                dest.mkdir(exist_ok=True)
                continue
            with open(dest, "wb") as fh:
                fh.write(data)
        for rel, src in (links or {}).items():
            link_or_copy(src, tmp.joinpath(*rel.split("/")))
        if existed or path.exists():
            target = replaceable(path, own=own)  # again: it may have changed meanwhile
            trash = _trash(target)
            target.rename(trash)
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    except OSError as exc:
        _raise_os(exc, path, "write")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard link `src` at `dest` (same file system), else copy it."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def plotly_js_source() -> Path:
    """plotly.js as the installed plotly package ships it (found without importing plotly)."""
    import importlib.util

    spec = importlib.util.find_spec("plotly")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "package_data" / PLOTLY_JS


def check_output_file(path: Path, option: str) -> None:
    """A file the user named for output (`option` PATH) can be written: it is not a folder and
    its folder exists (an InputError, exit 2, otherwise)."""
    from fitcli.errors import InputError

    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give the HTML file to write")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: its folder {path.parent} does not exist")


@contextlib.contextmanager
def _replacing(path: Path, mode: str, **kw: Any) -> Iterator[Any]:
    """A file object on a temporary name beside `path`, renamed to `path` once it is written
    whole: readers see old or new, never half; a failure removes it (RunDirError)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, mode, **kw) as fh:
            yield fh
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _raise_os(exc, path, "write")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see old or new, never half."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with _replacing(path, "wb") as fh:
        fh.write(payload)


def _clean(value: Any) -> Any:
    """JSON cannot hold NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def dumps_json(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, dumps_json(obj))


def write_csv(path: Path, header: list[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def fmt(v: float) -> str:
    """Shortest repr that round-trips a float exactly (what CSV files hold)."""
    return repr(float(v))


def write_data_csv(
    path: Path,
    x,
    y,
    y_true=None,
    sigma=None,
    variables=("x",),
    group=None,
    group_labels=None,
) -> None:
    """data.csv: x,y (observed) plus y_true for synthetic data and sigma when given; with
    several variables (x n x k), their names' columns in place of x; with `group` (each row's
    label, or with `group_labels` each row's index into them), a last column `group`."""
    import numpy as np

    if getattr(x, "ndim", 1) == 2:
        cols = [*((name, x[:, j]) for j, name in enumerate(variables)), ("y", y)]
    else:
        cols = [("x", x), ("y", y)]
    if y_true is not None:
        cols.append(("y_true", y_true))
    if sigma is not None:
        cols.append(("sigma", sigma))
    header = ",".join(c for c, _ in cols) + "\n"
    arrays = [np.asarray(v, dtype=np.float64) for _, v in cols]
    # %.17g round-trips every float64 exactly. Streamed in blocks of DATA_CSV_ROWS rows, each
    # formatted by one `%` over the block, so memory stays flat however many rows (10^8 rows
    # are about 6 GB of text) and the file is written faster than by np.savetxt. A column
    # with few distinct values (a shared x grid) is formatted once per value (`_FewValues`).
    # Many rows, where numba imports: blocks of COMPILED_ROWS by `csvrows.rows` (the same
    # bytes, 3x faster), any block it declines by `%`.
    n_rows = arrays[0].shape[0]
    compiled = _compiled_rows() if n_rows >= COMPILED_ROWS else None
    few = [_FewValues.of(a) for a in arrays]
    labels = codes = None
    if group is not None:
        header = header[:-1] + ",group\n"
        if group_labels is None:
            group_labels, codes = group, np.arange(len(group))
        else:
            codes = np.asarray(group)
        # One cell per distinct label, then each row's by its index: no Python call per row.
        labels = np.asarray([_csv_cell(str(v)) for v in group_labels], dtype=object)
    width = len(arrays) + (labels is not None)

    def block_text(sl: slice) -> bytes:
        n = arrays[0][sl].shape[0]
        cells: list = [None] * (n * width)
        fmts = []
        for j, a in enumerate(arrays):
            f = few[j]
            made = None if f is None else f.block(sl)
            if made is None:
                cells[j::width] = a[sl].tolist()
                fmts.append("%.17g")
            else:
                cells[j::width] = np.asarray(made[0], dtype=object)[made[1]].tolist()
                fmts.append("%s")
        if labels is not None and codes is not None:
            cells[width - 1 :: width] = labels[codes[sl]].tolist()
            fmts.append("%s")
        return (((",".join(fmts) + "\n") * n) % tuple(cells)).encode("utf-8")

    with _replacing(path, "wb") as fh:
        fh.write(header.encode("utf-8"))
        if compiled is not None:
            from fitcli.rundir.csvrows import labels_table

            table = None if labels is None else labels_table([c.encode() for c in labels])
            for start in range(0, n_rows, COMPILED_ROWS):
                sl = slice(start, start + COMPILED_ROWS)
                known = [None if f is None else f.block(sl, encoded=True) for f in few]
                chunk = compiled(
                    [a[sl] for a in arrays], None if codes is None else codes[sl], table, known
                )
                if chunk is None:  # a value the kernel does not take: this block by `%`
                    stop = min(sl.stop, n_rows)
                    chunk = b"".join(
                        block_text(slice(b, min(b + DATA_CSV_ROWS, stop)))
                        for b in range(start, stop, DATA_CSV_ROWS)
                    )
                fh.write(chunk)
            return
        for start in range(0, n_rows, DATA_CSV_ROWS):
            fh.write(block_text(slice(start, start + DATA_CSV_ROWS)))


COMPILED_ROWS = 1 << 18  # data.csv rows from which (and per block) the compiled writer runs


def _compiled_rows():
    """`csvrows.rows` where numba imports, else None."""
    from fitcli.rundir import csvrows

    return csvrows.rows if csvrows.njit is not None else None


class _FewValues:
    """A data.csv column with few distinct values (told by their bits: -0.0 is not 0.0), such
    as a grid shared by the groups: each value's %.17g text made once, and block by block each
    row's index into a block's values (memory: one block's). Formatting a value is most of
    data.csv's cost."""

    def __init__(self, a: Any) -> None:
        import numpy as np

        self.bits = np.ascontiguousarray(a).view(np.int64)
        self.texts: dict[int, str] = {}

    @classmethod
    def of(cls, a: Any) -> _FewValues | None:
        """The column's, where its first DATA_CSV_ROWS rows hold at most one value in 8."""
        if a.shape[0] < 4 * DATA_CSV_ROWS:
            return None
        import pandas as pd

        few = cls(a)
        return few if pd.unique(few.bits[:DATA_CSV_ROWS]).size <= DATA_CSV_ROWS // 8 else None

    def block(self, sl: slice, encoded: bool = False) -> tuple[list, Any] | None:
        """(the texts of the block's distinct values, as bytes if `encoded`, each row's index
        into them), or None where this block holds more than one value in 8."""
        import numpy as np
        import pandas as pd

        codes, uniq = pd.factorize(self.bits[sl])
        if uniq.size > max(codes.size // 8, 1):
            return None
        new = [b for b in uniq.tolist() if b not in self.texts]
        if new:
            values = np.asarray(new, dtype=np.int64).view(np.float64).tolist()
            made = (("%.17g\n" * len(values)) % tuple(values)).split("\n")[:-1]
            self.texts.update(zip(new, made, strict=True))
        texts = [self.texts[b] for b in uniq.tolist()]
        return ([t.encode() for t in texts] if encoded else texts), codes


def _csv_cell(text: str) -> str:
    """A text cell of a CSV file, quoted where it holds a comma, a quote or a line break."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def write_left_out_csv(path: Path, left_out: Any, variables: tuple[str, ...]) -> None:
    """left_out.csv: the rows read but not fitted, their variables' columns (x for one), y
    (nan where the cell was empty or NaN) and `reason`: nan or range; for grouped data then
    `group`, each row's group cell as read."""
    x = left_out.x
    columns = list(variables) if x.ndim == 2 else ["x"]
    grouped = getattr(left_out, "group", None) is not None
    lines = [",".join([*columns, "y", "reason", *(["group"] if grouped else [])])]
    xs = x.tolist() if x.ndim == 2 else [[v] for v in x.tolist()]
    groups = [[_csv_cell(str(g))] for g in left_out.group] if grouped else [[]] * len(xs)
    for row, y, why, g in zip(
        xs, left_out.y.tolist(), left_out.reason.tolist(), groups, strict=True
    ):
        lines.append(",".join([*map(repr, row), repr(y), str(why), *g]))
    atomic_write(path, "\n".join(lines) + "\n")


def data_columns(x, y, y_true=None, sigma=None, variables=("x",)) -> dict:
    """The observation columns a run directory stores, by name, in `DATA_COLUMNS` order; with
    several variables (x n x k), their names' columns in place of x."""
    if getattr(x, "ndim", 1) == 2:
        cols = {name: x[:, j] for j, name in enumerate(variables)}
        cols.update({"y": y, "y_true": y_true, "sigma": sigma})
    else:
        cols = {"x": x, "y": y, "y_true": y_true, "sigma": sigma}
    return {k: v for k, v in cols.items() if v is not None}


def write_data_npz(path: Path, x, y, y_true=None, sigma=None, variables=("x",)) -> None:
    """data.npz: the columns of data.csv as float64 arrays in an uncompressed `np.savez` archive
    (read back with `allow_pickle=False`), written atomically."""
    import numpy as np

    cols = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in data_columns(x, y, y_true, sigma, variables).items()
    }
    with _replacing(path, "wb") as fh:
        np.savez(fh, **cols)  # type: ignore[arg-type]  # numpy's stub types allow_pickle only


def copy_plotly_js(run_dir: Path) -> None:
    """plotly.min.js, once per run directory; snapshots and the report load it from here."""
    src = plotly_js_source()
    dest = run_dir / PLOTLY_JS
    if dest.exists():
        return
    try:
        atomic_write(dest, src.read_bytes())
    except OSError as exc:  # pragma: no cover - the package file is always there
        _raise_os(exc, src, "read")


# --------------------------------------------------------------------------------------------
# Reading run files: the one checked way to open a file of a run directory
# --------------------------------------------------------------------------------------------


def file_limit(rel: str) -> int:
    """The most bytes the run file `rel` (relative POSIX path) is read up to."""
    if rel in FILE_LIMITS:
        return FILE_LIMITS[rel]
    if rel.startswith(f"{SNAPSHOTS}/"):
        if rel.endswith(".csv"):  # x, y_fit and a column per component (at most one per node)
            return max(SNAPSHOT_LIMIT, csv_limit(FIT_GRID, 2 + MAX_COMPONENTS))
        return SNAPSHOT_LIMIT
    return OTHER_LIMIT


def csv_limit(rows: int, cols: int) -> int:
    """The most bytes a CSV that fitcli wrote with `rows` rows of `cols` floats can hold (a repr
    of a float64 is at most 24 characters), header included."""
    return 4096 + 256 * cols + (rows + 1) * cols * 26


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise RunFileError(f"{path}: is a directory, expected a file")
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a plain file")
    raise RunFileError(f"{path}: not a regular file ({kind}); refusing to read it")


def read_run_file(run_dir: Path, rel: str, *, limit: int | None = None) -> bytes:
    """The bytes of the file `rel` of a run directory, read only when it is a regular file
    inside the run directory (a link is followed only to a file inside it) of at most
    `file_limit(rel)` bytes, or `limit` when that is tighter. A FIFO, device or socket is never
    read (its type is checked before opening, it is opened without blocking and the type checked
    again on what was opened), so nothing a shared run directory holds can block a reader or
    feed it without end.
    RunFileError (exit 2) names the file and the reason.
    """
    path = Path(run_dir) / rel
    limit = file_limit(rel) if limit is None else min(limit, file_limit(rel))
    root = os.path.realpath(run_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise RunFileError(
            f"{path}: a link to {real}, outside the run directory; refusing to read it"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        _check_regular(path, os.stat(real))
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing from the run directory") from None
    except OSError as exc:
        raise RunFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        _check_regular(path, st)  # what was opened, should it have been swapped meanwhile
        too_big = RunFileError(
            f"{path}: larger than the {limit} bytes its kind of file can hold in a fitcli run "
            f"directory ({st.st_size} bytes); refusing to read it"
        )
        if st.st_size > limit:
            raise too_big
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise RunFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:  # it grew meanwhile
        raise too_big
    return data


def read_run_text(run_dir: Path, rel: str, *, limit: int | None = None) -> str:
    """A run file as UTF-8 text (`read_run_file`); RunFileError when it is not UTF-8."""
    raw = read_run_file(run_dir, rel, limit=limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunFileError(
            f"{Path(run_dir) / rel}: garbled (not UTF-8 text at byte {exc.start}); it cannot be "
            "read"
        ) from None


def read_run_json(run_dir: Path, rel: str, *, limit: int | None = None) -> Any:
    """A run file parsed as JSON (`read_run_file`); RunFileError when it is empty or not JSON."""
    text = read_run_text(run_dir, rel, limit=limit)
    path = Path(run_dir) / rel
    if not text.strip():
        raise RunFileError(f"{path}: empty (truncated?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(
            f"{path}: not valid JSON (truncated or garbled?): {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from None
    except RecursionError:
        raise RunFileError(f"{path}: not valid JSON (nested too deeply)") from None


def read_json(path: Path) -> Any:
    """A JSON file of a run directory, `path.parent` (`read_run_json`)."""
    path = Path(path)
    return read_run_json(path.parent, path.name)
