"""NIST StRD, 26 problems x 2 starts: fitcli's LevenbergMarquardt beside scipy's MINPACK lm.

Run:  .venv/bin/python benchmarks/nist_lm_core.py [--max-iter 5000] [--problem NAME ...]

For each fit it prints the worst-parameter LRE (capped at 11) of both solvers, the worst LRE of
fitcli's standard errors (from `fitcli.stats.fit_statistics`) against NIST's certified standard
deviations, and at the end the count of fits with LRE >= 6, the median and minimum, and the total
fit time of each solver (the standard errors are not timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares

from fitcli.lm import LevenbergMarquardt
from fitcli.stats import fit_statistics

ROOT = Path(__file__).resolve().parent.parent
NIST = ROOT / "tests" / "data" / "nist"
sys.path.insert(0, str(ROOT / "tests"))  # nist_problems: the reader of tests/data/nist
from nist_problems import MODELS, load_suite, worst_lre  # noqa: E402


def fit_fitcli(problem, start: int, max_iter: int) -> tuple[list[float], int, str | None]:
    fn = MODELS[problem.name]
    x = torch.tensor(problem.x, dtype=torch.float64)
    y = torch.tensor(problem.y, dtype=torch.float64)
    lm = LevenbergMarquardt(fn, x, y, torch.tensor(problem.start(start), dtype=torch.float64))
    for _ in range(max_iter):
        if lm.step().converged:
            break
    return lm.theta.tolist(), lm.n_iter, lm.reason


def fit_scipy(problem, start: int) -> list[float]:
    fn = MODELS[problem.name]
    x = torch.tensor(problem.x, dtype=torch.float64)
    y = np.asarray(problem.y)

    def residual(b: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fn(torch.from_numpy(b), x).numpy() - y

    res = least_squares(
        residual,
        np.asarray(problem.start(start), dtype=float),
        method="lm",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
        max_nfev=100_000,
    )
    return res.x.tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--problem", nargs="*", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    suite = load_suite(NIST)
    names = args.problem or list(suite)
    ours_scores: list[float] = []
    scipy_scores: list[float] = []
    time_ours = time_scipy = 0.0
    header = (
        f"{'problem':<10}{'start':>6}{'fitcli':>8}{'scipy':>8}{'stderr':>8}{'iters':>7}  reason"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        problem = suite[name]
        for start in (1, 2):
            t0 = time.perf_counter()
            theta, n_iter, reason = fit_fitcli(problem, start, args.max_iter)
            time_ours += time.perf_counter() - t0
            t0 = time.perf_counter()
            theta_scipy = fit_scipy(problem, start)
            time_scipy += time.perf_counter() - t0
            ours = worst_lre(theta, problem.certified)
            theirs = worst_lre(theta_scipy, problem.certified)
            stats = fit_statistics(
                MODELS[name],
                torch.tensor(theta, dtype=torch.float64),
                torch.tensor(problem.x, dtype=torch.float64),
                torch.tensor(problem.y, dtype=torch.float64),
                [f"b{i + 1}" for i in range(problem.n_params)],
            )
            errs = [stats.stderr[f"b{i + 1}"] for i in range(problem.n_params)]
            se = worst_lre(
                [e if e is not None else float("nan") for e in errs], problem.certified_stderr
            )
            ours_scores.append(ours)
            scipy_scores.append(theirs)
            print(f"{name:<10}{start:>6}{ours:>8.1f}{theirs:>8.1f}{se:>8.1f}{n_iter:>7}  {reason}")
    print()
    for label, scores, seconds in (
        ("fitcli LevenbergMarquardt", ours_scores, time_ours),
        ("scipy least_squares lm", scipy_scores, time_scipy),
    ):
        good = sum(s >= 6 for s in scores)
        print(
            f"{label:<27} LRE>=6: {good}/{len(scores)}  median {statistics.median(scores):.1f}"
            f"  min {min(scores):.1f}  time {seconds:.2f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
