"""Faddeeva function and Voigt profile: fitcli.faddeeva against scipy.special, side by side.

    .venv/bin/python benchmarks/voigt.py [--device cuda]

For 10^4 and 10^6 points: the largest relative error of `wofz` against ``scipy.special.wofz``
(on log-polar points, |z| from 1e-6 to 1e6, all four quadrants, where scipy's value is finite)
and of `voigt_profile` against ``scipy.special.voigt_profile`` (x, sigma, gamma spread over
six decades), and the times: scipy's, ours forward, ours forward + backward (all three
partials). Medians of 3 runs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import special

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from fitcli.faddeeva import voigt_profile, wofz  # noqa: E402


def timed(fn, reps: int = 3, sync=lambda: None) -> float:
    fn()  # warm up
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def points(n: int, rng: np.random.Generator) -> np.ndarray:
    r = 10 ** rng.uniform(-6, 6, n)
    return r * np.exp(1j * rng.uniform(-math.pi, math.pi, n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.machine()}, Python {platform.python_version()}")  # fmt: skip
    print()
    print("| function | points | max rel. error | scipy | ours, forward | ratio | ours, "
          "forward + backward | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n in (10**4, 10**6):
        z = points(n, rng)
        ref = special.wofz(z)
        zt = torch.from_numpy(z).to(device)
        ours = wofz(zt).cpu().numpy()
        ok = np.isfinite(ref) & (ref != 0)
        err = np.max(np.abs(ours[ok] - ref[ok]) / np.abs(ref[ok]))
        t_ref = timed(lambda z=z: special.wofz(z))
        t_fwd = timed(lambda zt=zt: wofz(zt), sync=sync)
        leaf = zt.clone().requires_grad_()

        def fwd_bwd(leaf=leaf):
            leaf.grad = None
            wofz(leaf).real.sum().backward()

        t_both = timed(fwd_bwd, sync=sync)
        print(f"| wofz | {n:.0e} | {err:.1e} | {t_ref * 1e3:.1f} ms | {t_fwd * 1e3:.1f} ms | "
              f"{t_fwd / t_ref:.1f} | {t_both * 1e3:.1f} ms | {t_both / t_ref:.1f} |")  # fmt: skip

        x = rng.normal(0, 10, n)
        sigma = 10 ** rng.uniform(-3, 3, n)
        gamma = 10 ** rng.uniform(-3, 3, n)
        ref_v = special.voigt_profile(x, sigma, gamma)
        leaves = [torch.from_numpy(a).to(device) for a in (x, sigma, gamma)]
        ours_v = voigt_profile(*leaves).cpu().numpy()
        ok = ref_v > 0
        err_v = np.max(np.abs(ours_v[ok] - ref_v[ok]) / ref_v[ok])
        t_ref = timed(lambda a=(x, sigma, gamma): special.voigt_profile(*a))
        t_fwd = timed(lambda a=leaves: voigt_profile(*a), sync=sync)
        grads = [a.clone().requires_grad_() for a in leaves]

        def v_both(grads=grads):
            for g in grads:
                g.grad = None
            voigt_profile(*grads).sum().backward()

        t_both = timed(v_both, sync=sync)
        print(f"| voigt_profile | {n:.0e} | {err_v:.1e} | {t_ref * 1e3:.1f} ms | "
              f"{t_fwd * 1e3:.1f} ms | {t_fwd / t_ref:.1f} | {t_both * 1e3:.1f} ms | "
              f"{t_both / t_ref:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
