"""Posterior sampling of a least-squares fit with emcee: credible intervals and bands, with the
diagnostics that say whether the chains can be trusted.

``method: mcmc`` samples the posterior of the free parameters with emcee's affine-invariant
ensemble sampler (Foreman-Mackey et al. 2013), evaluating the model for all walkers at once
(one batched model call per half-ensemble move). The posterior, in the parameters' own
(external) units:

- prior: flat inside each parameter's bounds (`min`, `max`), zero outside;
- likelihood, with sigma taken as absolute (``data.absolute_sigma: true`` and a sigma column):
  ``log L = -chi2 / 2``, the noise known;
- otherwise (no sigma, or relative weights) the noise scale s is unknown and integrated out
  under Jeffreys' prior p(s) ~ 1/s: ``log p(theta | y) = -(n / 2) log RSS_w(theta)``. For a model
  linear in its parameters that marginal posterior is Student's t with n - p degrees of freedom
  around the least-squares estimate with scale ``s^2 (J^T W J)^-1``: its credible intervals are
  then exactly the covariance's t-intervals, which `tests/test_mcmc.py` checks.

The walkers start from the covariance's normal approximation around the estimate (redrawn
inside the bounds). After discarding `burn` steps, every remaining state gives the percentile
(credible) intervals and, on a grid, the credible band of the fitted curve (quantiles of the
curve over posterior draws). Diagnostics per parameter: the integrated autocorrelation time tau
(emcee's estimator), the effective sample size ``walkers * kept / tau``, and the split R-hat over
the walkers' chains (Gelman et al. 2013, BDA3 eq. 11.4; walkers of an ensemble are not
independent chains, so it is a check, not a proof). The result claims ``converged`` only when
every R-hat is under `RHAT_MAX` and the kept chain is at least `TAU_FACTOR` autocorrelation
times long (emcee's own criterion for a reliable tau); otherwise it says which and what to do.

Pure: no printing, no files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fitcli.intervals import IntervalError
from fitcli.lm import one_thread

# Defaults of `uncertainty: {method: mcmc}`.
DEFAULT_STEPS = 5000
MIN_WALKERS = 32
# The chains are trusted when each R-hat is below this and the kept chain is this many
# autocorrelation times long.
RHAT_MAX = 1.05
TAU_FACTOR = 50
# Posterior draws the credible band is computed from (evenly spaced over the kept chain).
BAND_DRAWS = 2000
BAND_POINTS = 200
# Below this many model values per ensemble (points x walkers), sampling runs torch on one thread.
SMALL_ELEMENTS = 1_000_000
# Attempts at drawing each walker's start inside the bounds before shrinking the spread.
START_TRIES = 100


class McmcError(IntervalError):
    """The posterior cannot be sampled for this fit (the message says why); exit 2."""


def _finite(value: float) -> float | None:
    """A diagnostic as JSON can hold it: None where it is not finite."""
    value = float(value)
    return value if math.isfinite(value) else None


def _std(values: np.ndarray) -> float:
    """The sample standard deviation; inf where the chain ran off (1e153: its square
    overflows), with no warning: the verdict says that the chains do not settle."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(values.std(ddof=1))


def default_walkers(p: int) -> int:
    """Walkers of an ensemble for p free parameters: at least MIN_WALKERS and 4p, even."""
    w = max(MIN_WALKERS, 4 * p)
    return w + (w % 2)


def default_burn(steps: int) -> int:
    """Steps discarded at the start of each walker's chain unless `burn` is given."""
    return steps // 4


# The flat prior of a parameter without bounds stops at +-1e150: walkers drifting where the
# data do not pin a parameter down (an improper posterior) stay finite there, and the verdict
# says so; beyond, emcee's stretch moves overflowed to inf and it raised an error.
FLAT_LIMIT = 1e150
# A walker beyond this has run off: no fitted quantity is this large.
RUNAWAY = 1e100


class _Posterior:
    """log p(theta | y) for a batch of external parameter vectors [W, p] (numpy)."""

    def __init__(self, prob: Any, absolute: bool) -> None:
        model = prob.model
        self.model, self.x, self.n = model, prob.x, prob.n
        self.wy = prob.y if prob.weights is None else prob.y * prob.weights
        self.weights = prob.weights
        self.absolute = absolute
        infos = [i for i in model.infos if i.free]
        self.lo = np.array([-np.inf if i.min is None else i.min for i in infos])
        self.hi = np.array([np.inf if i.max is None else i.max for i in infos])

    def inside(self, theta: np.ndarray) -> np.ndarray:
        """Within the bounds, and within +-`FLAT_LIMIT` (the flat prior's reach)."""
        inside = (theta >= self.lo) & (theta <= self.hi) & (np.abs(theta) <= FLAT_LIMIT)
        return np.all(inside, axis=-1)

    def curve(self, theta: np.ndarray, x: torch.Tensor | None = None) -> torch.Tensor:
        """The model at x (the data's by default) for each row of theta: [W, len(x)]."""
        x = self.x if x is None else x
        t = torch.as_tensor(theta, dtype=torch.float64, device=self.wy.device)
        with torch.no_grad():
            out = self.model.predict_external(t, x)
        rows = x.shape[0]
        return out.expand(t.shape[0], rows)

    def rss(self, theta: np.ndarray) -> np.ndarray:
        m = self.curve(theta)
        wm = m if self.weights is None else m * self.weights
        r = self.wy - wm
        return (r * r).sum(dim=1).cpu().numpy()

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        theta = np.atleast_2d(theta)
        out = np.full(theta.shape[0], -np.inf)
        ok = self.inside(theta)
        if ok.any():
            s = self.rss(theta[ok])
            with np.errstate(divide="ignore", invalid="ignore"):
                lp = -0.5 * s if self.absolute else -0.5 * self.n * np.log(s)
            out[ok] = np.where(np.isfinite(lp), lp, -np.inf)
        return out


def _covariance(post: _Posterior, est: np.ndarray) -> np.ndarray:
    """The normal approximation's covariance at the estimate (external units), for the
    walkers' start: (J^T W J)^-1, times s^2 unless sigma is absolute; a pseudo-inverse, and a
    small diagonal where the problem is singular."""
    from fitcli.bands import jacobian

    t = torch.as_tensor(est, dtype=torch.float64, device=post.wy.device)
    jac = jacobian(post.model, t, post.x).detach()
    if post.weights is not None:
        jac = jac * post.weights[:, None]
    jac_np = jac.cpu().numpy()
    cov = np.linalg.pinv(jac_np.T @ jac_np)
    n, p = post.n, len(est)
    if not post.absolute and n > p:
        cov = cov * float(post.rss(est[None, :])[0]) / (n - p)
    diag = np.diag(cov).copy()
    floor = (1e-8 * np.maximum(np.abs(est), 1.0)) ** 2
    bad = ~np.isfinite(diag) | (diag <= 0)
    if bad.any() or not np.isfinite(cov).all():
        cov = np.diag(np.where(bad, floor, np.abs(diag)))
    return cov


def _starts(
    post: _Posterior, est: np.ndarray, cov: np.ndarray, walkers: int, rng: np.random.Generator
) -> np.ndarray:
    """Walkers' start points: draws from N(est, cov) inside the bounds, with finite posterior."""
    p = len(est)
    out = np.empty((walkers, p))
    todo = np.arange(walkers)
    scale = 1.0
    for attempt in range(START_TRIES):
        draw = rng.multivariate_normal(est, cov * scale**2, size=todo.size, method="eigh")
        good = np.isfinite(post(draw))
        out[todo[good]] = draw[good]
        todo = todo[~good]
        if todo.size == 0:
            return out
        if attempt % 10 == 9:
            scale *= 0.1  # near a bound or a cliff: start closer to the estimate
    if not np.isfinite(post(est[None, :]))[0]:
        raise McmcError("the posterior is zero at the estimate (outside the bounds or not finite)")
    raise McmcError(
        f"could not start {todo.size} of {walkers} walkers where the posterior is finite"
    )


def split_rhat(chain: np.ndarray) -> np.ndarray:
    """Split R-hat of each parameter from chains [steps, walkers, p] (BDA3, eq. 11.4): each
    walker's chain cut in two halves, between- and within-chain variances compared."""
    steps = chain.shape[0] // 2
    if steps < 2:
        return np.full(chain.shape[2], np.nan)
    halves = np.concatenate([chain[:steps], chain[steps : 2 * steps]], axis=1)
    with np.errstate(all="ignore"):
        return _rhat(halves, steps)


def _rhat(halves: np.ndarray, steps: int) -> np.ndarray:
    means = halves.mean(axis=0)  # [2W, p]
    within = halves.var(axis=0, ddof=1).mean(axis=0)
    between = steps * means.var(axis=0, ddof=1)
    var_plus = (steps - 1) / steps * within + between / steps
    return np.sqrt(var_plus / within)


def _autocorr(chain: np.ndarray) -> np.ndarray:
    """emcee's integrated autocorrelation time of each parameter ([steps, walkers, p]), without
    its warning (the verdict below says the same, once)."""
    from emcee.autocorr import integrated_time

    log = logging.getLogger("emcee.autocorr")
    was = log.disabled
    log.disabled = True
    try:
        with np.errstate(all="ignore"):
            return np.asarray(integrated_time(chain, quiet=True), dtype=np.float64)
    finally:
        log.disabled = was


def _settled(rhat: np.ndarray, tau: np.ndarray, chain: np.ndarray) -> np.ndarray:
    """Per parameter, whether its chains settled: a finite R-hat and autocorrelation time, and
    no walker beyond +-`RUNAWAY` (walkers that ran off pile up at the flat prior's limit,
    where their statistics look tame)."""
    reach = np.max(np.abs(chain), axis=(0, 1)) if chain.size else np.zeros(chain.shape[-1])
    return np.isfinite(rhat) & np.isfinite(tau) & (reach <= RUNAWAY)


def _verdict(
    names: Sequence[str],
    tau: np.ndarray,
    rhat: np.ndarray,
    kept: int,
    chain: np.ndarray,
    settled: np.ndarray,
) -> tuple[bool, str]:
    """Whether the chains can be trusted, and why not in words (`settled`: `_settled`'s)."""
    problems = []
    wild = np.flatnonzero(~settled).tolist()
    if wild:
        reach = ", ".join(f"{names[k]} reaches {np.max(np.abs(chain[..., k])):.3g}" for k in wild)
        problems.append(
            f"the chains do not settle ({reach}): the posterior may not be proper (a flat prior "
            "on a parameter the data do not pin down); give it bounds (min, max)"
        )
    tame = [k for k in range(len(names)) if k not in wild]
    if tame:
        worst = max(tame, key=lambda k: rhat[k])
        if rhat[worst] >= RHAT_MAX:
            problems.append(f"R-hat of {names[worst]} is {rhat[worst]:.4g} (want < {RHAT_MAX})")
        tmax = float(max(tau[k] for k in tame))
        if kept < TAU_FACTOR * tmax:
            problems.append(
                f"the kept chain is {kept} steps, under {TAU_FACTOR} autocorrelation times "
                f"({TAU_FACTOR * tmax:.0f} steps for tau = {tmax:.3g}): run more steps"
            )
    if problems:
        return False, "not converged: " + "; ".join(problems)
    return True, (
        f"converged: every R-hat < {RHAT_MAX}, the kept chain is {kept / tmax:.0f} "
        "autocorrelation times long"
    )


def sample(
    prob: Any,
    levels: Sequence[float],
    *,
    absolute: bool = False,
    walkers: int | None = None,
    steps: int = DEFAULT_STEPS,
    burn: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample the posterior of `prob` (an `intervals.Problem`): the document intervals.json
    holds, with the credible band of the curve under `band` (see `credible_band`)."""
    import emcee

    t0 = time.perf_counter()
    model = prob.model
    names = list(model.free_names)
    p, n = len(names), prob.n
    if p == 0:
        raise McmcError("there is no free parameter to sample")
    walkers = default_walkers(p) if walkers is None else walkers
    if walkers < 2 * p or walkers % 2:
        raise McmcError(
            f"walkers: an even number of at least 2 x the {p} free parameters is needed "
            f"(got {walkers}); e.g. {default_walkers(p)}"
        )
    burn = default_burn(steps) if burn is None else burn
    if not 0 <= burn < steps:
        raise McmcError(f"burn: must be in 0..steps-1 ({steps - 1}); got {burn}")
    if not absolute and n <= p:
        raise McmcError(f"{n} points for {p} free parameters: the noise cannot be estimated")
    post = _Posterior(prob, absolute)
    with torch.no_grad():
        est = model.external(model.raw.detach()).to(torch.float64).cpu().numpy()
    rng = np.random.default_rng(seed)
    start = _starts(post, est, _covariance(post, est), walkers, rng)
    sampler = emcee.EnsembleSampler(walkers, p, post, vectorize=True)
    state = emcee.State(start, random_state=np.random.RandomState(rng.integers(2**31)).get_state())
    # Each call evaluates half the ensemble: small ops, which a second thread only slows.
    small = post.x.device.type == "cpu" and n * walkers < SMALL_ELEMENTS
    with one_thread() if small else contextlib.nullcontext():
        sampler.run_mcmc(state, steps, progress=False)
    chain = sampler.get_chain()[burn:]  # [kept, walkers, p]
    kept = chain.shape[0]
    flat = chain.reshape(-1, p)
    tau = _autocorr(chain)
    rhat = split_rhat(chain)
    settled = _settled(rhat, tau, chain)
    converged, reason = _verdict(names, tau, rhat, kept, chain, settled)
    out: dict[str, Any] = {}
    for k, name in enumerate(names):
        entries = []
        for lv in levels:
            lower, upper = np.quantile(flat[:, k], [(1 - lv) / 2, (1 + lv) / 2])
            entries.append({"level": lv, "lower": float(lower), "upper": float(upper)})
        out[name] = {
            "estimate": float(est[k]),
            "median": float(np.median(flat[:, k])),
            "std": _finite(_std(flat[:, k])),
            "intervals": entries,
            "autocorr_time": _finite(tau[k]),
            "effective_samples": _finite(walkers * kept / tau[k]) if tau[k] > 0 else None,
            "r_hat": _finite(rhat[k]),
        }
    band = (
        credible_band(post, chain, levels)
        if settled.all()
        else {"skipped": "the chains do not settle (see reason)"}
    )
    notes = [] if converged else [reason]
    doc = {
        "method": "mcmc",
        "levels": list(levels),
        "sampler": f"emcee {emcee.__version__} EnsembleSampler (stretch move)",
        "likelihood": "gaussian, sigma absolute" if absolute else "gaussian, noise integrated out",
        "prior": "flat inside the bounds",
        "walkers": walkers,
        "steps": steps,
        "burn": burn,
        "seed": seed,
        "acceptance_fraction": float(np.mean(sampler.acceptance_fraction)),
        "converged": converged,
        "reason": reason,
        "n_points": n,
        "n_params": p,
        "params": out,
        "notes": notes,
        "elapsed_s": time.perf_counter() - t0,
    }
    doc["band"] = band
    if not math.isfinite(doc["acceptance_fraction"]):
        doc["acceptance_fraction"] = None
    return doc


def credible_band(post: _Posterior, chain: np.ndarray, levels: Sequence[float]) -> dict[str, Any]:
    """The credible band of the fitted curve: on BAND_POINTS points of the data's x range, the
    median and the `level` quantile range of the curve over about BAND_DRAWS posterior draws
    (every walker's state at evenly spaced steps of the kept chain [steps, walkers, p], so that
    the draws are as far apart in the chain as their number allows), as lists under `x`,
    `median`, `cred_lower_<tag>`, `cred_upper_<tag>` (tags as in bands.csv); for a model of
    several variables, the reason there is none under `skipped`."""
    from fitcli.bands import level_tag

    x = post.x
    if x.ndim != 1:
        return {"skipped": "the credible band is drawn for a model of one variable only"}
    grid = torch.linspace(float(x.min()), float(x.max()), BAND_POINTS, dtype=x.dtype)
    kept, walkers, p = chain.shape
    stride = max(1, kept * walkers // BAND_DRAWS)
    draws = chain[kept - 1 :: -stride][::-1].reshape(-1, p)
    curves = post.curve(draws, grid.to(x.device)).cpu().numpy()
    band: dict[str, Any] = {"draws": int(draws.shape[0]), "x": grid.tolist()}
    band["median"] = np.median(curves, axis=0).tolist()
    for lv in levels:
        lo, hi = np.quantile(curves, [(1 - lv) / 2, (1 + lv) / 2], axis=0)
        band[f"cred_lower_{level_tag(lv)}"] = lo.tolist()
        band[f"cred_upper_{level_tag(lv)}"] = hi.tolist()
    return band


__all__ = ["McmcError", "default_burn", "default_walkers", "sample", "split_rhat"]
