"""data.load_table: both readers (fast block parser, precise line-by-line) and their messages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fitcli import data
from fitcli.errors import DataError
from fitcli.rundir import files as store


def cols(x=None, y=None, sigma=None):
    return SimpleNamespace(x=x, y=y, sigma=sigma)


def write(tmp_path: Path, text: str | bytes, name: str = "d.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def both(path: Path, columns=None):
    """load_table's result, checked equal to the precise reader's (the fast path's oracle)."""
    ds = data.load_table(path, columns)
    ref = data._read_precise(path, columns)
    np.testing.assert_array_equal(ds.x, ref.x)
    np.testing.assert_array_equal(ds.y, ref.y)
    if ref.sigma is None:
        assert ds.sigma is None
    else:
        np.testing.assert_array_equal(ds.sigma, ref.sigma)
    return ds


def message(path: Path, columns=None) -> str:
    with pytest.raises(DataError) as info:
        data.load_table(path, columns)
    return str(info.value)


def test_csv_with_header(tmp_path):
    path = write(tmp_path, "x,y\n0,1.5\n1,2.5\n2,-3e-2\n")
    ds = both(path)
    assert ds.x.tolist() == [0, 1, 2] and ds.y.tolist() == [1.5, 2.5, -0.03]
    assert data._read_fast(path, None) is not None  # the fast reader took it
    assert ds.x.flags.c_contiguous and ds.y.dtype == np.float64


def test_whitespace_table_with_and_without_header(tmp_path):
    ds = both(write(tmp_path, "t  v\n1\t2\n3   4\n", "a.txt"), cols("t", "v"))
    assert ds.x.tolist() == [1, 3] and ds.y.tolist() == [2, 4]
    ds = both(write(tmp_path, "1 2 9\n3 4 9\n5 6 9\n", "b.txt"), cols(2, 0))
    assert ds.x.tolist() == [9, 9, 9] and ds.y.tolist() == [1, 3, 5]


def test_no_header_csv_and_tab(tmp_path):
    assert both(write(tmp_path, "1,2\n3,4\n")).y.tolist() == [2, 4]
    assert both(write(tmp_path, "1\t2\n3\t4\n", "t.tsv")).x.tolist() == [1, 3]


def test_columns_by_name_and_index(tmp_path):
    path = write(tmp_path, "a,b,c\n1,2,3\n4,5,6\n")
    assert both(path, cols("c", "a")).x.tolist() == [3, 6]
    assert both(path, cols(1, 2)).y.tolist() == [3, 6]
    # default names: columns called x and y are found wherever they are
    path = write(tmp_path, "y,other,x\n1,0,2\n3,0,4\n", "named.csv")
    ds = both(path)
    assert ds.x.tolist() == [2, 4] and ds.y.tolist() == [1, 3]


def test_missing_column_message(tmp_path):
    path = write(tmp_path, "time,counts\n1,2\n3,4\n")
    assert message(path, cols("t", "counts")) == (
        f"data.columns.x: no column 't' in {path}; its columns are 'time', 'counts'"
    )
    assert message(path, cols(0, 5)) == (
        f"data.columns.y: column index 5 is out of range; {path} has 2 columns (0 to 1)"
    )
    headless = write(tmp_path, "1,2\n3,4\n", "h.csv")
    assert "has no header row, so columns must be given by 0-based index" in message(
        headless, cols("x", "y")
    )


def test_nan_and_inf_cells_name_line_and_column(tmp_path):
    path = write(tmp_path, "# comment\nx,y\n1,2\n3,nan\n")
    assert message(path) == (
        f"data.file: {path} line 4, column 2: 'nan' is not a finite number; remove or fix that row"
    )
    path = write(tmp_path, "x,y\n1,2\ninf,3\n", "i.csv")
    assert "line 3, column 1: 'inf' is not a finite number" in message(path)


def test_text_cell_in_needed_and_unneeded_column(tmp_path):
    path = write(tmp_path, "x,y,note\n1,2,ok\n3,4,fine\n")
    ds = both(path)  # the note column is never parsed
    assert ds.y.tolist() == [2, 4]
    path = write(tmp_path, "x,y,note\n1,2,ok\n3,abc,fine\n", "bad.csv")
    assert message(path) == f"data.file: {path} line 3, column 2: 'abc' is not a number"


def test_ragged_rows_are_named(tmp_path):
    # One row short and one row long: the fast reader's per-line count sends it to the precise
    # reader, which names the first bad line (a total count alone would balance out).
    path = write(tmp_path, "x,y,z\n1,2,3\n4,5\n6,7,8,9\n")
    assert message(path) == f"data.file: {path} line 3: expected 3 columns, found 2"
    path = write(tmp_path, "x,y,z\n1,2,3\n4,5,6,7\n7,8\n", "r2.csv")
    assert message(path) == f"data.file: {path} line 3: expected 3 columns, found 4"
    path = write(tmp_path, "1 2 3\n4 5\n", "w.txt")
    assert message(path) == f"data.file: {path} line 2: expected 3 columns, found 2"


def test_empty_and_degenerate_files(tmp_path):
    path = write(tmp_path, "")
    assert message(path) == f"data.file: {path} holds no data"
    path = write(tmp_path, "# only a comment\n\n", "c.csv")
    assert message(path) == f"data.file: {path} holds no data"
    path = write(tmp_path, "x,y\n1,2\n", "one.csv")
    assert message(path) == f"data.file: {path} has 1 data rows; need at least 2"
    path = write(tmp_path, "x,y\n", "header-only.csv")
    assert message(path) == f"data.file: {path} has 0 data rows; need at least 2"
    path = write(tmp_path, "x\n1\n", "single.csv")
    assert "found 1 column; need at least x and y" in message(path)
    path = write(tmp_path, b"x,y\n\x00\x01", "bin.csv")
    assert message(path) == (
        f"data.file: {path} is a binary file (a NUL at byte 4), not a CSV or whitespace table"
    )
    path = write(tmp_path, b"x,y\n1,2\n3,\xff\n", "latin.csv")
    assert message(path) == f"data.file: {path} is not UTF-8 text (byte 10)"
    assert message(tmp_path / "nope.csv") == f"data.file: {tmp_path / 'nope.csv'} does not exist"


def test_sigma_column(tmp_path):
    path = write(tmp_path, "x,y,err\n1,2,0.5\n3,4,0.25\n")
    ds = both(path, cols(sigma="err"))
    assert ds.sigma.tolist() == [0.5, 0.25]
    path = write(tmp_path, "x,y,err\n1,2,0.5\n3,4,0\n", "s0.csv")
    assert message(path, cols(sigma="err")) == (
        f"data.file: {path}: sigma must be > 0, got 0 in data row 2"
    )


def test_comments_blank_lines_bom_and_crlf(tmp_path):
    text = "\ufeff# measured\r\nx,y\r\n1,2\r\n\r\n# mid-file comment\r\n3,4\r\n\r\n"
    ds = both(write(tmp_path, text))
    assert ds.x.tolist() == [1, 3] and ds.y.tolist() == [2, 4]
    ds = both(write(tmp_path, "x,y\n1,2\n3,4\n\n\n", "trailing.csv"))
    assert ds.x.tolist() == [1, 3]


def test_big_file_fast_path_equals_slow_path(tmp_path, monkeypatch):
    # Several blocks (the block size is shrunk) of values that need all 17 digits.
    monkeypatch.setattr(data, "READ_BLOCK", 4096)
    rng = np.random.default_rng(7)
    n = 20_000
    x = np.sort(rng.uniform(-1e3, 1e3, n))
    y = rng.normal(0, 1, n) * 10.0 ** rng.integers(-30, 30, n)
    sigma = rng.uniform(0.1, 2, n)
    path = tmp_path / "big.csv"
    store.write_data_csv(path, x, y, None, sigma)
    assert data._read_fast(path, cols(sigma="sigma")) is not None
    ds = both(path, cols(sigma="sigma"))
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)
    np.testing.assert_array_equal(ds.sigma, sigma)


def test_whitespace_big_file_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BLOCK", 1000)
    rows = "\n".join(f"{k}  {k * 0.1!r}   {-k}" for k in range(3000))
    ds = both(write(tmp_path, rows + "\n", "w.dat"), cols(0, 1))
    assert ds.n == 3000 and ds.y[-1] == 2999 * 0.1


def test_data_csv_streaming_matches_savetxt(tmp_path, monkeypatch):
    import io

    monkeypatch.setattr(store, "DATA_CSV_ROWS", 7)
    rng = np.random.default_rng(3)
    x, y, t = rng.normal(size=(3, 50))
    store.write_data_csv(tmp_path / "data.csv", x, y, t)
    buf = io.BytesIO()
    np.savetxt(
        buf,
        np.column_stack([x, y, t]),
        delimiter=",",
        fmt="%.17g",
        header="x,y,y_true",
        comments="",
    )
    assert (tmp_path / "data.csv").read_bytes() == buf.getvalue()
    ds = data.load_table(tmp_path / "data.csv")
    np.testing.assert_array_equal(ds.x, x)
