"""Nothing a shared file can do hurts you: text from configs and run directories cannot drive the
terminal, and resume never mixes data sets, loses snapshots or trains on a tampered state."""

from __future__ import annotations

import json
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml
from conftest import SMALL
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fitcli import console
from fitcli.cli import app
from fitcli.config import load_config
from fitcli.experiment import execute
from fitcli.prepare import prepare
from fitcli.rundir import files as store
from fitcli.rundir import state

runner = CliRunner()

# Clear the screen, retitle the window, write the clipboard (OSC 52), a single-byte CSI, a
# carriage return that overwrites the line, a bidi override, and rich markup.
HOSTILE = "a\x1b[2J\x1b]0;pwned\x07\x1b]52;c;SGVsbG8=\x07\x9b31m\rb\u202ec[bold]d[/][link=file:x]e"
UNSAFE = ("Cc", "Cf", "Zl", "Zp", "Cs")


def unsafe_chars(text: str, allow: str = "") -> set[str]:
    return {c for c in text if unicodedata.category(c) in UNSAFE and c not in allow}


_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def unescape(text: str) -> str:
    """A reference decoder of the escapes: `\\\\`, `\\xHH`, `\\uHHHH`, `\\UHHHHHHHH`."""
    return _ESCAPE.sub(lambda m: "\\" if m[1] == "\\" else chr(int(m[1][1:], 16)), text)


def cli(*args: str):
    return runner.invoke(app, list(args))


def config(tmp_path: Path, filename: str = "c.yaml", **changes) -> Path:
    cfg = json.loads(json.dumps(SMALL))
    cfg.update(changes)
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Terminal escapes
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["", "\n"]))
def test_printable_leaves_no_control_character_and_can_be_read_back(text, allow):
    shown = console.printable(text, allow=allow)
    assert not unsafe_chars(shown, allow)
    assert unescape(shown) == text
    if not unsafe_chars(text, allow) and "\\" not in text:
        assert shown == text  # ordinary text is shown as it is


def test_printable_names_each_character():
    assert console.printable("\x1b[2J\x07") == "\\x1b[2J\\x07"
    assert console.printable("\x85\u2028\u202e") == "\\x85\\u2028\\u202e"
    assert console.printable("a\nb\tc") == "a\\x0ab\\x09c"
    assert console.printable("a\nb", allow="\n") == "a\nb"
    assert console.printable("C:\\Users\\x1b") == "C:\\Users\\\\x1b"  # only \x1b doubled


def test_error_messages_show_escapes_and_markup_literally(tmp_path):
    cfg = config(tmp_path, data={"file": f"{HOSTILE}.csv"})
    result = cli("check", str(cfg))
    assert result.exit_code == 2
    assert not unsafe_chars(result.output, "\n"), repr(result.output)
    assert console.printable(HOSTILE) in result.output  # markup included, literally


def test_unknown_optimizer_key_is_named_escaped(tmp_path):
    cfg = config(tmp_path, optimizer={"name": "SGD", "lr": 0.1, f"mo{HOSTILE}": 1})
    result = cli("train", str(cfg), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert not unsafe_chars(result.output, "\n"), repr(result.output)
    assert console.printable(f"mo{HOSTILE}") in result.output


def test_check_prints_valid_yaml_without_raw_control_characters(tmp_path):
    name = "pts\x1b]0;pwned\x07\x9b2J.csv"
    (tmp_path / name).write_text("x,y\n" + "".join(f"{i},{2 * i + 1}\n" for i in range(20)))
    cfg = config(tmp_path, data={"file": name})
    result = cli("check", str(cfg))
    assert result.exit_code == 0, result.output
    assert not unsafe_chars(result.output, "\n"), repr(result.output)
    assert yaml.safe_load(result.stdout)["data"]["file"] == str(tmp_path / name)


MARKUP = "[bold]n[/][link=file:x]m[/link][red]"


def test_training_progress_and_summary_show_the_name_literally(tmp_path):
    """A run's name cannot hold control characters (the config refuses them), but rich markup
    in it must not style the progress bar or the summary table."""
    cfg = config(tmp_path, name=MARKUP, epochs=4, snapshots=1)
    for mode in ("plain", "rich"):
        result = cli("train", str(cfg), "--out", str(tmp_path / mode), "--progress", mode)
        assert result.exit_code == 0, result.output
        assert result.output.count(MARKUP) == (3 if mode == "plain" else 2), result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One small interrupted run (saved at epoch 20 of 40), copied by the tests that tamper."""
    tmp = tmp_path_factory.mktemp("trained")
    run = tmp / "run"
    run.mkdir()
    prep = prepare(load_config(config(tmp)))
    execute(prep, run, command=["fitcli", "test"], on_epoch=lambda epoch, loss: epoch >= 20)
    return run


def copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def edit_summary(run: Path, **changes) -> None:
    doc = json.loads((run / "summary.json").read_text())
    doc.update(changes)
    (run / "summary.json").write_text(json.dumps(doc))


def test_runs_table_shows_names_and_paths_escaped(tmp_path, trained, monkeypatch):
    monkeypatch.setattr(console.stdout, "_width", 1000)  # one line per run
    run = copy_run(trained, tmp_path / "runs" / "one")
    edit_summary(run, name=HOSTILE)
    bad = tmp_path / "runs" / f"bad{HOSTILE.replace('/', '|')}"
    bad.mkdir()
    (bad / "summary.json").write_text("{")
    result = cli("runs", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert not unsafe_chars(result.output, "\n"), repr(result.output)
    assert console.printable(HOSTILE) in result.stdout.replace("\n", "")
    assert f"skipped {console.printable(str(bad))}: " in result.stderr
    out = cli("runs", str(tmp_path / "runs"), "--format", "json")
    assert json.loads(out.stdout)[0]["name"] == HOSTILE  # --json stays exact JSON


# ---------------------------------------------------------------------------------------------
# The command line recorded in config.yaml and sweep.yaml
# ---------------------------------------------------------------------------------------------

BREAKS = "o\rname: injected\x85epochs: 1\u2028seed: 9\u2029x"


def test_command_line_with_line_breaks_keeps_config_yaml_rerunnable(tmp_path, monkeypatch):
    cfg = config(tmp_path, epochs=4, snapshots=1)
    out = tmp_path / BREAKS
    monkeypatch.setattr(sys, "argv", ["fitcli", "train", str(cfg), "--out", str(out)])
    result = cli("train", str(cfg), "--out", str(out), "--progress", "none")
    assert result.exit_code == 0, result.output
    (run,) = out.iterdir()
    text = (run / "config.yaml").read_text()
    (comment,) = [ln for ln in text.splitlines() if ln.startswith("# command:")]
    assert unescape(comment.removeprefix("# command: ")).endswith(str(out))
    rerun = load_config(run / "config.yaml")  # reads back: no line of it was injected
    assert (rerun.name, rerun.epochs, rerun.seed) == ("small", 4, 0)


def test_command_line_with_line_breaks_keeps_sweep_yaml_resumable(tmp_path, monkeypatch):
    cfg = config(tmp_path, epochs=4, snapshots=1)
    out = tmp_path / BREAKS
    argv = ["fitcli", "sweep", str(cfg), "seed=0,1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    result = cli(*argv[1:], "--progress", "none")
    assert result.exit_code == 0, result.output
    (sweep_dir,) = out.iterdir()
    text = (sweep_dir / "sweep.yaml").read_text()
    (comment,) = [ln for ln in text.splitlines() if ln.startswith("# command:")]
    run_dir = next(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file())
    run_comment = next(
        ln for ln in (run_dir / "config.yaml").read_text().splitlines() if ln.startswith("# com")
    )
    assert not unsafe_chars(comment) and not unsafe_chars(run_comment)
    result = cli("sweep", "--resume", str(sweep_dir), "--progress", "none")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# Resume integrity: the data
# ---------------------------------------------------------------------------------------------


def file_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run on a data file with a sigma column, stopped at epoch 5."""
    data = tmp_path / "points.csv"
    data.write_text("x,y,s\n" + "".join(f"{i},{2 * i + 1},{1 + i % 3}\n" for i in range(30)))
    cfg = config(tmp_path, data={"file": str(data), "columns": {"sigma": "s"}})
    run = tmp_path / "run"
    run.mkdir()
    execute(prepare(load_config(cfg)), run, command=["t"], on_epoch=lambda e, loss: e >= 5)
    return data, run


def test_resume_refuses_a_data_file_whose_sigma_column_changed(tmp_path):
    data, run = file_run(tmp_path)
    before = tree(run)
    data.write_text(data.read_text().replace("\n3,7,1\n", "\n3,7,2\n"))
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 2, result.output
    assert "changed since the run started" in result.output  # refused by its digest
    assert tree(run) == before


def test_resume_refuses_a_data_file_changed_in_any_byte(tmp_path):
    data, run = file_run(tmp_path)
    assert json.loads((run / "summary.json").read_text())["data_digest"].startswith("sha256:")
    data.write_text(data.read_text() + "# a note added later\n")
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 2, result.output
    assert f"{data} changed since the run started" in result.output


def test_run_without_a_recorded_digest_resumes_by_comparing_columns(tmp_path):
    data, run = file_run(tmp_path)
    doc = json.loads((run / "summary.json").read_text())
    del doc["data_digest"]  # as an older fitcli wrote it
    (run / "summary.json").write_text(json.dumps(doc))
    saved = data.read_text()
    data.write_text(saved.replace("\n3,7,1\n", "\n3,7,2\n"))
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 2 and "the data differ" in result.output, result.output
    data.write_text(saved)
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# Resume integrity: snapshots and state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garble",
    [
        lambda text: text[: len(text) // 2],
        lambda text: "",
        lambda text: json.dumps({"names": ["a"], "snapshots": [{"epoch": "x"}]}),
        lambda text: json.dumps({"names": ["a"], "snapshots": {}}),
    ],
)
def test_garbled_snapshot_list_is_refused_and_nothing_is_deleted(tmp_path, trained, garble):
    run = copy_run(trained, tmp_path / "run")
    params = run / "snapshots" / "params.json"
    params.write_text(garble(params.read_text()))
    before = tree(run)
    assert any(name.startswith("snapshots/epoch-") for name in before)
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 2, result.output
    assert str(params) in result.output
    assert tree(run) == before


def _stepper_state(doc: dict) -> dict:
    return doc["stepper"]["optimizer"]


TAMPER = {
    "huge-int-loss": (
        lambda d: d["history"]["losses"].__setitem__(0, int("9" * 400)),
        "history.losses[0]",
    ),
    "huge-int-epoch": (lambda d: d.__setitem__("epoch", int("9" * 400)), "epoch"),
    "history-row-width": (
        lambda d: d["history"]["params"].__setitem__(3, d["history"]["params"][3][:2]),
        "history.params[3]",
    ),
    "raw-huge-shape": (
        lambda d: d.__setitem__("raw", {"__tensor__": "float64", "shape": [0, 10**30], "data": []}),
        "raw.shape",
    ),
    "momentum-huge-shape": (
        lambda d: _stepper_state(d)["state"]["__dict__"][0][1].__setitem__(
            "momentum_buffer", {"__tensor__": "float64", "shape": [0, 10**30], "data": []}
        ),
        "stepper.optimizer.state[0].momentum_buffer.shape",
    ),
    "momentum-wrong-size": (
        lambda d: _stepper_state(d)["state"]["__dict__"][0][1].__setitem__(
            "momentum_buffer", {"__tensor__": "float64", "shape": [2], "data": [1.0, 2.0]}
        ),
        "stepper.optimizer.state[0].momentum_buffer",
    ),
    "lr-text": (
        lambda d: _stepper_state(d)["param_groups"][0].__setitem__("lr", "abc"),
        "stepper.optimizer.param_groups[0].lr",
    ),
    "momentum-missing": (
        lambda d: _stepper_state(d)["param_groups"][0].pop("momentum"),
        "stepper.optimizer.param_groups[0]",
    ),
    "generator-short": (
        lambda d: d["stepper"].__setitem__(
            "generator", {"__tensor__": "uint8", "shape": [2], "hex": "0102"}
        ),
        "stepper.generator",
    ),
    "history-text": (
        lambda d: d["history"]["lrs"].__setitem__(2, "fast"),
        "history.lrs[2]",
    ),
}


@pytest.fixture(scope="module")
def momentum_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("momentum")
    run = tmp / "run"
    run.mkdir()
    cfg = config(tmp, optimizer={"name": "SGD", "lr": 0.01, "momentum": 0.9})
    execute(prepare(load_config(cfg)), run, command=["t"], on_epoch=lambda e, loss: e >= 20)
    return run


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_state_is_refused_naming_the_field_before_anything_runs(
    tmp_path, momentum_run, case
):
    tamper, field = TAMPER[case]
    run = copy_run(momentum_run, tmp_path / "run")
    doc = json.loads((run / state.STATE_FILE).read_text())
    tamper(doc)
    (run / state.STATE_FILE).write_text(json.dumps(doc))
    before = tree(run)
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"{field}:" in lines[0] or f"{field} " in lines[0], lines[0]
    assert len(lines[0]) < 400
    assert tree(run) == before


def test_the_untampered_state_resumes(tmp_path, momentum_run):
    """The control of the test above: the same copy, untouched, resumes to the end."""
    run = copy_run(momentum_run, tmp_path / "run")
    result = cli("train", "--resume", str(run), "--progress", "none")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# Bad summaries: fitcli runs and fitcli sweep --resume
# ---------------------------------------------------------------------------------------------

BAD_SUMMARIES = {
    "final_loss-text": ({"final_loss": "abc"}, "final_loss"),
    "final_loss-nan": ({"final_loss": float("nan")}, "final_loss"),
    "params-list": ({"params": [1, 2]}, "params"),
    "param-text": ({"params": {"a": "x"}}, "params.a"),
    "epochs-text": ({"epochs_run": "many"}, "epochs_run"),
    "time-list": ({"elapsed_s": [1]}, "elapsed_s"),
    "name-number": ({"name": 5}, "name"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUMMARIES))
@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_runs_skips_a_bad_summary_with_the_reason(tmp_path, trained, case, fmt, monkeypatch):
    monkeypatch.setattr(console.stdout, "_width", 1000)  # one line per run
    changes, field = BAD_SUMMARIES[case]
    copy_run(trained, tmp_path / "runs" / "good")
    bad = copy_run(trained, tmp_path / "runs" / "bad")
    edit_summary(bad, **changes)
    result = cli("runs", str(tmp_path / "runs"), "--format", fmt)
    assert result.exit_code == 0, result.output
    assert f"skipped {bad}: " in result.stderr and field in result.stderr, result.stderr
    assert "good" in result.stdout and str(bad) not in result.stdout


def test_sweep_resume_reruns_a_run_with_a_garbled_summary(tmp_path):
    cfg = config(tmp_path, epochs=4, snapshots=1)
    result = cli(
        "sweep", str(cfg), "seed=0,1,2", "--out", str(tmp_path / "s"), "--progress", "none"
    )
    assert result.exit_code == 0, result.output
    (sweep_dir,) = (tmp_path / "s").iterdir()
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").is_file())
    good = json.loads((runs[1] / "summary.json").read_text())
    edit_summary(runs[1], final_loss="abc", params=[1])
    (runs[2] / "summary.json").write_text("[1, 2]")
    untouched = (runs[0] / "summary.json").stat().st_mtime_ns
    result = cli("sweep", "--resume", str(sweep_dir), "--json", "--progress", "none")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["completed"] == 3
    again = json.loads((runs[1] / "summary.json").read_text())
    assert again["final_loss"] == good["final_loss"] and again["params"] == good["params"]
    assert json.loads((runs[2] / "summary.json").read_text())["status"] == "completed"
    assert (runs[0] / "summary.json").stat().st_mtime_ns == untouched
    assert store.read_json(runs[1] / "summary.json")["status"] == "completed"
