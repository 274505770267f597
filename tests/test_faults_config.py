"""Fault suite 2: well over a thousand broken configs, each exits 2 with a message.

The mutations are generated deterministically from the shipped configs in configs/, and every one
is invalid by construction (a required key dropped, a key renamed to one no section takes, a key
given twice, a value of the wrong type, non-finite, negative or too large where the schema forbids
it, YAML that does not parse, alias bombs, deep nesting, binary and non-UTF-8 bytes, a directory
or a missing path, a bad override). None may be accepted: a mutation that validates is a failure
of the suite, not something to skip. Through `fitcli train` in process (CliRunner), a few through
the real process: exit 2, a one-line `error:` message, no traceback, no run directory.

`benchmarks/faults.py` runs the same generator with more random byte files and seeds.
"""

# ruff: noqa: E501 (tables of cases read best one case a line)
from __future__ import annotations

import codecs
import gzip
import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from conftest import CONFIGS, fitcli_process

from fitcli.cli import app

SHIPPED = sorted(CONFIGS.glob("*.yaml"))
# benchmarks/faults.py sets this above 1: every mutation, more random files, more seeds.
SCALE = int(os.environ.get("FITCLI_FAULTS_SCALE", "1"))

# Keys a config cannot do without (given the shape of the shipped configs).
REQUIRED = {
    ("data",),
    ("model",),
    ("data", "target"),
    ("data", "x"),
    ("data", "x", "start"),
    ("data", "x", "stop"),
    ("data", "x", "num"),
    ("data", "file"),
    ("model", "basis"),
    ("model", "expr"),
    ("scheduler", "name"),
}
# Numbers the schema (or torch, when the optimizer is built) requires to be positive.
POSITIVE = {
    ("seed",),
    ("epochs",),
    ("snapshots",),
    ("batch_size",),
    ("data", "x", "num"),
    ("data", "noise", "std"),
    ("optimizer", "lr"),
}
INTEGER = {("seed",), ("epochs",), ("snapshots",), ("batch_size",), ("data", "x", "num")}
UPPER = {("seed",): 2**64, ("epochs",): 10**10, ("snapshots",): 1001, ("data", "x", "num"): 10**9}


@dataclass
class Mutation:
    """One broken input: file bytes (or a special path) plus overrides."""

    kind: str
    name: str
    content: bytes | None = None
    special: str | None = None  # directory | missing | dev-null | fifo | symlink-loop | ...
    overrides: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Helpers over parsed configs
# --------------------------------------------------------------------------------------------


def paths(node, prefix=()) -> Iterator[tuple]:
    """Every key path (and list index) in a parsed config, parents before children."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from paths(v, (*prefix, i))


def get(node, path):
    for p in path:
        node = node[p]
    return node


def copy(cfg):
    return json.loads(json.dumps(cfg))


def with_value(cfg, path, value):
    out = copy(cfg)
    get(out, path[:-1])[path[-1]] = value
    return out


def dropped(cfg, path):
    out = copy(cfg)
    del get(out, path[:-1])[path[-1]]
    return out


def renamed(cfg, path, new):
    out = copy(cfg)
    parent = get(out, path[:-1])
    items = [(new if k == path[-1] else k, v) for k, v in parent.items()]
    parent.clear()
    parent.update(items)
    return out


def dump(cfg) -> bytes:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).encode()


def json_with_duplicate(node, path) -> str:
    """JSON (which is YAML) of `node` with the key at `path` written twice."""
    if not isinstance(node, dict):
        return json.dumps(node)
    parts = []
    for k, v in node.items():
        if path and k == path[0]:
            parts.append(f"{json.dumps(k)}: {json_with_duplicate(v, path[1:])}")
            if len(path) == 1:
                parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    return "{" + ", ".join(parts) + "}"


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def mutations(
    configs: list[Path] = SHIPPED, *, full: bool = False, random_files: int = 24, seed: int = 0
):
    """The mutations of every shipped config, in a fixed order; CI runs every broken-YAML form
    at every other line and two renames per key, `full` (benchmarks/faults.py) all of them."""
    rng = random.Random(seed)
    out: list[Mutation] = []
    for src in configs:
        text = src.read_text()
        cfg = yaml.safe_load(text)
        stem = src.stem
        out += structural(stem, cfg, full)
        out += values(stem, cfg)
        out += broken_yaml(stem, text, full)
        out += encodings(stem, text, rng)
        out += overrides(stem, text)
    out += bombs()
    out += nesting()
    out += binaries(rng, random_files)
    out += specials()
    return out


def structural(stem: str, cfg: dict, full: bool = True) -> list[Mutation]:
    out = []
    for path in paths(cfg):
        if isinstance(path[-1], int):
            continue
        dotted = ".".join(map(str, path))
        if path in REQUIRED:
            out.append(Mutation("key dropped", f"{stem}: {dotted}", dump(dropped(cfg, path))))
        key = path[-1]
        swapped = key[:1] + key[2:1:-1] + key[1:2] + key[3:]
        for new in [f"{key}_", swapped, f"_{key}", f"{key}2"][: 4 if full else 2]:
            if new != key and new not in get(cfg, path[:-1]):
                out.append(
                    Mutation(
                        "key renamed", f"{stem}: {dotted} -> {new}", dump(renamed(cfg, path, new))
                    )
                )
        out.append(
            Mutation("key duplicated", f"{stem}: {dotted}", json_with_duplicate(cfg, path).encode())
        )
    # Unknown top-level keys, each a near miss of a real one.
    for key in ("epoch", "optimiser", "lr", "learning_rate", "Seed", "snapshot", "modle", "data2"):
        out.append(Mutation("key unknown", f"{stem}: {key}", dump({**cfg, key: 1})))
    # Keys that exclude each other, or need each other.
    data, model = cfg["data"], cfg["model"]
    bad = []
    if "target" in data and "start" in data["x"]:  # one variable's grid (not several)
        bad += [
            ("data.file with data.target", with_value(cfg, ("data", "file"), "x.csv")),
            ("data.columns with data.target", with_value(cfg, ("data", "columns"), {"x": 0})),
            ("x.stop == x.start", with_value(cfg, ("data", "x", "stop"), data["x"]["start"])),
            ("x.stop < x.start", with_value(cfg, ("data", "x", "stop"), data["x"]["start"] - 1)),
            ("target with a parameter", with_value(cfg, ("data", "target"), "a*x")),
        ]
    else:
        bad += [
            ("data.target with data.file", with_value(cfg, ("data", "target"), "x")),
            (
                "data.x with data.file",
                with_value(cfg, ("data", "x"), {"start": 0, "stop": 1, "num": 2}),
            ),
            ("missing data file", with_value(cfg, ("data", "file"), "no/such/file.csv")),
            ("data file is a directory", with_value(cfg, ("data", "file"), ".")),
        ]
        columns = data.get("columns") or {}
        bad += [
            ("unknown column", with_value(cfg, ("data", "columns"), {**columns, "y": "nope"})),
            (
                "column index out of range",
                with_value(cfg, ("data", "columns"), {**columns, "x": 99}),
            ),
        ]
    if "basis" in model:
        bad += [
            ("basis with expr", with_value(cfg, ("model", "expr"), "a*x")),
            ("params with basis", with_value(cfg, ("model", "params"), {"a": 1})),
            ("init too short", with_value(cfg, ("model", "init"), [1.0])),
            ("empty basis", with_value(cfg, ("model", "basis"), [])),
            ("basis with a parameter", with_value(cfg, ("model", "basis"), ["x", "a*x"])),
        ]
    else:
        bad += [
            ("expr with basis", with_value(cfg, ("model", "basis"), ["x"])),
            ("init with expr", with_value(cfg, ("model", "init"), [1.0])),
            ("expr without parameters", with_value(cfg, ("model", "expr"), "sin(x)")),
            ("param not in expr", with_value(cfg, ("model", "params", "zz"), 1.0)),
        ]
        for name in model.get("params") or {}:
            bad += [
                (f"{name}: min > max", with_value(cfg, ("model", "params", name), {"min": 2, "max": 1})),
                (f"{name}: value out of bounds", with_value(cfg, ("model", "params", name), {"value": 5, "min": 0, "max": 1})),
                (f"{name}: value on a bound", with_value(cfg, ("model", "params", name), {"value": 0, "min": 0})),
                (f"{name}: unknown field", with_value(cfg, ("model", "params", name), {"valu": 1})),
            ]  # fmt: skip
    if cfg.get("optimizer", {}).get("name") == "LBFGS":  # torch divides by lr in its line search
        bad.append(("LBFGS with lr 0", with_value(cfg, ("optimizer", "lr"), 0)))
    bad += [
        ("unknown optimizer", with_value(cfg, ("optimizer", "name"), "Adamm")),
        ("unknown optimizer argument", with_value(cfg, ("optimizer", "lrr"), 0.1)),
        ("unknown scheduler", with_value(cfg, ("scheduler",), {"name": "StepLRR"})),
        ("scheduler missing argument", with_value(cfg, ("scheduler",), {"name": "StepLR"})),
        ("scheduler unknown argument", with_value(cfg, ("scheduler",), {"name": "StepLR", "step_size": 1, "x": 1})),
        ("scheduler without name", with_value(cfg, ("scheduler",), {"step_size": 1})),
        ("chained scheduler", with_value(cfg, ("scheduler",), {"name": "SequentialLR", "schedulers": []})),
        ("optimizer argument not a name", with_value(cfg, ("optimizer", "1lr"), 0.1)),
        ("loss unknown", with_value(cfg, ("loss",), "mae")),
        ("device unknown", with_value(cfg, ("device",), "tpu")),
        ("device cuda:99", with_value(cfg, ("device",), "cuda:99")),
        ("dtype unknown", with_value(cfg, ("dtype",), "float16")),
        ("name with a newline", with_value(cfg, ("name",), "a\nb")),
        ("name too long", with_value(cfg, ("name",), "n" * 201)),
        ("name empty", with_value(cfg, ("name",), "")),
        ("top level is a list", [cfg]),
        ("top level is text", "a config"),
        ("top level is a number", 42),
    ]  # fmt: skip
    out += [Mutation("structure", f"{stem}: {what}", dump(c)) for what, c in bad]
    return out


WRONG_FOR_NUMBER = ["abc", [1, 2], {"k": 1}, True]
WRONG_FOR_TEXT = [[1, 2], {"k": 1}, True, None]


def values(stem: str, cfg: dict) -> list[Mutation]:
    out = []
    for path in paths(cfg):
        value = get(cfg, path)
        dotted = ".".join(map(str, path))
        kwargs = path[0] in ("optimizer", "scheduler") and path[-1] != "name"
        if is_number(value):
            wrong = [w for w in WRONG_FOR_NUMBER if not (kwargs and isinstance(w, bool))]
            wrong += [float("nan"), float("inf"), float("-inf")]
            if path in POSITIVE:
                wrong += [-1, -1e-3]
            if path in POSITIVE - {("seed",), ("data", "noise", "std"), ("optimizer", "lr")}:
                wrong += [0]
            if path in INTEGER:
                wrong += [2.5, "12"]
            if path in UPPER:
                wrong += [UPPER[path]]
        elif isinstance(value, str):
            wrong = WRONG_FOR_TEXT if path != ("scheduler", "name") else [[1], {"k": 1}, True]
            if kwargs:  # an optimizer's text argument (line_search_fn)
                wrong = [5, [1], {"k": 1}, "no_such_method"]
        elif isinstance(value, list):
            wrong = ["x", {"k": 1}, 5]
        elif isinstance(value, dict):
            # (a number where a parameter's mapping is expected is its start value: valid)
            wrong = ["text", [1, 2], True] + ([] if path[:2] == ("model", "params") else [5])
        else:  # null or a boolean: `scheduler: null`
            wrong = ["text", 5, [1]]
        for w in wrong:
            if w is None and (
                path == ("scheduler",) or path[:2] == ("data", "columns") or path[0] == "report"
            ):
                continue  # null means "none" or "the default" there (report: the column name)
            out.append(
                Mutation("wrong value", f"{stem}: {dotted} = {w!r}", dump(with_value(cfg, path, w)))
            )
    return out


BROKEN_LINES = [
    "\tbad: 1",  # a tab cannot indent YAML
    "{unclosed: [1, 2",
    "zz_alias: *undefined",
    "zz: a: b",
    "- a list item inside a mapping",
    "zz: !!python/object/apply:os.system ['touch MARKER']",
    "zz: !!binary not-base64!",
    "%YAML 1.1",
    "zz: [1, 2]]",
    "zz: 'unterminated",
]


def broken_yaml(stem: str, text: str, full: bool = True) -> list[Mutation]:
    lines = text.splitlines()
    out = []
    for i in range(len(lines) + 1):
        for k, bad in enumerate(BROKEN_LINES):
            if k % 3 != i % 3 and k > 4:  # the rarer forms at every third line only
                continue
            if not full and k % 2 != i % 2:
                continue
            mutated = "\n".join([*lines[:i], bad, *lines[i:]]) + "\n"
            out.append(
                Mutation("broken YAML", f"{stem}: line {i + 1}: {bad[:20]!r}", mutated.encode())
            )
    return out


def encodings(stem: str, text: str, rng: random.Random) -> list[Mutation]:
    named = text.replace("name: ", "name: caf\u00e9-", 1)
    raw = text.encode()
    out = [
        Mutation("encoding", f"{stem}: UTF-16 LE with BOM", codecs.BOM_UTF16_LE + text.encode("utf-16-le")),
        Mutation("encoding", f"{stem}: UTF-16 BE", text.encode("utf-16-be")),
        Mutation("encoding", f"{stem}: UTF-32", text.encode("utf-32")),
        Mutation("encoding", f"{stem}: Latin-1", named.encode("latin-1")),
        Mutation("encoding", f"{stem}: gzip", gzip.compress(raw, mtime=0)),
        Mutation("encoding", f"{stem}: trailing 0xff", raw + b"\xff"),
        Mutation("encoding", f"{stem}: overlong UTF-8", raw.replace(b"name: ", b"name: \xc0\xaf", 1)),
        Mutation("encoding", f"{stem}: UTF-8 surrogate", raw.replace(b"name: ", b"name: \xed\xa0\x80", 1)),
        Mutation("encoding", f"{stem}: bell character", raw.replace(b"name: ", b"name: \x07", 1)),
        Mutation("encoding", f"{stem}: escape character", raw.replace(b"name: ", b"name: \x1b[2J", 1)),
        Mutation("encoding", f"{stem}: too large", raw + b"#" * (1024 * 1024)),
    ]  # fmt: skip
    for _ in range(6):  # a NUL byte somewhere
        pos = rng.randrange(len(raw) + 1)
        out.append(Mutation("encoding", f"{stem}: NUL at {pos}", raw[:pos] + b"\0" + raw[pos:]))
    return out


def overrides(stem: str, text: str) -> list[Mutation]:
    bad = [
        "epochs", "=1", "epochs=abc", "epochs=-1", "epochs=.nan", "epochs=1e400", "epochs=2.5",
        "nonexistent=1", "optimizer.lr=[", "optimizer.lr=.inf", "optimizer.lr={a: 1}",
        "data=5", "data.x.num=1", "model.basis=[]", "loss=mae", "device=tpu", "dtype=float16",
        "seed=-1", "optimizer.name=Nope", "scheduler.name=Nope", "snapshots=0", "name=",
        "name=[1]", "data.target=__import__('os')", "a.b.c.d.e=1", "epochs: 5", "1epochs=5",
        "epochs=*a", "epochs=&a", "epochs=!!python/name:os.system", "data.x=[1, 2]",
        "model.params.zz=1", "optimizer.lr=1\tx: [",
    ]  # fmt: skip
    return [Mutation("override", f"{stem}: {o!r}", text.encode(), overrides=[o]) for o in bad]


def bombs() -> list[Mutation]:
    out = []
    for width in (2, 3, 5, 9):
        for depth in range(4, 24, 2):
            if width**depth < 2e5:
                continue
            lines = [f"l0: &a0 [{', '.join(['x'] * width)}]"]
            for d in range(1, depth):
                lines.append(f"l{d}: &a{d} [{', '.join([f'*a{d - 1}'] * width)}]")
            body = "\n".join(lines) + "\n"
            out.append(Mutation("alias bomb", f"{width}^{depth} as unknown keys", body.encode()))
            inner = "\n".join("  " + ln for ln in lines)
            out.append(
                Mutation(
                    "alias bomb", f"{width}^{depth} under model", f"model:\n{inner}\n".encode()
                )
            )
    for d in range(2, 12):  # merge-key bombs
        lines = ["m0: &m0 {a: 1, b: 2}"]
        for k in range(1, d * 3):
            lines.append(
                f"m{k}: &m{k} {{<<: [*m{k - 1}], k{k}: [*m{k - 1}, *m{k - 1}, *m{k - 1}]}}"
            )
        out.append(
            Mutation("alias bomb", f"merge keys x{d * 3}", ("\n".join(lines) + "\n").encode())
        )
    out.append(Mutation("alias bomb", "self-reference", b"name: &a [*a]\n"))
    out.append(Mutation("alias bomb", "anchor loop", b"data: &d {x: *d}\n"))
    return out  # fmt: skip


def nesting() -> list[Mutation]:
    out = []
    for depth in (5, 20, 49, 51, 100, 1000, 10000, 100000):
        out.append(
            Mutation(
                "deep nesting",
                f"flow lists {depth}",
                ("name: " + "[" * depth + "]" * depth + "\n").encode(),
            )
        )
        out.append(
            Mutation(
                "deep nesting",
                f"flow maps {depth}",
                ("data: " + "{a: " * depth + "1" + "}" * depth + "\n").encode(),
            )
        )
        if depth <= 1000:
            block = "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "1\n"
            out.append(
                Mutation(
                    "deep nesting",
                    f"block maps {depth}",
                    ("model:\n" + "".join("  " + ln + "\n" for ln in block.splitlines())).encode(),
                )
            )
        out.append(
            Mutation("deep nesting", f"unclosed {depth}", ("name: " + "[" * depth + "\n").encode())
        )
    return out  # fmt: skip


def binaries(rng: random.Random, n: int) -> list[Mutation]:
    out = [
        Mutation("binary", "PNG header", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
        Mutation("binary", "ELF header", b"\x7fELF\x02\x01\x01" + b"\0" * 64),
        Mutation("binary", "pickle", b"\x80\x04\x95\x1c\x00cos\nsystem\n\x94."),
        Mutation("binary", "empty file", b""),
        Mutation("binary", "only a comment", b"# nothing here\n"),
        Mutation("binary", "only whitespace", b"  \n\n   \n"),
        Mutation("binary", "only a BOM", b"\xef\xbb\xbf"),
        Mutation("binary", "document end only", b"---\n...\n"),
        Mutation("binary", "two documents", b"name: a\n---\nname: b\n"),
    ]
    for k in range(n):
        size = rng.choice([1, 7, 100, 4096])
        out.append(Mutation("binary", f"random {size} bytes #{k}", rng.randbytes(size)))
    return out


def specials() -> list[Mutation]:
    return [
        Mutation("path", "a directory", special="directory"),
        Mutation("path", "a missing file", special="missing"),
        Mutation("path", "a missing folder", special="missing-folder"),
        Mutation("path", "/dev/null", special="dev-null"),
        Mutation("path", "a FIFO", special="fifo"),
        Mutation("path", "a symlink loop", special="symlink-loop"),
        Mutation("path", "a file with a trailing slash", special="trailing-slash"),
        Mutation("path", "an empty path", special="empty"),
    ]


def materialise(m: Mutation, where: Path, index: int) -> str:
    """Write the mutation's file under `where`; the config path to give fitcli."""
    path = where / f"m{index}.yaml"
    if m.content is not None:
        path.write_bytes(m.content)
        return str(path)
    if m.special == "directory":
        path.mkdir()
    elif m.special == "missing-folder":
        return str(where / "no-such-folder" / "c.yaml")
    elif m.special == "dev-null":
        return os.devnull
    elif m.special == "fifo":
        os.mkfifo(path)
    elif m.special == "symlink-loop":
        path.symlink_to(path)
    elif m.special == "trailing-slash":
        path.write_text("name: x\n")
        return str(path) + "/"
    elif m.special == "empty":
        return ""
    return str(path)


def workspace(tmp: Path) -> Path:
    """A folder holding the shipped data file where relative data paths expect it."""
    where = tmp / "cfgs"
    where.mkdir()
    shutil.copytree(CONFIGS / "data", where / "data")
    return where


def run_all(runner, tmp: Path, cases: list[Mutation]) -> tuple[Counter, list[str]]:
    from fitcli.cli import app

    where = workspace(tmp)
    out = tmp / "runs"
    counts: Counter = Counter()
    failures: list[str] = []
    for i, m in enumerate(cases):
        config = materialise(m, where, i)
        args = ["train", config, *m.overrides, "--out", str(out), "--progress", "none"]
        result = runner.invoke(app, args)
        text = result.output
        ok = (
            result.exit_code == 2
            and text.startswith("error: ")
            and "Traceback" not in text
            and not out.exists()
        )
        if not ok:
            failures.append(f"[{m.kind}] {m.name}: exit {result.exit_code}: {text[:300]!r}")
            if out.exists():
                shutil.rmtree(out)
        counts[m.kind] += 1
    return counts, failures


def test_at_least_a_thousand_broken_configs_all_exit_2(runner, tmp_path):
    cases = mutations(full=SCALE > 1, random_files=24 * SCALE)
    for seed in range(1, SCALE):
        cases += binaries(random.Random(seed), 24 * SCALE)
    assert len(cases) >= 1000
    counts, failures = run_all(runner, tmp_path, cases)
    print(f"\n{len(cases)} mutated configs: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures[:40])


def test_mutations_are_deterministic():
    a, b = mutations(), mutations()
    assert [(m.name, m.content, m.overrides) for m in a] == [
        (m.name, m.content, m.overrides) for m in b
    ]
    assert len({m.name for m in a}) > 0.9 * len(a)


def test_the_harness_accepts_the_unmutated_configs(runner, tmp_path):
    """The suite can tell valid from invalid: the shipped configs themselves pass `check`."""
    where = workspace(tmp_path)
    for src in SHIPPED:
        path = where / src.name
        path.write_bytes(src.read_bytes())
        result = runner.invoke(app, ["check", str(path)])
        assert result.exit_code == 0, result.output


def test_some_broken_configs_through_the_real_process(tmp_path):
    picks = {"binary", "path", "alias bomb", "broken YAML", "wrong value", "deep nesting"}
    chosen: dict[str, Mutation] = {}
    for m in mutations():
        if m.kind in picks and m.kind not in chosen and m.special != "fifo":
            chosen[m.kind] = m
    where = workspace(tmp_path)
    out = tmp_path / "runs"
    for i, m in enumerate(chosen.values()):
        config = materialise(m, where, i)
        proc = fitcli_process("train", config, "--out", str(out), "--progress", "none")
        assert proc.returncode == 2, (m.name, proc.stderr)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, m.name
        assert not out.exists()
