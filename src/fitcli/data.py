"""Observations: synthetic data from a target expression plus noise, or a measured data file."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fitcli.errors import DataError

if TYPE_CHECKING:
    from fitcli.config import Config

MAX_FILE_BYTES = 4 * 1024**3


@dataclass
class Dataset:
    """Observed points (float64 numpy arrays); `y_true` only for synthetic data."""

    x: np.ndarray
    y: np.ndarray
    y_true: np.ndarray | None = None
    sigma: np.ndarray | None = None
    source: str = "synthetic"

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def seed_streams(seed: int) -> dict[str, int]:
    """Independent 63-bit seeds for each random consumer, all derived from the config's seed."""
    names = ("noise", "init", "shuffle")
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


def evaluate_on(expression: Any, x: np.ndarray, key: str) -> np.ndarray:
    """Evaluate a parameter-free expression on x in float64; a non-finite value is a DataError."""
    import torch

    with torch.no_grad():
        values = expression(torch.from_numpy(x)).numpy()
    bad = first_bad_x(values, x)
    if bad is not None:
        raise DataError(
            f"{key}: {expression.source!r} is not finite at x = {bad:g}; "
            "change the expression or the x range"
        )
    return values


def make_dataset(cfg: Config) -> Dataset:
    """Build the observations a config describes (deterministic given cfg.seed)."""
    data = cfg.data
    if data.file is not None:
        return load_table(Path(data.file), data.columns)
    from fitcli.expr import parse_expression

    target = parse_expression(data.target, allow_params=False, what="target")
    x = np.linspace(data.x.start, data.x.stop, data.x.num, dtype=np.float64)
    y_true = evaluate_on(target, x, "data.target")
    y = y_true
    if data.noise.std > 0:
        rng = np.random.default_rng(seed_streams(cfg.seed)["noise"])
        y = y_true + rng.normal(0.0, data.noise.std, size=x.shape[0])
    return Dataset(x=x, y=y, y_true=y_true, source="synthetic")


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


def load_table(path: Path, columns: Any = None) -> Dataset:
    """Read x, y (and sigma) from a CSV or whitespace table; every cell must be a finite number."""
    if not path.exists():
        raise DataError(f"data.file: {path} does not exist")
    if not path.is_file():
        raise DataError(f"data.file: {path} is not a regular file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"data.file: {path} is larger than {MAX_FILE_BYTES // 1024**3} GiB")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data.file: cannot read {path}: {exc.strerror}") from None
    if b"\0" in raw[:65536]:
        raise DataError(f"data.file: {path} is a binary file, not a CSV or whitespace table")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"data.file: {path} is not UTF-8 text (byte {exc.start})") from None
    del raw
    lines = text.splitlines()
    # Skip leading blank lines and '#' comments, remembering 1-based line numbers for messages.
    first = 0
    while first < len(lines) and (
        not lines[first].strip() or lines[first].lstrip().startswith("#")
    ):
        first += 1
    if first == len(lines):
        raise DataError(f"data.file: {path} holds no data")
    head_line = lines[first]
    delimiter = "," if "," in head_line else ("\t" if "\t" in head_line else None)
    cells = _split(head_line, delimiter)
    header: list[str] | None = None
    body_start = first
    if not all(_is_number(c) for c in cells):
        header = cells
        body_start = first + 1
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise DataError(f"data.file: {path} line {first + 1}: column {dup!r} appears twice")
    ncols = len(cells)
    if ncols < 2:
        raise DataError(
            f"data.file: {path} line {first + 1}: found 1 column; need at least x and y "
            "(comma-, tab- or space-separated)"
        )
    get = (lambda name: getattr(columns, name, None)) if columns is not None else (lambda _: None)
    ix = _column_index(get("x"), header, 0, "x", path, ncols)
    iy = _column_index(get("y"), header, 1, "y", path, ncols)
    sigma_spec = get("sigma")
    isig = (
        None if sigma_spec is None else _column_index(sigma_spec, header, 2, "sigma", path, ncols)
    )
    if ix == iy:
        raise DataError("data.columns: x and y name the same column")
    wanted = [ix, iy] + ([isig] if isig is not None else [])
    table = _parse_body(lines, body_start, delimiter, ncols, path, wanted)
    if table.shape[0] < 2:
        raise DataError(f"data.file: {path} has {table.shape[0]} data rows; need at least 2")
    x = np.ascontiguousarray(table[:, 0])
    y = np.ascontiguousarray(table[:, 1])
    sigma = None
    if isig is not None:
        sigma = np.ascontiguousarray(table[:, 2])
        nonpos = np.flatnonzero(sigma <= 0)
        if nonpos.size:
            row = int(nonpos[0])
            raise DataError(
                f"data.file: {path}: sigma must be > 0, got {sigma[row]:g} in data row {row + 1}"
            )
    return Dataset(x=x, y=y, sigma=sigma, source=str(path))


def _parse_body(
    lines: list[str], start: int, delimiter: str | None, ncols: int, path: Path, wanted: list[int]
) -> np.ndarray:
    """The wanted columns of the table body as an (n, len(wanted)) float64 array."""
    body = [ln for ln in lines[start:] if ln.strip() and not ln.lstrip().startswith("#")]
    try:
        # Fast path: the whole table is numeric and rectangular.
        if delimiter is None:
            flat = np.array(" ".join(body).split(), dtype=np.float64)
        else:
            flat = np.array(delimiter.join(body).split(delimiter), dtype=np.float64)
        if flat.size == len(body) * ncols:
            table = flat.reshape(len(body), ncols)[:, wanted]
            if np.isfinite(table).all():
                return table
    except ValueError:
        pass
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
        for j, col in enumerate(wanted):
            cell = cells[col]
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
        row += 1
    return out
