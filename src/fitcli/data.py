"""Observations: synthetic data from a target expression plus noise, or a measured data file."""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import math
import mmap
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fitcli.errors import DataError

if TYPE_CHECKING:
    from fitcli.config import ColumnsSpec, Config
    from fitcli.expr import Expression

MAX_FILE_BYTES = 4 * 1024**3
EVAL_CHUNK = 1 << 20  # points per chunk when evaluating a target expression
READ_BLOCK = 16 * 1024**2  # bytes of a data file parsed at a time by the fast reader


@dataclass
class LeftOut:
    """Rows read but not fitted: their x (n x k for several variables), y (NaN where the cell
    was), and why, per row: "nan" (`data.nan_policy: omit`) or "range" (`data.range`); for
    grouped data, each row's group label (the cell as read: it may be empty or a group none
    of whose rows was kept)."""

    x: np.ndarray
    y: np.ndarray
    reason: np.ndarray
    group: np.ndarray | None = None


@dataclass
class Dataset:
    """Observed points (float64 numpy arrays); `y_true` only for synthetic data.

    `x` is one array of n values, or n x k for k independent variables named `variables`.
    `rows` counts what was read and left out (`{read, used, omitted_nan, outside_range}`),
    only when `data.nan_policy: omit` or `data.range` may leave rows out; `omitted_lines` are
    the file's line numbers (1-based) of the rows omitted for NaN or empty cells.
    """

    x: np.ndarray
    y: np.ndarray
    y_true: np.ndarray | None = None
    sigma: np.ndarray | None = None
    source: str = "synthetic"
    digest: str | None = None  # of a data file's bytes: resume refuses a file edited since
    size: int | None = None  # of a data file, in bytes
    names: dict[str, str] | None = None  # a data file's header names of x, y (and sigma)
    variables: tuple[str, ...] = ("x",)
    rows: dict[str, int] | None = None
    omitted_lines: list[int] | None = None
    left_out: LeftOut | None = None
    # Grouped data (`data.columns.group`, `data.files`): each row's group as an index into
    # `group_labels` (the groups in order of first appearance).
    group: np.ndarray | None = None
    group_labels: tuple[str, ...] | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def point_text(x: np.ndarray, k: int, names: tuple[str, ...] = ("x",)) -> str:
    """Row k of x as text for messages: ``x = 1.5``, or ``T = 300, P = 2`` for several."""
    if x.ndim == 1:
        return f"x = {float(x[k]):g}"
    if len(names) != x.shape[1]:
        names = tuple(f"x{j}" for j in range(x.shape[1]))
    return ", ".join(f"{n} = {float(v):g}" for n, v in zip(names, x[k], strict=True))


def seed_streams(seed: int) -> dict[str, int]:
    """Independent 63-bit seeds for each random consumer, all derived from the config's seed."""
    return dict(_seed_streams(seed))


@functools.lru_cache(maxsize=64)  # a pure function; a SeedSequence spawn costs a small fit 3%
def _seed_streams(seed: int) -> dict[str, int]:
    # Appending a name keeps the others' seeds: child k of a SeedSequence depends only on k.
    names = ("noise", "init", "shuffle", "starts", "bootstrap", "mcmc")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {
        name: int(child.generate_state(1, np.uint64)[0] >> np.uint64(1))
        for name, child in zip(names, children, strict=True)
    }


def first_bad_x(values: np.ndarray, x: np.ndarray) -> float | None:
    """The first x where `values` is NaN or infinite, or None when all are finite."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    return float(x[int(np.argmax(bad))])


def evaluate_on(expression: Expression, x: np.ndarray, key: str) -> np.ndarray:
    """Evaluate a parameter-free expression on x in float64; a non-finite value is a DataError.

    Evaluated in chunks of EVAL_CHUNK points into one output array, so the expression's
    temporaries stay small however long x is (10^8 points need 800 MB for the result alone).
    """
    import torch

    values = np.empty(x.shape[:1], dtype=np.float64)
    with torch.no_grad():
        for start in range(0, max(x.shape[0], 1), EVAL_CHUNK):
            sl = slice(start, start + EVAL_CHUNK)
            values[sl] = expression(torch.from_numpy(x[sl])).numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        at = point_text(x, int(np.argmax(bad)), expression.variables)
        raise DataError(
            f"{key}: {expression.source!r} is not finite at {at}; "
            "change the expression or the x range"
        )
    return values


def make_dataset(cfg: Config) -> Dataset:
    """Build the observations a config describes (deterministic given cfg.seed)."""
    data = cfg.data
    if data.files is not None:
        from fitcli.groups_data import load_files

        ds = load_files(data.files, data.columns, omit_nan=data.nan_policy == "omit")
        return restrict(ds, data.range) if data.range is not None else ds
    if data.file is not None:
        omit = data.nan_policy == "omit"
        if data.columns is not None and data.columns.group is not None:
            from fitcli.groups_data import load_grouped_table

            ds = load_grouped_table(
                Path(data.file), data.columns, data.columns.group, omit_nan=omit
            )
        else:
            ds = load_table(Path(data.file), data.columns, omit_nan=omit)
        return restrict(ds, data.range) if data.range is not None else ds
    from fitcli.expr import parse_expression

    grid, noise = data.x, data.noise
    # The schema gives synthetic data (no file) a target, an x grid and its noise (default 0).
    assert data.target is not None and grid is not None and noise is not None
    variables = data.variables
    target = parse_expression(data.target, allow_params=False, what="target", variables=variables)
    if isinstance(grid, dict):
        # Several variables: the full grid, the first variable varying slowest.
        size = math.prod(g.num for g in grid.values())
        if size > 10**8:
            raise DataError(
                f"data.x: the full grid has {size:,} points, more than 10^8; use fewer per variable"
            )
        axes = [np.linspace(g.start, g.stop, g.num, dtype=np.float64) for g in grid.values()]
        mesh = np.meshgrid(*axes, indexing="ij")
        x = np.stack([m.ravel() for m in mesh], axis=1)
    else:
        x = np.linspace(grid.start, grid.stop, grid.num, dtype=np.float64)
    y_true = evaluate_on(target, x, "data.target")
    y = y_true
    if noise.std > 0:
        rng = np.random.default_rng(seed_streams(cfg.seed)["noise"])
        # The noise array becomes y (added to in place): x, y_true and y are the only n-arrays.
        y = rng.normal(0.0, noise.std, size=len(x))
        y += y_true
    ds = Dataset(x=x, y=y, y_true=y_true, source="synthetic", variables=variables)
    return restrict(ds, data.range) if data.range is not None else ds


def restrict(ds: Dataset, ranges: dict[str, list[float]]) -> Dataset:
    """Only the rows whose every variable named in `ranges` lies in its [low, high]
    (inclusive); the others are counted in `rows` and kept in `left_out` for the plots."""
    keep = np.ones(ds.n, dtype=bool)
    for name, (lo, hi) in ranges.items():
        column = ds.x if ds.x.ndim == 1 else ds.x[:, ds.variables.index(name)]
        keep &= (column >= lo) & (column <= hi)
    outside = int(ds.n - np.count_nonzero(keep))
    if int(np.count_nonzero(keep)) < 2:
        raise DataError(
            f"data.range: {int(np.count_nonzero(keep))} of the {ds.n} rows lie inside "
            f"{ranges}; need at least 2: widen the range"
        )
    rows = dict(ds.rows or {"read": ds.n, "used": ds.n, "omitted_nan": 0, "outside_range": 0})
    rows["used"], rows["outside_range"] = ds.n - outside, outside
    group = None
    if ds.group is not None and ds.group_labels is not None:
        group = np.asarray(ds.group_labels, dtype=object)[ds.group[~keep]]
    left = LeftOut(ds.x[~keep], ds.y[~keep], np.full(outside, "range"), group)
    if ds.left_out is not None:
        left = concat_left_out([ds.left_out, left])
    return dataclasses.replace(  # the file's digest, size and column names kept
        ds,
        x=np.ascontiguousarray(ds.x[keep]),
        y=ds.y[keep],
        y_true=None if ds.y_true is None else ds.y_true[keep],
        sigma=None if ds.sigma is None else ds.sigma[keep],
        rows=rows,
        omitted_lines=ds.omitted_lines if ds.omitted_lines is not None else [],
        left_out=left,
        group=None if ds.group is None else ds.group[keep],
    )


def concat_left_out(parts: list[LeftOut]) -> LeftOut:
    """Several `LeftOut` one after the other (their groups kept where every part has them)."""
    groups = [p.group for p in parts]
    return LeftOut(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.reason for p in parts]),
        None if any(g is None for g in groups) else np.concatenate(groups),  # type: ignore[arg-type]
    )


ARRAYS = "arrays"  # Dataset.source of data given as arrays (the Python API), not read from a file


def as_column(values: Any, role: str) -> np.ndarray:
    """One data column given in memory (numpy, torch, pandas, a list) as a contiguous float64
    array, checked as a data file's cells are: real numbers, every one finite; a fault is a
    DataError naming the argument and the 0-based index."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor
        values = values.detach().cpu().numpy()
    elif hasattr(values, "to_numpy"):  # a pandas Series (or one-column frame)
        values = values.to_numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{role}: cannot be read as numbers: {exc}") from None
    if arr.ndim != 1:
        raise DataError(f"{role}: must be one-dimensional (got shape {arr.shape})")
    if arr.dtype.kind not in "iuf":
        if arr.dtype.kind == "c":
            raise DataError(f"{role}: holds complex numbers; give the real values")
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            bad = next((v for v in arr.tolist() if not _is_real(v)), arr[0] if arr.size else None)
            raise DataError(f"{role}: {bad!r} is not a number") from None
    # A copy of its own: the caller's array may change later, or be read-only (pandas).
    arr = np.array(arr, dtype=np.float64, order="C", copy=True)
    bad_at = np.flatnonzero(~np.isfinite(arr))
    if bad_at.size:
        k = int(bad_at[0])
        raise DataError(
            f"{role}[{k}] is {float(arr[k])!r}, not a finite number; remove or fix that row"
        )
    return arr


def _is_real(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool | complex)


def dataset_from_arrays(x: Any, y: Any, sigma: Any = None) -> Dataset:
    """Observations given in memory: the checks of a data file (finite numbers, at least 2
    points, sigma > 0) with messages naming the argument (`x`, `y`, `sigma`) and the index."""
    xs, ys = as_column(x, "x"), as_column(y, "y")
    sig = None if sigma is None else as_column(sigma, "sigma")
    for role, arr in (("y", ys), ("sigma", sig)):
        if arr is not None and arr.shape[0] != xs.shape[0]:
            raise DataError(f"{role} has {arr.shape[0]} values but x has {xs.shape[0]}")
    if xs.shape[0] < 2:
        raise DataError(f"x has {xs.shape[0]} values; need at least 2 points")
    if sig is not None:
        nonpos = np.flatnonzero(sig <= 0)
        if nonpos.size:
            k = int(nonpos[0])
            raise DataError(f"sigma[{k}] is {sig[k]:g}; sigma must be > 0")
    return Dataset(x=xs, y=ys, sigma=sig, source=ARRAYS)


def load_x_column(path: Path, column: str | int | None) -> np.ndarray:
    """The x column of a table of new points (CSV or whitespace, header row optional): the
    config's `data.columns.x` (a name or 0-based index), else a column named x, else the first.
    Every cell must be a finite number; a fault names the line."""
    wanted: list[str | int] = ["x", 0] if column is None else [column]
    return load_x_columns(path, [("x", wanted)])[:, 0]


def load_x_columns(path: Path, wanted: Sequence[tuple[str, Sequence[str | int]]]) -> np.ndarray:
    """New points from a table (CSV or whitespace, header row optional), n x k: for each of the
    k variables (name, candidates), the first candidate column found (a header name, or a
    0-based index). Every cell must be a finite number; a fault names the line."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise DataError(f"--x-file: {path} {what}")
    _check_text(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--x-file: cannot read {path}: {exc}") from None
    body = [(k + 1, ln) for k, ln in enumerate(lines) if not _is_skipped(ln)]
    if not body:
        raise DataError(f"--x-file: {path} holds no data")
    head_line = body[0][1]
    delimiter = "," if "," in head_line else ("\t" if "\t" in head_line else None)
    cells = _split(head_line, delimiter)
    header = None if all(_is_number(c) for c in cells) else cells
    if header is not None:
        body = body[1:]
    indices = []
    for name, candidates in wanted:
        names = header or []
        found = [
            c if isinstance(c, int) else names.index(c)
            for c in candidates
            if c in names or isinstance(c, int)
        ]
        if not found:
            have = ", ".join(map(repr, header)) if header else "no header row"
            which = " or ".join(repr(c) for c in candidates)
            whose = f" for the variable {name}" if len(wanted) > 1 else ""
            raise DataError(f"--x-file: no column {which}{whose} in {path} ({have})")
        indices.append(found[0])
    out = np.empty((len(body), len(indices)), dtype=np.float64)
    for row, (lineno, line) in enumerate(body):
        row_cells = _split(line, delimiter)
        for j, index in enumerate(indices):
            if index >= len(row_cells):
                raise DataError(f"--x-file: {path} line {lineno}: no column {index + 1}")
            cell = row_cells[index]
            try:
                value = float(cell)
            except ValueError:
                raise DataError(
                    f"--x-file: {path} line {lineno}: {cell!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise DataError(f"--x-file: {path} line {lineno}: {cell!r} is not a finite number")
            out[row, j] = value
    if not out.shape[0]:
        raise DataError(f"--x-file: {path} holds no data rows")
    return out


def check_dtype_range(ds: Dataset, dtype: str) -> None:
    """In float32, every value the fit uses (x, y, and the weights 1/sigma) must be a finite
    float32; a value beyond its range is a DataError naming the row, not a diverged fit."""
    if dtype != "float32":
        return
    limit = float(np.finfo(np.float32).max)
    # (role, what the fit uses, what the file holds)
    columns = [("x", ds.x, ds.x), ("y", ds.y, ds.y)]
    if ds.sigma is not None:
        # The weights are 1/sigma: a sigma below 1/limit makes an infinite weight.
        columns.append(("sigma", np.where(ds.sigma < 1.0 / limit, np.inf, ds.sigma), ds.sigma))
    for role, values, given in columns:
        over = np.flatnonzero(np.abs(values) > limit)
        if not over.size:
            continue
        row = int(over[0])
        shown = given[row]
        if ds.source == ARRAYS:
            where = f"{role}[{row}]"
        elif ds.source != "synthetic":
            where = f"data.file: {ds.source} data row {row + 1}"
        else:
            where = f"data.target: at x = {ds.x[row]:g}"
        bound = "its weight 1/sigma is" if role == "sigma" else "is"
        raise DataError(
            f"{where}: {role} = {shown:g} {bound} beyond float32's range (about 3.4e38); "
            "use dtype: float64 or rescale the data"
        )


# ---------------------------------------------------------------------------------------------
# Data files: CSV with a header row, or a whitespace table (with or without a header row).

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _split(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return line.split()
    return [cell.strip() for cell in line.split(delimiter)]


def _is_number(cell: str) -> bool:
    return bool(_NUMBER.match(cell))


def _column_index(
    spec: str | int | None,
    header: list[str] | None,
    default: int,
    role: str,
    path: Path,
    ncols: int,
) -> int:
    if spec is None:
        if header is not None and role in header:
            return header.index(role)
        return default
    if isinstance(spec, int):
        if not 0 <= spec < ncols:
            raise DataError(
                f"data.columns.{role}: column index {spec} is out of range; {path} has {ncols} "
                f"columns (0 to {ncols - 1})"
            )
        return spec
    if header is None:
        raise DataError(
            f"data.columns.{role}: {path} has no header row, so columns must be given by "
            f"0-based index, not by name {spec!r}"
        )
    if spec not in header:
        raise DataError(
            f"data.columns.{role}: no column {spec!r} in {path}; its columns are "
            + ", ".join(repr(h) for h in header)
        )
    return header.index(spec)


def load_table(
    path: Path, columns: ColumnsSpec | None = None, *, omit_nan: bool = False
) -> Dataset:
    """Read x, y (and sigma) from a CSV or whitespace table; every cell must be a finite number,
    except that with `omit_nan` a row with a NaN or empty cell in a used column is left out
    (counted in `Dataset.rows`, its line in `omitted_lines`).

    Two readers, one result. The fast one (`_read_fast`) maps the file and hands blocks of
    rows to pandas' C parser, converting the columns straight into the output arrays: no
    Python object per cell or line (but for the few rows with a NaN or blank line, read again),
    and nothing held beyond the output but one block. Whenever it meets anything unusual
    (comments, a ragged row, a bad or infinite cell, NaN without `omit_nan`, other line breaks)
    it gives up, and the precise reader (`_read_precise`) reads the file line by line and names
    the line and column at fault.
    """
    return load_table_text(path, columns, None, omit_nan=omit_nan)[0]


def load_table_text(
    path: Path, columns: ColumnsSpec | None, text: str | int | None, *, omit_nan: bool = False
) -> tuple[Dataset, TextColumn | None]:
    """`load_table`, and with `text` (a column name or 0-based index) that column's cells as
    labels, read in the same pass, where the fast reader can read them exactly as a
    line-by-line split would (else None: the caller reads them itself)."""
    if not path.exists():
        raise DataError(f"data.file: {path} does not exist")
    if not path.is_file():
        raise DataError(f"data.file: {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"data.file: {path} is larger than {MAX_FILE_BYTES // 1024**3} GiB")
    _check_text(path)
    fast = _read_fast(path, columns, omit_nan, text) if size else None
    if fast is None and text is not None and size:
        fast = _read_fast(path, columns, omit_nan)  # the numbers alone, as without `text`
    if fast is None:
        ds = _read_precise(path, columns, omit_nan)
    else:
        ds = _dataset(path, fast.table, columns)
        if omit_nan:
            _note_omitted(ds, fast.omitted, len(fast.table), labelled=fast.text is not None)
    ds.digest, ds.size = file_digest(path), size
    ds.names = column_names(path, columns)
    return ds, None if fast is None else fast.text


def column_names(path: Path, columns: ColumnsSpec | None = None) -> dict[str, str] | None:
    """The header names of the x, y (and sigma) columns of a data file already read, by role;
    None when the file has no header row. The plots' axis titles come from them."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        for lineno, line in enumerate(fh, 1):
            if not _is_skipped(line):
                header, _, _, wanted = _layout(line.rstrip("\r\n"), lineno, path, columns)
                if header is None:
                    return None
                # Several variables are named by their own keys: y (and sigma) follow them.
                nx = len(_x_specs(columns) or [None])
                roles = ("x", "y", "sigma")
                picked = [wanted[0], *wanted[nx:]] if nx > 1 else wanted
                names = {role: header[i] for role, i in zip(roles, picked, strict=False)}
                if nx > 1:
                    del names["x"]
                return names
    return None


def _x_specs(columns: ColumnsSpec | None) -> list[str | int] | None:
    """The columns of several variables (`data.columns.x` as a list or mapping), else None."""
    spec = columns.x if columns is not None else None
    if isinstance(spec, dict):
        return list(spec.values())
    return list(spec) if isinstance(spec, list) else None


def _variables(columns: ColumnsSpec | None) -> tuple[str, ...]:
    from fitcli.config.schema import variable_names

    return variable_names(columns.x if columns is not None else None, None)


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file's bytes (hardware-accelerated: faster than blake2b)."""
    import hashlib

    try:
        with open(path, "rb") as fh:
            return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise DataError(f"data.file: cannot read {path}: {exc.strerror}") from None


SNIFF_BYTES = 65536  # a data file whose first 64 KiB are not text is refused before reading on

_UTF16_32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff", b"\xff\xfe", b"\xfe\xff")


def _check_text(path: Path) -> None:
    """Refuse a binary (or UTF-16/32) data file from its first bytes, not after reading it all."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"data.file: cannot read {path}: {exc.strerror}") from None
    if head.startswith(_UTF16_32_BOMS):
        raise DataError(
            f"data.file: {path} is UTF-16 or UTF-32 text; save it as UTF-8 (or ASCII) CSV"
        )
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"data.file: {path} is a binary file (a NUL at byte {nul}), not a CSV or "
            "whitespace table"
        )


def _dataset(path: Path, table: list[np.ndarray], columns: ColumnsSpec | None = None) -> Dataset:
    variables = _variables(columns)
    k = len(variables)
    x = table[0] if k == 1 else np.ascontiguousarray(np.column_stack(table[:k]))
    y = table[k]
    if x.shape[0] < 2:
        raise DataError(f"data.file: {path} has {x.shape[0]} data rows; need at least 2")
    sigma = table[k + 1] if len(table) > k + 1 else None
    if sigma is not None:
        nonpos = np.flatnonzero(sigma <= 0)
        if nonpos.size:
            row = int(nonpos[0])
            raise DataError(
                f"data.file: {path}: sigma must be > 0, got {sigma[row]:g} in data row {row + 1}"
            )
    return Dataset(x=x, y=y, sigma=sigma, source=str(path), variables=variables)


def _is_skipped(line: str) -> bool:
    return not line.strip() or line.lstrip().startswith("#")


def _layout(
    head_line: str, lineno: int, path: Path, columns: ColumnsSpec | None
) -> tuple[list[str] | None, str | None, int, list[int]]:
    """(header or None, delimiter, number of columns, wanted column indexes) from the first
    non-blank, non-comment line (1-based `lineno`); column problems are DataErrors."""
    delimiter = "," if "," in head_line else ("\t" if "\t" in head_line else None)
    cells = _split(head_line, delimiter)
    header: list[str] | None = None
    if not all(_is_number(c) for c in cells):
        header = cells
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise DataError(f"data.file: {path} line {lineno}: column {dup!r} appears twice")
    ncols = len(cells)
    if ncols < 2:
        raise DataError(
            f"data.file: {path} line {lineno}: found 1 column; need at least x and y "
            "(comma-, tab- or space-separated)"
        )
    get = (lambda name: getattr(columns, name, None)) if columns is not None else (lambda _: None)
    specs = _x_specs(columns)
    if specs is not None:
        # Several variables: y defaults to a column named y, else the first one not an x.
        ixs = [_column_index(s, header, 0, "x", path, ncols) for s in specs]
        if len(set(ixs)) != len(ixs):
            raise DataError("data.columns.x: two variables name the same column")
        unused = next((j for j in range(ncols) if j not in ixs), ncols)
        iy = _column_index(get("y"), header, unused, "y", path, ncols)
        if iy in ixs or iy >= ncols:
            raise DataError(
                "data.columns: y is one of the x columns (or there is no column left for it); "
                "give data.columns.y"
            )
        sigma_spec = get("sigma")
        isig = (
            None
            if sigma_spec is None
            else _column_index(sigma_spec, header, 2, "sigma", path, ncols)
        )
        return header, delimiter, ncols, [*ixs, iy] + ([isig] if isig is not None else [])
    ix = _column_index(get("x"), header, 0, "x", path, ncols)
    iy = _column_index(get("y"), header, 1, "y", path, ncols)
    sigma_spec = get("sigma")
    isig = (
        None if sigma_spec is None else _column_index(sigma_spec, header, 2, "sigma", path, ncols)
    )
    if ix == iy:
        raise DataError("data.columns: x and y name the same column")
    wanted = [ix, iy] + ([isig] if isig is not None else [])
    return header, delimiter, ncols, wanted


@dataclass
class TextColumn:
    """A text column read along with the table (the group labels): each kept row's code, an
    index into `texts` (the distinct cells, stripped, in order of first appearance), and the
    1-based line of the first kept row whose cell is empty (None when none is)."""

    codes: np.ndarray
    texts: list[str]
    empty_line: int | None


@dataclass
class _FastTable:
    """What `_read_fast` read: the wanted columns of the kept rows, the rows left out for NaN
    or empty cells (`omit_nan`: 1-based line, wanted values), and the text column if asked."""

    table: list[np.ndarray]
    omitted: list[tuple[int, list[float], str]]  # with the text column's cell ("" without)
    text: TextColumn | None


def _text_index(spec: str | int, header: list[str] | None, ncols: int) -> int | None:
    """The 0-based index of the text column `spec` (a name or an index), or None where the
    file does not have it (the caller's own reader then says why)."""
    if isinstance(spec, int):
        return spec if 0 <= spec < ncols else None
    if header is None or spec not in header:
        return None
    return header.index(spec)


def _read_fast(
    path: Path,
    columns: ColumnsSpec | None,
    omit_nan: bool = False,
    text: str | int | None = None,
) -> _FastTable | None:
    """The wanted columns as contiguous float64 arrays (and, with `text`, that column's cells
    as labels), or None to leave it to `_read_precise`.

    The body's newlines are counted once for its number of rows, then blocks of whole lines
    (READ_BLOCK bytes) are parsed by `_parse_block` into preallocated arrays, one row per line.
    A row with a non-finite value (or an empty text cell) is looked at again as text by
    `_check_row`, with the precise reader's rules: a blank line is skipped, a row with a NaN or
    empty cell is left out under `omit_nan`. Anything else that is not a plain table gives up
    here: a comment or text cell does not parse, a ragged row changes the width or fails to
    parse, a NaN not left out or an infinite cell is refused by `_check_row`, and a block whose
    rows do not match its newlines (other line breaks) is caught at once.
    """
    with open(path, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
    with mm:
        # The head: skipped lines, then the first row (header or data), decoded line by line.
        pos, lineno, start = 0, 0, 3 if mm[:3] == b"\xef\xbb\xbf" else 0
        pos = start
        while True:
            end = mm.find(b"\n", pos)
            end = len(mm) if end < 0 else end
            try:
                line = mm[pos:end].decode("utf-8")
            except UnicodeDecodeError:
                return None
            lineno += 1
            if any(c in _OTHER_LINE_BREAKS for c in line.rstrip("\r")):
                return None  # str.splitlines would count lines differently: let it
            if not _is_skipped(line):
                break
            if end >= len(mm):
                return None
            pos = end + 1
        header, delimiter, ncols, wanted = _layout(line, lineno, path, columns)
        ti = None if text is None else _text_index(text, header, ncols)
        if text is not None and (ti is None or ti in wanted):
            return None
        body_start = end + 1 if header is not None else pos
        line_at = lineno + 1 if header is not None else lineno  # the line of the next row
        body_end = len(mm)
        while body_end > body_start and mm[body_end - 1] in b" \t\r\n":
            body_end -= 1
        if body_end <= body_start:
            return None
        # Pages of the map that are done with are dropped from this process's resident set
        # (they stay in the page cache): memory is the output plus one block, not the file.
        nrows = 1 + _count_newlines(mm, body_start, body_end)
        released = 0
        out = [np.empty(nrows, dtype=np.float64) for _ in wanted]
        labels = _Labels(nrows, delimiter) if ti is not None else None
        omitted: list[tuple[int, list[float], str]] = []
        row = 0
        a = body_start
        try:
            while a < body_end:
                b = mm.find(b"\n", min(a + READ_BLOCK, body_end), body_end)
                b = body_end if b < 0 else b
                whole = mm[a:b]
                a = b + 1
                # Blank lines at either end of a block (they would set the parser's width).
                i, lead = _blank_head(whole)
                j, tail = _blank_tail(whole, i)
                if i >= j:
                    line_at += whole.count(b"\n") + 1
                    continue
                block = whole if (i, j) == (0, len(whole)) else whole[i:j]
                line_at += lead
                parsed = _parse_block(block, delimiter, ti, omit_nan, ncols)
                if parsed.ndim != 2 or parsed.shape[1] != ncols:
                    return None
                k = parsed.shape[0]
                # One row per line: a line break other than \n (or \r\n) splitting a row
                # shows in the total of rows (checked at the end); a whitespace table's
                # parser may also drop a line, so there each block is counted.
                if delimiter is None and k != block.count(b"\n") + 1:
                    return None
                table = parsed.iloc[:, wanted].to_numpy(dtype=np.float64)
                cells = None if ti is None else parsed.iloc[:, ti].to_numpy(dtype=object)
                bad = ~np.isfinite(table).all(axis=1)
                if cells is not None:
                    bad |= _missing(cells, omit_nan)  # an empty cell (or a short row)
                keep = None
                if bad.any():
                    keep = np.ones(k, dtype=bool)
                    table = np.array(table)  # pandas may hand out read-only views
                    cells = None if cells is None else np.array(cells)
                    starts = np.concatenate(
                        [[0], np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + 1]
                    )
                    if starts.size != k:
                        return None  # rows and lines do not line up: let the precise reader
                    for r in np.flatnonzero(bad).tolist():
                        stop = starts[r + 1] - 1 if r + 1 < k else len(block)
                        text_line = block[starts[r] : stop].decode("utf-8")
                        if text_line.endswith("\r"):
                            text_line = text_line[:-1]
                        checked = _check_row(text_line, delimiter, ncols, wanted, ti, omit_nan)
                        if checked is None:
                            return None
                        what, values, cell = checked
                        if what != "keep":
                            keep[r] = False
                            if what == "omit":
                                omitted.append((line_at + r, values, cell))
                            continue
                        table[r] = values
                        if cells is not None:
                            cells[r] = cell
                    table = table[keep]
                    if cells is not None:
                        cells = cells[keep]
                n_kept = table.shape[0]
                if row + n_kept > nrows:
                    return None
                for j, col in enumerate(out):
                    col[row : row + n_kept] = table[:, j]
                if labels is not None and cells is not None:
                    lines = line_at + (np.arange(k) if keep is None else np.flatnonzero(keep))
                    if not labels.add(cells, row, lines):
                        return None
                row += n_kept
                line_at += k + tail
                done = a - a % mmap.PAGESIZE
                _release(mm, released, done)
                released = max(released, done)
        except (ValueError, UnicodeDecodeError, IndexError, TypeError, KeyError):
            return None
    if line_at - (lineno + 1 if header is not None else lineno) != nrows:
        return None
    return _FastTable(
        [col[:row] for col in out], omitted, None if labels is None else labels.done(row)
    )


def _blank_head(block: bytes) -> tuple[int, int]:
    """(bytes, lines) of the blank lines (\\n or \\r\\n alone) that start `block`."""
    i = lines = 0
    while True:
        if block.startswith(b"\n", i):
            i += 1
        elif block.startswith(b"\r\n", i):
            i += 2
        else:
            return i, lines
        lines += 1


def _blank_tail(block: bytes, start: int) -> tuple[int, int]:
    """(where `block` ends without the blank lines that end it, how many): its last line ends
    at the newline after it."""
    j, lines = len(block), 0
    while j > start:
        if block.endswith(b"\n", start, j):
            j -= 1
        elif block.endswith(b"\n\r", start, j):
            j -= 2
        else:
            break
        lines += 1
    return j, lines


def _check_row(
    line: str,
    delimiter: str | None,
    ncols: int,
    wanted: list[int],
    text: int | None,
    omit_nan: bool,
) -> tuple[str, list[float], str] | None:
    """A row the block parser found non-finite (or with an empty text cell), read as the
    precise reader reads it: ("skip", ...) for a blank line, ("omit", values, text cell) for a
    row with a NaN or empty cell under `omit_nan`, ("keep", values, text cell) for a good row;
    None for anything the precise reader refuses (it names the fault)."""
    if _is_skipped(line):
        return "skip", [], ""
    cells = _split(line, delimiter)
    if len(cells) != ncols:
        return None
    values: list[float] = []
    missing = False
    for col in wanted:
        cell = cells[col]
        if omit_nan and (cell == "" or cell.lower() in _NAN_CELLS):
            missing = True
            values.append(math.nan)
            continue
        try:
            value = float(cell)
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        values.append(value)
    return "omit" if missing else "keep", values, "" if text is None else cells[text]


def _missing(cells: np.ndarray, omit_nan: bool) -> np.ndarray:
    """Which text cells are empty: "" (a short row's missing cell is one too), or NaN where
    `omit_nan` made the parser read "" and the NaN spellings as NaN."""
    empty = np.asarray(cells == "", dtype=bool)
    if omit_nan:
        import pandas as pd

        empty |= np.asarray(pd.isna(cells), dtype=bool)
    return empty


class _Labels:
    """The text column's cells, block by block: codes in order of first appearance of the
    stripped cell (what `str.strip` after splitting the line gives), as `_split` would."""

    def __init__(self, nrows: int, delimiter: str | None) -> None:
        self.codes = np.empty(nrows, dtype=np.int64)
        self.index: dict[str, int] = {}
        self.empty_line: int | None = None
        self.delimiter = delimiter

    def add(self, cells: np.ndarray, row: int, lines: np.ndarray) -> bool:
        """Code the block's kept cells (`lines`: their 1-based lines); False where a cell holds
        what the line-by-line reader would split differently."""
        import pandas as pd

        codes, uniques = pd.factorize(cells)
        if codes.size and int(codes.min()) < 0:
            return False
        raws = uniques.tolist()
        joined = "".join(raws)  # each test once over all distinct cells (10^5 of them)
        if _BREAKS_OR_NUL.search(joined):
            return False  # str.splitlines would break a line (numpy drops a NUL)
        if self.delimiter is None and _SPACE.search(joined):
            return False  # str.split would split a cell
        index = self.index
        mapped = np.array([index.setdefault(raw.strip(), len(index)) for raw in raws], np.int64)
        block = mapped[codes]
        self.codes[row : row + block.size] = block
        empty = self.index.get("")
        if self.empty_line is None and empty is not None:
            hit = np.flatnonzero(block == empty)
            if hit.size:
                self.empty_line = int(lines[hit[0]])
        return True

    def done(self, rows: int) -> TextColumn:
        return TextColumn(self.codes[:rows], list(self.index), self.empty_line)


def _parse_block(
    block: bytes,
    delimiter: str | None,
    text: int | None = None,
    omit_nan: bool = False,
    ncols: int = 0,
) -> Any:
    """A block of plain lines as a DataFrame, one row per line (a blank line is a row of NaN):
    every column float64 but the `text` column (str cells).

    pandas' C tokenizer and float parser read a block several times faster than
    numpy.loadtxt, with the same bits (both round-trip every float64 written with 17 digits).
    Strict: the first line fixes the width, a longer line is a ParserError (a ValueError), a
    text cell in a number column is a ValueError; any of these sends the caller to the precise
    reader, which names the line. With `omit_nan`, an empty cell and the precise reader's NaN
    spellings parse as NaN (the caller reads those rows again); without it they do not parse.
    With a text column, quotes are plain characters, as the precise reader takes them.
    """
    import csv

    import pandas as pd

    dtype: Any = np.float64
    if text is not None:
        dtype = {j: object if j == text else np.float64 for j in range(ncols)}
    frame = pd.read_csv(
        io.BytesIO(block),
        sep=delimiter if delimiter is not None else r"\s+",
        header=None,
        dtype=dtype,
        engine="c",
        na_filter=omit_nan,  # else "nan", "NA", "": not numbers here; the precise reader says so
        na_values=_NAN_SPELLINGS if omit_nan else None,
        keep_default_na=False,
        skip_blank_lines=False,
        quoting=csv.QUOTE_NONE if text is not None else csv.QUOTE_MINIMAL,
    )
    return frame


_OTHER_LINE_BREAKS = frozenset("\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")

# A line break str.splitlines knows besides \n, or a NUL; and what str.isspace calls space
# (the regular expression's \s is the same test, Py_UNICODE_ISSPACE).
_BREAKS_OR_NUL = re.compile("[" + re.escape("".join(sorted(_OTHER_LINE_BREAKS)) + "\0") + "]")
_SPACE = re.compile(r"\s")


def _release(mm: Any, start: int, end: int) -> None:
    """Drop mapped pages [start, end) from the resident set, where the platform can."""
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _count_newlines(mm: Any, start: int, end: int) -> int:
    view = np.frombuffer(mm, dtype=np.uint8, count=end - start, offset=start)
    total = 0
    try:
        for k in range(0, view.shape[0], READ_BLOCK):
            total += int(np.count_nonzero(view[k : k + READ_BLOCK] == 10))
            done = start + k + READ_BLOCK
            _release(mm, 0, done - done % mmap.PAGESIZE)
    finally:
        del view  # release the export, or the map cannot be closed
    return total


def _read_precise(path: Path, columns: ColumnsSpec | None, omit_nan: bool = False) -> Dataset:
    """The line-by-line reader: slower and memory-hungry, but it names the first fault."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data.file: cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"data.file: {path} is not UTF-8 text (byte {exc.start})") from None
    del raw
    lines = text.splitlines()
    # Skip leading blank lines and '#' comments, remembering 1-based line numbers for messages.
    first = 0
    while first < len(lines) and _is_skipped(lines[first]):
        first += 1
    if first == len(lines):
        raise DataError(f"data.file: {path} holds no data")
    header, delimiter, ncols, wanted = _layout(lines[first], first + 1, path, columns)
    body_start = first + 1 if header is not None else first
    omitted: list[tuple[int, list[float], str]] | None = [] if omit_nan else None
    table = _parse_body(lines, body_start, delimiter, ncols, path, wanted, omitted)
    ds = _dataset(path, [np.ascontiguousarray(table[:, j]) for j in range(len(wanted))], columns)
    if omitted is not None:
        _note_omitted(ds, omitted, len(wanted))
    return ds


def _note_omitted(
    ds: Dataset,
    omitted: list[tuple[int, list[float], str]],
    width: int,
    labelled: bool = False,
) -> None:
    """`rows`, `omitted_lines` and `left_out` of the rows left out for NaN or empty cells
    (1-based line, their `width` wanted values with NaN for those cells, the text column's
    cell: with `labelled`, the rows' group labels)."""
    k = len(ds.variables)
    dropped = np.array([v for _, v, _ in omitted], dtype=np.float64).reshape(-1, width)
    ds.rows = {
        "read": ds.n + len(omitted),
        "used": ds.n,
        "omitted_nan": len(omitted),
        "outside_range": 0,
    }
    ds.omitted_lines = [line for line, _, _ in omitted]
    if omitted:
        ds.left_out = LeftOut(
            dropped[:, 0] if k == 1 else dropped[:, :k],
            dropped[:, k],
            np.full(len(omitted), "nan"),
            np.array([c for _, _, c in omitted], dtype=object) if labelled else None,
        )


def _parse_body(
    lines: list[str],
    start: int,
    delimiter: str | None,
    ncols: int,
    path: Path,
    wanted: list[int],
    omitted: list[tuple[int, list[float], str]] | None = None,
) -> np.ndarray:
    """The wanted columns of the table body as an (n, len(wanted)) float64 array. With
    `omitted` (a list), a row with a NaN or empty cell in a wanted column is left out and
    appended to it as (1-based line number, its wanted values, NaN for an empty cell)."""
    body = [ln for ln in lines[start:] if ln.strip() and not ln.lstrip().startswith("#")]
    # Slow path: other columns may hold text; read the wanted ones and name the first bad cell.
    out = np.empty((len(body), len(wanted)), dtype=np.float64)
    row = 0
    for lineno in range(start, len(lines)):
        line = lines[lineno]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = _split(line, delimiter)
        if len(cells) != ncols:
            raise DataError(
                f"data.file: {path} line {lineno + 1}: expected {ncols} columns, found {len(cells)}"
            )
        missing = False
        for j, col in enumerate(wanted):
            cell = cells[col]
            if omitted is not None and (cell == "" or cell.lower() in _NAN_CELLS):
                missing = True
                out[row, j] = math.nan
                continue
            try:
                value = float(cell)
            except ValueError:
                raise DataError(
                    f"data.file: {path} line {lineno + 1}, column {col + 1}: {cell!r} is not a "
                    "number"
                ) from None
            if not math.isfinite(value):
                raise DataError(
                    f"data.file: {path} line {lineno + 1}, column {col + 1}: {cell!r} is not a "
                    "finite number; remove or fix that row"
                )
            out[row, j] = value
        if missing and omitted is not None:
            omitted.append((lineno + 1, out[row].tolist(), ""))
            continue
        row += 1
    return out[:row]


_NAN_CELLS = frozenset({"nan", "+nan", "-nan"})
# Every spelling of those (any case): what the block parser reads as NaN under omit_nan.
_NAN_SPELLINGS = sorted(
    {
        "".join(c)
        for w in _NAN_CELLS
        for c in itertools.product(*({ch.lower(), ch.upper()} for ch in w))
    }
    | {""}
)
