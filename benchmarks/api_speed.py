"""In-process fit time of small problems: `fitcli.fit` against lmfit and scipy, side by side.

For each problem (the shipped configs' LM-able problems and a seeded set of small NIST-size
problems: exponentials, Gaussians, rationals, 10-200 points, 2-6 parameters) the same data and
starting values go to `fitcli.fit(..., optimizer="LM", dtype="float64", device="cpu")` (no run
directory), `lmfit.Model.fit` and `scipy.optimize.curve_fit`; after a warm-up, each is timed
`--reps` times, interleaved. Reported: the median over problems of each problem's median time,
and the ratios fitcli/lmfit and fitcli/curve_fit, plus the worst disagreement in the fitted
parameters (all three must find the same minimum for the times to compare). Each call's
process CPU time is taken too and summarized the same way: on a machine shared with other jobs
it is disturbed less than the wall time.

    python benchmarks/api_speed.py [--reps 15] [--record] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, record  # noqa: E402

NUMPY = {"exp": np.exp, "sin": np.sin, "cos": np.cos, "sqrt": np.sqrt, "log": np.log}


@dataclass
class Problem:
    name: str
    expr: str  # valid both as a fitcli expression and as numpy code
    x: np.ndarray
    y: np.ndarray
    start: dict[str, float]
    fixed: dict[str, float]

    def function(self):
        """A Python function f(x, p1, p2, ...) of the free parameters (lmfit, curve_fit)."""
        free = list(self.start)
        args = ", ".join(["x", *free])
        ns = {**NUMPY, **self.fixed}
        exec(f"def f({args}):\n    return {self.expr}\n", ns)  # our own expressions only
        return ns["f"]


def shipped() -> list[Problem]:
    """The shipped configs' problems: their data and starts, bounds dropped (curve_fit's LM has
    none), fixed parameters kept fixed."""
    from fitcli.config import load_config
    from fitcli.data import make_dataset

    out = []
    for name in ("measured-decay", "nist-misra1a", "damped-oscillator", "seed"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        ds = make_dataset(cfg)
        m = cfg.model
        if m.basis is not None:
            terms = [f"theta{k}*({b})" for k, b in enumerate(m.basis)]
            expr, start, fixed = (
                " + ".join(terms),
                {f"theta{k}": 0.5 for k in range(len(terms))},
                {},
            )
        else:
            assert m.expr is not None and m.params is not None
            expr = m.expr
            start = {k: p.value for k, p in m.params.items() if p.vary}
            fixed = {k: p.value for k, p in m.params.items() if not p.vary}
        out.append(Problem(f"config {name}", expr, ds.x, ds.y, start, fixed))
    return out


KINDS = [
    ("exp1", "a*exp(-b*x)", {"a": 5.0, "b": 0.4}, (0, 10)),
    ("exp1+c", "a*exp(-b*x) + c", {"a": 5.0, "b": 0.4, "c": 1.0}, (0, 10)),
    ("exp2", "a*exp(-b*x) + c*exp(-d*x)", {"a": 4.0, "b": 1.5, "c": 2.0, "d": 0.15}, (0, 12)),
    ("gauss", "a*exp(-(x - m)**2/(2*s**2)) + c", {"a": 3.0, "m": 5.0, "s": 1.2, "c": 0.5}, (0, 10)),
    (
        "gauss+line",
        "a*exp(-(x - m)**2/(2*s**2)) + c + d*x",
        {"a": 3.0, "m": 5.0, "s": 1.2, "c": 0.5, "d": 0.1},
        (0, 10),
    ),
    ("rat1", "(a + b*x)/(1 + c*x)", {"a": 1.0, "b": 2.0, "c": 0.3}, (0, 10)),
    (
        "rat2",
        "(a + b*x + c*x**2)/(1 + d*x + g*x**2)",
        {"a": 1.0, "b": 0.5, "c": 0.2, "d": 0.1, "g": 0.05},
        (0, 10),
    ),
    (
        "sin-damped",
        "a*exp(-k*x)*sin(w*x + p) + c + d*x",
        {"a": 2.0, "k": 0.2, "w": 1.3, "p": 0.3, "c": 0.1, "d": 0.05},
        (0, 12),
    ),
]


def generated(count: int = 20, seed: int = 17) -> list[Problem]:
    """Seeded small problems: a kind, 10-200 points, 2% noise, starts 10-30% off the truth."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind, expr, truth, (lo, hi) = KINDS[i % len(KINDS)]
        n = int(rng.integers(10, 201))
        x = np.linspace(lo, hi, n)
        f = Problem("", expr, x, x, dict(truth), {}).function()
        clean = f(x, *truth.values())
        y = clean + 0.02 * np.std(clean) * rng.normal(size=n)
        off = rng.uniform(0.1, 0.3, len(truth)) * rng.choice([-1, 1], len(truth))
        start = {k: v * (1 + o) for (k, v), o in zip(truth.items(), off, strict=True)}
        out.append(Problem(f"{kind} n={n}", expr, x, y, start, {}))
    return out


def runners(p: Problem):
    import lmfit
    from scipy.optimize import curve_fit

    import fitcli

    f = p.function()
    model = lmfit.Model(f)
    lm_params = model.make_params(**p.start)
    p0 = list(p.start.values())
    params = {**p.start, **{k: {"value": v, "vary": False} for k, v in p.fixed.items()}}

    def run_fitcli():
        r = fitcli.fit(
            x=p.x, y=p.y, expr=p.expr, params=params, optimizer="LM", dtype="float64", device="cpu"
        )
        return [r.params[k] for k in p.start]

    def run_fitcli_loose():
        # At lmfit's own stopping tolerances (leastsq's ftol = xtol = 1.5e-8), where fitcli's
        # defaults iterate to rounding level (1e-15): how much of the gap is the extra iterations.
        r = fitcli.fit(
            x=p.x,
            y=p.y,
            expr=p.expr,
            params=params,
            optimizer="LM",
            dtype="float64",
            device="cpu",
            **{"optimizer.ftol": 1.5e-8, "optimizer.xtol": 1.5e-8},
        )
        return [r.params[k] for k in p.start]

    def run_lmfit():
        r = model.fit(p.y, lm_params, x=p.x)
        return [r.params[k].value for k in p.start]

    def run_curve_fit():
        popt, _ = curve_fit(f, p.x, p.y, p0=p0, maxfev=10000)
        return list(popt)

    return {
        "fitcli": run_fitcli,
        "fitcli_loose": run_fitcli_loose,
        "lmfit": run_lmfit,
        "curve_fit": run_curve_fit,
    }


def measure(problems: list[Problem], reps: int) -> tuple[list[dict], list[str]]:
    rows, lines = [], []
    for p in problems:
        fns = runners(p)
        found = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in fns.items():  # warm-up (imports, caches) and the answers
                fn()
                found[name] = np.array(fn())
            times: dict[str, list[float]] = {k: [] for k in fns}
            cpu: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(reps):
                for name, fn in fns.items():
                    c, t = time.process_time(), time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
        scale = np.maximum(np.abs(found["curve_fit"]), 1e-12)
        agree = max(float(np.max(np.abs(found[k] - found["curve_fit"]) / scale)) for k in found)
        row = {k: statistics.median(v) for k, v in times.items()}
        row.update({f"cpu {k}": statistics.median(v) for k, v in cpu.items()})
        row["agree"] = agree
        rows.append(row)
        lines.append(
            f"{p.name:28s} fitcli {1e3 * row['fitcli']:7.2f} ms"
            f" (at lmfit's tolerances {1e3 * row['fitcli_loose']:7.2f} ms)"
            f"  lmfit {1e3 * row['lmfit']:7.2f} ms"
            f"  curve_fit {1e3 * row['curve_fit']:7.2f} ms  params agree to {agree:.1e}"
        )
    return rows, lines


def summarize(label: str, rows: list[dict], clock: str = "") -> str:
    """The medians over problems of the wall times, or with `clock` "cpu " of the process's
    CPU times (what other jobs on a shared machine disturb least)."""
    med = {
        k: statistics.median(r[clock + k] for r in rows)
        for k in ("fitcli", "fitcli_loose", "lmfit", "curve_fit")
    }
    label = f"{label} ({clock.strip() or 'wall'})"
    return (
        f"{label:28s} ({len(rows):2d} problems): fitcli {1e3 * med['fitcli']:.2f} ms, "
        f"lmfit {1e3 * med['lmfit']:.2f} ms, curve_fit {1e3 * med['curve_fit']:.2f} ms; "
        f"fitcli/lmfit {med['fitcli'] / med['lmfit']:.2f}x, "
        f"fitcli/curve_fit {med['fitcli'] / med['curve_fit']:.2f}x; at lmfit's tolerances "
        f"fitcli {1e3 * med['fitcli_loose']:.2f} ms, {med['fitcli_loose'] / med['lmfit']:.2f}x "
        "lmfit; "
        f"worst parameter disagreement {max(r['agree'] for r in rows):.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--record", action="store_true", help="write BENCHMARKS.md's section")
    ap.add_argument("--profile", action="store_true", help="cProfile fitcli.fit over the set")
    args = ap.parse_args()
    sets = {"shipped configs": shipped(), "generated NIST-size": generated()}
    out = [f"machine: {machine()}", f"reps per problem: {args.reps} (after a warm-up)", ""]
    summary = []
    for label, problems in sets.items():
        rows, lines = measure(problems, args.reps)
        out += lines
        summary.append(summarize(label, rows))
        summary.append(summarize(label, rows, "cpu "))
    everything = [*out, "", *summary]
    print("\n".join(everything))
    if args.profile:
        fns = [runners(p)["fitcli"] for ps in sets.values() for p in ps]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            for fn in fns:
                fn()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        print(buf.getvalue())
    if args.record:
        cmd = "python benchmarks/api_speed.py --reps " + str(args.reps) + " --record"
        head = "## Python API: in-process fit time against lmfit and curve_fit\n\n"
        record("api-speed", head + f"```\n$ {cmd}\n" + "\n".join(everything) + "\n```")


if __name__ == "__main__":
    main()
