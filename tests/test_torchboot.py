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
