"""Start guesses (`params: {a: guess}`, `model.guess: true`): against lmfit's Model.guess on
single peaks, LM from the guess against curve_fit from the truth, peaks assigned by center, the
resolved config.yaml."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from lmfit import lineshapes as ls
from lmfit import models
from scipy.optimize import curve_fit

from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.errors import ConfigError
from fitcli.guess import find_peaks, guess_values
from fitcli.prepare import prepare
from fitcli.train import train

X = np.linspace(-10, 10, 401)
RNG = np.random.default_rng(7)

# kind -> (lmfit model, lmfit lineshape call on the true parameters, fitcli call)
SINGLE = {
    "gaussian": (models.GaussianModel, lambda x: ls.gaussian(x, 3, 1.2, 0.8)),
    "lorentzian": (models.LorentzianModel, lambda x: ls.lorentzian(x, 3, 1.2, 0.8)),
    "voigt": (models.VoigtModel, lambda x: ls.voigt(x, 3, 1.2, 0.6, 0.6)),
    "pvoigt": (models.PseudoVoigtModel, lambda x: ls.pvoigt(x, 3, 1.2, 0.8, 0.5)),
    "moffat": (models.MoffatModel, lambda x: ls.moffat(x, 3, 1.2, 0.8, 1.0)),
}


@pytest.mark.parametrize("kind", SINGLE)
def test_single_peak_guess_is_close_to_lmfits(kind):
    model_cls, truth = SINGLE[kind]
    y = truth(X) + RNG.normal(0, 0.01, X.size)
    theirs = model_cls().guess(y, x=X).valuesdict()
    ours = guess_values(f"{kind}(x, amplitude, center, sigma)", X, y, ["amplitude", "center"])
    ours |= guess_values(f"{kind}(x, amplitude, center, sigma)", X, y, ["sigma"])
    step = X[1] - X[0]
    assert abs(ours["center"] - theirs["center"]) <= 2 * step
    # lmfit's widths and areas are rough (within a factor 2 of the truth); ours as well.
    for name in ("sigma", "amplitude"):
        assert 0.4 < ours[name] / theirs[name] < 2.5, (name, ours[name], theirs[name])


FORMULA = {
    "gaussian": ("a/(s*sqrt(2*pi))*exp(-(x - c)**2/(2*s**2))", ls.gaussian),
    "lorentzian": ("a/(pi*s)/(1 + ((x - c)/s)**2)", ls.lorentzian),
}


@pytest.mark.parametrize("kind", FORMULA)
def test_lm_from_the_guess_reaches_curve_fits_minimum_from_the_truth(kind, tmp_path):
    formula, shape = FORMULA[kind]
    true = {"a": 4.0, "c": -2.5, "s": 0.6, "m": 0.05, "b": 1.0}
    y = shape(X, true["a"], true["c"], true["s"]) + true["m"] * X + true["b"]
    y = y + RNG.normal(0, 0.02, X.size)
    start = guess_values(f"{kind}(x, a, c, s) + linear(x, m, b)", X, y, list(true))
    data = tmp_path / "d.csv"
    np.savetxt(data, np.c_[X, y], delimiter=",", header="x,y", comments="")
    cfg = config_from_dict(
        {
            "device": "cpu",
            "epochs": 300,
            "data": {"file": str(data)},
            "model": {"expr": f"{formula} + m*x + b", "params": start},
            "optimizer": {"name": "LevenbergMarquardt"},
        }
    )
    prep = prepare(cfg)
    result = train(prep.model, prep.stepper, epochs=300, evaluate_loss=prep.evaluate_loss)

    def f(x, a, c, s, m, b):
        return shape(x, a, c, s) + m * x + b

    theta, _ = curve_fit(f, X, y, p0=list(true.values()), xtol=1e-14, ftol=1e-14)
    reference = float(((y - f(X, *theta)) ** 2).sum())
    assert result.final_loss * X.size == pytest.approx(reference, rel=1e-8)


def test_peaks_are_assigned_to_the_terms_by_increasing_center():
    # Written right to left in the data, the terms still get the peaks left to right.
    y = (
        ls.gaussian(X, 2.0, 6.0, 0.5)
        + ls.lorentzian(X, 5.0, -6.0, 0.4)
        + ls.gaussian(X, 3.0, 0.5, 0.7)
        + RNG.normal(0, 0.01, X.size)
    )
    expr = "lorentzian(x, a1, c1, s1) + gaussian(x, a2, c2, s2) + gaussian(x, a3, c3, s3)"
    got = guess_values(expr, X, y, ["c1", "c2", "c3", "a1", "a2", "a3"])
    assert got["c1"] == pytest.approx(-6.0, abs=0.1)
    assert got["c2"] == pytest.approx(0.5, abs=0.1)
    assert got["c3"] == pytest.approx(6.0, abs=0.1)
    assert got["a2"] == pytest.approx(3.0, rel=0.3)
    assert got["a3"] == pytest.approx(2.0, rel=0.3)


def test_the_most_prominent_peaks_are_the_ones_found():
    y = ls.gaussian(X, 1.0, -5, 0.5) + ls.gaussian(X, 4.0, 0, 0.5) + ls.gaussian(X, 3.0, 5, 0.5)
    peaks = find_peaks(X, y, 2)
    assert sorted(round(p.center) for p in peaks) == [0, 5]
    heights = {round(p.center): p.height for p in peaks}
    assert heights[0] == pytest.approx(4.0 / (0.5 * np.sqrt(2 * np.pi)), rel=0.05)


LINE = {
    "name": "line",
    "device": "cpu",
    "epochs": 20,
    "snapshots": 1,
    "data": {"target": "0.5*x + 2", "x": {"start": 0, "stop": 10, "num": 50}},
    "model": {"expr": "linear(x, m, b)", "params": {"m": "guess", "b": {"value": "guess"}}},
    "optimizer": {"name": "LevenbergMarquardt"},
}


def test_the_guess_is_written_into_the_resolved_config(runner, tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text(json.dumps(LINE))
    out = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    run_dir = next(out.iterdir())
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    params = resolved["model"]["params"]
    # The line through the edges of exact data is the line itself.
    assert params["m"]["value"] == pytest.approx(0.5, rel=1e-12)
    assert params["b"]["value"] == pytest.approx(2.0, rel=1e-12)
    # Rerunning the resolved config starts where the run started.
    again = runner.invoke(app, ["train", str(run_dir / "config.yaml"), "--out", str(out)])
    assert again.exit_code == 0, again.output


def test_model_guess_guesses_every_shape_argument_without_a_value():
    raw = json.loads(json.dumps(LINE))
    raw["model"] = {"expr": "linear(x, m, b)", "guess": True, "params": {"b": 7.0}}
    prep = prepare(config_from_dict(raw))
    params = prep.cfg.model.params
    assert params["m"].value == pytest.approx(0.5, rel=1e-12)
    assert params["b"].value == 7.0  # given: kept
    assert prep.cfg.model.guess is None


def test_guess_for_a_parameter_outside_any_shape_is_a_config_error():
    raw = json.loads(json.dumps(LINE))
    raw["model"] = {"expr": "linear(x, m, b) + k*x**2", "params": {"k": "guess"}}
    with pytest.raises(ConfigError, match=r"model\.params\.k: guess needs a shape argument"):
        prepare(config_from_dict(raw))


def test_a_guess_is_put_inside_the_bounds():
    raw = json.loads(json.dumps(LINE))
    raw["model"]["params"] = {"m": {"value": "guess", "min": 1.0, "max": 3.0}, "b": 1.0}
    prep = prepare(config_from_dict(raw))
    assert 1.0 < prep.cfg.model.params["m"].value < 3.0


def test_guess_only_goes_with_an_expression():
    raw = json.loads(json.dumps(LINE))
    raw["model"] = {"basis": ["x"], "guess": True}
    with pytest.raises(ConfigError, match="model.guess: only allowed with expr"):
        config_from_dict(raw)
