"""What a process keeps between fits of the same model: the verdicts of `lm.host_ok`, symdiff's
compiled programs and an expression's components. A fit after others must give exactly what
the same fit gives in a fresh process, and models that differ never share an entry."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import fitcli
from fitcli import lm, model, symdiff
from fitcli.lm_optim import NumpyModel

EXPR = "a*exp(-b*x) + c"


def _data(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 8.0, n)
    y = 3.0 * np.exp(-0.6 * x) + 0.4 + 0.02 * rng.normal(size=n)
    return x, y


def _fields(result: fitcli.FitResult) -> dict:
    d = result.to_dict()
    keys = ("params", "stderr", "covariance", "rss", "r2", "status", "reason", "lm_iterations")
    return {k: d.get(k) for k in keys}


def _cold() -> None:
    """Every cache emptied, as in a process that has fitted nothing yet."""
    lm.forget_host_verdicts()
    symdiff._compiled_jacobian.cache_clear()
    model._expression_components.cache_clear()


def _fit(x, y, expr=EXPR, params=None, dtype="float64"):
    params = params or {"a": 1.0, "b": 0.3, "c": 0.0}
    return fitcli.fit(x=x, y=y, expr=expr, params=params, dtype=dtype, device="cpu")


FRESH = """
import json, sys
import numpy as np
import fitcli
x, y = (np.array(v) for v in json.loads(sys.stdin.read()))
r = fitcli.fit(x=x, y=y, expr={expr!r}, params={{"a": 1.0, "b": 0.3, "c": 0.0}},
               dtype="float64", device="cpu")
d = r.to_dict()
print(json.dumps({{k: d.get(k) for k in {keys!r}}}))
"""


def test_a_second_fit_of_a_model_gives_what_a_fresh_process_gives():
    xa, ya = _data(1)
    xb, yb = _data(2, n=55)
    _fit(xa, ya)  # the model's program, checks and components now kept
    again = _fields(_fit(xb, yb))
    keys = ("params", "stderr", "covariance", "rss", "r2", "status", "reason", "lm_iterations")
    code = FRESH.format(expr=EXPR, keys=keys)
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([xb.tolist(), yb.tolist()]),
        capture_output=True,
        text=True,
        check=True,
    )
    fresh = json.loads(out.stdout)
    assert json.loads(json.dumps(again)) == fresh  # bit for bit, through JSON's repr floats


@pytest.mark.parametrize(
    ("expr", "params", "dtype"),
    [
        ("a*exp(-k*x) + c", {"a": 1.0, "k": 0.3, "c": 0.0}, "float64"),  # other names
        (EXPR, {"a": 1.0, "b": 0.3, "c": {"value": 0.4, "vary": False}}, "float64"),  # fixed
        (EXPR, {"a": 1.0, "b": {"value": 0.3, "min": 0.0}, "c": 0.0}, "float64"),  # bounded
        (EXPR, {"a": 1.0, "b": 0.3, "c": 0.0}, "float32"),
    ],
    ids=["names", "fixed", "bounded", "float32"],
)
def test_a_model_that_differs_gets_what_it_gets_with_nothing_kept(expr, params, dtype):
    x, y = _data(3)
    _fit(x, y)  # another model fitted first: its entries must not be taken for this one's
    after = _fields(_fit(x, y, expr, params, dtype))
    _cold()
    alone = _fields(_fit(x, y, expr, params, dtype))
    assert after == alone


def _model(params: dict, dtype=torch.float64):
    from fitcli.config import config_from_dict
    from fitcli.prepare import prepare

    x, y = _data(4)
    cfg = config_from_dict(
        {
            "name": "m",
            "data": {"target": "3*exp(-0.6*x) + 0.4", "x": {"start": 0, "stop": 8, "num": 30}},
            "model": {"expr": EXPR, "params": params},
            "optimizer": {"name": "LevenbergMarquardt"},
            "dtype": "float64" if dtype == torch.float64 else "float32",
            "device": "cpu",
            "epochs": 5,
        }
    )
    return prepare(cfg)


def test_the_signature_of_a_numpy_program_names_everything_it_computes_with():
    base = {"a": 1.0, "b": 0.3, "c": 0.0}
    variants = [
        base,
        {**base, "a": 2.5},  # a start value only: the same program
        {**base, "c": {"value": 0.0, "vary": False}},
        {**base, "c": {"value": 1.0, "vary": False}},
        {**base, "b": {"value": 0.3, "min": 0.0}},
        {**base, "b": {"value": 0.3, "min": 0.0, "max": 2.0}},
        {**base, "c": {"expr": "a/10"}},
    ]
    sigs = []
    for params in variants:
        prep = _model(params)
        sigs.append(NumpyModel(prep.model, prep.x).signature)
    assert sigs[0] == sigs[1]
    assert len(set(sigs[1:])) == len(sigs) - 1  # every other variant its own program
    bounded = _model(variants[4])
    internal = NumpyModel(bounded.model, bounded.x).signature
    external = NumpyModel(bounded.model, bounded.x, external=True).signature
    assert internal != external  # the bound transforms are in one and not the other


def test_host_verdicts_are_bounded(monkeypatch):
    monkeypatch.setattr(lm, "HOST_VERDICTS_KEPT", 3)
    x = torch.linspace(0.1, 2.0, 20, dtype=torch.float64)
    xn = x.numpy()

    def fn(theta, x):
        return theta[0] * x

    class Line(lm.HostModel):
        def __init__(self, k):
            self.signature = ("line", k)

        def value(self, theta):
            return theta[0] * xn

        def jacobian(self, theta):
            return self.value(theta), xn[:, None].copy()

    theta = torch.tensor([0.5], dtype=torch.float64)
    lm.forget_host_verdicts()
    for k in range(5):
        assert lm.host_ok(fn, Line(k), theta, x)
    assert list(lm._HOST_VERDICTS) == [("line", 2), ("line", 3), ("line", 4)]
    lm.forget_host_verdicts()
