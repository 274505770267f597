"""Start values: fitcli's guess + LM on seeded synthetic peak problems, against lmfit's guess on
single peaks and curve_fit's default start (all ones), in one run.

    .venv/bin/python benchmarks/guess.py [--count 1000] [--seed 0]

Each problem is a sum of 1-6 peaks (Gaussian, Lorentzian, pseudo-Voigt, Voigt or Moffat, each drawn,
fitted through the lineshape calls themselves), at random
positions at least two widths apart, of random width and area, on a straight background, with
Gaussian noise (1-5% of the smallest peak's height). The true least-squares minimum is the RSS
that fitcli's LM reaches from the true parameters; a fit succeeds when its final RSS is within
1e-6 relative of it (or below). Fitting time is the training loop's alone (no run directory).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fitcli.config import config_from_dict  # noqa: E402
from fitcli.guess import guess_values  # noqa: E402

KINDS = ("gaussian", "lorentzian", "pvoigt", "voigt", "moffat")
X = (0.0, 40.0)
RTOL = 1e-6
EPOCHS = 500


def problem(rng: np.random.Generator) -> dict:
    """One seeded problem: peak kinds and true parameters, the background and the data."""
    k = int(rng.integers(1, 7))
    sigmas = rng.uniform(0.15, 0.6, k)
    fwhm = 2.5 * sigmas
    while True:  # centers at least two widths apart, away from the ends
        centers = np.sort(rng.uniform(X[0] + 3, X[1] - 3, k))
        gaps = np.diff(centers)
        if k == 1 or np.all(gaps > 2 * (fwhm.max() + 0.3)):
            break
    kinds = [KINDS[int(i)] for i in rng.integers(0, len(KINDS), k)]
    areas = rng.uniform(1.0, 10.0, k)
    fractions = rng.uniform(0.2, 0.8, k)
    slope, intercept = rng.uniform(-0.03, 0.03), rng.uniform(0.0, 2.0)
    n = int(rng.integers(300, 801))
    x = np.linspace(*X, n)
    true: dict[str, float] = {"m": slope, "b": intercept}
    for j in range(k):
        true |= {f"a{j}": areas[j], f"c{j}": centers[j], f"s{j}": sigmas[j]}
        if kinds[j] == "pvoigt":
            true[f"f{j}"] = fractions[j]
    y_clean = evaluate(kinds, true, x)
    heights = [area / (s * 2.5) for area, s in zip(areas, sigmas, strict=True)]
    noise = rng.uniform(0.01, 0.05) * min(heights)
    y = y_clean + rng.normal(0.0, noise, n)
    return {"kinds": kinds, "true": true, "x": x, "y": y}


def evaluate(kinds: list[str], p: dict[str, float], x: np.ndarray) -> np.ndarray:
    from lmfit import lineshapes as ls

    out = p["m"] * x + p["b"]
    for j, kind in enumerate(kinds):
        a, c, s = p[f"a{j}"], p[f"c{j}"], p[f"s{j}"]
        if kind == "gaussian":
            out = out + ls.gaussian(x, a, c, s)
        elif kind == "lorentzian":
            out = out + ls.lorentzian(x, a, c, s)
        elif kind == "voigt":
            out = out + ls.voigt(x, a, c, s)
        elif kind == "moffat":
            out = out + ls.moffat(x, a, c, s)
        else:
            out = out + ls.pvoigt(x, a, c, s, p[f"f{j}"])
    return out


def shape_expr(kinds: list[str]) -> str:
    terms = []
    for j, kind in enumerate(kinds):
        extra = f", f{j}" if kind == "pvoigt" else ""
        terms.append(f"{kind}(x, a{j}, c{j}, s{j}{extra})")
    return " + ".join([*terms, "linear(x, m, b)"])


def fitcli_fit(prob: dict, start: dict[str, float], data: Path) -> tuple[float, float]:
    """(final RSS, seconds in the training loop) of fitcli's LM from `start`."""
    from fitcli.prepare import prepare
    from fitcli.train import train

    cfg = config_from_dict(
        {
            "name": "guess",
            "device": "cpu",
            "epochs": EPOCHS,
            "snapshots": 1,
            "data": {"file": str(data)},
            "model": {"expr": shape_expr(prob["kinds"]), "params": start},
            "optimizer": {"name": "LevenbergMarquardt"},
        }
    )
    prep = prepare(cfg)
    t = time.perf_counter()
    result = train(prep.model, prep.stepper, epochs=EPOCHS, evaluate_loss=prep.evaluate_loss)
    dt = time.perf_counter() - t
    return result.final_loss * prob["x"].size, dt


def rss(prob: dict, p: dict[str, float]) -> float:
    return float(((prob["y"] - evaluate(prob["kinds"], p, prob["x"])) ** 2).sum())


def curve_fit_ones(prob: dict) -> float:
    """curve_fit with its default start (every parameter 1), lmfit's lineshapes as the model."""
    from scipy.optimize import curve_fit

    names = list(prob["true"])

    def f(x, *theta):
        return evaluate(prob["kinds"], dict(zip(names, theta, strict=True)), x)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theta, _ = curve_fit(f, prob["x"], prob["y"], p0=np.ones(len(names)), maxfev=20000)
    except (RuntimeError, ValueError):
        return math.inf
    return rss(prob, dict(zip(names, theta, strict=True)))


def lmfit_guess(prob: dict) -> float:
    """lmfit's Model.guess for a single peak on a linear background, then lmfit's fit."""
    from lmfit import models

    kind = prob["kinds"][0]
    peak_cls = {
        "gaussian": models.GaussianModel,
        "lorentzian": models.LorentzianModel,
        "pvoigt": models.PseudoVoigtModel,
        "voigt": models.VoigtModel,  # gamma tied to sigma, as fitcli's voigt(x, a, c, s)
        "moffat": models.MoffatModel,  # beta free in lmfit's model; fixed at 1 in the problems
    }[kind]
    peak = peak_cls(prefix="p_")
    line = models.LinearModel(prefix="l_")
    x, y = prob["x"], prob["y"]
    pars = line.guess(y, x=x)
    pars.update(peak.guess(y - (pars["l_slope"].value * x + pars["l_intercept"].value), x=x))
    result = (peak + line).fit(y, pars, x=x)
    return float((result.residual**2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="problems (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    ok = ok_single = n_single = ok_cf = ok_lmfit = 0
    times: list[float] = []
    failures: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.count):
            prob = problem(rng)
            data = Path(tmp) / "data.csv"
            np.savetxt(data, np.c_[prob["x"], prob["y"]], delimiter=",", header="x,y", comments="")
            best, _ = fitcli_fit(prob, prob["true"], data)
            names = list(prob["true"])
            start = guess_values(shape_expr(prob["kinds"]), prob["x"], prob["y"], names)
            got, dt = fitcli_fit(prob, start, data)
            times.append(dt)
            reached = got <= best * (1 + RTOL)
            ok += reached
            if not reached:
                failures.append(i)
            ok_cf += curve_fit_ones(prob) <= best * (1 + RTOL)
            if len(prob["kinds"]) == 1:
                n_single += 1
                ok_single += reached
                ok_lmfit += lmfit_guess(prob) <= best * (1 + RTOL)
    n = args.count
    print(f"problems: {n} (seed {args.seed}); single-peak problems: {n_single}")
    print(f"fitcli guess + LM reached the minimum: {ok}/{n} = {ok / n:.1%}")
    print(f"curve_fit from all ones:               {ok_cf}/{n} = {ok_cf / n:.1%}")
    if n_single:
        print(
            f"single peaks: fitcli {ok_single}/{n_single} = {ok_single / n_single:.1%}, "
            f"lmfit guess {ok_lmfit}/{n_single} = {ok_lmfit / n_single:.1%}"
        )
    print(
        f"fit time: median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms"
    )
    if failures:
        print(f"missed: problems {failures[:20]}{' ...' if len(failures) > 20 else ''}")


if __name__ == "__main__":
    main()
