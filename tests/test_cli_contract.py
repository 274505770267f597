"""The command line as a contract: lines it prints run as they are, JSON keeps YAML types, help
shows what the source says, shell completion knows the config's keys, messages name the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from conftest import CONFIGS, ROOT, fitcli_process
from typer.testing import CliRunner

from fitcli.cli import app

runner = CliRunner()
SEED = CONFIGS / "seed.yaml"
TINY = ["epochs=5", "snapshots=2", "data.x.num=30"]


def argv_of(line: str) -> list[str]:
    """The argv bash builds from `line`, run as it is (printf prints each argument)."""
    out = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + line], capture_output=True, check=True
    ).stdout
    return out.decode().split("\0")[:-1]


def test_dry_run_prints_lines_bash_runs_as_they_are(tmp_path):
    folder = tmp_path / "my configs"
    folder.mkdir()
    cfg = folder / "seed.yaml"
    cfg.write_bytes(SEED.read_bytes())
    name = 'name="sine, v2"'
    res = runner.invoke(
        app, ["sweep", str(cfg), name, "model.basis=[x, sin(x)],[x, x**2]", "seed=0,1", "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    expected = [
        ["fitcli", "train", str(cfg), name, f"model.basis={basis}", f"seed={seed}"]
        for basis in ("[x, sin(x)]", "[x, x**2]")
        for seed in (0, 1)
    ]
    assert [argv_of(line) for line in lines] == expected


def test_sweep_json_values_keep_their_yaml_types(tmp_path):
    res = runner.invoke(
        app,
        ["sweep", str(SEED), *TINY, "optimizer.lr=1e-3,0.01", "seed=range(0, 2)", "--json",
         "--progress", "none", "-o", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    runs = json.loads(res.stdout)["runs"]
    assert [r["values"] for r in runs] == [
        {"optimizer.lr": 0.001, "seed": 0},
        {"optimizer.lr": 0.001, "seed": 1},
        {"optimizer.lr": 0.01, "seed": 0},
        {"optimizer.lr": 0.01, "seed": 1},
    ]
    for r in runs:  # the same value, and type, as the run's own resolved config
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert type(r["values"]["optimizer.lr"]) is type(cfg["optimizer"]["lr"]) is float
        assert r["values"] == {"optimizer.lr": cfg["optimizer"]["lr"], "seed": cfg["seed"]}


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


def _squash(text: str) -> str:
    """Text without white space or the help panels' borders, which wrap it differently."""
    return re.sub(r"[\s\u2500-\u257f]+", "", text)


def _as_written(help_text: str) -> str:
    """What a help text says: its markup escapes (`\\[`) removed, nothing else."""
    return help_text.replace("\\[", "[")


GROUP = typer.main.get_command(app)


@pytest.mark.parametrize("name", ["", *GROUP.commands], ids=lambda n: n or "fitcli")
def test_help_shows_every_help_text_as_written(name):
    path, cmd = ([name], GROUP.commands[name]) if name else ([], GROUP)
    res = runner.invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    shown = _squash(res.stdout)
    texts = [cmd.help] + [p.help for p in cmd.params if getattr(p, "help", None)]
    assert cmd.help, f"{path} has no help"
    for text in texts:
        assert _squash(_as_written(text)) in shown, f"--help of {path} does not show: {text}"


def test_sweep_help_shows_brackets_literally():
    res = runner.invoke(app, ["sweep", "--help"])
    assert _squash("model.basis=[x, sin(x)]") in _squash(res.stdout)


@pytest.mark.parametrize("example", ["model.basis=[x, sin(x)]", "'name=\"sine, v2\"'"])
def test_the_one_value_examples_in_help_and_readme_are_accepted(example):
    assert _squash(example) in _squash(runner.invoke(app, ["sweep", "--help"]).stdout)
    assert example in (ROOT / "README.md").read_text()
    value = example.strip("'")
    res = runner.invoke(app, ["sweep", str(SEED), value, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert len(res.stdout.splitlines()) == 1  # one value, one run
    res = runner.invoke(app, ["check", str(SEED), value])
    assert res.exit_code == 0, res.output


# --------------------------------------------------------------------------------------------
# Shell completion
# --------------------------------------------------------------------------------------------


def test_completion_options_are_offered():
    helped = fitcli_process("--help").stdout
    assert "--install-completion" in helped and "--show-completion" in helped


@pytest.fixture
def bash_complete(tmp_path):
    """complete(words) -> what bash offers for the last word, through fitcli's own completion
    script (`fitcli --show-completion bash`) with a `fitcli` on PATH that runs this code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "fitcli"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m fitcli.cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("COLUMNS", None)
    # From bash, which --show-completion detects as the shell it is asked from.
    shown = subprocess.run(
        ["bash", "--norc", "-c", "fitcli --show-completion; true"],
        env=env,
        capture_output=True,
        text=True,
    )
    script = shown.stdout
    assert "complete -o default -F _fitcli_completion fitcli" in script, shown.stderr
    assert "_FITCLI_COMPLETE=complete_bash" in script

    def complete(*words: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        array = " ".join(f"'{w}'" for w in ("fitcli", *words))
        program = (
            f"{script}\nCOMP_WORDS=({array}); COMP_CWORD={len(words)}\n"
            "_fitcli_completion fitcli\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
        )
        return subprocess.run(
            ["bash", "--norc", "--noprofile", "-c", program],
            env={**env, **(extra_env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return complete


def _offers(res: subprocess.CompletedProcess) -> list[str]:
    assert res.returncode == 0, res.stderr
    return [ln for ln in res.stdout.splitlines() if ln]


def test_completion_offers_the_config_files_keys(bash_complete):
    assert _offers(bash_complete("train", "configs/seed.yaml", "optimizer.l")) == ["optimizer.lr="]
    assert _offers(bash_complete("sweep", "configs/seed.yaml", "optimizer.l")) == ["optimizer.lr="]
    # From the schema, whether or not the file sets them.
    grid = json.loads(fitcli_process("schema").stdout)["$defs"]["GridSpec"]["properties"]
    offered = _offers(bash_complete("check", "configs/seed.yaml", "data.x."))
    assert sorted(offered) == sorted(f"data.x.{k}=" for k in grid)
    assert "epochs=" in _offers(bash_complete("train", "configs/seed.yaml", "ep"))


def test_completion_offers_an_expression_configs_parameters(bash_complete, tmp_path):
    cfg = tmp_path / "expr.yaml"
    cfg.write_text(
        "data: {target: 2*exp(-x/3), x: {start: 0, stop: 5, num: 20}}\n"
        "model: {expr: amp*exp(-x/tau), params: {amp: 1, tau: {value: 2, min: 0}}}\n"
    )
    offered = _offers(bash_complete("train", str(cfg), "model.params.t"))
    assert "model.params.tau=" in offered and "model.params.tau.min=" in offered
    assert all(o.startswith("model.params.tau") for o in offered)


def test_completion_does_not_import_torch(bash_complete):
    res = bash_complete(
        "train", "configs/seed.yaml", "optimizer.l", extra_env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert res.returncode == 0 and res.stdout.split() == ["optimizer.lr="], res.stderr
    imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if "|" in ln}
    assert "fitcli.config" in imported  # the import log is there
    assert not any(m == "torch" or m.startswith("torch.") for m in imported)


# --------------------------------------------------------------------------------------------
# Messages that name the fix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,what", [("e", "Euler's number"), ("pi", "the constant pi")], ids=["e", "pi"]
)
def test_a_parameter_named_like_a_constant_is_explained(write_config, name, what):
    cfg = write_config(
        {
            "model": {
                "expr": f"a*sin(x) + {name}",
                "params": {"a": 1.0, name: 0.5},
            }
        }
    )
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2
    text = " ".join(res.stderr.split())
    assert f"model.params.{name}: {name!r} is {what}" in text
    assert "in expressions, not a parameter" in text
    assert f"e.g. {name}_ or {name}1" in text  # names to use instead
    assert "Traceback" not in res.output


def test_a_parameter_named_like_a_function_is_explained(write_config):
    cfg = write_config({"model": {"expr": "a*erf(x) + c", "params": {"a": 1.0, "erf": 0.5}}})
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2
    text = " ".join(res.stderr.split())
    assert "model.params.erf: 'erf' is a function in expressions (erf(u): error function)" in text
    assert "not a parameter; name the parameter otherwise, e.g. erf_ or erf1" in text
    cfg = write_config({"model": {"expr": "a*x + erf"}})  # used as a name in the expression
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "'erf' is taken: name the parameter otherwise, e.g. erf_ or erf1" in res.stderr


def test_unknown_optimizer_suggests_levenberg_marquardt(write_config):
    cfg = write_config()
    res = runner.invoke(app, ["check", str(cfg), "optimizer.name=LevenbergMarquard"])
    assert res.exit_code == 2
    text = " ".join(res.stderr.split())
    assert "did you mean 'LevenbergMarquardt'?" in text
    valid = re.search(r"\(valid: ([^)]*)\)", text).group(1).split(", ")
    assert {"LevenbergMarquardt", "LM", "SGD", "Adam", "LBFGS"} <= set(valid)


# --------------------------------------------------------------------------------------------
# fitcli runs in a pipe
# --------------------------------------------------------------------------------------------


def test_runs_table_prints_whole_values_without_a_terminal(tmp_path, write_config):
    basis = ["x", "sin(x)", "cos(x)", "sin(2*x)", "cos(2*x)", "sin(3*x)", "cos(3*x)", "x**2"]
    cfg = write_config({"model.basis": basis, "epochs": 3, "snapshots": 2, "data.x.num": 30})
    deep = tmp_path / "a-rather-long-folder-name-for-the-runs" / "and-another-level-below-it"
    res = runner.invoke(app, ["train", str(cfg), "--out", str(deep), "--progress", "none"])
    assert res.exit_code == 0, res.output
    (run,) = deep.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    params = ", ".join(f"{k}={v:.6g}" for k, v in summary["params"].items())
    assert len(params) > 80 and len(str(run)) > 80
    res = fitcli_process("runs", str(deep), env={"COLUMNS": "80"})  # stdout is a pipe, not a tty
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if str(run) in ln]
    assert params in line


# --------------------------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------------------------


def test_an_existing_run_dir_is_a_usage_error(write_config, tmp_path):
    cfg = write_config({"epochs": 3, "snapshots": 2})
    target = tmp_path / "run"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["train", str(cfg), "--run-dir", str(target), "--progress", "none"])
    assert res.exit_code == 2
    assert "already exists; pass --overwrite" in res.stderr
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
