"""Levenberg-Marquardt as a fitcli optimizer: one LM iteration per epoch of the training loop.

`LMStepper` drives `fitcli.lm.LevenbergMarquardt` over the model's internal parameter vector
`model.raw` (bounds are reparametrised and fixed parameters are not in it, so both come for free),
with the residuals ``w * (y - model.predict(raw, x))``, ``w = 1/sigma`` when the data carry
sigmas, and for a loss other than mse its Gauss-Newton form (`fitcli.losses`: iteratively
reweighted for the robust losses, Fisher scoring for poisson and bce). Each `step()` returns the
loss at the parameters before the step in the config's terms (mse: the mean of the squared
weighted residuals, the same number a torch optimizer reports) and writes the new parameters
back into `model.raw`.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fitcli.errors import ConfigError
from fitcli.lm import HostModel, LevenbergMarquardt, host_eligible
from fitcli.losses import ROBUST, Loss, resolve
from fitcli.model import BasisModel, ExprModel, FitModel, model_function

if TYPE_CHECKING:
    from fitcli.config import Config

NAME = "LevenbergMarquardt"
# Keyword arguments of `optimizer: {name: LevenbergMarquardt, ...}` and their defaults.
DEFAULTS: dict[str, Any] = {
    "ftol": 1e-15,
    "xtol": 1e-15,
    "gtol": 1e-15,
    "damping": 1e-3,
    "chunk_size": None,
}
# Reasons of the core that mean "no solution could be reached", not convergence.
_FAILURES = ("non-finite",)


def validate_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """The problems with the keyword arguments of an LM optimizer section."""
    problems: list[str] = []
    valid = list(DEFAULTS)
    for key, value in kwargs.items():
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" did you mean {close[0]!r}?" if close else ""
            if key in ("lr", "momentum", "weight_decay", "betas"):
                hint = " LM needs no learning rate (replace the whole optimizer section);"
            problems.append(
                f"optimizer.{key}: {NAME} takes no argument {key!r};{hint} it takes: "
                + ", ".join(valid)
            )
        elif key == "chunk_size":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                problems.append(
                    f"optimizer.chunk_size: must be a whole number >= 1 (rows per Jacobian "
                    f"chunk) or null for automatic (got {value!r})"
                )
        elif (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (key == "damping" and value == 0)
        ):
            what = "> 0" if key == "damping" else ">= 0"
            problems.append(f"optimizer.{key}: must be a finite number {what} (got {value!r})")
    return problems


def validate(cfg: Config, kwargs: dict[str, Any]) -> list[str]:
    """Every problem with an LM optimizer section and the settings it cannot work with."""
    problems = validate_kwargs(kwargs)
    if not resolve(cfg.loss).lm_ready:
        takes = ", ".join(("mse", "poisson", "bce", "student_t", *ROBUST))
        problems.append(
            f"loss: {NAME} minimises the sum of squared residuals or a likelihood, so the loss "
            f"must be one of {takes} (got {resolve(cfg.loss).name!r}); use one of those or a "
            "torch optimizer such as Adam"
        )
    if cfg.batch_size is not None:
        problems.append(
            f"batch_size: {NAME} works on the full batch (got {cfg.batch_size}); "
            "remove batch_size or use a torch optimizer"
        )
    if cfg.scheduler is not None:
        problems.append(
            f"scheduler: {NAME} has no learning rate to schedule; remove the scheduler section"
        )
    return problems


class LMStepper:
    """The training loop's stepper for Levenberg-Marquardt (see the module doc)."""

    def __init__(
        self,
        model: FitModel,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: torch.Tensor | None,
        kwargs: dict,
        loss: Loss | None = None,
    ) -> None:
        problems = validate_kwargs(kwargs)
        if problems:
            raise ConfigError(problems)
        opts = {**DEFAULTS, **kwargs}
        self.model = model
        self.n = int(y.shape[0])
        self.converged: str | None = None
        self.failure: str | None = None  # set when no solution could be reached
        self.stop_reason: str | None = None  # the core's own words
        # The core's own least squares for mse; any other loss by its Gauss-Newton form.
        self.loss = loss if loss is not None and loss.name != "mse" else None
        self.half = 0.5 if self.loss is None else self.loss.half
        self.lm = LevenbergMarquardt(
            model_function(model),
            x,
            y,
            model.raw.detach(),
            weights=weights,
            ftol=float(opts["ftol"]),
            xtol=float(opts["xtol"]),
            gtol=float(opts["gtol"]),
            damping=float(opts["damping"]),
            chunk_size=opts["chunk_size"],
            host=host_model(model, x) if host_eligible(x, model.raw) else None,
            loss=self.loss,
        )
        self._written = self.lm.theta.clone()

    def step(self) -> torch.Tensor:
        raw = self.model.raw
        if not torch.equal(raw.detach(), self._written):
            # The parameters were set from outside (resume, divergence restore): start there.
            self.lm.reset_theta(raw.detach())
        result = self.lm.step()
        theta = self.lm.theta
        with torch.no_grad():
            raw.copy_(theta)
        # The core never changes its theta in place (each step makes a new one): no copy.
        self._written = theta
        if result.converged:
            assert result.reason is not None  # a stop always says why (LevenbergMarquardt._stop)
            self.stop_reason = result.reason
            if any(result.reason.startswith(f) for f in _FAILURES):
                self.failure = f"{NAME} cannot continue: {result.reason}"
                self.converged = self.failure
            else:
                # Whether this is a minimum is the error bars' to say (`stats.verdict`).
                n = self.lm.n_iter
                self.converged = f"{NAME} stopped after {n} iterations ({result.reason})"
        # The mean of the points' loss: cost = half * sum(point) (mse: 0.5 * sum(r**2)).
        # (from numpy: a fifth of torch.tensor's cost for one number, the same value)
        return torch.from_numpy(np.array(result.cost_before / (self.half * self.n)))

    def lr(self) -> float:
        return float("nan")

    def summary_fields(self) -> dict[str, Any]:
        """What summary.json records about how LM ended. (A `failure` fails the run, and whether
        it converged is decided with the error bars: both by the recipe, `experiment.execute`.)"""
        lm = self.lm
        out: dict[str, Any] = {
            "stop_reason": self.stop_reason,
            "lm_iterations": lm.n_iter,
            "lm_evaluations": {"model": lm.n_fev, "jacobian": lm.n_jev},
        }
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the core's state (theta, damping, counters) and why it stopped."""
        return {
            "lm": self.lm.state_dict(),
            "converged": self.converged,
            "failure": self.failure,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("lm") is not None:
            self.lm.load_state_dict(state["lm"])
            self._written = self.lm.theta.clone()
            with torch.no_grad():
                self.model.raw.copy_(self.lm.theta)
        self.converged = state.get("converged")
        self.failure = state.get("failure")
        self.stop_reason = state.get("stop_reason")


class NumpyModel(HostModel):
    """A `FitModel` in numpy float64 at fixed x, as a function of its internal vector: the
    expression's value and exact Jacobian from `fitcli.symdiff` (a basis model's Jacobian is its
    design matrix), chained through the ties and the bound transforms of `FitModel.external`:
    with the expression's Jacobian J_direct over the free and tied parameters it mentions,
    ``J_free = J_direct[:, free] + J_direct[:, tied] @ d tied / d free``, the ties' gradients
    from `fitcli.symdiff` too, chained in dependency order. With `external`, a function of the
    free parameters' own values (`FitModel.predict_external`, what the error bars are taken
    against): the same without the bound transforms."""

    def __init__(self, model: FitModel, x: torch.Tensor, *, external: bool = False) -> None:
        from fitcli.symdiff import compile_jacobian, compile_value

        x = x.detach().to(torch.float64)
        self.x = (x.reshape(-1) if x.dim() <= 1 else x).numpy()  # n x k for several variables
        free = [info for info in model.infos if info.free]
        self.free_names = [info.name for info in free]
        fixed = model.fixed.detach().to(torch.float64).tolist()
        self.fixed = {
            info.name: fixed[k] for k, info in enumerate(i for i in model.infos if i.fixed)
        }
        # Ties in dependency order: (name, value and gradient over the names the tie mentions).
        self._ties = [
            (model.names[pos], tie.params, compile_jacobian(tie, tie.params))
            for pos, tie in model._ties
        ]
        self.bounds = [(info.min, info.max) for info in free]
        self.bounded = not external and any(
            lo is not None or hi is not None for lo, hi in self.bounds
        )
        self.kind = model.kind
        # The program, whatever the data and the free parameters' values (`host_ok` judges it
        # once): the model's form, every parameter's role, bounds, fixed value and tie, and
        # whether the bound transforms are in it.
        form: tuple = ()
        if isinstance(model, BasisModel):
            form = ("basis", tuple((b.source, b.variables) for b in model.basis))
        elif isinstance(model, ExprModel):
            form = ("expr", model.expression.source, model.expression.variables)
        roles = tuple(
            (i.name, i.free, i.value if i.fixed else None, i.min, i.max, i.expr)
            for i in model.infos
        )
        self.signature = (form, roles, self.bounded, str(model.raw.dtype))
        if isinstance(model, BasisModel):
            phi = model.design(x).detach().to(torch.float64).numpy()
            self.phi = np.ascontiguousarray(phi)
            self.phi_free = np.ascontiguousarray(phi[:, model._free_pos])
            self.names = list(model.names)
        else:
            assert isinstance(model, ExprModel)  # `host_model` builds one for these two kinds
            # Without ties the columns are the free parameters; with them, the free and tied
            # parameters the expression mentions, chained to the free ones in `jacobian`.
            moved = set(self.free_names) | {name for name, _, _ in self._ties}
            self._direct = (
                [n for n in model.expression.params if n in moved]
                if self._ties
                else self.free_names
            )
            self._jacobian = compile_jacobian(model.expression, self._direct)
            self._value = compile_value(model.expression)

    def external(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Free parameters' values from the internal vector, and d value / d u (None: all 1)."""
        if not self.bounded:
            return u, None
        ext = np.array(u, dtype=np.float64)
        slope = np.ones_like(ext)
        for k, (lo, hi) in enumerate(self.bounds):
            if lo is None and hi is None:
                continue
            s = 1.0 / (1.0 + np.exp(-u[k]))
            if lo is not None and hi is not None:
                ext[k] = lo + (hi - lo) * s
                slope[k] = (hi - lo) * s * (1.0 - s)
            else:
                soft = u[k] if u[k] > 20.0 else np.log1p(np.exp(u[k]))  # torch's softplus
                ext[k] = lo + soft if lo is not None else hi - soft
                slope[k] = s if lo is not None else -s
        return ext, slope

    def _values(self, ext: np.ndarray) -> dict[str, Any]:
        values = {**self.fixed, **dict(zip(self.free_names, ext.tolist(), strict=True))}
        for name, _, tie in self._ties:
            values[name] = float(tie(_ONE, values)[0][0])
        return values

    def _tie_gradients(self, values: dict[str, Any]) -> dict[str, np.ndarray]:
        """d value / d free (external) of every free and tied parameter, by the chain rule."""
        p = len(self.free_names)
        grads = {name: np.zeros(p) for name in self.fixed}
        grads.update({name: np.eye(p)[k] for k, name in enumerate(self.free_names)})
        for name, mentions, tie in self._ties:
            _, jac = tie(_ONE, values)
            grads[name] = jac[0] @ np.array([grads[m] for m in mentions])
        return grads

    def _full(self, ext: np.ndarray) -> np.ndarray:
        values = self._values(ext)
        return np.array([values[name] for name in self.names], dtype=np.float64)

    def value(self, theta: np.ndarray) -> np.ndarray:
        ext, _ = self.external(theta)
        if self.kind == "basis":
            return self.phi @ self._full(ext)
        return self._value(self.x, self._values(ext))

    def jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ext, slope = self.external(theta)
        if self.kind == "basis":
            m, jac = self.phi @ self._full(ext), self.phi_free
        else:
            values = self._values(ext)
            m, direct = self._jacobian(self.x, values)
            if self._ties:
                grads = self._tie_gradients(values)
                jac = direct @ np.array([grads[n] for n in self._direct]).reshape(-1, len(ext))
            else:
                jac = direct
        if slope is not None:
            jac = jac * slope
        return m, jac


_ONE = np.zeros(1)  # the x at which a tie (which never uses x) is evaluated


def host_model(model: FitModel, x: torch.Tensor, *, external: bool = False) -> HostModel | None:
    """The numpy form of a basis or expression model (None for anything else)."""
    if getattr(model, "kind", None) not in ("basis", "expr"):
        return None
    return NumpyModel(model, x, external=external)
