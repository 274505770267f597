"""Deferring torch._dynamo changes nothing but start-up time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # each test starts Python processes that import torch

SCRIPT = """
import json, sys
from fitcli.config import load_config
from fitcli.prepare import prepare
from fitcli.train import train
out = {}
for name in ["SGD", "Adam", "LBFGS", "RMSprop"]:
    cfg = load_config(sys.argv[1], ["epochs=20", "data.x.num=50", f"optimizer.name={name}",
                                    "scheduler={name: StepLR, step_size: 5}"])
    prep = prepare(cfg)
    train(prep.model, prep.stepper, epochs=20, evaluate_loss=prep.evaluate_loss)
    out[name] = [v.hex() for v in prep.model.values().values()]
out["real_dynamo"] = type(sys.modules.get("torch._dynamo")).__name__ == "module"
print(json.dumps(out))
"""


def run(env_value: str | None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "FITCLI_EAGER_DYNAMO"}
    if env_value:
        env["FITCLI_EAGER_DYNAMO"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(CONFIGS / "seed.yaml")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def test_deferred_dynamo_gives_bit_identical_results():
    deferred, eager = run(None), run("1")
    assert deferred.pop("real_dynamo") is False
    assert eager.pop("real_dynamo") is True
    assert deferred == eager


def test_real_dynamo_loads_on_demand():
    code = (
        "from fitcli.torchboot import import_torch; import sys; torch = import_torch(); "
        "f = torch.func.jacrev(lambda p: (p * p).sum()); f(torch.ones(3)); "
        "print(type(sys.modules['torch._dynamo']).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "module"


def test_module_introspection_does_not_load_dynamo_mid_import():
    """inspect.getmodule probes every module's __file__; that must not import torch._dynamo
    (it did, inside torch.distributed's import, and failed with a circular import)."""
    code = (
        "from fitcli.torchboot import import_torch; import sys; torch = import_torch(); "
        "import torch.testing; torch.testing.assert_close(torch.ones(2), torch.ones(2)); "
        "print(type(sys.modules['torch._dynamo']).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "_DeferredDynamo"


MEANWHILE = """
import json, sys, threading
from fitcli.torchboot import importing_meanwhile
out = {}
with importing_meanwhile():
    out["torch_at_start"] = "torch" in sys.modules and hasattr(sys.modules["torch"], "tensor")
    out["helper"] = [t.name for t in threading.enumerate() if t.name == "fitcli-import-torch"]
    import pandas  # work that needs no torch, meanwhile
out["torch"] = "torch" in sys.modules and hasattr(sys.modules["torch"], "tensor")
out["dynamo"] = type(sys.modules["torch._dynamo"]).__name__
try:
    with importing_meanwhile():  # torch is loaded: nothing to do
        raise KeyError("block error")
except KeyError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""


def test_torch_is_imported_in_a_helper_thread_while_the_block_runs():
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", MEANWHILE], capture_output=True, text=True, check=True
        ).stdout
    )
    assert out["helper"] == ["fitcli-import-torch"] and not out["torch_at_start"]
    assert out["torch"] and out["dynamo"] == "_DeferredDynamo"
    assert out["error"] == "'block error'"


def wells(path, bad: bool = False) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    lines = ["t,y,well"]
    for g in range(6):
        for t in np.linspace(0, 5, 25).tolist():
            lines.append(
                f"{t!r},{float(2 * np.exp(-(0.5 + g / 10) * t) + rng.normal(0, 0.02))!r},w{g}"
            )
    if bad:
        lines[40] = "1.0,abc,w1"
    path.write_text("\n".join(lines) + "\n")


def test_reading_the_data_while_torch_imports_changes_nothing(tmp_path):
    from conftest import fitcli_process

    wells(tmp_path / "w.csv")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {file: w.csv, columns: {x: t, y: y, group: well}}\n"
        "model: {expr: a*exp(-b*x), params: {a: {value: 1, per_group: true}, "
        "b: {value: 1, per_group: true}}}\noptimizer: {name: LM}\n"
    )
    got = {}
    for value in ("1", "0"):
        run = tmp_path / f"run{value}"
        proc = fitcli_process(
            "train", str(cfg), "--run-dir", str(run), "--json", cwd=tmp_path,
            env={"FITCLI_IMPORT_MEANWHILE": value},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        got[value] = ((run / "groups.csv").read_bytes(), json.loads(proc.stdout)["groups"])
    assert got["1"] == got["0"]
    # Bad data still ends the command before anything is written, with the file and line.
    wells(tmp_path / "w.csv", bad=True)
    proc = fitcli_process("train", str(cfg), "--run-dir", str(tmp_path / "bad"), cwd=tmp_path)
    assert proc.returncode == 2 and "line 41" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
