"""The Faddeeva function w(z) = exp(-z^2) erfc(-iz) and the Voigt profile, in torch and numpy.

torch has no ``wofz``. `wofz` computes it with pure elementwise torch ops (no data-dependent
shapes, no host synchronisation), so it runs on CUDA and under ``torch.func`` transforms, in
complex128 and complex64 (evaluated in double and rounded once). The algorithm is the one
S. G. Johnson's Faddeeva package (which ``scipy.special.wofz`` uses) combines, re-derived here
for whole-tensor evaluation:

* for large |z| (``|Im z| > 7``, or ``|Re z| > 6`` away from the real axis), the continued
  fraction of Gautschi and Poppe & Wijers (ACM TOMS 16(1), 1990),

      w(z) = (i / sqrt(pi)) / (z - (1/2) / (z - 1 / (z - (3/2) / (z - ...)))),

  with the number of levels fitted by Johnson (at most 20 in that region; 2 or 1 beyond
  ``|Re z| + |Im z| > 4000``, where it is the asymptotic ``i z / (sqrt(pi) (z^2 - 1/2))``);
* elsewhere, the exponentially convergent series of Zaghloul & Ali (Algorithm 916, ACM TOMS
  38(2), 2011) with a = pi / sqrt(-log(eps / 2)): for z = x + iy, x >= 0,

      w(z) = exp(-x^2) erfcx(y) cos 2xy + (2a/pi) x exp(-x^2) sin(xy)^2 / (xy)
             - (2a/pi) y S1 cos 2xy + (a/pi) y (S2 + S3)
             + i [ (2a/pi) x exp(-x^2) sin(2xy) / (2xy) - (exp(-x^2) erfcx(y) - (2a/pi) y S1)
                   sin 2xy + (a/pi) (S5 - S4) ]

  with S1 = sum exp(-a^2 n^2 - x^2) / (a^2 n^2 + y^2), S2, S3 the same with exp(-(an -+ x)^2),
  and S4, S5 those weighted by a n. Each term is formed directly as exp(-(an - x)^2) times
  powers of exp(-2anx) (no running products, so no overflow up to x = 28), S5 - S4 as
  -expm1(-4anx) times the S5 term (no cancellation at small x), over a window of 27 values of
  n centred on x / a, which holds every term above 1e-18 of the largest.

For Im z < 0 the continued fraction is used on -z and w(z) = 2 exp(-z^2) - w(-z), with
exp(-z^2) = exp(y^2 - x^2) e^{-2ixy} (it overflows, to inf, where w does). The series holds in
both half planes. On the imaginary axis w = erfcx(Im z) exactly. The measured relative error
against ``scipy.special.wofz`` is in BENCHMARKS.md ("Voigt profile").

The derivative is w'(z) = -2 z w(z) + 2i / sqrt(pi). For large |z| the two terms cancel (w'
is about -i / (sqrt(pi) z^2)), so in the continued-fraction region it is taken from the
fraction itself: with W = z - (1/2) / V the last level, w = (i / sqrt(pi)) / W and
-2 z w + 2i / sqrt(pi) = (2i / sqrt(pi)) (W - z) / W = -(i / sqrt(pi)) / (W V) exactly.

`voigt_profile` is ``scipy.special.voigt_profile`` as a ``torch.autograd.Function`` with exact
first derivatives (not twice differentiable: differentiating a derivative raises);
`voigt_profile_numpy` is the same function and partials on scipy's ``wofz``, for fitcli's
numpy Jacobian path (`fitcli.symdiff`). scipy is imported on first use there.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch

__all__ = [
    "voigt_partials_numpy",
    "voigt_profile",
    "voigt_profile_numpy",
    "voigt_value_numpy",
    "wofz",
    "wofz_and_derivative",
]

_EPS = 2.0**-52
_A = math.pi / math.sqrt(-math.log(_EPS * 0.5))  # Algorithm 916's a, for double precision
_C = 2.0 * _A / math.pi
_ISQRT_PI = 1.0 / math.sqrt(math.pi)
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_WINDOW = 27  # series terms summed: n = s .. s + 26, s = max(1, round(x / a) - 13)
_HALF_WINDOW = 13
_CPU_CHUNK = 4096
_CF_LEVELS = 19  # continued-fraction updates: the most that Johnson's fit asks for there


def _continued_fraction(xp: Any, x0: Any, y: Any, x: Any, ya: Any) -> tuple[Any, ...]:
    """(Re w, Im w, Re w', Im w', Re q, Im q), q = w + z w', from the continued fraction, for
    Im z >= 0 or by reflection; ``xp`` is torch or numpy, the arguments its arrays."""
    xs = xp.where(y < 0, -x0, x0)  # u = xs + i ya is z, or -z below the real axis
    # Johnson fits the fewest levels that reach machine precision (at most 20 where the fraction
    # is used, 2 beyond |x| + |y| > 4000); more levels only add accuracy, so every element takes
    # the most, without a branch. Beyond |u| ~ 1e154, |W|^2 overflows and the updates vanish:
    # W = u, the one-level fraction, exact there.
    wr, wi = xs, ya
    # the two levels below the last: W = u - (1/2) / V, V = u - 1 / V2
    vr, vi = xs, ya
    v2r, v2i = xs, ya
    for k in range(_CF_LEVELS, 0, -1):
        scale = (0.5 * k) / (wr * wr + wi * wi)
        v2r, v2i = vr, vi
        vr, vi = wr, wi
        wr, wi = xs - wr * scale, ya + wi * scale
    rr, ri = _reciprocal(xp, wr, wi)
    qr, qi = _reciprocal(xp, vr, vi)
    q2r, q2i = _reciprocal(xp, v2r, v2i)
    # w = (i / sqrt(pi)) / W, w' = -(i / sqrt(pi)) / (W V), w + u w' = -(i / sqrt(pi)) / (W V V2)
    w_re, w_im = -_ISQRT_PI * ri, _ISQRT_PI * rr
    pr, pi_ = rr * qr - ri * qi, rr * qi + ri * qr
    d_re, d_im = _ISQRT_PI * pi_, -_ISQRT_PI * pr
    pr, pi_ = pr * q2r - pi_ * q2i, pr * q2i + pi_ * q2r
    p_re, p_im = _ISQRT_PI * pi_, -_ISQRT_PI * pr
    # Below the real axis: w(z) = 2 exp(-z^2) - w(-z), w'(z) = -2 z (2 exp(-z^2)) + w'(-z),
    # w(z) + z w'(z) = (1 - 2 z^2) 2 exp(-z^2) - (w(u) + u w'(u)).
    below = y < 0
    mag = 2.0 * xp.exp(xp.where(below, (ya - xs) * (xs + ya), 0.0))
    phase = 2.0 * xs * y
    er, ei = mag * xp.cos(phase), mag * xp.sin(phase)
    w_re = xp.where(below, er - w_re, w_re)
    w_im = xp.where(below, ei - w_im, w_im)
    d_re = xp.where(below, -2.0 * (x0 * er - y * ei) + d_re, d_re)
    d_im = xp.where(below, -2.0 * (x0 * ei + y * er) + d_im, d_im)
    fr, fi = 1.0 - 2.0 * (x0 - y) * (x0 + y), -4.0 * x0 * y  # 1 - 2 z^2
    p_re = xp.where(below, (fr * er - fi * ei) - p_re, p_re)
    p_im = xp.where(below, (fr * ei + fi * er) - p_im, p_im)
    return w_re, w_im, d_re, d_im, p_re, p_im


def _reciprocal(xp: Any, re: Any, im: Any) -> tuple[Any, Any]:
    """1 / (re + i im), scaled so that |z| up to the largest float neither overflows nor
    underflows on the way."""
    s = xp.maximum(xp.abs(re), xp.abs(im))
    s = xp.where(s == 0, 1.0, s)
    a, b = re / s, im / s
    d = s * (a * a + b * b)
    return a / d, -b / d


def _series(
    x0: torch.Tensor, y: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re w, Im w) from Algorithm 916's series; accurate where the module docstring says."""
    xc = torch.clamp(x, max=30.0)  # beyond, the fraction answers; keep the terms finite
    y2 = y * y
    # terms along a last axis of _WINDOW values of n: one kernel per operation, not per term
    start = torch.clamp(torch.round(xc / _A) - _HALF_WINDOW, min=1.0)
    offsets = torch.arange(_WINDOW, dtype=x.dtype, device=x.device)
    t = _A * (start.unsqueeze(-1) + offsets)  # a n
    xk, y2k = xc.unsqueeze(-1), y2.unsqueeze(-1)
    tx = t * xk
    e3 = torch.exp(-((t - xk) ** 2)) / (t * t + y2k)  # exp(-(an - x)^2) / (a^2 n^2 + y^2)
    g = torch.exp(-2.0 * tx)
    e1 = e3 * g  # exp(-a^2 n^2 - x^2) / (...); times g again: exp(-(an + x)^2) / (...)
    s1 = e1.sum(-1)
    s23 = (e3 + e1 * g).sum(-1)
    s54 = -(t * e3 * torch.expm1(-4.0 * tx)).sum(-1)
    expx2 = torch.exp(-xc * xc)
    # erfcx(y) = 2 exp(y^2) to double precision for y < -6: avoid exp(y^2) * exp(-x^2) overflow
    e = torch.where(
        y > -6, expx2 * torch.special.erfcx(torch.clamp(y, min=-6.0)), 2.0 * torch.exp(y2 - xc * xc)
    )
    u = x0 * y
    sin_u, sin_2u, cos_2u = torch.sin(u), torch.sin(2.0 * u), torch.cos(2.0 * u)
    nonzero = u != 0
    safe_u = torch.where(nonzero, u, 1.0)
    sinc_u = torch.where(nonzero, sin_u / safe_u, 1.0)
    sinc_2u = torch.where(nonzero, sin_2u / (2.0 * safe_u), 1.0)
    coef1 = e - _C * y * s1
    coef2 = _C * x0 * expx2
    re = coef1 * cos_2u + coef2 * sin_u * sinc_u + (0.5 * _C) * y * s23
    # for y > 5 the first two imaginary terms cancel to below rounding: leave them out
    im_trig = torch.where(y > 5, 0.0, coef2 * sinc_2u - coef1 * sin_2u)
    im = im_trig + (0.5 * _C) * torch.copysign(s54, x0)
    return re, im


_Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _wofz_parts(z: torch.Tensor) -> _Parts:
    """w(z), w'(z) and w(z) + z w'(z) (which the Voigt profile's sigma partial needs, and which
    cancels for large |z| when formed from the other two), elementwise, in z's precision."""
    if not z.is_complex():
        raise TypeError(f"wofz needs a complex tensor, got {z.dtype}")
    if z.dtype != torch.complex128:
        # Lower precisions are evaluated in double and rounded once: in float32 itself the
        # phase 2xy of exp(-z^2) and the series' exponents lose all digits at large |z|.
        return tuple(t.to(z.dtype) for t in _wofz_parts(z.to(torch.complex128)))  # type: ignore[return-value]
    n = z.numel()
    if z.device.type != "cpu" or n <= _CPU_CHUNK:
        return _wofz_block(z)
    # On a CPU the series' [n, 27] temporaries are kept in cache a block at a time (several
    # times faster at a million points); fixed slices, so no data-dependent shape.
    flat = z.reshape(-1)
    blocks = [_wofz_block(flat[i : i + _CPU_CHUNK]) for i in range(0, n, _CPU_CHUNK)]
    w, dw, q = (torch.cat([b[k] for b in blocks]).reshape(z.shape) for k in range(3))
    return w, dw, q


def _wofz_block(z: torch.Tensor) -> _Parts:
    x0, y = z.real, z.imag
    x, ya = x0.abs(), y.abs()
    cf = (ya > 7) | ((x > 6) & ((ya > 0.1) | ((x > 8) & (ya > 1e-10)) | (x > 28)))
    c_re, c_im, cd_re, cd_im, cq_re, cq_im = _continued_fraction(torch, x0, y, x, ya)
    s_re, s_im = _series(x0, y, x)
    # w' = -2 z w + 2i/sqrt(pi) where the series answers. Near the real axis out to x = 28 the
    # imaginary part of that cancels (by 2 x^2): the fraction's is used there instead.
    sd_re = -2.0 * (x0 * s_re - y * s_im)
    sd_im = torch.where(x > 6, cd_im, -2.0 * (x0 * s_im + y * s_re) + 2.0 * _ISQRT_PI)
    sq_re = s_re + (x0 * sd_re - y * sd_im)
    sq_im = s_im + (x0 * sd_im + y * sd_re)
    w_re = torch.where(cf, c_re, s_re)
    w_im = torch.where(cf, c_im, s_im)
    d = torch.complex(torch.where(cf, cd_re, sd_re), torch.where(cf, cd_im, sd_im))
    q = torch.complex(torch.where(cf, cq_re, sq_re), torch.where(cf, cq_im, sq_im))
    # the imaginary axis: w(iy) = erfcx(y), real (keeping the sign of a zero Re z in Im w)
    axis = x0 == 0
    w_re = torch.where(axis, torch.special.erfcx(y), w_re)
    w_im = torch.where(axis, x0, w_im)
    return torch.complex(w_re, w_im), d, q


def wofz_and_derivative(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w(z), w'(z))`` for a complex128 or complex64 tensor, without autograd."""
    with torch.no_grad():
        w, dw, _ = _wofz_parts(z)
    return w, dw


class _FirstOrder(torch.autograd.Function):
    """Passes saved first derivatives through, tied to the inputs they depend on: a backward
    pass built with ``create_graph`` stays linear in its incoming gradient (what reverse-over-
    reverse Jacobians need), and differentiating the derivatives themselves raises instead of
    silently treating them as constants."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*tensors: Any) -> Any:
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("wofz and voigt_profile have exact first derivatives only")

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise RuntimeError("wofz and voigt_profile have exact first derivatives only")


def _first_order(partials: tuple[Any, ...], inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The partials, guarded by `_FirstOrder` when a graph of the backward pass is being built."""
    if not torch.is_grad_enabled() or not any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in inputs
    ):
        return partials
    out = _FirstOrder.apply(*partials, *inputs)
    return tuple(out[: len(partials)])


class _Wofz(torch.autograd.Function):
    """w(z), holomorphic: the vector-Jacobian product is grad * conj(w'(z))."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, dw, _ = _wofz_parts(z)
        return w, dw

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, dw = output
        ctx.mark_non_differentiable(dw)
        ctx.save_for_backward(dw, inputs[0])
        ctx.save_for_forward(dw)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> torch.Tensor:
        dw, z = ctx.saved_tensors
        (dw,) = _first_order((dw,), (z,))
        return grad * dw.conj()

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> tuple[torch.Tensor, None]:
        dw = ctx.saved_tensors[0]
        return tangent * dw, None


def wofz(z: torch.Tensor) -> torch.Tensor:
    """The Faddeeva function w(z) = exp(-z^2) erfc(-iz), as ``scipy.special.wofz``.

    ``z`` is a complex128 or complex64 tensor on any device; differentiable (once), with
    dw/dz = -2 z w(z) + 2i / sqrt(pi).
    """
    return _Wofz.apply(z)[0]


# ---------------------------------------------------------------------------------------------
# The Voigt profile
#
#   V(x, s, g) = Re w(z) / (s sqrt(2 pi)),   z = (x + i g) / (s sqrt 2)
#
# With dz/dx = 1 / (s sqrt 2), dz/dg = i / (s sqrt 2), dz/ds = -z / s and w' = -2 z w + 2i/sqrt(pi):
#
#   dV/dx = Re w'(z) / (2 sqrt(pi) s^2)
#   dV/dg = -Im w'(z) / (2 sqrt(pi) s^2)
#   dV/ds = -(Re w(z) + Re(z w'(z))) / (sqrt(2 pi) s^2)
#
# (so x dV/dx + s dV/ds + g dV/dg = -V: V is homogeneous of degree -1). The limits follow scipy:
# s = 0 is the Lorentzian g / (pi (x^2 + g^2)), with dV/ds = 0 (V = L + O(s^2) as s -> 0+);
# g = 0 is the Gaussian exp(-x^2 / (2 s^2)) / (s sqrt(2 pi)), whose partials are the general
# ones at real z (dV/dg there is the derivative of the analytic continuation in g).


def _voigt_parts(
    x: torch.Tensor, sigma: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = x.dtype
    if dtype != torch.float64:  # evaluated in double, rounded once (see _wofz_parts)
        parts = _voigt_parts(x.double(), sigma.double(), gamma.double())
        return tuple(t.to(dtype) for t in parts)  # type: ignore[return-value]
    x, sigma, gamma = torch.broadcast_tensors(x, sigma, gamma)
    lorentz = sigma == 0
    s = torch.where(lorentz, 1.0, sigma)
    scale = s * math.sqrt(2.0)
    z = torch.complex(x / scale, gamma / scale)
    w, dw, q = _wofz_parts(z)
    s2 = s * s
    value = w.real / (s * _SQRT_2PI)
    d_x = dw.real / (2.0 * math.sqrt(math.pi) * s2)
    d_gamma = -dw.imag / (2.0 * math.sqrt(math.pi) * s2)
    d_sigma = -q.real / (_SQRT_2PI * s2)
    # gamma = 0: scipy's Gaussian, exactly
    r = x / s
    gauss = torch.exp(-(r * r) / 2.0) / (_SQRT_2PI * s)
    value = torch.where(gamma == 0, gauss, value)
    # sigma = 0: the Lorentzian (and at gamma = 0 too: 0 off x = 0, inf at it)
    q = x * x + gamma * gamma
    lor = gamma / math.pi / q
    lor = torch.where((gamma == 0) & (x == 0), math.inf, torch.where(gamma == 0, 0.0, lor))
    lor = torch.where(torch.isnan(x), x, lor)
    value = torch.where(lorentz, lor, value)
    d_x = torch.where(lorentz, -2.0 * x * gamma / (math.pi * q * q), d_x)
    d_gamma = torch.where(lorentz, (x * x - gamma * gamma) / (math.pi * q * q), d_gamma)
    d_sigma = torch.where(lorentz, 0.0, d_sigma)
    return value, d_x, d_sigma, d_gamma


class _VoigtProfile(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Any, sigma: Any, gamma: Any) -> Any:
        return _voigt_parts(x, sigma, gamma)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, d_x, d_sigma, d_gamma = output
        ctx.mark_non_differentiable(d_x, d_sigma, d_gamma)
        ctx.save_for_backward(d_x, d_sigma, d_gamma, *inputs)
        ctx.save_for_forward(d_x, d_sigma, d_gamma)
        ctx.shapes = tuple(t.shape for t in inputs)

    @staticmethod
    def backward(ctx: Any, grad: Any, *_: Any) -> Any:
        saved = ctx.saved_tensors
        partials = _first_order(saved[:3], saved[3:])
        return tuple(
            (grad * d).sum_to_size(shape) if needed else None
            for d, shape, needed in zip(partials, ctx.shapes, ctx.needs_input_grad, strict=True)
        )

    @staticmethod
    def jvp(ctx: Any, t_x: Any, t_sigma: Any, t_gamma: Any) -> Any:
        d_x, d_sigma, d_gamma = ctx.saved_tensors[:3]
        out = torch.zeros_like(d_x)
        for t, d in ((t_x, d_x), (t_sigma, d_sigma), (t_gamma, d_gamma)):
            if t is not None:
                out = out + t * d
        return out, None, None, None


def voigt_profile(x: Any, sigma: Any, gamma: Any) -> torch.Tensor:
    """The Voigt profile, as ``scipy.special.voigt_profile``: the convolution of a Gaussian of
    standard deviation ``sigma`` with a Lorentzian of half width ``gamma``, at ``x``:

        V = Re w((x + i gamma) / (sigma sqrt 2)) / (sigma sqrt(2 pi)).

    Real tensors (float64 or float32; numbers take the tensors' dtype), broadcast together.
    Exact first partials in every argument, by reverse and forward mode (not twice
    differentiable).
    """
    tensors = [a for a in (x, sigma, gamma) if isinstance(a, torch.Tensor)]
    if tensors:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        device = tensors[0].device
    else:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    args = [torch.as_tensor(a, dtype=dtype, device=device) for a in (x, sigma, gamma)]
    return _VoigtProfile.apply(*args)[0]


# ---------------------------------------------------------------------------------------------
# numpy, on scipy's wofz


def _numpy_derivatives(z: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w'(z) and w(z) + z w'(z) from w = scipy's wofz(z), formed as the torch path forms them:
    from -2 z w + 2i/sqrt(pi), and where that cancels, from the continued fraction."""
    x0, y = z.real, z.imag
    x, ya = np.abs(x0), np.abs(y)
    cf = (ya > 7) | ((x > 6) & ((ya > 0.1) | ((x > 8) & (ya > 1e-10)) | (x > 28)))
    dw = -2.0 * z * w + 2j * _ISQRT_PI
    if (x > 6).any() or cf.any():
        _, _, d_re, d_im, q_re, q_im = _continued_fraction(np, x0, y, x, ya)
        dw = np.where(cf, d_re + 1j * d_im, np.where(x > 6, dw.real + 1j * d_im, dw))
        return dw, np.where(cf, q_re + 1j * q_im, w + z * dw)
    return dw, w + z * dw


def voigt_profile_numpy(
    x: Any, sigma: Any, gamma: Any
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(V, (dV/dx, dV/dsigma, dV/dgamma))`` in numpy float64: V from
    ``scipy.special.voigt_profile``, the partials (formulas above) from ``scipy.special.wofz``.
    """
    from scipy import special

    x, sigma, gamma = np.broadcast_arrays(
        np.asarray(x, dtype=np.float64),
        np.asarray(sigma, dtype=np.float64),
        np.asarray(gamma, dtype=np.float64),
    )
    with np.errstate(all="ignore"):  # the unused branches of the np.where below
        return _voigt_numpy(special, x, sigma, gamma)


def _voigt_numpy(
    special: Any, x: np.ndarray, sigma: np.ndarray, gamma: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    value = special.voigt_profile(x, sigma, gamma)
    lorentz = sigma == 0
    s = np.where(lorentz, 1.0, sigma)
    z = (x + 1j * gamma) / (s * math.sqrt(2.0))
    w = special.wofz(z)
    dw, q = _numpy_derivatives(z, w)
    s2 = s * s
    d_x = dw.real / (2.0 * math.sqrt(math.pi) * s2)
    d_gamma = -dw.imag / (2.0 * math.sqrt(math.pi) * s2)
    d_sigma = -q.real / (_SQRT_2PI * s2)
    q = x * x + gamma * gamma
    d_x = np.where(lorentz, -2.0 * x * gamma / (math.pi * q * q), d_x)
    d_gamma = np.where(lorentz, (x * x - gamma * gamma) / (math.pi * q * q), d_gamma)
    d_sigma = np.where(lorentz, 0.0, d_sigma)
    return value, (d_x, d_sigma, d_gamma)


_LAST = threading.local()  # the last voigt_value_numpy result and its partials, per thread


def voigt_value_numpy(x: Any, sigma: Any, gamma: Any) -> Any:
    """`voigt_profile_numpy`'s value, its partials kept for `voigt_partials_numpy`."""
    value, partials = voigt_profile_numpy(x, sigma, gamma)
    _LAST.value, _LAST.partials = value, partials
    return value


def voigt_partials_numpy(x: Any, sigma: Any, gamma: Any, value: Any) -> tuple[Any, Any, Any]:
    """The three partials at (x, sigma, gamma), given `voigt_value_numpy`'s ``value`` there:
    symdiff asks for the value, then each partial, and this computes wofz once for all four
    (a value is a fresh array each time, so its identity says which call it came from)."""
    if getattr(_LAST, "value", None) is value:
        return _LAST.partials
    return voigt_profile_numpy(x, sigma, gamma)[1]
