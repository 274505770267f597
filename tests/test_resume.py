"""fitcli train --resume: state.json round trips exactly, and a run stopped anywhere and resumed
ends with exactly the parameters, history and snapshots of the same run uninterrupted."""

from __future__ import annotations

import ast
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL
from hypothesis import given, settings
from hypothesis import strategies as st

from fitcli.cli import app
from fitcli.config import load_config
from fitcli.experiment import execute
from fitcli.prepare import prepare
from fitcli.resume import prepare_resume
from fitcli.rundir import files as store
from fitcli.rundir import state
from fitcli.rundir import state as codec

# Configs that exercise every kind of state: plain SGD; mini-batches (the shuffle generator) with
# Adam and a step scheduler; LBFGS (lists of tensors, Python floats); float32 with bounds, a
# plateau scheduler (infinite `best`) and momentum buffers.
CASES = {
    "sgd": {},
    "adam-minibatch-steplr": {
        "batch_size": 48,
        "optimizer": {"name": "Adam", "lr": 0.05},
        "scheduler": {"name": "StepLR", "step_size": 7, "gamma": 0.7},
    },
    "lbfgs": {"epochs": 12, "optimizer": {"name": "LBFGS", "lr": 0.5, "max_iter": 4}},
    "float32-bounds-plateau": {
        "dtype": "float32",
        "batch_size": 64,
        "model": {
            "expr": "a*sin(x) + b*cos(x/4) + c*x",
            "params": {"a": {"value": 1.0, "min": 0, "max": 3}, "b": 0.5, "c": 0.0},
        },
        "optimizer": {"name": "SGD", "lr": 0.02, "momentum": 0.9},
        "scheduler": {"name": "ReduceLROnPlateau", "patience": 2, "factor": 0.5},
    },
}


def config_file(tmp_path: Path, case: str, **extra) -> Path:
    cfg = json.loads(json.dumps(SMALL))
    cfg.update(json.loads(json.dumps(CASES[case])))
    cfg.update(extra)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(runner, *args: str):
    return runner.invoke(app, [*args, "--progress", "none"])


def train_full(runner, cfg: Path, run: Path) -> None:
    result = cli(runner, "train", str(cfg), "--run-dir", str(run))
    assert result.exit_code == 0, result.output


def train_stopped_at(cfg: Path, run: Path, stop_after: int) -> dict:
    """The run stopped after `stop_after` epochs the way Ctrl-C stops it."""
    prep = prepare(load_config(cfg))
    run.mkdir(parents=True)
    return execute(prep, run, command=["test"], on_epoch=lambda epoch, loss: epoch >= stop_after)


def metrics(run: Path) -> list[dict]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    for r in rows:
        del r["elapsed_s"]  # wall-clock time, the only thing allowed to differ
    return rows


def snapshots(run: Path, exclude: set[int] = frozenset()) -> list[tuple]:
    doc = json.loads((run / "snapshots" / "params.json").read_text())
    out = []
    for s in doc["snapshots"]:
        if s["epoch"] in exclude:
            continue
        fit = (run / "snapshots" / s["fit"]).read_text()
        out.append((s["epoch"], s["loss"], s["params"], s["file"], fit))
    return out


def assert_same_run(resumed: Path, reference: Path, extra_snapshots: set[int] = frozenset()):
    a, b = (json.loads((p / "summary.json").read_text()) for p in (resumed, reference))
    assert a["status"] == b["status"] == "completed"
    assert a["params"] == b["params"]  # exact, not approx
    assert a["final_loss"] == b["final_loss"] and a["epochs_run"] == b["epochs_run"]
    assert metrics(resumed) == metrics(reference)
    assert snapshots(resumed, extra_snapshots) == snapshots(reference)
    pages = {p.name for p in (resumed / "snapshots").iterdir()}
    assert pages == {p.name for p in (reference / "snapshots").iterdir()} | {
        f"epoch-{e:02d}.{ext}" for e in extra_snapshots for ext in ("html", "csv")
    }
    assert not list(resumed.rglob(".*.tmp-*"))


# --------------------------------------------------------------------------------------------
# The state file format
# --------------------------------------------------------------------------------------------


def test_encode_decode_is_exact():
    value = {
        "state": {0: {"step": torch.tensor(7.0), "buf": torch.tensor([[1e-310, -0.0]])}},
        "tuple": (0.9, 0.999),
        "nonfinite": [math.inf, -math.inf],
        "f32": torch.tensor([0.1, math.nan, math.inf], dtype=torch.float32),
        "gen": torch.Generator().manual_seed(3).get_state(),
        "ints": torch.tensor([1, -(2**62)], dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "__tensor__": "a key that looks like a tag",
        "plain": [None, True, 3, "text", 1 / 3],
    }
    text = json.dumps(state.encode(value), allow_nan=False)
    back = state.decode(json.loads(text))
    assert back.keys() == value.keys() and back["tuple"] == (0.9, 0.999)
    assert back["nonfinite"] == [math.inf, -math.inf] and back["plain"] == value["plain"]
    assert back["__tensor__"] == value["__tensor__"]
    for key in ("f32", "gen", "ints", "flags"):
        assert back[key].dtype == value[key].dtype
        assert torch.equal(back[key].nan_to_num(), value[key].nan_to_num())
    assert torch.isnan(back["f32"][1])
    step, buf = back["state"][0]["step"], back["state"][0]["buf"]
    assert step.shape == () and step.dtype == torch.float32 and float(step) == 7.0
    assert buf.shape == (1, 2) and math.copysign(1, float(buf[0, 1])) == -1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=64), max_size=20))
def test_any_float64_round_trips_bit_for_bit(values):
    t = torch.tensor(values, dtype=torch.float64)
    back = state.decode(json.loads(json.dumps(state.encode(t), allow_nan=False)))
    assert back.dtype == torch.float64 and back.tolist() == values
    assert [math.copysign(1, v) for v in back.tolist()] == [math.copysign(1, v) for v in values]


@pytest.mark.parametrize(
    "doc",
    [
        {"__tensor__": "object", "shape": [1], "data": [1]},
        {"__tensor__": "float64", "shape": [2], "data": [1.0]},
        {"__tensor__": "float64", "shape": [1], "data": ["__import__('os')"]},
        {"__tensor__": "int64", "shape": [1], "data": [1.5]},
        {"__tensor__": "uint8", "shape": [1], "hex": "zz"},
        {"__float__": "os.system"},
    ],
)
def test_decode_rejects_anything_but_data(doc):
    with pytest.raises(ValueError):
        state.decode(doc)


def test_state_module_never_unpickles():
    """Loading is json.loads plus tensors built from lists: no unpickler is reachable."""
    tree = ast.parse(Path(codec.__file__).read_text())
    unsafe = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & unsafe
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in unsafe
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("load", "loads") or ast.unparse(node) == "json.loads"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "__import__")


# --------------------------------------------------------------------------------------------
# Resumed runs end exactly where uninterrupted runs end
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_interrupted_then_resumed_equals_uninterrupted(runner, tmp_path, case):
    cfg = config_file(tmp_path, case)
    epochs = load_config(cfg).epochs
    reference = tmp_path / "reference"
    train_full(runner, cfg, reference)
    # Stop at a snapshot epoch, between snapshots, after one epoch, and twice in one run.
    stops = [[epochs // 4], [epochs // 2 + 3], [1, epochs - 1]]
    for k, plan in enumerate(stops):
        run = tmp_path / f"run{k}"
        summary = train_stopped_at(cfg, run, plan[0])
        assert summary["status"] == "interrupted" and summary["epochs_run"] == plan[0]
        for nxt in plan[1:]:
            prep_point = prepare_resume(run, [])
            stopped = execute(
                *prep_point[:1],
                run,
                command=["test"],
                on_epoch=lambda epoch, loss, n=nxt: epoch >= n,
                resume=prep_point[1],
            )
            assert stopped["status"] == "interrupted" and stopped["epochs_run"] == nxt
        result = cli(runner, "train", "--resume", str(run), "--json")
        assert result.exit_code == 0, result.output
        snaps = load_config(cfg).snapshots
        scheduled = {round(i * epochs / snaps) for i in range(snaps + 1)}
        assert_same_run(run, reference, set(plan) - scheduled)
        summary = json.loads((run / "summary.json").read_text())
        assert [r["from_epoch"] for r in summary["resumes"]] == plan


class Killed(BaseException):
    """Stands in for SIGKILL: once raised, nothing more reaches the disk."""


def gone_process() -> dict:
    """The `process` record of a process that has ended, for runs killed in this one."""
    import subprocess

    from fitcli import liveness

    proc = subprocess.Popen(["true"])
    proc.wait()
    return {**liveness.identity(), "pid": proc.pid}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before-write", "mid-write"])
def test_killed_at_every_write_then_resumed_equals_uninterrupted(
    runner, tmp_path, monkeypatch, where
):
    """Stop the process at each file write in turn (before it, or after the temporary file is
    written but before its rename): the directory resumes to the uninterrupted result."""
    cfg = config_file(tmp_path, "adam-minibatch-steplr", epochs=12, snapshots=3)
    reference = tmp_path / "reference"
    train_full(runner, cfg, reference)
    # More than enough write sites (a file may be written more than once: the last snapshot
    # page again with the bands); the loop stops at the first run that completes.
    writes = 2 * len(list(reference.rglob("*"))) + 8
    resumed, completed = 0, False
    from fitcli import liveness

    writer = gone_process()  # the killed runs' writer: gone, as after a real SIGKILL
    for n in range(1, writes):
        run = tmp_path / f"kill{n}"
        calls = {"n": 0}
        real_write, real_replace = store.atomic_write, store.os.replace

        def counted(
            *args, calls=calls, n=n, _real=real_write if where == "before-write" else real_replace
        ):
            calls["n"] += 1
            if calls["n"] >= n:
                raise Killed
            return _real(*args)

        target = "atomic_write" if where == "before-write" else "replace"
        with monkeypatch.context() as m:
            m.setattr(store if target == "atomic_write" else store.os, target, counted)
            m.setattr(liveness, "identity", lambda: writer)
            prep = prepare(load_config(cfg))
            run.mkdir()
            try:
                execute(prep, run, command=["test"])
            except Killed:
                pass
            else:
                completed = True  # n is past the last write
                break
        # Every file under its final name parses.
        for path in run.rglob("*"):
            if path.name.endswith(".json"):
                json.loads(path.read_text())
        if not (run / state.STATE_FILE).exists():
            result = cli(runner, "train", "--resume", str(run))
            assert result.exit_code == 2 and "resume" in result.output, result.output
            continue
        result = cli(runner, "train", "--resume", str(run))
        assert result.exit_code == 0, (n, result.output)
        assert_same_run(run, reference)
        resumed += 1
    assert completed and resumed >= 12, (completed, resumed)


# --------------------------------------------------------------------------------------------
# What resume refuses, and resuming a diverged run with a new learning rate
# --------------------------------------------------------------------------------------------


def test_completed_run_refuses_to_resume(runner, tmp_path):
    cfg = config_file(tmp_path, "sgd")
    run = tmp_path / "done"
    train_full(runner, cfg, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = cli(runner, "train", "--resume", str(run))
    assert result.exit_code == 2
    assert "has already completed (40 epochs); nothing to resume" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_diverged_run_resumes_with_a_new_learning_rate(runner, tmp_path):
    cfg = config_file(tmp_path, "sgd", epochs=400, optimizer={"name": "SGD", "lr": 50.0})
    run = tmp_path / "blew-up"
    result = cli(runner, "train", str(cfg), "--run-dir", str(run))
    assert result.exit_code == 3, result.output
    diverged = json.loads((run / "summary.json").read_text())
    result = cli(runner, "train", "--resume", str(run), "optimizer.lr=0.001", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 400
    assert 0 < summary["resumes"][0]["from_epoch"] == diverged["epochs_run"] < 400
    assert "state starts afresh" in summary["resumes"][0]["notes"][0]
    assert all(math.isfinite(v) for v in summary["params"].values())
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(401))
    assert float(rows[diverged["epochs_run"]]["lr"]) == 0.001
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == 0.001


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["seed=5"], "with a different seed"),
        (["data.noise.std=2"], "with a different data"),
        (["model.basis=[x]"], "with a different model"),
        (["epochs=3"], "beyond epochs=3"),
        (["nonsense=1"], "unknown key 'nonsense'"),
    ],
)
def test_resume_refuses_changes_the_state_does_not_fit(runner, tmp_path, overrides, message):
    cfg = config_file(tmp_path, "sgd")
    run = tmp_path / "run"
    train_stopped_at(cfg, run, 20)
    result = cli(runner, "train", "--resume", str(run), *overrides)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_resume_refuses_what_is_not_a_resumable_run(runner, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    result = cli(runner, "train", "--resume", str(mine))
    assert result.exit_code == 2 and "not a fitcli run directory" in result.output
    result = cli(runner, "train", "--resume", str(tmp_path / "absent"))
    assert result.exit_code == 2 and "does not exist" in result.output
    cfg = config_file(tmp_path, "sgd")
    run = tmp_path / "run"
    train_stopped_at(cfg, run, 10)
    state_file = run / state.STATE_FILE
    good = state_file.read_text()
    for bad in ("{", '{"format": "fitcli-state", "version": 99}', "[]", "\x80\x04K."):
        state_file.write_text(bad)
        result = cli(runner, "train", "--resume", str(run))
        assert result.exit_code == 2 and "cannot read the saved state" in result.output, bad
    state_file.write_text(good.replace('"epoch": 10', '"epoch": 11'))
    result = cli(runner, "train", "--resume", str(run))
    assert result.exit_code == 2 and "does not hold 11 rows" in result.output
    state_file.write_text(good)
    result = cli(runner, "train", "--resume", str(run), "--run-dir", str(tmp_path / "x"))
    assert result.exit_code == 2 and "in place" in result.output


def test_resume_refuses_edited_data_file(runner, tmp_path):
    data = tmp_path / "points.csv"
    data.write_text("x,y\n" + "".join(f"{i},{2 * i + 1}\n" for i in range(30)))
    cfg = json.loads(json.dumps(SMALL))
    cfg["data"] = {"file": str(data)}
    path = tmp_path / "file.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    train_stopped_at(path, run, 5)
    data.write_text(data.read_text().replace("\n3,7\n", "\n3,8\n"))
    result = cli(runner, "train", "--resume", str(run))
    assert result.exit_code == 2 and f"{data} changed since the run started" in result.output


def test_levenberg_marquardt_run_resumes_exactly(runner, tmp_path):
    """Resume is generic over steppers with state_dict/load_state_dict: the LM stepper too."""
    from conftest import CONFIGS

    cfg = CONFIGS / "nist-misra1a.yaml"
    reference = tmp_path / "reference"
    train_full(runner, cfg, reference)
    want = json.loads((reference / "summary.json").read_text())
    for stop in (1, 4):
        run = tmp_path / f"stop{stop}"
        assert train_stopped_at(cfg, run, stop)["status"] == "interrupted"
        result = cli(runner, "train", "--resume", str(run))
        assert result.exit_code == 0, result.output
        got = json.loads((run / "summary.json").read_text())
        assert got["params"] == want["params"] and got["epochs_run"] == want["epochs_run"]
        assert metrics(run) == metrics(reference)
