"""Band coverage: how often fitcli's 95% confidence band holds the true curve, measured.

    PYTHONPATH=src .venv/bin/python benchmarks/band_coverage.py [--replicates 2000] [--write]

For each case, `replicates` data sets (seeded) of a known model with known Gaussian noise are
fitted as one batched program: `fitcli.lm_batch.solve`, Levenberg-Marquardt with a leading
replicate dimension on the parameters, through fitcli's own model (`model.model_function`, whose
models take a leading run dimension) and its exact Jacobian (forward-mode autograd, one pass per
parameter for all replicates). Each replicate's covariance is the one `fitcli.stats` computes
(``s² (J^T J)^-1``, or ``(J^T W J)^-1`` with absolute sigma), its band the one `fitcli.bands`
computes on a grid of the data's range. A few replicates are fitted again one by one with
`fitcli.fit` (LM) and must give the same parameters, covariance and band
(`check_against_fitcli`).

Reported: pointwise coverage (the mean over replicates and grid points of "the true curve is
inside the band there") and simultaneous coverage (the fraction of replicates whose whole true
curve is inside), for the band as fitcli draws it (pointwise, t or normal quantile) and, for
reference, with the Working-Hotelling multiplier ``sqrt(p F(p, n-p))`` (``sqrt(chi2_p)`` with
known sigma), which makes a band simultaneous for a model linear in its parameters.
tests/test_bands.py runs the same check at 1,000 replicates.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fitcli import bands, lm_batch  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A known model with known noise: the config's model section, the truth, the data grid."""

    name: str
    model: dict
    truth: tuple[float, ...]
    start: tuple[float, ...]
    x: tuple[float, float, int]  # start, stop, points
    sigma: float

    def x_data(self) -> np.ndarray:
        return np.linspace(*self.x[:2], self.x[2])


LINEAR = Case(
    "quadratic basis 1, x, x^2 (linear in its parameters)",
    {"basis": ["1", "x", "x**2"]},
    (1.0, 2.0, -0.5),
    (0.0, 0.0, 0.0),
    (0.0, 4.0, 50),
    0.3,
)
NONLINEAR = Case(
    "exponential decay a*exp(-b*x) + c (nonlinear)",
    {"expr": "a*exp(-b*x) + c"},
    (3.0, 0.8, 0.5),
    (1.0, 0.5, 0.0),
    (0.0, 5.0, 50),
    0.2,
)
CASES = {"linear": LINEAR, "nonlinear": NONLINEAR}


def fit_model(case: Case):
    """fitcli's float64 model of the case (`build_model` from a config) and its ``fn(theta, x)``
    over the free parameters' values, which takes a leading replicate dimension on theta."""
    import torch

    from fitcli.config import config_from_dict
    from fitcli.model import build_model, model_function

    section = dict(case.model)
    if "expr" in section:
        names = ("a", "b", "c")
        section["params"] = dict(zip(names, case.start, strict=True))
    else:
        section["init"] = list(case.start)
    cfg = config_from_dict(
        {"data": {"target": "x", "x": {"start": 0, "stop": 1, "num": 2}}, "model": section}
    )
    model = build_model(cfg.model, 0, torch.float64)
    return model, model_function(model, external=True)


def batched_jacobian(fn, theta, x):
    """d fn(theta_r, x) / d theta_r for every replicate r: [R, len(x), p], exact, one
    forward-mode pass per parameter for all replicates at once."""
    import torch

    p = theta.shape[-1]
    cols = []
    for k in range(p):
        tangent = torch.zeros_like(theta)
        tangent[..., k] = 1.0
        _, col = torch.func.jvp(lambda t: fn(t, x), (theta,), (tangent,))
        cols.append(col)
    return torch.stack(cols, dim=-1)


class ReplicateLanes:
    """The replicates as lanes of `fitcli.lm_batch.solve`: y [R, n] of one model at x, with
    weights w [n]."""

    def __init__(self, fn, x, y, w) -> None:
        self.fn, self.x, self.y, self.w = fn, x, y, w

    def take(self, idx):
        return ReplicateLanes(self.fn, self.x, self.y[idx], self.w)

    def linearize(self, theta):
        import torch

        with torch.no_grad():
            r = (self.y - self.fn(theta, self.x)) * self.w
        return r, batched_jacobian(self.fn, theta, self.x) * self.w[:, None]


@dataclass
class Replicates:
    """The fitted replicates of a case: data, parameters, covariances and 95% bands on a grid."""

    x: np.ndarray
    y: np.ndarray
    theta: np.ndarray
    cov: np.ndarray
    grid: np.ndarray
    truth_grid: np.ndarray
    fit_grid: np.ndarray
    var_grid: np.ndarray
    dof: int
    absolute: bool
    seconds: float


def simulate(
    case: Case, replicates: int, *, absolute: bool, grid_points: int = 1000, seed: int = 0
) -> Replicates:
    """Draw, fit and band `replicates` data sets of `case` (noise sigma known to the fit with
    `absolute`, else estimated as s²), all as one batched program, on one thread (small
    tensors: more threads only wait for each other on busy cores)."""
    from fitcli.lm import one_thread

    with one_thread():
        return _simulate(case, replicates, absolute, grid_points, seed)


def _simulate(
    case: Case, replicates: int, absolute: bool, grid_points: int, seed: int
) -> Replicates:
    import torch

    model, fn = fit_model(case)
    x = case.x_data()
    xt = torch.from_numpy(x)
    grid = np.linspace(x.min(), x.max(), grid_points)
    gt = torch.from_numpy(grid)
    truth = torch.tensor(case.truth, dtype=torch.float64)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        clean = fn(truth, xt).numpy()
        truth_grid = fn(truth, gt).numpy()
    y = clean + rng.normal(0.0, case.sigma, (replicates, x.size))
    t0 = time.perf_counter()
    w = torch.full_like(xt, 1.0 / case.sigma) if absolute else torch.ones_like(xt)
    theta0 = torch.tensor(case.start, dtype=torch.float64).expand(replicates, -1)
    yt = torch.from_numpy(y)
    theta = lm_batch.solve(ReplicateLanes(fn, xt, yt, w), theta0, lm_batch.LMOptions()).theta
    with torch.no_grad():
        jac = batched_jacobian(fn, theta, xt) * w[:, None]
        resid = (yt - fn(theta, xt)) * w
        inv = torch.linalg.inv(jac.transpose(-1, -2) @ jac)
        n, p = x.size, theta.shape[-1]
        dof = n - p
        s2 = torch.ones(replicates, dtype=torch.float64) if absolute else (resid**2).sum(-1) / dof
        cov = inv * s2[:, None, None]
        fit_grid = fn(theta, gt)
        jac_grid = batched_jacobian(fn, theta, gt)
    var = bands.delta_variance(jac_grid.numpy(), cov.numpy())
    seconds = time.perf_counter() - t0
    return Replicates(
        x,
        y,
        theta.numpy(),
        cov.numpy(),
        grid,
        truth_grid,
        fit_grid.numpy(),
        var,
        dof,
        absolute,
        seconds,
    )


@dataclass(frozen=True)
class Coverage:
    pointwise: float
    simultaneous: float


def coverage(reps: Replicates, level: float = 0.95, *, multiplier: float | None = None) -> Coverage:
    """Coverage of the true curve by each replicate's band at `level` (`fitcli.bands`), or by
    fit ± multiplier sqrt(var) when a multiplier is given (Working-Hotelling)."""
    if multiplier is None:
        cols = bands.band_columns(
            reps.fit_grid, reps.var_grid, [level], dof=reps.dof, absolute=reps.absolute
        )
        tag = bands.level_tag(level)
        lower, upper = cols[f"conf_lower_{tag}"], cols[f"conf_upper_{tag}"]
    else:
        half = multiplier * np.sqrt(reps.var_grid)
        lower, upper = reps.fit_grid - half, reps.fit_grid + half
    inside = (lower <= reps.truth_grid) & (reps.truth_grid <= upper)
    return Coverage(float(inside.mean()), float(inside.all(axis=-1).mean()))


def working_hotelling(p: int, dof: int, absolute: bool, level: float = 0.95) -> float:
    from scipy import stats

    if absolute:
        return math.sqrt(stats.chi2.ppf(level, p))
    return math.sqrt(p * stats.f.ppf(level, p, dof))


def check_against_fitcli(case: Case, reps: Replicates, indices=(0, 1, 2)) -> float:
    """Fit replicates `indices` one by one with `fitcli.fit` (LM) and compare parameters,
    covariance and 95% band with the batched ones; returns the largest relative difference."""
    import fitcli

    worst = 0.0
    section = dict(case.model)
    kw: dict = {"device": "cpu", "optimizer": {"name": "LM"}, "epochs": 500}
    if "expr" in section:
        kw.update(expr=section["expr"], params=dict(zip("abc", case.start, strict=True)))
    else:
        kw.update(basis=section["basis"], init=list(case.start))
    for i in indices:
        sigma = np.full_like(reps.x, case.sigma) if reps.absolute else None
        r = fitcli.fit(x=reps.x, y=reps.y[i], sigma=sigma, **kw)
        got = r.predict(reps.grid, band=0.95)
        assert isinstance(got, dict)
        mine = bands.band_columns(
            reps.fit_grid[i], reps.var_grid[i], [0.95], dof=reps.dof, absolute=reps.absolute
        )
        cov = r.covariance
        assert cov is not None
        pairs = [
            (np.array(list(r.params.values())), reps.theta[i]),
            (cov, reps.cov[i]),
            (got["conf_upper_95"] - got["fit"], mine["conf_upper_95"] - reps.fit_grid[i]),
        ]
        for a, b in pairs:
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=2000)
    ap.add_argument("--grid", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    simulate(LINEAR, 2, absolute=False, grid_points=10)  # torch.func's one-time start-up
    for key, case in CASES.items():
        for absolute in (False, True):
            reps = simulate(
                case, args.replicates, absolute=absolute, grid_points=args.grid, seed=args.seed
            )
            band = coverage(reps)
            p = reps.theta.shape[-1]
            wh = coverage(reps, multiplier=working_hotelling(p, reps.dof, absolute))
            diff = check_against_fitcli(case, reps)
            noise = (
                "known sigma (normal)" if absolute else f"estimated s² (Student t, {reps.dof} dof)"
            )
            rows.append(
                f"| {key} | {noise} | {band.pointwise:.2%} | {band.simultaneous:.2%} | "
                f"{wh.simultaneous:.2%} | {reps.seconds:.2f} s | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    cmd = "PYTHONPATH=src .venv/bin/python benchmarks/band_coverage.py --write"
    if args.replicates != 2000 or args.grid != 1000 or args.seed != 0:
        cmd += f" --replicates {args.replicates} --grid {args.grid} --seed {args.seed}"
    head = (
        f"    {cmd}\n\n"
        f"{args.replicates:,} replicates (seed {args.seed}) of each model, 50 points, Gaussian "
        f"noise; the 95% confidence band on a {args.grid}-point grid of the data's range. "
        f"Linear: {LINEAR.name}, truth {LINEAR.truth}, x in [0, 4], sigma {LINEAR.sigma}. "
        f"Nonlinear: {NONLINEAR.name}, truth (a, b, c) = {NONLINEAR.truth}, x in [0, 5], sigma "
        f"{NONLINEAR.sigma}, every fit started at {NONLINEAR.start}. Pointwise: the mean over "
        "replicates and grid points of the true curve being inside; simultaneous: the share of "
        "replicates whose whole true curve is inside. Working-Hotelling: the same band with "
        "the multiplier sqrt(p F(p, n-p)) (sqrt(chi2_p) with known sigma) instead of t, for "
        "reference. Time: the batched fit, covariances and bands of all replicates. Against "
        "fitcli: the largest relative difference of parameters, covariance and band half-width "
        "between the batched computation and `fitcli.fit(...).predict(grid, band=0.95)` on "
        "three replicates.\n\n"
        "| model | noise | pointwise | simultaneous | simultaneous, Working-Hotelling | time | "
        "against fitcli |\n|---|---|---|---|---|---|---|\n"
    )
    text = head + "\n".join(rows)
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import record

        record("coverage", text)


if __name__ == "__main__":
    main()
