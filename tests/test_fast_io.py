"""The vectorised readers and writers of a grouped run, each against the line-by-line code it
replaces: a grouped file's labels read with the table (`groups_data.load_grouped_table`)
against the precise reader plus `attach_group_column`, the fast reader's NaN and blank-line
handling against `_read_precise`, data.csv and groups.csv against
row-by-row csv-module writers."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fitcli import data, groups_data
from fitcli.errors import DataError
from fitcli.rundir import files


def cols(x=None, y=None, sigma=None, group=None):
    return SimpleNamespace(x=x, y=y, sigma=sigma, group=group)


def write(tmp_path: Path, text: str | bytes, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def outcome(load) -> tuple:
    """What a reader gives, comparable with ==: the dataset's fields, or the error's text."""
    try:
        ds = load()
    except DataError as exc:
        return ("error", str(exc))
    left = None if ds.left_out is None else (ds.left_out.x.tolist(), ds.left_out.y.tolist())
    return (
        ds.x.tolist(),
        ds.y.tolist(),
        None if ds.sigma is None else ds.sigma.tolist(),
        None if ds.group is None else ds.group.tolist(),
        ds.group_labels,
        ds.rows,
        ds.omitted_lines,
        repr(left),  # repr: NaN == NaN
    )


def line_by_line(path: Path, columns, spec, omit_nan: bool):
    """The reference: the precise reader, then the group column split line by line."""
    ds = data._read_precise(path, columns, omit_nan)
    groups_data.attach_group_column(ds, path, spec)
    return ds


GROUPED = {
    "text labels padded with spaces": ("x,y,g\n1,2, a\n3,4,b \n5,6,a\n7,8, b\n", "g", False, True),
    "integer-looking labels": ("x,y,g\n1,2,0\n3,4,00\n5,6,1.0\n7,8,0\n", "g", False, True),
    "quotes are plain characters": ('x,y,g\n1,2,"a"\n3,4,c\n', "g", False, True),
    "a quoted label with a comma": ('x,y,g\n1,2,"a,b"\n3,4,c\n', "g", False, False),
    "crlf line endings": ("x,y,g\r\n1,2,a\r\n3,4,b\r\n5,6,a\r\n", "g", False, True),
    "blank lines in the body": ("x,y,g\n1,2,a\n\n3,4,b\n\n5,6,a\n", "g", True, True),
    "nan rows left out": ("x,y,g\n1,2,a\n3,nan,b\n5,,a\n7,8,b\n,9,c\n", "g", True, True),
    "nan rows refused without omit": ("x,y,g\n1,2,a\n3,nan,b\n5,6,a\n", "g", False, False),
    "an omitted row's empty label": ("x,y,g\n1,2,a\n3,NaN,\n5,6,b\n", "g", True, True),
    "labels spelled nan and NA": ("x,y,g\n1,2,nan\n3,4,NA\n5,6,nan\n", "g", True, True),
    "header-less, group by index": ("1,2,a\n3,4,b\n5,6,a\n", 2, False, True),
    "header-less, the group column is x too": ("7,1,2\n8,3,4\n7,5,6\n", 0, False, False),
    "whitespace table": ("x y g\n1 2 a\n3 4 b\n 5  6  a \n", "g", False, True),
    "tab-separated, comma in a label": ("x\ty\tg\n1\t2\ta,b\n3\t4\tc\n", "g", False, True),
    "non-ascii labels": ("x,y,g\n1,2,é\n3,4,日本\n5,6,é\n", "g", False, True),
    "a hash inside a label": ("x,y,g\n1,2,a#1\n3,4,b#2\n", "g", False, True),
    "comment lines": ("# made by hand\nx,y,g\n1,2,a\n# a note\n3,4,b\n", "g", False, False),
    "sigma and group": ("x,y,s,g\n1,2,0.5,a\n3,4,1,b\n", "g", False, True),
    "an empty group cell": ("x,y,g\n1,2,a\n3,4,\n5,6,b\n", "g", False, True),
    "a blank group cell": ("x,y,g\n1,2,a\n3,4,   \n5,6,b\n", "g", False, True),
    "a short row": ("x,y,g\n1,2,a\n3,4\n5,6,b\n", "g", False, False),
    "one group only": ("x,y,g\n1,2,a\n3,4,a\n", "g", False, True),
    "no such group column": ("x,y,g\n1,2,a\n3,4,b\n", "h", False, False),
    "index out of range": ("1,2,a\n3,4,b\n", 5, False, False),
    "a name without a header": ("1,2,a\n3,4,b\n", "g", False, False),
    "a vertical tab in a label": ("x,y,g\n1,2,a\x0bz\n3,4,b\n", "g", False, False),
    "a lone carriage return": ("x,y,g\n1,2,a\n3,4,b\r5,6,a\n7,8,b\n", "g", False, False),
    "a line separator in a label": ("x,y,g\n1,2,a\u2028z\n3,4,b\n", "g", False, False),
    "a no-break space in a whitespace table's label": (
        "x y g\n1 2 a\xa0z\n3 4 b\n",
        "g",
        False,
        False,
    ),
}


@pytest.mark.parametrize("case", list(GROUPED))
def test_grouped_reader_equals_the_line_by_line_reader(tmp_path, case):
    text, spec, omit, fast = GROUPED[case]
    path = write(tmp_path, text)
    columns = cols(sigma="s" if ",s," in text else None, group=spec)
    got = outcome(lambda: groups_data.load_grouped_table(path, columns, spec, omit_nan=omit))
    assert got == outcome(lambda: line_by_line(path, columns, spec, omit))
    # The one-pass reader took the cases it should (the others fall back to the old path).
    assert (data._read_fast(path, columns, omit, spec) is not None) == fast


def test_grouped_reader_numbers_lines_across_blocks(tmp_path, monkeypatch):
    """Many small blocks: the lines of omitted rows and of an empty group cell count on
    from block to block."""
    monkeypatch.setattr(data, "READ_BLOCK", 64)
    rng = np.random.default_rng(3)
    lines = ["x,y,g"]
    for k in range(400):
        y = "nan" if k % 37 == 5 else repr(float(rng.normal()))
        lines.append(f"{k},{y},{'grp' + str(k % 7) if k % 11 else ' grp1'}")
        if k % 53 == 0:
            lines.append("")
    path = write(tmp_path, "\n".join(lines) + "\n")
    columns = cols(group="g")
    got = outcome(lambda: groups_data.load_grouped_table(path, columns, "g", omit_nan=True))
    assert got == outcome(lambda: line_by_line(path, columns, "g", True))
    assert data._read_fast(path, columns, True, "g") is not None
    assert got[6] == [k + 2 + k // 53 + 1 for k in range(400) if k % 37 == 5]
    lines[250] = "248,1.5,"
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 251: the group cell is empty"):
        groups_data.load_grouped_table(path, columns, "g", omit_nan=True)


UNGROUPED = {
    "nan rows left out": ("x,y\n1,nan\n3,4\n5,6\n,7\n", True, True),
    "blank lines": ("x,y\n1,2\n\n3,4\n", True, True),
    "crlf with nan": ("x,y\r\n1,NaN\r\n3,4\r\n5,6\r\n", True, True),
    "whitespace table with nan": ("1 2\n\n3 nan\n5 6\n", True, True),
    "an infinite cell": ("x,y\n1,inf\n3,4\n5,6\n", True, False),
    "nan without omit": ("x,y\n1,nan\n3,4\n5,6\n", False, False),
    "a padded nan": ("x,y\n1, nan \n3,4\n5,6\n", True, False),
    "a ragged row": ("x,y,z\n1,2\n3,4,5\n5,6,7\n", True, False),
}


@pytest.mark.parametrize("case", list(UNGROUPED))
def test_fast_reader_leaves_out_nan_rows_as_the_precise_reader(tmp_path, case):
    text, omit, fast = UNGROUPED[case]
    path = write(tmp_path, text)
    got = outcome(lambda: data.load_table(path, None, omit_nan=omit))
    assert got == outcome(lambda: data._read_precise(path, None, omit))
    assert (data._read_fast(path, None, omit) is not None) == fast


def reference_data_csv(x, y, sigma, labels, variables=("x",)) -> bytes:
    """data.csv row by row: %.17g per number, the csv module's quoting for the label."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(variables) if x.ndim == 2 else ["x"]
    w.writerow([*names, "y", *(["sigma"] if sigma is not None else []), "group"])
    for k in range(len(y)):
        xs = list(x[k]) if x.ndim == 2 else [x[k]]
        nums = [*xs, y[k], *([sigma[k]] if sigma is not None else [])]
        w.writerow([*(f"{v:.17g}" for v in nums), labels[k]])
    return buf.getvalue().encode("utf-8")


@pytest.mark.parametrize(
    "names",
    [
        [str(k) for k in range(40)],
        [f'well "{k}", row {k % 3}' if k % 4 == 0 else f"w {k}" for k in range(40)],
        ["a\nb", "c\r\nd", "é", "x"] * 10,
    ],
    ids=["integers", "quotes-and-commas", "line-breaks"],
)
def test_data_csv_equals_a_row_by_row_writer(tmp_path, names):
    """Enough rows for several blocks, and a repeated x grid (formatted once per value, -0.0
    kept apart from 0.0), against the csv module writing each row."""
    rng = np.random.default_rng(7)
    n = 5 * files.DATA_CSV_ROWS + 123
    x = np.tile(np.linspace(-5, 5, 100), n // 100 + 1)[:n]
    x[3], x[4], x[5] = -0.0, 0.0, 1e-310
    y = rng.normal(size=n) * 10.0 ** rng.integers(-30, 30, n)
    sigma = rng.uniform(0.1, 2, n)
    codes = rng.integers(0, len(names), n)
    path = tmp_path / "data.csv"
    files.write_data_csv(path, x, y, None, sigma, group=codes, group_labels=tuple(names))
    labels = [names[c] for c in codes]
    assert path.read_bytes() == reference_data_csv(x, y, sigma, labels)
    # Labels given per row (the other form) write the same file.
    again = tmp_path / "again.csv"
    files.write_data_csv(again, x, y, None, sigma, group=np.asarray(labels, dtype=object))
    assert again.read_bytes() == path.read_bytes()


def test_data_csv_of_several_variables_equals_a_row_by_row_writer(tmp_path):
    rng = np.random.default_rng(8)
    n = 300
    x = np.column_stack([rng.normal(size=n), np.repeat([1.0, 2.0, 3.0], 100)])
    y = rng.normal(size=n)
    codes = np.repeat([0, 1, 2], 100)
    path = tmp_path / "data.csv"
    files.write_data_csv(path, x, y, None, None, ("T", "P"), group=codes, group_labels="abc")
    ref = reference_data_csv(x, y, None, ["abc"[c] for c in codes], ("T", "P"))
    assert path.read_bytes() == ref


def tricky_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """Values at every edge of the compiled %.17g: ties at the 17th digit, powers of ten and
    their neighbours, the kernel's range ends, zeros, infinities, NaN, subnormals."""
    p = 10.0 ** np.arange(-12, 18)
    edges = [
        p,
        np.nextafter(p, 0),
        np.nextafter(p, np.inf),
        [1125899906842623.75, 1125899906842624.25, 4503599627370495.5, 2.0**53, 2.0**53 - 1],
        [1e-10, np.nextafter(1e-10, 0), 0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 2.2e-308],
        [1.7976931348623157e308, 0.1, 0.5, 1e-5, 9.99999999999999e-5, 123456789012345678.0],
    ]
    rand = [
        rng.normal(size=n) * 10.0 ** rng.integers(-14, 19, n),
        rng.integers(1, 2**53, n) / 2.0 ** rng.integers(1, 60, n),  # exact binary fractions
    ]
    vals = np.concatenate([np.asarray(e, dtype=np.float64) for e in edges] + rand)
    return np.concatenate([vals, -vals])


def test_compiled_rows_equal_percent_17g():
    pytest.importorskip("numba")
    from fitcli.rundir import csvrows

    values = tricky_floats(np.random.default_rng(11), 50_000)
    got = csvrows.rows([values])
    assert got == (("%.17g\n" * values.size) % tuple(values.tolist())).encode()
    labels = csvrows.labels_table([b"a", b'"b,c"', "é".encode()])
    codes = np.arange(values.size) % 3
    got = csvrows.rows([values, values[::-1]], codes, labels)
    cells = ["a", '"b,c"', "é"]
    ref = "".join(
        f"{u:.17g},{v:.17g},{cells[c]}\n"
        for u, v, c in zip(values.tolist(), values[::-1].tolist(), codes.tolist(), strict=True)
    )
    assert got == ref.encode()


def test_data_csv_from_the_compiled_writer_equals_a_row_by_row_writer(tmp_path, monkeypatch):
    """Blocks of 1000 rows through `csvrows.rows` (numba), with values it leaves to Python."""
    pytest.importorskip("numba")
    monkeypatch.setattr(files, "COMPILED_ROWS", 1000)
    rng = np.random.default_rng(12)
    y = tricky_floats(rng, 2000)
    n = y.size
    x = np.tile(np.linspace(-5, 5, 100), n // 100 + 1)[:n]
    sigma = rng.uniform(0.1, 2, n)
    names = ['well "1", left', "w2", "é"]
    codes = rng.integers(0, 3, n)
    path = tmp_path / "data.csv"
    files.write_data_csv(path, x, y, None, sigma, group=codes, group_labels=names)
    assert path.read_bytes() == reference_data_csv(x, y, sigma, [names[c] for c in codes])
    files.write_data_csv(path, x, y)  # no group column, the ungrouped run's data.csv
    ref = "x,y\n" + "".join(
        f"{u:.17g},{v:.17g}\n" for u, v in zip(x.tolist(), y.tolist(), strict=True)
    )
    assert path.read_text(encoding="utf-8") == ref


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
def test_data_csv_with_a_grid_column_that_stops_repeating(tmp_path, monkeypatch, compiled):
    """A column of few values (formatted once per value) whose later blocks hold many: each
    block takes the way that fits it, and the file is the row-by-row writer's."""
    if compiled:
        pytest.importorskip("numba")
    monkeypatch.setattr(files, "DATA_CSV_ROWS", 64)
    monkeypatch.setattr(files, "COMPILED_ROWS", 1000 if compiled else 10**9)
    rng = np.random.default_rng(13)
    n = 6000
    x = np.tile(np.array([-0.0, 0.0, 0.1, 1e-300, 2.5, -7.25]), n // 6)
    x[4000:] = rng.normal(size=n - 4000)
    y = rng.normal(size=n)
    codes = np.repeat(np.arange(60), 100)
    names = [f"g{k}" if k % 2 else f'"{k}",x' for k in range(60)]
    path = tmp_path / "data.csv"
    files.write_data_csv(path, x, y, None, None, group=codes, group_labels=names)
    assert path.read_bytes() == reference_data_csv(x, y, None, [names[c] for c in codes])


def test_groups_csv_equals_a_row_by_row_writer(tmp_path):
    """groups.csv column by column against the csv module row by row (floats by repr, numpy
    floats as Python floats, text quoted where it needs to be)."""
    from fitcli.grouped_run import write_groups_csv

    rng = np.random.default_rng(14)
    rows = [
        {
            "group": ['a,"b"', "g2", "é"][k % 3],
            "status": "failed" if k % 5 == 0 else "converged",
            "reason": "too few points: 1, for 3" if k % 5 == 0 else "ran 9 epochs",
            "iterations": k,
            "n_points": 100,
            "loss": math.nan if k % 7 == 0 else float(rng.normal()),
            "rss": math.inf if k == 3 else float(rng.normal()) * 1e-300,
            "a": np.float64(rng.normal()),
            "a_stderr": -0.0,
        }
        for k in range(50)
    ]
    path = tmp_path / "groups.csv"
    write_groups_csv(path, rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(rows[0]))
    for row in rows:
        w.writerow([repr(float(v)) if isinstance(v, float) else v for v in row.values()])
    assert path.read_text(encoding="utf-8") == buf.getvalue()
