"""Basis and expression models as nn.Modules over one flat vector of free parameters.

Bounds are kept by reparametrisation, never by clipping: a parameter with both bounds is
`lo + (hi - lo) * sigmoid(u)`, one with a lower bound `lo + softplus(u)`, one with an upper bound
`hi - softplus(u)`, where `u` is the unconstrained value the optimizer moves. Fixed parameters
(`vary: false`) are buffers the optimizer never sees. Tied parameters (`expr: ...`, see
`fitcli.composition`) are computed from the others in every evaluation, so every gradient and
Jacobian chains through their ties.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from fitcli.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from fitcli.config import ModelSpec
    from fitcli.expr import Expression

# Below this many data points torch reduces each row serially, so a batch of runs reduces every
# run exactly as a single run would; above it a single run's sums are split across threads.
ROW_EXACT_LIMIT = 32768


def rows_dot(phi_t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """yhat[..., i] = sum_k phi_t[k, i] * full[..., k], by broadcast-multiply and sum.

    Not a matmul on purpose: each run of a batch (leading dims of `full`) goes through the same
    elementwise and row-reduction kernels as a single run, so `fitcli sweep`'s batched runs match
    `fitcli train` to the last bit, which BLAS does not promise. On 2 busy cores it is also
    faster than torch.mv, whose threaded backward contends for them.
    """
    return (phi_t * full[..., :, None]).sum(-2)


@dataclass(frozen=True)
class ParamInfo:
    """One named parameter: initial value, bounds and whether it varies; or its tie."""

    name: str
    value: float
    min: float | None = None
    max: float | None = None
    vary: bool = True
    expr: str | None = None  # a tie: the parameter is this expression of other parameters

    @property
    def free(self) -> bool:
        """Whether the optimizer moves it (neither fixed nor tied)."""
        return self.vary and self.expr is None

    @property
    def fixed(self) -> bool:
        """Whether it is held at its value (`vary: false`)."""
        return not self.vary and self.expr is None


def _softplus_inv(v: float) -> float:
    # inverse of softplus(u) = log1p(exp(u)); exact for large v, stable for small v
    return v + math.log(-math.expm1(-v)) if v > 0 else float("-inf")


def to_internal(info: ParamInfo, value: float) -> float:
    """Unconstrained value u whose transform gives `value` (which must be inside the bounds)."""
    lo, hi = info.min, info.max
    if lo is not None and hi is not None:
        t = (value - lo) / (hi - lo)
        return math.log(t) - math.log1p(-t)
    if lo is not None:
        return _softplus_inv(value - lo)
    if hi is not None:
        return _softplus_inv(hi - value)
    return value


class FitModel(torch.nn.Module):
    """A model whose free parameters live in one flat vector `raw` (internal, unconstrained)."""

    kind = "model"
    # Buffers (registered in __init__; `lo` and after it only when some parameter is bounded).
    fixed: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    both: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    def __init__(self, infos: list[ParamInfo], dtype: torch.dtype) -> None:
        super().__init__()
        self.infos = tuple(infos)
        self.names = tuple(i.name for i in infos)
        self.free_names = tuple(i.name for i in infos if i.free)
        free = [i for i in infos if i.free]
        self.raw = torch.nn.Parameter(
            torch.tensor([to_internal(i, i.value) for i in free], dtype=dtype)
        )
        self.register_buffer(
            "fixed", torch.tensor([i.value for i in infos if i.fixed], dtype=dtype)
        )
        self._free_pos = [k for k, i in enumerate(infos) if i.free]
        self._fixed_pos = [k for k, i in enumerate(infos) if i.fixed]
        self.tied = {i.name: i.expr for i in infos if i.expr is not None}
        # (position, tie) of each tied parameter, in dependency order.
        self._ties = _ordered_ties(infos)
        self._bounded = any(i.min is not None or i.max is not None for i in free)
        self._all_free_unbounded = not self._bounded and not self._fixed_pos and not self._ties
        if self._bounded:
            lo = [i.min if i.min is not None else 0.0 for i in free]
            hi = [i.max if i.max is not None else 0.0 for i in free]
            self.register_buffer("lo", torch.tensor(lo, dtype=dtype))
            self.register_buffer("hi", torch.tensor(hi, dtype=dtype))
            self.register_buffer(
                "both", torch.tensor([i.min is not None and i.max is not None for i in free])
            )
            self.register_buffer(
                "lower", torch.tensor([i.min is not None and i.max is None for i in free])
            )
            self.register_buffer(
                "upper", torch.tensor([i.min is None and i.max is not None for i in free])
            )

    # -- parameter space -------------------------------------------------------------------------
    def external(self, raw: torch.Tensor) -> torch.Tensor:
        """Free parameter values (bounded space) from internal `raw`; works with a leading batch."""
        if not self._bounded:
            return raw
        both = self.lo + (self.hi - self.lo) * torch.sigmoid(raw)
        sp = F.softplus(raw)
        out = torch.where(self.both, both, raw)
        out = torch.where(self.lower, self.lo + sp, out)
        return torch.where(self.upper, self.hi - sp, out)

    def full_vector(self, free_ext: torch.Tensor) -> torch.Tensor:
        """All parameter values in declaration order, fixed and tied ones included."""
        if not self._fixed_pos and not self._ties:
            return free_ext
        parts: list[torch.Tensor | None] = [None] * len(self.names)
        for k, pos in enumerate(self._free_pos):
            parts[pos] = free_ext[..., k]
        for k, pos in enumerate(self._fixed_pos):
            parts[pos] = self.fixed[k].expand(free_ext.shape[:-1])
        self.fill_ties(parts)
        # The free, fixed and tied positions partition all positions: every part is filled.
        return torch.stack(cast(list[torch.Tensor], parts), dim=-1)

    def fill_ties(self, parts: list[torch.Tensor | None]) -> None:
        """Fill the tied positions of `parts` (all parameters in declaration order, the free and
        fixed ones set) from their ties, in dependency order."""
        if not self._ties:
            return
        values = {n: v for n, v in zip(self.names, parts, strict=True) if v is not None}
        for pos, tie in self._ties:
            # A tie never uses x: its first parameter's value gives the shape, dtype and device.
            value = tie(values[tie.params[0]], values)
            parts[pos] = value
            values[self.names[pos]] = value

    def values(self) -> dict[str, float]:
        """Current parameter values by name, as Python floats."""
        with torch.no_grad():
            vec = self.full_vector(self.external(self.raw)).double().cpu().tolist()
        return dict(zip(self.names, vec, strict=True))

    def set_values(self, values: Mapping[str, float]) -> None:
        """Set free parameters from external values (they must lie inside their bounds)."""
        infos = {i.name: i for i in self.infos}
        raw = [to_internal(infos[n], float(values[n])) for n in self.free_names]
        with torch.no_grad():
            self.raw.copy_(torch.tensor(raw, dtype=self.raw.dtype))

    def at_bound(self, rtol: float = 1e-6) -> list[str]:
        """Names of free parameters sitting on (or numerically at) one of their bounds."""
        out = []
        vals = self.values()
        for info in self.infos:
            if not info.free:
                continue
            v = vals[info.name]
            for b in (info.min, info.max):
                if b is not None and abs(v - b) <= rtol * max(1.0, abs(b)):
                    out.append(info.name)
                    break
        return out

    # -- evaluation --------------------------------------------------------------------------------
    def predict_full(self, full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model output at x for a full parameter vector (declaration order)."""
        raise NotImplementedError

    def predict(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pure function of the internal free vector: what LM and torch.func differentiate."""
        return self.predict_full(self.full_vector(self.external(raw)), x)

    def predict_external(self, free_ext: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pure function of the external free values: what error bars are computed against."""
        return self.predict_full(self.full_vector(free_ext), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(self.raw, x)

    def bind(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A zero-argument function giving the prediction on `x` from the current parameters:
        the training loop's forward pass, with per-call overhead kept out of the hot path."""
        raw = self.raw
        return lambda: self.predict(raw, x)

    def predict_rows(self, x: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        """Prediction on the rows `x[idx]` (a mini-batch, a chunk) from the current parameters."""
        return self.predict(self.raw, x[idx])

    # -- components (`fitcli.composition`) -------------------------------------------------------
    components: tuple[str, ...] = ()  # each component's text; () for a model of one term

    def component_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each component at x from the current parameters, with x's shape (none: [])."""
        return []


class BasisModel(FitModel):
    """yhat = theta0*b0(x) + theta1*b1(x) + ...; the design matrix is cached for the data's x."""

    kind = "basis"

    def __init__(self, basis: list, init: list[float], dtype: torch.dtype) -> None:
        from fitcli.composition import basis_components

        infos = [ParamInfo(f"theta{k}", float(v)) for k, v in enumerate(init)]
        super().__init__(infos, dtype)
        self.basis = list(basis)
        self.components = tuple(basis_components([b.source for b in basis]))
        # x tensor -> [phi, phi transposed or None], for the last two x seen (the data and the
        # snapshot grid): a snapshot must not evict the training data's design matrix.
        self._designs: list[tuple[torch.Tensor, list]] = []

    def _design_entry(self, x: torch.Tensor) -> list:
        for seen, entry in self._designs:
            if seen is x:
                return entry
        with torch.no_grad():
            phi = torch.stack([b(x) for b in self.basis], dim=-1)
        entry = [phi, None]
        self._designs = [(x, entry), *self._designs[:1]]
        return entry

    def design(self, x: torch.Tensor) -> torch.Tensor:
        """The n x p design matrix [b0(x), b1(x), ...]; cached for the last two x seen."""
        return self._design_entry(x)[0]

    def predict_full(self, full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        phi = self.design(x)
        if full.dim() == 1 and phi.shape[0] >= ROW_EXACT_LIMIT:
            return phi @ full
        return rows_dot(self.design_t(x), full)

    def design_t(self, x: torch.Tensor) -> torch.Tensor:
        """The p x n transposed design matrix, contiguous (what `rows_dot` reads)."""
        entry = self._design_entry(x)
        if entry[1] is None:
            entry[1] = entry[0].T.contiguous()
        return entry[1]

    def bind(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        if self._all_free_unbounded:
            # Phi is computed once: the whole model is one matrix-vector product.
            if x.shape[0] >= ROW_EXACT_LIMIT:
                return functools.partial(torch.mv, self.design(x), self.raw)
            return functools.partial(rows_dot, self.design_t(x), self.raw)
        return super().bind(x)

    def predict_rows(self, x: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        # Rows of the cached design matrix: the basis functions are not re-evaluated per batch.
        return self.design(x)[idx] @ self.full_vector(self.external(self.raw))

    def component_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.components:
            return []
        with torch.no_grad():
            full = self.full_vector(self.external(self.raw))
            phi = self.design(x)
            return [phi[:, k] * full[k] for k in range(phi.shape[1])]


class ExprModel(FitModel):
    """yhat = expr(x; a, b, ...): an expression whose free names are the parameters."""

    kind = "expr"

    def __init__(self, expression: Expression, infos: list[ParamInfo], dtype: torch.dtype) -> None:
        super().__init__(infos, dtype)
        self.expression = expression
        self.components, parsed = _expression_components(expression.source, expression.variables)
        self._components = list(parsed)

    def component_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.components:
            return []
        with torch.no_grad():
            full = self.full_vector(self.external(self.raw))
            params = {name: full[k] for k, name in enumerate(self.names)}
            return [c(x, params) for c in self._components]

    def predict_full(self, full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if full.dim() > 1:
            # A leading run dimension: each run's parameters broadcast over its own copy of x.
            # (Several variables: x is n x k, and each run gets its own n x k.)
            tail = x.shape[-1:] if x.dim() == 1 else x.shape[-2:]
            x = x.expand(*full.shape[:-1], *tail)
        params = {
            name: full[..., k, None] if full.dim() > 1 else full[k]
            for k, name in enumerate(self.names)
        }
        return self.expression(x, params)


@functools.lru_cache(maxsize=256)
def _expression_components(
    source: str, variables: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[Expression, ...]]:
    """An expression's components (`fitcli.composition`) as texts and parsed: a pure function
    of its source, worked out once per expression (a notebook fits the same model many times;
    an `Expression` is immutable, so the models share them)."""
    from fitcli.composition import expression_components, parse_components

    texts = tuple(expression_components(source))
    return texts, tuple(parse_components(texts, variables))


def _bound_transform(
    info: ParamInfo, lo: torch.Tensor, hi: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform of `FitModel.external` for one free parameter (None: unbounded)."""
    if info.min is not None and info.max is not None:
        return lambda u: lo + (hi - lo) * torch.sigmoid(u)
    if info.min is not None:
        return lambda u: lo + F.softplus(u)
    if info.max is not None:
        return lambda u: hi - F.softplus(u)
    return None


def model_function(
    model: FitModel, *, external: bool = False
) -> Callable[[torch.Tensor | Sequence[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``fn(theta, x)`` of a `FitModel` in the form the LM core and the error bars
    differentiate: ``model.predict`` (internal raw vector) or, with `external`,
    ``model.predict_external`` (free parameters' values) for a 1-D theta; for a list of p
    tensors (the core's one-pass row-wise Jacobian: one leaf per free parameter, expanded over
    the rows) the same model with each parameter read from its own leaf, so that no parameter is
    selected out of a vector. The core checks the row-wise form against an exact Jacobian before
    it uses it."""
    one = model.predict_external if external else model.predict
    free = [info for info in model.infos if info.free]
    # Per free parameter, the bound transform of `FitModel.external` (None: unbounded).
    transforms: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None] * len(free)
    if not external and model._bounded:
        for k, info in enumerate(free):
            transforms[k] = _bound_transform(info, model.lo[k], model.hi[k])
    fixed_pos = {pos: k for k, pos in enumerate(model._fixed_pos)}
    free_pos = {pos: k for k, pos in enumerate(model._free_pos)}

    def columns(theta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # All parameters in declaration order: free ones from their leaves, fixed ones as
        # 0-dim tensors that broadcast, tied ones computed from those.
        out: list[torch.Tensor | None] = []
        for pos in range(len(model.names)):
            if pos in free_pos:
                k = free_pos[pos]
                u = theta[k]
                transform = transforms[k]
                out.append(u if transform is None else transform(u))
            elif pos in fixed_pos:
                out.append(model.fixed[fixed_pos[pos]])
            else:
                out.append(None)
        model.fill_ties(out)
        return cast(list[torch.Tensor], out)

    def fn(theta: torch.Tensor | Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if isinstance(theta, torch.Tensor):
            return one(theta, x)
        values = columns(theta)
        if isinstance(model, BasisModel):
            phi_t = model.design(x).T
            total = phi_t[0] * values[0]
            for k in range(1, len(values)):
                total = total + phi_t[k] * values[k]
            return total
        assert isinstance(model, ExprModel)  # the two kinds of FitModel
        return model.expression(x, dict(zip(model.names, values, strict=True)))

    return fn


def build_model(
    model_cfg: ModelSpec,
    init_seed: int,
    dtype: torch.dtype,
    variables: tuple[str, ...] = ("x",),
) -> FitModel:
    """Model from the config's `model` section, over the independent `variables` (the data's:
    `DataSpec.variables`); basis coefficients default to N(0, 1) draws."""
    from fitcli.expr import parse_expression

    if model_cfg.basis is not None:
        basis = [
            parse_expression(b, allow_params=False, what="basis function", variables=variables)
            for b in model_cfg.basis
        ]
        if model_cfg.init is not None:
            init = [float(v) for v in model_cfg.init]
        else:
            gen = torch.Generator().manual_seed(init_seed)
            init = torch.randn(len(basis), generator=gen, dtype=torch.float64).tolist()
        return BasisModel(basis, init, dtype)
    assert model_cfg.expr is not None  # the schema requires basis or expr
    expression = parse_expression(model_cfg.expr, allow_params=True, variables=variables)
    specs = model_cfg.params or {}
    infos = []
    # The parameters of expr, then those only in ties and the derived ones (`ModelSpec`).
    for name in [*expression.params, *(k for k in specs if k not in expression.params)]:
        spec = specs.get(name)
        if spec is None:
            infos.append(ParamInfo(name, 1.0))
        elif isinstance(spec, int | float):
            infos.append(ParamInfo(name, float(spec)))
        elif spec.expr is not None:
            infos.append(ParamInfo(name, math.nan, expr=spec.expr))
        else:
            infos.append(ParamInfo(name, float(spec.value), spec.min, spec.max, spec.vary))
    return ExprModel(expression, infos, dtype)


def _ordered_ties(infos: Sequence[ParamInfo]) -> list[tuple[int, Expression]]:
    """(position, parsed tie) of each tied parameter, each after the ties it mentions."""
    from fitcli.composition import parse_tie, tie_order

    pos = {info.name: k for k, info in enumerate(infos)}
    ties = {info.name: parse_tie(info.expr) for info in infos if info.expr is not None}
    for name, tie in ties.items():
        unknown = [p for p in tie.params if p not in pos]
        if unknown:  # the schema refuses these; a model built by hand gets the same words
            raise ValueError(f"the tie of {name} mentions unknown parameters: {unknown}")
    order = tie_order({name: tie.params for name, tie in ties.items()})
    return [(pos[name], ties[name]) for name in order]


# Rows of the data per evaluation of `check_finite_start`: a model is a function of each point,
# and on 10^7 points a chunk's temporaries stay in the cache (1.15 s in one piece, 0.07 s so).
CHECK_ROWS = 1 << 17


def check_finite_start(model: FitModel, x: torch.Tensor, xs_cpu: np.ndarray) -> None:
    """A model that is NaN or infinite at its starting point on the data is a config error."""
    k = None
    with torch.no_grad():
        for a in range(0, max(1, x.shape[0]), CHECK_ROWS):
            # x itself where it is one chunk: a basis model keeps its design matrix for it.
            finite = torch.isfinite(model(x if x.shape[0] <= CHECK_ROWS else x[a : a + CHECK_ROWS]))
            if not bool(finite.all()):
                k = a + int((~finite).nonzero()[0, 0])
                break
    if k is not None:
        what = "model.basis" if model.kind == "basis" else "model.expr"
        from fitcli.data import point_text

        expression = getattr(model, "expression", None)
        names = expression.variables if expression is not None else ("x",)

        raise DataError(
            f"{what}: the model is not finite at {point_text(xs_cpu, k, names)} with the starting "
            f"parameters {model.values()}; change the expression, the starting values or the data"
        )
