"""MCMC intervals: fitcli's `method: mcmc` against lmfit's `Minimizer.emcee` on the same
posterior, same sampler (emcee), same walkers and steps, both in this process.

    python benchmarks/mcmc.py            # prints the table and updates BENCHMARKS.md

Both sample the parameters under a flat prior inside their bounds. Without a sigma column,
lmfit samples the noise scale as an extra parameter (`__lnsigma`, flat in log sigma: Jeffreys'
prior), fitcli integrates it out analytically under the same prior, so the two target the same
marginal posterior of the model's parameters. Agreement: the largest difference of any 95%
credible end between the two, in posterior standard deviations (Monte Carlo error of a 2.5%
quantile from a few thousand effective samples is about 0.05-0.1). Time: wall clock of the
sampling alone (fitcli: `FitResult.intervals("mcmc")`, which also computes the credible band and
the diagnostics; lmfit: `Minimizer.emcee`, one Python residual call per walker and step).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import ROOT, machine, record  # noqa: E402
from intervals import NIST_EXPR, _numpy_model  # noqa: E402
from nist_problems import load_suite  # noqa: E402

import fitcli  # noqa: E402

WALKERS, STEPS, BURN, SEED = 32, 5000, 1250, 0
NIST = ["Misra1a", "Chwirut2", "DanWood", "BoxBOD", "Rat42", "Eckerle4"]
SHIPPED = ["measured-decay.yaml", "damped-oscillator.yaml", "seed.yaml"]


def _lmfit(result: fitcli.FitResult) -> tuple[dict, float]:
    import lmfit

    f = _numpy_model(result)
    y = result.y
    w = None if result.sigma is None else 1.0 / result.sigma
    params = lmfit.Parameters()
    for info in result._float64_model().infos:
        params.add(
            info.name,
            value=result.params[info.name],
            vary=info.free,
            min=-np.inf if info.min is None else info.min,
            max=np.inf if info.max is None else info.max,
        )

    def residual(p):
        with np.errstate(all="ignore"):
            r = y - f({k: p[k].value for k in p if not k.startswith("__")})
        r = r if w is None else r * w
        # A walker where the model is not finite: zero posterior (lmfit raises on NaN).
        return r if np.isfinite(r).all() else np.full_like(r, 1e150)

    mini = lmfit.Minimizer(residual, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = mini.emcee(
            steps=STEPS,
            nwalkers=WALKERS,
            burn=BURN,
            is_weighted=w is not None,
            seed=SEED,
            progress=False,
        )
        wall = time.perf_counter() - t0
    chain = out.flatchain
    ends = {
        name: np.quantile(chain[name].to_numpy(), [0.025, 0.975])
        for name in result._float64_model().free_names
    }
    return ends, wall


def row(label: str, result: fitcli.FitResult) -> dict:
    result.intervals("mcmc", 0.95, walkers=WALKERS, steps=200, burn=0, seed=SEED)  # warm-up
    t0 = time.perf_counter()
    doc = result.intervals("mcmc", 0.95, walkers=WALKERS, steps=STEPS, burn=BURN, seed=SEED)
    ours = time.perf_counter() - t0
    failed = None
    try:
        ends, theirs = _lmfit(result)
    except ValueError as exc:  # lmfit's walkers can run off an improper posterior
        ends, theirs, failed = {}, None, str(exc)
    worst = None
    for name, entry in doc["params"].items():
        if name in ends and entry["std"] is not None:  # None: chains that do not settle
            iv, (lo, hi), sd = entry["intervals"][0], ends[name], entry["std"]
            worst = max(worst or 0.0, abs(iv["lower"] - lo) / sd, abs(iv["upper"] - hi) / sd)
    diag = doc["params"].values()
    out = {
        "label": label,
        "p": doc["n_params"],
        "n": doc["n_points"],
        "worst": worst,
        "ours": ours,
        "theirs": theirs,
        "rhat": max(np.inf if d["r_hat"] is None else d["r_hat"] for d in diag),
        "tau": max(np.inf if d["autocorr_time"] is None else d["autocorr_time"] for d in diag),
        "converged": doc["converged"],
        "failed": failed,
    }
    print(out, flush=True)
    return out


def main() -> None:
    suite = load_suite(ROOT / "tests" / "data" / "nist")
    rows = []
    for name in NIST:
        pr = suite[name]
        params = {f"b{i + 1}": v for i, v in enumerate(pr.certified)}
        result = fitcli.fit(
            x=np.array(pr.x), y=np.array(pr.y), expr=NIST_EXPR[name], params=params, epochs=300
        )
        rows.append(row(f"NIST {name}", result))
    for name in SHIPPED:
        result = fitcli.fit(
            ROOT / "configs" / name, optimizer="LM", loss="mse", epochs=300, scheduler=None
        )
        rows.append(row(f"configs/{name}", result))
    lines = [
        "Command: `python benchmarks/mcmc.py`",
        "",
        f"Machine: {machine()} (shared with other jobs: wall times are noisy).",
        "",
        f"{WALKERS} walkers, {STEPS} steps, the first {BURN} left out, seed {SEED}, on both sides.",
        "",
        "| problem | p | n | worst 95% end difference (posterior sd) | fitcli s | lmfit emcee s "
        "| time ratio | fitcli max R-hat | max tau | fitcli says converged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["failed"]:
            cells = f"n/a | {r['ours']:.2f} | failed: {r['failed']} | n/a"
        else:
            ratio = r["ours"] / r["theirs"]
            worst = "n/a" if r["worst"] is None else f"{r['worst']:.3f}"
            cells = f"{worst} | {r['ours']:.2f} | {r['theirs']:.2f} | {ratio:.3f}"
        lines.append(
            f"| {r['label']} | {r['p']} | {r['n']} | {cells} | {r['rhat']:.4f} "
            f"| {r['tau']:.1f} | {'yes' if r['converged'] else 'no'} |"
        )
    ok = [r for r in rows if not r["failed"]]
    ratios = sorted(r["ours"] / r["theirs"] for r in ok)
    worst = max(r["worst"] for r in ok if r["worst"] is not None)
    lines += [
        "",
        f"Time ratio fitcli / lmfit: median {ratios[len(ratios) // 2]:.3f}, "
        f"worst {ratios[-1]:.3f}; worst end difference {worst:.3f} posterior sd.",
    ]
    text = "\n".join(lines)
    print(text)
    if "--no-record" not in sys.argv:
        record("mcmc", text)


if __name__ == "__main__":
    main()
