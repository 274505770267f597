"""NIST StRD lower-difficulty problems through fitcli's config and training path (issue 4)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from nist_problems import load_suite, worst_lre

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from nist import fit_fitcli, nist_config, write_csv  # noqa: E402

SUITE = load_suite(ROOT / "tests" / "data" / "nist")
LOWER = [name for name, p in SUITE.items() if p.difficulty == "lower"]


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("start", [1, 2])
@pytest.mark.parametrize("name", LOWER)
def test_lower_difficulty_through_the_config_path(name, start, path, tmp_path, monkeypatch):
    # "numpy": the LM core's numpy model with symbolic Jacobians (what these small float64 fits
    # use); "torch": autograd, what float32, large or CUDA fits use.
    # stats binds host_ok by name when imported: imported first, it keeps the real one, so
    # `checks` records the LM core's own check whatever ran before this test.
    from fitcli import lm, lm_optim, stats  # noqa: F401

    checks = []
    if path == "torch":
        monkeypatch.setattr(lm_optim, "host_eligible", lambda x, theta: False)
    real = lm.host_ok
    monkeypatch.setattr(lm, "host_ok", lambda *a: checks.append(real(*a)) or checks[-1])
    problem = SUITE[name]
    got = fit_fitcli(problem, start, write_csv(problem, tmp_path))
    assert checks == ([True] if path == "numpy" else [])  # the numpy model was used
    assert got["status"] == "completed", got["reason"]
    assert got["reason"].startswith("LevenbergMarquardt stopped")
    assert worst_lre(got["theta"], problem.certified) >= 6
    assert worst_lre(got["stderr"], problem.certified_stderr) >= 3
    assert got["uncertainty"] == "ok"


def test_config_is_a_plain_fitcli_config(tmp_path):
    from fitcli.config import config_from_dict

    problem = SUITE["Misra1a"]
    cfg = config_from_dict(nist_config(problem, 1, write_csv(problem, tmp_path)))
    assert cfg.optimizer.name == "LevenbergMarquardt" and cfg.dtype == "float64"
    assert cfg.model.expr == "b1*(1-exp(-b2*x))"
    assert cfg.model.params["b1"].value == 500.0
