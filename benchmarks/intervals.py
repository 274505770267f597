"""Intervals beyond the covariance: fitcli's profile likelihood against lmfit's conf_interval
on NIST problems and the shipped configs (digits of agreement of each end's distance from the
estimate, and in-process time, both sides), and the bootstrap's time against the fit's own.

    python benchmarks/intervals.py            # prints the tables and updates BENCHMARKS.md

lmfit gets a numpy residual (the expression compiled by `fitcli.symdiff`, no torch), starts
at fitcli's least-squares estimate, and runs `conf_interval(mini, result, sigmas=[0.95])`.
Its root finder stops at a relative tolerance of 0.5e-4 of the parameter's *value*, which is
coarse where an interval is narrow relative to the value (Thurber's b1 = 1288 ± 10): the
digits are therefore also given against lmfit with that tolerance tightened to 1e-10 (the
time is always stock lmfit's). Times are the best of several runs, wall clock and CPU.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import ROOT, machine, record, train_cmd  # noqa: E402
from nist_problems import load_suite  # noqa: E402

import fitcli  # noqa: E402
from fitcli import intervals  # noqa: E402

NIST_EXPR = {
    "Misra1a": "b1*(1-exp(-b2*x))",
    "Chwirut2": "exp(-b1*x)/(b2+b3*x)",
    "Chwirut1": "exp(-b1*x)/(b2+b3*x)",
    "Lanczos3": "b1*exp(-b2*x) + b3*exp(-b4*x) + b5*exp(-b6*x)",
    "Gauss1": "b1*exp(-b2*x) + b3*exp(-(x-b4)**2/b5**2) + b6*exp(-(x-b7)**2/b8**2)",
    "Gauss2": "b1*exp(-b2*x) + b3*exp(-(x-b4)**2/b5**2) + b6*exp(-(x-b7)**2/b8**2)",
    "DanWood": "b1*x**b2",
    "Misra1b": "b1*(1-(1+b2*x/2)**(-2))",
    "Kirby2": "(b1 + b2*x + b3*x**2) / (1 + b4*x + b5*x**2)",
    "Hahn1": "(b1+b2*x+b3*x**2+b4*x**3) / (1+b5*x+b6*x**2+b7*x**3)",
    "MGH17": "b1 + b2*exp(-x*b4) + b3*exp(-x*b5)",
    "Misra1c": "b1*(1-(1+2*b2*x)**(-0.5))",
    "Misra1d": "b1*b2*x*((1+b2*x)**(-1))",
    "Roszman1": "b1 - b2*x - atan(b3/(x-b4))/pi",
    "ENSO": "b1 + b2*cos(2*pi*x/12) + b3*sin(2*pi*x/12) + b5*cos(2*pi*x/b4) "
    "+ b6*sin(2*pi*x/b4) + b8*cos(2*pi*x/b7) + b9*sin(2*pi*x/b7)",
    "MGH09": "b1*(x**2+x*b2) / (x**2+x*b3+b4)",
    "Thurber": "(b1 + b2*x + b3*x**2 + b4*x**3) / (1 + b5*x + b6*x**2 + b7*x**3)",
    "BoxBOD": "b1*(1-exp(-b2*x))",
    "Rat42": "b1 / (1+exp(b2-b3*x))",
    "MGH10": "b1 * exp(b2/(x+b3))",
    "Eckerle4": "(b1/b2) * exp(-0.5*((x-b3)/b2)**2)",
    "Rat43": "b1 / ((1+exp(b2-b3*x))**(1/b4))",
    "Bennett5": "b1 * (b2+x)**(-1/b3)",
}
SHIPPED = ["nist-misra1a.yaml", "measured-decay.yaml", "damped-oscillator.yaml", "seed.yaml"]


def _numpy_model(result: fitcli.FitResult):
    """y(params dict, x) in numpy: the model's expression (or basis) compiled by symdiff."""
    from fitcli.model import BasisModel
    from fitcli.symdiff import compile_value

    model = result._float64_model()
    if isinstance(model, BasisModel):
        cols = [compile_value(b)(result.x, {}) for b in model.basis]
        design = np.stack([np.broadcast_to(c, result.x.shape) for c in cols], axis=1)
        names = list(model.names)
        return lambda p: design @ np.array([p[n] for n in names])
    value = compile_value(model.expression)
    x = result.x
    return lambda p: value(x, p)


def _lmfit(result: fitcli.FitResult, estimate: dict, tight: bool) -> tuple[dict, float, float]:
    import lmfit
    import lmfit.confidence as conf

    f = _numpy_model(result)
    y = result.y
    w = None if result.sigma is None else 1.0 / result.sigma
    model = result._float64_model()
    params = lmfit.Parameters()
    for info in model.infos:
        if info.expr is not None:
            continue
        value = estimate.get(info.name, result.params[info.name])
        params.add(
            info.name,
            value=value,
            vary=info.free,
            min=-np.inf if info.min is None else info.min,
            max=np.inf if info.max is None else info.max,
        )

    def residual(p):
        r = y - f({k: p[k].value for k in p})
        return r if w is None else r * w

    mini = lmfit.Minimizer(residual, params)
    best = mini.minimize(method="leastsq")
    original = conf.root_scalar
    if tight:
        conf.root_scalar = lambda *a, **k: original(*a, **{**k, "rtol": 1e-10})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w0, c0 = time.perf_counter(), time.process_time()
            ci = lmfit.conf_interval(mini, best, sigmas=[0.95])
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        conf.root_scalar = original
    return ci, wall, cpu


def _ours(result: fitcli.FitResult, reps: int = 3) -> tuple[dict, float, float]:
    model = result._float64_model()
    model.set_values(result.params)
    w = None if result.sigma is None else torch.from_numpy(1.0 / result.sigma)
    prob = intervals.Problem(model, torch.from_numpy(result.x), torch.from_numpy(result.y), w)
    intervals.profile(prob)  # warm-up: first-call costs of torch and scipy
    walls, cpus = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        doc = intervals.profile(prob, 0.95)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return doc, min(walls), min(cpus)


def _digits(doc: dict, ci: dict) -> float:
    """The fewest agreeing digits, -log10 |a - b| / |b|, of any end's distance from the estimate
    (0 when an end is missing on either side)."""
    worst = 15.0
    for name, entry in doc["params"].items():
        (iv,) = entry["intervals"]
        (_, lo), (_, est), (_, hi) = ci[name]
        mid = entry["estimate"]
        for end, sign, ref in ((iv["lower"], -1.0, est - lo), (iv["upper"], 1.0, hi - est)):
            if end is None or not math.isfinite(ref):
                return 0.0
            a = sign * (end - mid)
            worst = min(worst, 15.0 if a == ref else -math.log10(abs(a - ref) / abs(ref)))
    return worst


def compare(label: str, result: fitcli.FitResult) -> dict | None:
    doc, wall, cpu = _ours(result)
    estimate = {k: v["estimate"] for k, v in doc["params"].items()}
    try:
        stock, lm_wall, lm_cpu = _lmfit(result, estimate, tight=False)
        if lm_wall < 5:  # a second run for the best of two where it is cheap
            again = _lmfit(result, estimate, tight=False)
            lm_wall, lm_cpu = min(lm_wall, again[1]), min(lm_cpu, again[2])
        tight, _, _ = _lmfit(result, estimate, tight=True)
    except Exception as exc:  # lmfit refuses (e.g. a parameter without stderr)
        print(f"{label}: lmfit fails: {type(exc).__name__}: {exc}")
        return None
    row = {
        "label": label,
        "p": len(doc["params"]),
        "n": doc["n_points"],
        "digits_stock": _digits(doc, stock),
        "digits_tight": _digits(doc, tight),
        "ours_ms": wall * 1e3,
        "lmfit_ms": lm_wall * 1e3,
        "ratio_wall": wall / lm_wall,
        "ratio_cpu": cpu / lm_cpu,
        "null_ends": sum(
            iv[k] is None
            for e in doc["params"].values()
            for iv in e["intervals"]
            for k in ("lower", "upper")
        ),
    }
    print(
        f"{label:24s} p={row['p']} n={row['n']:4d} digits {row['digits_stock']:5.2f} "
        f"(tight {row['digits_tight']:5.2f})  ours {row['ours_ms']:8.1f} ms  lmfit "
        f"{row['lmfit_ms']:9.1f} ms  ratio {row['ratio_wall']:.3f} (cpu {row['ratio_cpu']:.3f})",
        flush=True,
    )
    return row


def nist_rows() -> list[dict]:
    suite = load_suite(ROOT / "tests" / "data" / "nist")
    rows = []
    for name, expr in NIST_EXPR.items():
        pr = suite[name]
        params = {f"b{i + 1}": v for i, v in enumerate(pr.certified)}
        result = fitcli.fit(
            x=np.array(pr.x), y=np.array(pr.y), expr=expr, params=params, epochs=300
        )
        row = compare(f"NIST {name}", result)
        if row is not None:
            rows.append(row)
    return rows


def shipped_rows() -> list[dict]:
    rows = []
    for name in SHIPPED:
        # Least squares with LM, so that both sides start from the least-squares minimum.
        result = fitcli.fit(
            ROOT / "configs" / name, optimizer="LM", loss="mse", epochs=300, scheduler=None
        )
        row = compare(f"configs/{name}", result)
        if row is not None:
            rows.append(row)
    return rows


BOOT_CONFIG = {
    "name": "boot-1000",
    "seed": 0,
    "device": "cpu",
    "epochs": 200,
    "snapshots": 10,
    "data": {
        "target": "3*exp(-x/2) + 0.5",
        "x": {"start": 0, "stop": 10, "num": 1000},
        "noise": {"std": 0.1},
    },
    "model": {"expr": "a*exp(-x/tau) + c", "params": {"a": 1, "tau": 1, "c": 0}},
    "optimizer": {"name": "LM"},
}


def bootstrap_row(tmp: Path) -> dict:
    """B = 1000 on a 1000-point fit: `fitcli ci --method bootstrap` in-process vs the run's
    own elapsed_s (summary.json), for both resamplings."""
    import json
    import subprocess

    import yaml

    cfg = tmp / "boot.yaml"
    cfg.write_text(yaml.safe_dump(BOOT_CONFIG))
    run = tmp / "run"
    subprocess.run(
        train_cmd(cfg, run),
        check=True,
        capture_output=True,
    )
    fit_s = json.loads((run / "summary.json").read_text())["elapsed_s"]
    from fitcli.api import ci_run

    out = {"fit_s": fit_s}
    for resampling in ("residual", "case"):
        doc = ci_run(run, "bootstrap", 0.95, samples=1000, resampling=resampling)
        out[resampling] = doc["elapsed_s"]
        out[f"{resampling}_converged"] = doc["converged"]
        print(
            f"bootstrap B=1000 n=1000 {resampling}: {doc['elapsed_s']:.2f} s, fit {fit_s:.2f} s, "
            f"ratio {doc['elapsed_s'] / fit_s:.2f}, {doc['converged']} converged",
            flush=True,
        )
    return out


def main() -> None:
    import tempfile

    rows = nist_rows() + shipped_rows()
    with tempfile.TemporaryDirectory() as tmp:
        boot = bootstrap_row(Path(tmp))
    lines = [
        f"Machine: {machine()} (shared with other jobs: wall times are noisy; CPU is the "
        "process's own time).",
        "",
        "| problem | p | n | digits vs lmfit | digits vs lmfit (rtol 1e-10) | fitcli ms | "
        "lmfit ms | time ratio (wall) | time ratio (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['p']} | {r['n']} | {r['digits_stock']:.2f} | "
            f"{r['digits_tight']:.2f} | {r['ours_ms']:.1f} | {r['lmfit_ms']:.1f} | "
            f"{r['ratio_wall']:.3f} | {r['ratio_cpu']:.3f} |"
        )
    ratios = sorted(r["ratio_wall"] for r in rows)
    cpu = sorted(r["ratio_cpu"] for r in rows)
    tight = [r["digits_tight"] for r in rows]
    lines += [
        "",
        f"Digits (against lmfit with the tightened tolerance): min {min(tight):.2f}, "
        f"{sum(d >= 3 for d in tight)} of {len(rows)} problems at 3 or more. "
        f"Time ratio fitcli / lmfit: median {ratios[len(ratios) // 2]:.3f} wall "
        f"({cpu[len(cpu) // 2]:.3f} CPU), worst {ratios[-1]:.3f} wall ({cpu[-1]:.3f} CPU); "
        f"{sum(x <= 0.1 for x in ratios)} of {len(rows)} at or under 0.1 (wall), "
        f"{sum(x <= 0.1 for x in cpu)} (CPU).",
        "",
        "Bootstrap, B = 1000 resamples of a 1000-point fit (3 parameters, LM), "
        "`fitcli ci --method bootstrap` in-process against the run's own `elapsed_s` "
        f"({boot['fit_s']:.2f} s): residual resampling {boot['residual']:.2f} s "
        f"({boot['residual'] / boot['fit_s']:.2f}x, {boot['residual_converged']} converged), "
        f"case resampling {boot['case']:.2f} s ({boot['case'] / boot['fit_s']:.2f}x, "
        f"{boot['case_converged']} converged); target at most 20x.",
    ]
    text = "\n".join(lines)
    print(text)
    record("intervals", "Command: `python benchmarks/intervals.py`\n\n" + text)


if __name__ == "__main__":
    main()
