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
import time
from pathlib import Path
from typing import Any

from fitcli.errors import RunDirError, RunDirExistsError

SUMMARY = "summary.json"
CONFIG = "config.yaml"
DATA = "data.csv"
METRICS = "metrics.csv"
SNAPSHOTS = "snapshots"
SNAPSHOT_PARAMS = "snapshots/params.json"
PLOTLY_JS = "plotly.min.js"
STATE = "state"
DATA_CSV_ROWS = 1 << 14  # rows of data.csv formatted at a time
MARKERS = (SUMMARY, CONFIG)  # what makes a directory a fitcli run directory


def slug(name: str) -> str:
    """A file-system-safe version of a run name (letters, digits, '.', '_' and '-')."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return (s or "run")[:60]


def command_comment(command: list[str]) -> str:
    """The `# command: ...` line of config.yaml and sweep.yaml: the command line on one line,
    every line break or control character in it escaped (`\\r`, NEL and U+2028 end a YAML line:
    written raw, the rest of the command would become YAML keys)."""
    from fitcli.console import printable

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


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MARKERS)


def claim_run_dir(path: Path, *, overwrite: bool) -> Path:
    """Create exactly `path`; an existing one is replaced only with overwrite and only if it is a
    fitcli run directory (never a folder a user made for something else)."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise RunDirExistsError(
                f"run directory {path} already exists; pass --overwrite to replace it, or choose "
                "another --run-dir"
            )
        if not is_run_dir(path):
            raise RunDirError(
                f"{path} exists and is not a fitcli run directory; refusing to replace it even "
                "with --overwrite"
            )
        # Move it aside first so a failure below never leaves a half-deleted directory.
        trash = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
        try:
            path.rename(trash)
            shutil.rmtree(trash)
        except OSError as exc:
            _raise_os(exc, path, "replace")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        raise RunDirError(f"run directory {path} was created by someone else meanwhile") from None
    except OSError as exc:
        _raise_os(exc, path, "create")
    return path


def install_run_dir(
    path: Path, files: dict[str, bytes | None], links: dict[str, Path] | None = None
) -> Path:
    """Write a whole run directory at once: `files` (relative POSIX path -> bytes; a path ending
    in "/" with None is a directory) and `links` (relative path -> a file hard-linked, else
    copied) go into a hidden folder beside `path`, which is then renamed to `path`. A reader, a
    crash or Ctrl-C sees the complete directory or none of it; an existing fitcli run directory
    at `path` is replaced, anything else is refused (as by `claim_run_dir`)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
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
        if path.exists() or path.is_symlink():
            if not is_run_dir(path):
                raise RunDirError(
                    f"{path} exists and is not a fitcli run directory; refusing to replace it"
                )
            trash = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
            path.rename(trash)
            tmp.rename(path)
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


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see old or new, never half."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _raise_os(exc, path, "write")


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


def write_data_csv(path: Path, x, y, y_true=None, sigma=None) -> None:
    """data.csv: x,y (observed) plus y_true for synthetic data and sigma when given."""
    import numpy as np

    cols = [("x", x), ("y", y)]
    if y_true is not None:
        cols.append(("y_true", y_true))
    if sigma is not None:
        cols.append(("sigma", sigma))
    header = ",".join(c for c, _ in cols) + "\n"
    arrays = [np.asarray(v, dtype=np.float64) for _, v in cols]
    # %.17g round-trips every float64 exactly. Streamed in blocks of DATA_CSV_ROWS rows, each
    # formatted by one `%` over the block, so memory stays flat however many rows (10^8 rows
    # are about 6 GB of text) and the file is written about 2.5x faster than by np.savetxt.
    row_fmt = ",".join(["%.17g"] * len(arrays)) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "w", encoding="ascii", newline="\n") as fh:
            fh.write(header)
            for start in range(0, arrays[0].shape[0], DATA_CSV_ROWS):
                block = np.column_stack([a[start : start + DATA_CSV_ROWS] for a in arrays])
                fh.write((row_fmt * block.shape[0]) % tuple(block.ravel().tolist()))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _raise_os(exc, path, "write")


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


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
