"""Grouped observations: a group column of a data file, or several files (one group each).

Rows keep their file order; each row's group is an index into `Dataset.group_labels`, the
groups in order of first appearance. No torch here.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fitcli.data import (
    Dataset,
    _check_text,
    _is_number,
    _is_skipped,
    _split,
    concat_left_out,
    load_table,
    load_table_text,
)
from fitcli.errors import DataError

if TYPE_CHECKING:
    from fitcli.config import ColumnsSpec


def _head(path: Path) -> tuple[list[str], int, str | None, bool, list[str]]:
    """(lines, index of the first data-or-header line, delimiter, has a header, its cells)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.file: cannot read {path}: {exc}") from None
    first = 0
    while first < len(lines) and _is_skipped(lines[first]):
        first += 1
    if first == len(lines):
        raise DataError(f"data.file: {path} holds no data")
    line = lines[first]
    delimiter = "," if "," in line else ("\t" if "\t" in line else None)
    cells = _split(line, delimiter)
    header = not all(_is_number(c) for c in cells)
    return lines, first, delimiter, header, cells


def load_grouped_table(
    path: Path, columns: ColumnsSpec, spec: str | int, *, omit_nan: bool = False
) -> Dataset:
    """`load_table` with each row's group from the file's group column `spec`, read in the same
    pass where the fast reader can (else by `attach_group_column`): the same result either way."""
    ds, text = load_table_text(path, columns, spec, omit_nan=omit_nan)
    if text is None:
        attach_group_column(ds, path, spec)
        return ds
    if text.empty_line is not None:
        raise DataError(
            f"data.columns.group: {path} line {text.empty_line}: the group cell is empty"
        )
    _set_groups(ds, path, spec, text.codes, text.texts)
    return ds


def attach_group_column(ds: Dataset, path: Path, spec: str | int) -> None:
    """Set `ds.group` and `ds.group_labels` from the file's group column (`spec`: a name or a
    0-based index; its cells are labels, text or integers). The rows that `load_table` left
    out (`omitted_lines`) are left out here too. One group only, or an empty cell, is a
    DataError naming the file and line."""
    lines, first, delimiter, header, cells = _head(path)
    key = "data.columns.group"
    if isinstance(spec, int):
        if spec >= len(cells):
            raise DataError(
                f"{key}: column index {spec} is out of range; {path} has {len(cells)} columns"
            )
        index = spec
    else:
        if not header:
            raise DataError(
                f"{key}: {path} has no header row, so give the group column by 0-based index"
            )
        if spec not in cells:
            have = ", ".join(repr(c) for c in cells)
            raise DataError(f"{key}: no column {spec!r} in {path}; its columns are {have}")
        index = cells.index(spec)
    omitted = set(ds.omitted_lines or [])
    labels: list[str] = []
    left: list[str] = []  # the group cells of the rows left out for NaN, in line order
    for k in range(first + 1 if header else first, len(lines)):
        line = lines[k]
        if _is_skipped(line):
            continue
        row = _split(line, delimiter)
        cell = row[index] if index < len(row) else ""
        if (k + 1) in omitted:
            left.append(cell)
            continue
        if cell == "":
            raise DataError(f"{key}: {path} line {k + 1}: the group cell is empty")
        labels.append(cell)
    codes, uniq = _codes(labels)
    _set_groups(ds, path, spec, codes, uniq)
    if ds.left_out is not None and ds.left_out.group is None:
        ds.left_out.group = np.array(left, dtype=object)


def _set_groups(
    ds: Dataset, path: Path, spec: str | int, codes: np.ndarray, uniq: list[str]
) -> None:
    """Each row's group (`codes` into the labels `uniq`), refusing one group only."""
    key = "data.columns.group"
    if len(codes) != ds.n:  # the readers agree on rows; a mismatch is a bug, said plainly
        raise DataError(f"{key}: {path}: {len(codes)} group cells for {ds.n} data rows")
    if len(uniq) < 2:
        raise DataError(
            f"{key}: column {spec!r} of {path} holds one group ({uniq[0]!r}); grouping needs "
            "at least two (remove data.columns.group to fit it as one data set)"
        )
    ds.group, ds.group_labels = codes, tuple(uniq)


def _codes(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each label's index among the distinct labels in order of first appearance."""
    arr = np.asarray(labels, dtype=object)
    uniq_sorted, first, inverse = np.unique(arr.astype(str), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # sorted position -> appearance rank
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse].astype(np.int64), [str(uniq_sorted[j]) for j in order]


def expand_files(files: list[str] | str) -> list[Path]:
    """The files of `data.files`: the list as given, or a glob's matches sorted by path."""
    if isinstance(files, str):
        found = sorted(glob.glob(files, recursive=True))
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise DataError(f"data.files: {files!r} matches no file; check the pattern")
        return [Path(f) for f in found]
    return [Path(f) for f in files]


def file_labels(paths: list[Path]) -> list[str]:
    """Each file's group label: its name without extension, or its path (relative to the files'
    common folder, without extension) where two names clash."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    out = []
    for p, stem in zip(paths, stems, strict=True):
        if stems.count(stem) == 1:
            out.append(stem)
        else:
            out.append(str(p.resolve().with_suffix("").relative_to(common)))
    return out


def load_files(
    files: list[str] | str, columns: ColumnsSpec | None, *, omit_nan: bool = False
) -> Dataset:
    """Several data files with the same columns, each one group (labelled by `file_labels`).
    Files whose header rows differ are a DataError naming both files."""
    paths = expand_files(files)
    if len(paths) < 2:
        raise DataError(
            f"data.files: {files!r} matches one file ({paths[0]}); give at least two, or use "
            "data.file"
        )
    ref: tuple[Path, list[str], bool] | None = None
    parts: list[Dataset] = []
    for path in paths:
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise DataError(f"data.files: {path} {what}")
        _check_text(path)
        _, first, _, header, cells = _head(path)
        if ref is None:
            ref = (path, cells, header)
        elif header != ref[2] or (header and cells != ref[1]) or len(cells) != len(ref[1]):
            raise DataError(
                f"data.files: {path} line {first + 1} has the columns "
                f"{', '.join(map(repr, cells))} but {ref[0]} has "
                f"{', '.join(map(repr, ref[1]))}; every file needs the same columns"
            )
        parts.append(load_table(path, columns, omit_nan=omit_nan))
    labels = file_labels(paths)
    counts = [p.n for p in parts]
    digest = hashlib.sha256("".join(p.digest or "" for p in parts).encode()).hexdigest()
    rows = None
    if any(p.rows is not None for p in parts):
        rows = {
            k: sum((p.rows or {}).get(k, 0) for p in parts)
            for k in ("read", "used", "omitted_nan", "outside_range")
        }
    left = [
        replace(p.left_out, group=np.full(len(p.left_out.y), label, dtype=object))
        for p, label in zip(parts, labels, strict=True)
        if p.left_out is not None
    ]
    return Dataset(
        x=np.concatenate([p.x for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        sigma=None
        if any(p.sigma is None for p in parts)
        else np.concatenate([p.sigma for p in parts if p.sigma is not None]),
        source=files if isinstance(files, str) else ", ".join(files),
        digest=f"sha256:{digest}",
        variables=parts[0].variables,
        rows=rows,
        left_out=concat_left_out(left) if left else None,
        group=np.repeat(np.arange(len(parts), dtype=np.int64), counts),
        group_labels=tuple(labels),
    )
