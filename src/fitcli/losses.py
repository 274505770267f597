"""Loss functions by name: each one's value per point, its Gauss-Newton form, its error bars.

Conventions. ``m`` is the model and ``y`` the data, both multiplied by ``w = 1/sigma`` when the
data carry sigmas, so the residual is ``f = y - m``. The loss a run reports (metrics.csv,
`final_loss`) is the mean of `Loss.point` over the points; Levenberg-Marquardt minimises
``cost = half * sum(point)`` (``half`` is 1/2 for the squared-residual family, so that its cost is
``0.5 * sum(f**2)`` for mse, and 1 for bce, whose cost is then its negative log-likelihood).

- ``mse``, ``l1``, ``huber``, ``smooth_l1``: torch.nn.functional's (LM takes mse only).
- ``cauchy``, ``soft_l1``, ``arctan``: scipy's robust losses, ``point = C^2 rho(z)`` with
  ``z = (f / C)^2`` and ``C = f_scale``, exactly as ``scipy.optimize.least_squares(loss=...,
  f_scale=C)``, whose cost is ``0.5 * C^2 * sum(rho(z))``.
- ``student_t``: ``rho(z) = (nu + 1) log(1 + z / nu)``, so ``cost = C^2 * NLL`` with NLL the
  Student-t negative log-likelihood of the residuals, degrees of freedom nu and fixed scale C
  (times sigma when the data carry sigmas); ``nu -> inf`` gives mse's cost.
- ``poisson``: m is the expected count ``mu > 0``, ``point`` the unit deviance
  ``2 (y log(y/mu) - (y - mu))`` (Cash's statistic), ``cost = NLL + const``.
- ``bce``: m is the logit, ``point = log(1 + e^m) - y m`` (torch's
  ``binary_cross_entropy_with_logits``), ``cost = NLL``; y in [0, 1].

LM (`gauss_newton`) works on effective residuals and a row scaling of the Jacobian, ``r_eff``
and ``s`` with ``J_eff = s J`` (J the Jacobian of m), chosen so that ``J_eff^T r_eff`` is minus
the cost's gradient: robust losses and student_t as scipy's ``scale_for_robust_loss_function``
(``s^2 = rho' + 2 z rho''``, floored at machine epsilon: iteratively reweighted Gauss-Newton),
poisson and bce by Fisher scoring (``s^2`` the variance of a point, mu and p(1-p)).

Error bars (`stats.fit_statistics`) come from the observed information ``H``, the Hessian of
the cost at the optimum (model curvature included): the likelihoods (poisson, bce, student_t)
take ``covariance = scale * H^-1`` with scale 1 (C^2 for student_t), the inverse observed Fisher
information; the robust losses, which are no likelihood, take the sandwich
``n/(n-p) H^-1 B H^-1`` with ``B = sum_i g_i g_i^T`` of the points' cost gradients (Huber's
M-estimator covariance, the HC1 small-sample factor).

Every function takes the array module ``xp`` (numpy or torch) as its last argument: the same
formula runs on LM's numpy path and in torch.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

# Names in the order the README lists them.
TORCH_LOSSES = ("mse", "l1", "huber", "smooth_l1")
ROBUST = ("cauchy", "soft_l1", "arctan")
LIKELIHOODS = ("poisson", "bce", "student_t")
NAMES = (*TORCH_LOSSES, *LIKELIHOODS, *ROBUST)
# The options each loss takes, with their defaults (None: required).
OPTIONS: dict[str, dict[str, float | None]] = {
    **{name: {} for name in (*TORCH_LOSSES, "poisson", "bce")},
    **{name: {"f_scale": 1.0} for name in ROBUST},
    "student_t": {"nu": None, "f_scale": 1.0},
}
# scipy's floor for the Jacobian scaling of robust losses (`least_squares` EPS).
EPS = 2.220446049250313e-16


def _rho(name: str, z: Any, nu: float, xp: Any) -> tuple[Any, Any, Any]:
    """rho(z), rho'(z), rho''(z) of a robust loss (scipy's `_lsq.least_squares` formulas)."""
    if name == "soft_l1":
        t = 1 + z
        root = xp.sqrt(t)
        return 2 * (root - 1), 1 / root, -0.5 / (t * root)
    if name == "cauchy":
        t = 1 + z
        return xp.log1p(z), 1 / t, -1 / (t * t)
    if name == "arctan":
        t = 1 + z * z
        return xp.arctan(z), 1 / t, -2 * z / (t * t)
    assert name == "student_t"  # `Loss` builds only these
    t = nu + z
    return (nu + 1) * xp.log1p(z / nu), (nu + 1) / t, -(nu + 1) / (t * t)


def _softplus(v: Any, xp: Any) -> Any:
    return xp.logaddexp(xp.zeros_like(v), v)


@dataclass(frozen=True)
class Loss:
    """One loss with its options resolved (see the module doc)."""

    name: str
    options: dict[str, float] = field(default_factory=dict)

    @property
    def f_scale(self) -> float:
        return float(self.options.get("f_scale", 1.0))

    @property
    def nu(self) -> float:
        return float(self.options.get("nu", math.inf))

    @property
    def half(self) -> float:
        """cost = half * sum(point)."""
        return 1.0 if self.name == "bce" else 0.5

    @property
    def lm_ready(self) -> bool:
        """Whether Levenberg-Marquardt minimises it (mse as least squares, the rest by
        `gauss_newton`)."""
        return self.name == "mse" or self.name in (*ROBUST, *LIKELIHOODS)

    @property
    def own_information(self) -> bool:
        """Whether the error bars come from this loss's information (not least squares)."""
        return self.name in (*ROBUST, *LIKELIHOODS)

    @property
    def sandwich(self) -> bool:
        """Robust losses are no likelihood: their covariance is the sandwich."""
        return self.name in ROBUST

    @property
    def information_scale(self) -> float:
        """cost = information_scale * NLL for the likelihoods (C^2 for student_t)."""
        return self.f_scale**2 if self.name == "student_t" else 1.0

    def label(self) -> str:
        """The name with its options, e.g. ``soft_l1(f_scale=0.5)``."""
        if not self.options:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v:g}" for k, v in self.options.items()) + ")"

    # -- values --------------------------------------------------------------------------------

    def point(self, m: Any, y: Any, xp: Any) -> Any:
        """The loss of each point (its mean is the loss a run reports)."""
        name = self.name
        if name == "mse":
            return (y - m) ** 2
        if name in (*ROBUST, "student_t"):
            c = self.f_scale
            rho, _, _ = _rho(name, ((y - m) / c) ** 2, self.nu, xp)
            return (c * c) * rho
        if name == "poisson":
            safe = xp.where(y > 0, y, xp.ones_like(y))
            ylogy = xp.where(y > 0, y * xp.log(safe), xp.zeros_like(y))
            return 2 * (ylogy - y * xp.log(m) - y + m)
        if name == "bce":
            return _softplus(m, xp) - y * m
        raise ValueError(f"{name} has no per-point formula here (a torch.nn.functional loss)")

    def cost_terms(self, m: Any, y: Any, xp: Any) -> Any:
        """Each point's share of LM's cost."""
        return self.half * self.point(m, y, xp)

    def gauss_newton(self, m: Any, y: Any, xp: Any) -> tuple[Any, Any, Any]:
        """``(r_eff, s, cost_terms)``: LM's effective residuals, the factor of each Jacobian row
        (``J_eff = s[:, None] * J``) and the points' cost (see the module doc)."""
        name = self.name
        cost = self.cost_terms(m, y, xp)
        if name in (*ROBUST, "student_t"):
            c = self.f_scale
            f = y - m
            z = (f / c) ** 2
            _, d1, d2 = _rho(name, z, self.nu, xp)
            scale = d1 + 2 * d2 * z
            s = xp.sqrt(xp.where(scale > EPS, scale, EPS * xp.ones_like(scale)))
            return d1 * f / s, s, cost
        if name == "poisson":
            s = 1 / xp.sqrt(m)
            return (y - m) * s, s, cost
        if name == "bce":
            var = xp.exp(-_softplus(m, xp) - _softplus(-m, xp))  # p (1 - p), stably
            var = xp.where(var > EPS, var, EPS * xp.ones_like(var))
            p = xp.exp(-_softplus(-m, xp))
            s = xp.sqrt(var)
            return (y - p) / s, s, cost
        raise ValueError(f"{name} is minimised by least squares or not by LM")

    # -- the torch.nn.functional form -----------------------------------------------------------

    def torch_function(self) -> Any:
        """``f(input, target, reduction="mean")`` as torch.nn.functional's losses take it."""
        import torch

        from fitcli.train import LOSSES

        if self.name in LOSSES:
            return LOSSES[self.name]

        def loss(input: Any, target: Any, /, *, reduction: str = "mean") -> Any:
            values = self.point(input, target, torch)
            return values if reduction == "none" else values.mean()

        return loss


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def problems(value: Any) -> list[tuple[tuple[str, ...], str]]:
    """What is wrong with a config's `loss` (a name or a mapping of name and options), as
    (key path below `loss`, message) pairs; [] when it is valid."""
    names = ", ".join(NAMES)
    if isinstance(value, str):
        if value not in NAMES:
            close = difflib.get_close_matches(value, NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return [((), f"must be one of {names} (got {value!r}){hint}")]
        missing = [k for k, v in OPTIONS[value].items() if v is None]
        if missing:
            return [
                (
                    (),
                    f"{value} needs {', '.join(missing)}: write the mapping form, e.g. "
                    f"loss: {{name: {value}, {missing[0]}: 4}}",
                )
            ]
        return []
    if not isinstance(value, dict):
        return [
            (
                (),
                f"must be a loss name ({names}) or a mapping with name and its options "
                f"(got {value!r})",
            )
        ]
    name = value.get("name")
    if name is None:
        return [(("name",), f"required key is missing: one of {names}")]
    if not isinstance(name, str):
        return [(("name",), f"must be text, one of {names} (got {name!r})")]
    if name not in NAMES:
        return [(("name",), msg) for _, msg in problems(name)]
    allowed = OPTIONS[name]
    out: list[tuple[tuple[str, ...], str]] = []
    for key, v in value.items():
        if key == "name":
            continue
        if key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            out.append(((str(key),), f"{name} takes no option {key!r}; {hint}{takes}"))
        elif not _number(v) or not math.isfinite(v) or v <= 0:
            out.append(((key,), f"must be a finite number > 0 (got {v!r})"))
    for key, default in allowed.items():
        if default is None and key not in value:
            out.append(((key,), f"{name} needs {key} (e.g. {key}: 4); required key is missing"))
    return out


def resolve(spec: Any) -> Loss:
    """The `Loss` of a config's `loss` value (a name, a `LossSpec` or a plain mapping),
    defaults filled in. Raises ValueError for an invalid one (the schema has checked it)."""
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(exclude_none=True)
    found = problems(spec)
    if found:
        raise ValueError("; ".join(msg for _, msg in found))
    if isinstance(spec, str):
        name, given = spec, {}
    else:
        name, given = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    options = {k: float(given.get(k, d)) for k, d in OPTIONS[name].items()}  # type: ignore[arg-type]
    return Loss(name, options)


def name_of(spec: Any) -> str:
    """The loss's name, from a config's `loss` value."""
    return spec if isinstance(spec, str) else str(getattr(spec, "name", spec))


__all__ = ["LIKELIHOODS", "NAMES", "OPTIONS", "ROBUST", "Loss", "name_of", "problems", "resolve"]
