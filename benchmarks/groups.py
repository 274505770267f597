"""Many fits and global fits: one `fitcli train` on grouped data against a Python loop of scipy
`curve_fit` over the same groups, and a global fit against lmfit on the flat stacked problem.

    python benchmarks/groups.py                 # 10^3 and 10^4 groups; updates BENCHMARKS.md
    python benchmarks/groups.py --big           # also 10^5 groups of the 1-D Gaussian

(a) a 1-D Gaussian a*exp(-(x-c)**2/(2*s**2)) on 100 points per group, all three per group;
(b) Gpufit's GAUSS_2D on 15 x 15 pixels, a*exp(-((u-xc)**2+(v-yc)**2)/(2*s**2)) + b, five
parameters per group, two named variables u, v. Gaussian noise; every group starts from the
same values, near each group's truth (within about 10%). Both sides read the same CSV (one
group column). fitcli: summary.json's `fit_s` (fit and error bars) and `elapsed_s`, and the
whole process. The loop: `curve_fit(method="lm")` with its default tolerances, timed around the
loop in its own process (a subprocess that reads the file), and that whole process.
(c) a global fit: 1,000 groups of a Gaussian with per-group a, c, s on a shared line b0 + b1*x.
lmfit gets the flat problem (3*G + 2 parameters, one residual vector), timed in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, record, train_cmd  # noqa: E402

# fitcli.lm_jit.MIN_CELLS, read in `main` (the loop's own process must not import fitcli).
MIN_CELLS = 0

GAUSS1 = {
    "expr": "a*exp(-(x - c)**2/(2*s**2))",
    "names": ["a", "c", "s"],
    "start": [10.0, 0.0, 1.0],
}
GAUSS2 = {
    "expr": "a*exp(-((u - xc)**2 + (v - yc)**2)/(2*s**2)) + b",
    "names": ["a", "xc", "yc", "s", "b"],
    "start": [500.0, 7.0, 7.0, 2.0, 10.0],
}
GLOBAL = {
    "expr": "a*exp(-(x - c)**2/(2*s**2)) + b0 + b1*x",
    "names": ["a", "c", "s"],
    "shared": ["b0", "b1"],
    "start": [10.0, 0.0, 1.0],
    "shared_start": [0.5, 0.1],
}


def gauss1(x, a, c, s):
    return a * np.exp(-((x - c) ** 2) / (2 * s**2))


def gauss2(uv, a, xc, yc, s, b):
    u, v = uv
    return a * np.exp(-((u - xc) ** 2 + (v - yc) ** 2) / (2 * s**2)) + b


def make_1d(groups: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    x = np.linspace(-5, 5, 100)
    truth = np.array(GAUSS1["start"]) + rng.uniform(-1, 1, (groups, 3)) * [1.0, 0.3, 0.1]
    y = gauss1(x[None, :], *(truth[:, k, None] for k in range(3)))
    y = y + rng.normal(0, 0.1, y.shape)
    frame = pd.DataFrame(
        {"x": np.tile(x, groups), "y": y.ravel(), "g": np.repeat(np.arange(groups), x.size)}
    )
    return frame, truth


def make_2d(groups: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    u, v = (w.ravel() for w in np.meshgrid(np.arange(15.0), np.arange(15.0), indexing="ij"))
    start = np.array(GAUSS2["start"])
    truth = start + rng.uniform(-1, 1, (groups, 5)) * [50.0, 0.5, 0.5, 0.2, 1.0]
    z = gauss2((u[None, :], v[None, :]), *(truth[:, k, None] for k in range(5)))
    z = z + rng.normal(0, 5.0, z.shape)
    frame = pd.DataFrame(
        {
            "u": np.tile(u, groups),
            "v": np.tile(v, groups),
            "z": z.ravel(),
            "g": np.repeat(np.arange(groups), u.size),
        }
    )
    return frame, truth


# curve_fit's own tolerances (MINPACK's lmdif defaults through scipy): ftol = xtol = 1.49e-8,
# gtol = 0; fitcli's defaults iterate to rounding level.
CURVE_FIT_TOLERANCES = {"ftol": 1.49012e-08, "xtol": 1.49012e-08, "gtol": 0.0}


def write_config(
    path: Path, data: str, problem: dict, columns: dict, dtype: str, tolerances: dict | None = None
) -> None:
    params: dict = {
        n: {"value": v, "per_group": True}
        for n, v in zip(problem["names"], problem["start"], strict=True)
    }
    for n, v in zip(problem.get("shared", []), problem.get("shared_start", []), strict=True):
        params[n] = v
    cfg = {
        "name": path.stem,
        "epochs": 200,
        "snapshots": 2,
        "dtype": dtype,
        "data": {"file": data, "columns": columns},
        "model": {"expr": problem["expr"], "params": params},
        "optimizer": {"name": "LevenbergMarquardt", **(tolerances or {})},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def fitcli_train(cfg: Path, run: Path) -> dict:
    """One whole `fitcli train` process: its wall time, summary.json and groups.csv."""
    t = time.perf_counter()
    res = subprocess.run(
        train_cmd(cfg, run),
        capture_output=True,
        text=True,
    )
    whole = time.perf_counter() - t
    if res.returncode not in (0, 1):
        raise RuntimeError(f"fitcli train {cfg} exited {res.returncode}: {res.stderr[-3000:]}")
    summary = json.loads((run / "summary.json").read_text())
    rows = pd.read_csv(run / "groups.csv", keep_default_na=False)
    return {"whole": whole, "summary": summary, "rows": rows}


# ---- the scipy loop, run as its own process on the same file -------------------------------


def loop_main(data: str, kind: str, out: str) -> None:
    """The baseline script: read the file, curve_fit each group, save the parameters."""
    from scipy.optimize import curve_fit

    frame = pd.read_csv(data)
    g = frame["g"].to_numpy()
    order = np.argsort(g, kind="stable")
    bounds = np.flatnonzero(np.diff(g[order])) + 1
    slices = np.split(order, bounds)
    labels = [int(g[s[0]]) for s in slices]
    if kind == "1d":
        f, p0, xs = gauss1, GAUSS1["start"], [frame["x"].to_numpy()[s] for s in slices]
    else:
        u, v = frame["u"].to_numpy(), frame["v"].to_numpy()
        f, p0, xs = gauss2, GAUSS2["start"], [np.vstack([u[s], v[s]]) for s in slices]
    ycol = frame["y" if kind == "1d" else "z"].to_numpy()
    ys = [ycol[s] for s in slices]
    params = np.full((len(slices), len(p0)), np.nan)
    t = time.perf_counter()
    for j in range(len(slices)):
        with contextlib.suppress(RuntimeError):  # not converged: left NaN, counted
            params[j] = curve_fit(f, xs[j], ys[j], p0=p0, method="lm")[0]
    fit_s = time.perf_counter() - t
    np.savez(out, labels=np.array(labels), params=params, fit_s=fit_s)


def scipy_loop(data: Path, kind: str, out: Path) -> dict:
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--loop", str(data), kind, str(out)], check=True)
    whole = time.perf_counter() - t
    z = np.load(out)
    return {
        "whole": whole,
        "fit_s": float(z["fit_s"]),
        "labels": z["labels"],
        "params": z["params"],
    }


def worst_rel(rows: pd.DataFrame, names: list[str], labels: np.ndarray, ref: np.ndarray):
    """(worst relative difference over groups and parameters, groups over 1e-6, the worst group).
    Relative to max(|value|, 1): the 1-D centre lies in [-0.3, 0.3] and can be ~0, where a
    relative difference says nothing (the other parameters are all above 1)."""
    mine = rows.set_index(rows["group"].astype(int)).loc[labels, names].to_numpy(float)
    rel = np.abs(mine - ref) / np.maximum(np.abs(ref), 1.0)
    per = np.nanmax(rel, axis=1)
    worst = int(np.nanargmax(per))
    return float(per[worst]), int(np.sum(per > 1e-6)), worst, mine


def tight_refit(kind: str, frame: pd.DataFrame, label: int) -> np.ndarray:
    """The scipy fit of one group with tolerances at 1e-15 (which minimum is the better one)."""
    from scipy.optimize import curve_fit

    sub = frame[frame["g"] == label]
    tight = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "maxfev": 100000}
    if kind == "1d":
        return curve_fit(
            gauss1,
            sub["x"].to_numpy(),
            sub["y"].to_numpy(),
            p0=GAUSS1["start"],
            method="lm",
            **tight,
        )[0]
    uv = np.vstack([sub["u"].to_numpy(), sub["v"].to_numpy()])
    return curve_fit(gauss2, uv, sub["z"].to_numpy(), p0=GAUSS2["start"], method="lm", **tight)[0]


# (problem, dtype) -> (whole process with a cold kernel cache, the same run warm, groups), for
# the first size whose run compiles its fit (`fitcli.lm_jit.MIN_CELLS`; smaller runs do not).
COMPILE: dict = {}


def many_fits(kind: str, groups: int, tmp: Path, lines: list[str]) -> dict:
    rng = np.random.default_rng(groups + (0 if kind == "1d" else 1))
    frame, _ = (make_1d if kind == "1d" else make_2d)(groups, rng)
    data = tmp / f"{kind}-{groups}.csv"
    frame.to_csv(data, index=False)
    problem = GAUSS1 if kind == "1d" else GAUSS2
    columns = (
        {"x": "x", "y": "y", "group": "g"}
        if kind == "1d"
        else {"x": ["u", "v"], "y": "z", "group": "g"}
    )
    out: dict = {"kind": kind, "groups": groups}
    for dtype in ("float64", "float32"):
        cfg = tmp / f"{kind}-{groups}-{dtype}.yaml"
        write_config(cfg, data.name, problem, columns, dtype)
        compiles = groups * (100 if kind == "1d" else 225) >= MIN_CELLS
        if compiles and (kind, dtype) not in COMPILE:
            # The first run of a model compiles it into the kernel cache (cold); later runs of
            # the same model, these measured ones included, load it.
            cold = fitcli_train(cfg, tmp / f"run-{kind}-{groups}-{dtype}-cold")["whole"]
            COMPILE[(kind, dtype)] = cold
        out[dtype] = fitcli_train(cfg, tmp / f"run-{kind}-{groups}-{dtype}")
        if isinstance(COMPILE.get((kind, dtype)), float):
            COMPILE[(kind, dtype)] = (COMPILE[(kind, dtype)], out[dtype]["whole"], groups)
    cfg = tmp / f"{kind}-{groups}-loose.yaml"
    write_config(cfg, data.name, problem, columns, "float64", CURVE_FIT_TOLERANCES)
    out["loose"] = fitcli_train(cfg, tmp / f"run-{kind}-{groups}-loose")
    loop = scipy_loop(data, kind, tmp / f"loop-{kind}-{groups}.npz")
    out["loop"] = loop
    rel, over, worst, mine = worst_rel(
        out["float64"]["rows"], problem["names"], loop["labels"], loop["params"]
    )
    out["rel"], out["over"] = rel, over
    note = ""
    if over:
        # Which minimum is right: refit the worst group with scipy at tight tolerances.
        label = int(loop["labels"][worst])
        ref = tight_refit(kind, frame, label)
        d_fitcli = float(np.max(np.abs(mine[worst] - ref) / np.maximum(np.abs(ref), 1.0)))
        d_loop = float(np.max(np.abs(loop["params"][worst] - ref) / np.maximum(np.abs(ref), 1.0)))
        note = (
            f"; worst group {label}: against curve_fit at 1e-15 tolerances fitcli differs by "
            f"{d_fitcli:.1e}, the default-tolerance loop by {d_loop:.1e}"
        )
    rel32, _, _, _ = worst_rel(
        out["float32"]["rows"], problem["names"], loop["labels"], loop["params"]
    )
    s64, s32 = out["float64"]["summary"], out["float32"]["summary"]
    loose = out["loose"]["summary"]
    rel_loose, _, _, _ = worst_rel(
        out["loose"]["rows"], problem["names"], loop["labels"], loop["params"]
    )
    out["note"] = note
    out["rel32"] = rel32
    lines.append(
        f"| {'1-D Gaussian, 100 pts' if kind == '1d' else '2-D Gaussian, 15x15'} | {groups:,} "
        f"| {s64['fit_s']:.2f} | {s64['elapsed_s']:.2f} | {out['float64']['whole']:.2f} "
        f"| {loop['fit_s']:.2f} | {loop['whole']:.2f} "
        f"| {groups / s64['fit_s']:,.0f} | {groups / loop['fit_s']:,.0f} "
        f"| {loop['fit_s'] / s64['fit_s']:.1f} | {loop['whole'] / out['float64']['whole']:.1f} "
        f"| {s32['fit_s']:.2f} | {groups / s32['fit_s']:,.0f} "
        f"| {loose['fit_s']:.2f} | {loop['fit_s'] / loose['fit_s']:.1f} | {rel_loose:.1e} "
        f"| {rel:.1e} ({over}) "
        f"| {s64['groups_converged']}/{groups}, {s32['groups_converged']}/{groups} |"
    )
    print(lines[-1], note, flush=True)
    if note:
        lines.append(f"|   | {note[2:]} |")
    return out


# ---- (c) the global fit ---------------------------------------------------------------------


def make_global(groups: int, rng: np.random.Generator):
    x = np.linspace(-5, 5, 100)
    truth = np.array(GLOBAL["start"]) + rng.uniform(-1, 1, (groups, 3)) * [1.0, 0.3, 0.1]
    b0, b1 = 0.4, 0.12
    y = gauss1(x[None, :], *(truth[:, k, None] for k in range(3))) + b0 + b1 * x[None, :]
    y = y + rng.normal(0, 0.1, y.shape)
    return x, y


def lmfit_flat(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, int]:
    """lmfit on the flat problem: 3*G + 2 parameters, G*100 residuals; (seconds, values, nfev)."""
    import lmfit

    groups = y.shape[0]
    params = lmfit.Parameters()
    for j in range(groups):
        for n, v in zip(GLOBAL["names"], GLOBAL["start"], strict=True):
            params.add(f"{n}{j}", value=v)
    for n, v in zip(GLOBAL["shared"], GLOBAL["shared_start"], strict=True):
        params.add(n, value=v)
    names = list(params)

    def residual(p):
        vals = np.array([p[n].value for n in names])
        per = vals[: 3 * groups].reshape(groups, 3)
        b0, b1 = vals[-2:]
        m = gauss1(x[None, :], per[:, :1], per[:, 1:2], per[:, 2:3]) + b0 + b1 * x[None, :]
        return (m - y).ravel()

    t = time.perf_counter()
    res = lmfit.minimize(residual, params, method="leastsq")
    return time.perf_counter() - t, np.array([res.params[n].value for n in names]), int(res.nfev)


def global_fit(groups: int, lm_groups: list[int], tmp: Path, lines: list[str]) -> None:
    x, y = make_global(groups, np.random.default_rng(7))
    frame = pd.DataFrame(
        {"x": np.tile(x, groups), "y": y.ravel(), "g": np.repeat(np.arange(groups), x.size)}
    )
    frame.to_csv(tmp / "global.csv", index=False)
    cfg = tmp / "global.yaml"
    write_config(cfg, "global.csv", GLOBAL, {"x": "x", "y": "y", "group": "g"}, "float64")
    got = fitcli_train(cfg, tmp / "run-global")
    s = got["summary"]
    lines.append(
        f"fitcli, {groups:,} groups x (3 per-group + 2 shared) = {3 * groups + 2:,} parameters, "
        f"{groups * x.size:,} points: fit_s {s['fit_s']:.2f} s (target <= 5 s), elapsed_s "
        f"{s['elapsed_s']:.2f} s, whole process {got['whole']:.2f} s; status {s['status']}, "
        f"{s['groups_converged']}/{groups} groups converged; shared b0 = {s['params']['b0']:.6f}, "
        f"b1 = {s['params']['b1']:.6f}."
    )
    print(lines[-1], flush=True)
    rows = got["rows"].set_index(got["rows"]["group"].astype(int))
    for g in lm_groups:
        # The same data's first g groups, fitted by fitcli and by lmfit, so the results compare.
        sub = frame[frame["g"] < g]
        sub.to_csv(tmp / f"global-{g}.csv", index=False)
        cfg_g = tmp / f"global-{g}.yaml"
        write_config(
            cfg_g, f"global-{g}.csv", GLOBAL, {"x": "x", "y": "y", "group": "g"}, "float64"
        )
        mine = fitcli_train(cfg_g, tmp / f"run-global-{g}")
        secs, vals, nfev = lmfit_flat(x, y[:g])
        r = mine["rows"].set_index(mine["rows"]["group"].astype(int)).loc[range(g), GLOBAL["names"]]
        ours = np.concatenate(
            [r.to_numpy(float).ravel(), [mine["summary"]["params"][n] for n in GLOBAL["shared"]]]
        )
        rel = float(np.max(np.abs(ours - vals) / np.abs(vals)))
        lines.append(
            f"lmfit leastsq, flat problem of {g} groups ({3 * g + 2} parameters, {g * x.size:,} "
            f"residuals): {secs:.2f} s in-process ({nfev} evaluations); fitcli on the same "
            f"{g} groups: fit_s {mine['summary']['fit_s']:.3f} s "
            f"({secs / mine['summary']['fit_s']:.0f}x); "
            f"worst relative difference of the {3 * g + 2} parameters {rel:.1e}."
        )
        print(lines[-1], flush=True)
    del rows
    if len(lm_groups) >= 2:
        g1, g2 = lm_groups[-2], lm_groups[-1]
        t1 = float(lines[-2].split("): ")[1].split(" s")[0])
        t2 = float(lines[-1].split("): ")[1].split(" s")[0])
        k = np.log(t2 / t1) / np.log(g2 / g1)
        est = t2 * (groups / g2) ** k
        lines.append(
            f"lmfit at {groups:,} groups, extrapolated (not run) from {g1} and {g2} groups as "
            f"time ~ G^{k:.2f}: about {est:,.0f} s, {est / s['fit_s']:,.0f}x fitcli's fit_s. It is "
            f"not run: MINPACK's finite-difference Jacobian is dense, {groups * x.size:,} x "
            f"{3 * groups + 2:,} ({groups * x.size * (3 * groups + 2) * 8 / 2**30:.1f} GiB), one "
            f"model evaluation per parameter for each Jacobian, and a dense QR of it per iteration."
        )
        print(lines[-1], flush=True)


def main() -> None:
    global MIN_CELLS
    from fitcli.lm_jit import MIN_CELLS

    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also 10^5 groups of the 1-D Gaussian")
    ap.add_argument("--groups", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    head = (
        "| problem | groups | fitcli fit_s | elapsed_s | whole process s | loop fit s "
        "| loop process s | fitcli fits/s | loop fits/s | fit ratio | process ratio "
        "| float32 fit_s | float32 fits/s | fit_s at curve_fit's tolerances | its fit ratio "
        "| its worst rel. diff | worst rel. diff (groups > 1e-6) "
        "| converged f64, f32 |\n"
        "|" + "---|" * 18
    )
    lines = [head]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        os.environ["FITCLI_CACHE_DIR"] = str(tmp / "kernel-cache")  # cold at the start
        for kind in ("1d", "2d"):
            for groups in args.groups:
                many_fits(kind, groups, tmp, lines)
        if args.big:
            for kind in ("1d", "2d"):
                many_fits(kind, 100_000, tmp, lines)
        glines: list[str] = []
        global_fit(1000, [50, 100], tmp, glines)
    compile_lines = [
        f"{'1-D' if kind == '1d' else '2-D'} {dtype}, {g:,} groups: whole process {cold:.2f} s "
        f"with a cold kernel cache, {warm:.2f} s warm"
        for (kind, dtype), (cold, warm, g) in COMPILE.items()
    ]
    cmd = "python benchmarks/groups.py" + (" --big" if args.big else "")
    text = (
        f"Command: `{cmd}`\n\nMachine: {machine()} (shared with other jobs: wall times are "
        "noisy).\n\n"
        + "\n".join(lines)
        + "\n\nCompiling (the first run of a model on a machine):\n\n"
        + "\n".join(f"- {c}" for c in compile_lines)
        + "\n\nGlobal fit:\n\n"
        + "\n".join(f"- {g}" for g in glines)
        + "\n"
    )
    print(text)
    if not args.no_record:
        record("groups", text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loop":
        loop_main(*sys.argv[2:5])
    else:
        sys.path.insert(0, str(ROOT / "src"))
        main()
