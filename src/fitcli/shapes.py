"""Lineshapes: named curves callable in expressions, each a macro over the expression language.

``gaussian(x, amplitude, center, sigma)`` in a model expression is replaced, when the expression
is checked, by the shape's ``formula`` with its arguments put in place of the formula's names.
So a shape is differentiated exactly on both Jacobian paths (torch autograd and `fitcli.symdiff`)
with no code of its own, and a sum of shapes is just an expression. The names, argument order,
defaults and parameterisations of lmfit's ``lineshapes`` are kept exactly; where lmfit takes a
``form=`` string each form is its own name (``step_erf``, ``thermal_fermi``). Trailing arguments
with a default may be left out; a default is a number or an expression over earlier arguments
(voigt's ``gamma`` defaults to ``sigma``, as in lmfit).

Each shape's ``roles`` tell the start-value guesser what an argument means:

- ``area``: scales the curve so that its integral over x is the argument; the peak height is
  ``factor * argument / width`` (width: the shape's ``width`` argument) at the default starts.
- ``height``: the peak (or plateau) value is ``factor * argument``.
- ``center``: the x of the peak maximum (of a step: its half-way point).
- ``width``: the full width at half maximum is ``factor * argument`` (of a step: the FWHM of its
  derivative, a peak).
- ``background_slope`` / ``background_level``: a straight background's slope and value at x = 0.
- ``scale``: a length along x that is not a peak width (a decay length, kT); ``rate``: one over
  such a length (a frequency, a decay rate).
- ``fraction``: a mixing fraction in [0, 1]; ``shape``: a dimensionless shape parameter. Both
  have a default ``start``.
- ``variable``: a second independent variable (gaussian2d's ``y``): a variable of the data
  (``data.columns.x: [x, y]``) or a number, never guessed.

Pure Python, no torch or numpy: `fitcli.expr` parses each formula once and expands calls.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fitcli.errors import InputError

__all__ = [
    "ROLE_KINDS",
    "SHAPES",
    "TINY",
    "UNAVAILABLE",
    "Role",
    "Shape",
    "describe",
    "lookup",
    "signature",
]

TINY = 1e-15
"""lmfit's ``tiny``: the floor of widths and divisors, written into formulas as a literal."""

ROLE_KINDS = (
    "area",
    "height",
    "center",
    "width",
    "background_slope",
    "background_level",
    "scale",
    "rate",
    "fraction",
    "shape",
    "variable",
)


@dataclass(frozen=True)
class Role:
    """What an argument means to the start-value guesser (see the module docstring)."""

    kind: str
    factor: float = 1.0
    start: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Shape:
    """One lineshape: its arguments (``x`` first), defaults, formula, documentation and roles."""

    name: str
    args: tuple[str, ...]
    defaults: dict[str, float | str]
    formula: str
    doc: str
    roles: dict[str, Role] = field(default_factory=dict)
    source: str = "lmfit"  # "lmfit": as lmfit.lineshapes; "fitcli": a formula documented here

    @property
    def required(self) -> int:
        """How many leading arguments must be given (the rest have defaults)."""
        return len(self.args) - len(self.defaults)

    @property
    def summary(self) -> str:
        """The doc's first line: what the shape is."""
        return self.doc.split("\n", 1)[0]


def signature(shape: Shape) -> str:
    """``gaussian(x, amplitude=1, center=0, sigma=1)``."""
    parts = []
    for arg in shape.args:
        if arg in shape.defaults:
            default = shape.defaults[arg]
            text = f"{default:g}" if isinstance(default, float) else default
            parts.append(f"{arg}={text}")
        else:
            parts.append(arg)
    return f"{shape.name}({', '.join(parts)})"


_T = "1e-15"  # TINY as formulas write it
_GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))  # FWHM / sigma of a Gaussian
_S2PI = 1.0 / math.sqrt(2.0 * math.pi)  # height * sigma / area of a Gaussian

# nz(v): lmfit's not_zero, v with its magnitude at least tiny and its sign kept
_NZ = "where({v} < 0, -max(" + _T + ", abs({v})), max(" + _T + ", abs({v})))"
# 1 / d as lmfit's thermal_distribution computes it, real(1 / (d + tiny*1j)) = d / (d² + tiny²):
# 1 / d where tiny² is below d²'s rounding, the exact expression near d = 0
_RECIP = "where(abs({d}) > 1e-7, 1 / ({d}), ({d}) / (({d})**2 + 1e-30))"


def _nz(v: str) -> str:
    return _NZ.format(v=v)


def _thermal(offset: str) -> str:
    d = f"amplitude*exp((x - center) / {_nz('kt')}){offset}"
    return _RECIP.format(d=d)


_AMP = Role("area", _S2PI, note="area-normalised: the integral over x is amplitude")
_CEN = Role("center")
_D = {"amplitude": 1.0, "center": 0.0, "sigma": 1.0}  # lmfit's usual defaults


def _peak(factor: float, fwhm: float) -> dict[str, Role]:
    return {
        "amplitude": Role("area", factor, note="area-normalised: the integral is amplitude"),
        "center": _CEN,
        "sigma": Role("width", fwhm),
    }


_STEP_ARG = f"sign(sigma)*(x - center) / max({_T}**2, abs(sigma))"
_RECT_ARG1 = f"(x - center1) / max({_T}, sigma1)"
_RECT_ARG2 = f"(center2 - x) / max({_T}, sigma2)"
_STEP_ROLES = {"amplitude": Role("height"), "center": _CEN}
_RECT_DEFAULTS: dict[str, float | str] = {
    "amplitude": 1.0,
    "center1": 0.0,
    "sigma1": 1.0,
    "center2": 1.0,
    "sigma2": 1.0,
}
_LOGISTIC_FWHM = 2.0 * math.log(3.0 + 2.0 * math.sqrt(2.0))  # of sech²(u/2)
_ERF_FWHM = 2.0 * math.sqrt(math.log(2.0))  # of exp(-u²)


def _rect_roles(fwhm: float) -> dict[str, Role]:
    return {
        "amplitude": Role("height"),
        "center1": Role("center", note="the rising edge"),
        "sigma1": Role("width", fwhm, note="of the rising edge"),
        "center2": Role("center", note="the falling edge"),
        "sigma2": Role("width", fwhm, note="of the falling edge"),
    }


def _build() -> tuple[Shape, ...]:
    x3 = ("x", "amplitude", "center", "sigma")
    kt = {"amplitude": 1.0, "center": 0.0, "kt": 1.0}
    kt_roles = {
        "amplitude": Role("shape", start=1.0, note="multiplies exp((x - center)/kt)"),
        "center": _CEN,
        "kt": Role("scale", note="kT in the units of x; negative for the energy-loss convention"),
    }
    shapes = [
        Shape(
            "gaussian",
            x3,
            dict(_D),
            f"amplitude / max({_T}, sqrt(2*pi)*sigma)"
            f" * exp(-(x - center)**2 / max({_T}, 2*sigma**2))",
            "Gaussian peak of area amplitude.\n"
            "amplitude / (sigma sqrt(2 pi)) exp(-(x - center)^2 / (2 sigma^2))",
            _peak(_S2PI, _GAUSS_FWHM),
        ),
        Shape(
            "gaussian2d",
            ("x", "y", "amplitude", "centerx", "centery", "sigmax", "sigmay"),
            {
                "y": 0.0,
                "amplitude": 1.0,
                "centerx": 0.0,
                "centery": 0.0,
                "sigmax": 1.0,
                "sigmay": 1.0,
            },
            "amplitude * (gaussian(x, 1, centerx, sigmax) * gaussian(y, 1, centery, sigmay))",
            "Two-dimensional Gaussian peak of volume amplitude, in the variables x and y.\n"
            "amplitude / (2 pi sigmax sigmay) exp(-(x - centerx)^2 / (2 sigmax^2)"
            " - (y - centery)^2 / (2 sigmay^2))",
            {
                "y": Role("variable", note="the second independent variable (data.columns.x)"),
                "amplitude": Role("area", _S2PI, note="the integral over x and y is amplitude"),
                "centerx": _CEN,
                "centery": Role("center", note="along y"),
                "sigmax": Role("width", _GAUSS_FWHM),
                "sigmay": Role("width", _GAUSS_FWHM, note="along y"),
            },
        ),
        Shape(
            "lorentzian",
            x3,
            dict(_D),
            f"amplitude / (1 + ((x - center) / max({_T}, sigma))**2) / max({_T}, pi*sigma)",
            "Lorentzian (Cauchy) peak of area amplitude.\n"
            "amplitude / (pi sigma) / (1 + ((x - center) / sigma)^2)",
            _peak(1 / math.pi, 2.0),
        ),
        Shape(
            "split_lorentzian",
            (*x3, "sigma_r"),
            {**_D, "sigma_r": 1.0},
            f"2*amplitude / (pi*(max({_T}, sigma) + max({_T}, sigma_r)))"
            f" * where(x < center,"
            f" max({_T}, sigma)**2 / (max({_T}, sigma)**2 + (x - center)**2),"
            f" max({_T}, sigma_r)**2 / (max({_T}, sigma_r)**2 + (x - center)**2))",
            "Lorentzian of area amplitude with half-width sigma left and sigma_r right of center.\n"
            "2 amplitude / (pi (sigma + sigma_r)) s^2 / (s^2 + (x - center)^2),"
            " s = sigma for x < center, sigma_r for x >= center",
            {
                "amplitude": Role("area", 1 / math.pi, note="area-normalised"),
                "center": _CEN,
                "sigma": Role("width", 2.0, note="left half-width at half maximum"),
                "sigma_r": Role("width", 2.0, note="right half-width at half maximum"),
            },
        ),
        Shape(
            "voigt",
            (*x3, "gamma"),
            {**_D, "gamma": "sigma"},
            "amplitude * voigt_profile(x - center, sigma, gamma)",
            "Voigt peak of area amplitude: a Gaussian (sigma) convolved with a Lorentzian"
            " (gamma).\n"
            "amplitude Re[w(z)] / (sigma sqrt(2 pi)), z = (x - center + i gamma) / (sigma sqrt 2),"
            " w the Faddeeva function",
            {
                "amplitude": Role("area", 0.2087, note="height factor at gamma = sigma"),
                "center": _CEN,
                "sigma": Role("width", 3.6013, note="FWHM at gamma = sigma"),
                "gamma": Role("width", 3.6013, note="the Lorentzian half-width; start = sigma"),
            },
        ),
        Shape(
            "pvoigt",
            (*x3, "fraction"),
            {**_D, "fraction": 0.5},
            "(1 - fraction) * gaussian(x, amplitude, center, sigma / sqrt(2*log(2)))"
            " + fraction * lorentzian(x, amplitude, center, sigma)",
            "Pseudo-Voigt peak of area amplitude: a Gaussian and a Lorentzian of the same FWHM.\n"
            "(1 - fraction) gaussian(x, amplitude, center, sigma / sqrt(2 ln 2))"
            " + fraction lorentzian(x, amplitude, center, sigma); FWHM = 2 sigma",
            {
                "amplitude": Role(
                    "area",
                    0.5 * math.sqrt(math.log(2.0) / math.pi) + 0.5 / math.pi,
                    note="height factor at fraction = 0.5",
                ),
                "center": _CEN,
                "sigma": Role("width", 2.0),
                "fraction": Role("fraction", start=0.5, note="the Lorentzian share"),
            },
        ),
        Shape(
            "moffat",
            (*x3, "beta"),
            {**_D, "beta": 1.0},
            f"amplitude / (((x - center) / max({_T}, sigma))**2 + 1)**beta",
            "Moffat peak of height amplitude (a Lorentzian for beta = 1).\n"
            "amplitude / (((x - center) / sigma)^2 + 1)^beta",
            {
                "amplitude": Role("height"),
                "center": _CEN,
                "sigma": Role("width", 2.0, note="FWHM = 2 sigma sqrt(2^(1/beta) - 1)"),
                "beta": Role("shape", start=1.0),
            },
        ),
        Shape(
            "pearson4",
            (*x3, "expon", "skew"),
            {**_D, "expon": 1.0, "skew": 0.0},
            f"amplitude / max({_T}, sigma) * exp("
            f"2*(loggamma_re(max({_T}, expon), skew/2) - lgamma(max({_T}, expon)))"
            f" - (lgamma(max({_T}, expon) - 0.5) + lgamma(0.5) - lgamma(max({_T}, expon)))"
            f" - max({_T}, expon)*log1p(((x - center) / max({_T}, sigma))**2)"
            f" - skew*atan((x - center) / max({_T}, sigma)))",
            "Pearson type IV peak of area amplitude (skewed; Student's t-like tails).\n"
            "amplitude / sigma |Gamma(m + i nu/2) / Gamma(m)|^2 / B(m - 1/2, 1/2)"
            " (1 + u^2)^-m exp(-nu atan u), u = (x - center) / sigma, m = expon, nu = skew",
            {
                "amplitude": Role("area", 1 / math.pi, note="height factor at expon 1, skew 0"),
                "center": Role("center", note="the mode is center - sigma skew / (2 expon)"),
                "sigma": Role("width", 2.0, note="FWHM at expon 1, skew 0"),
                "expon": Role("shape", start=1.5),
                "skew": Role("shape", start=0.0),
            },
        ),
        Shape(
            "pearson7",
            (*x3, "expon"),
            {**_D, "expon": 1.0},
            f"amplitude * gamma(max({_T}, expon)) / (gamma(0.5)*gamma(max({_T}, expon) - 0.5))"
            f" * (1 + ((x - center) / max({_T}, sigma))**2)**(-max({_T}, expon))"
            f" / max({_T}, sigma)",
            "Pearson type VII peak of area amplitude (a Lorentzian for expon = 1).\n"
            "amplitude / (sigma B(expon - 1/2, 1/2)) (1 + ((x - center) / sigma)^2)^-expon",
            {
                "amplitude": Role("area", 1 / math.pi, note="height factor at expon = 1"),
                "center": _CEN,
                "sigma": Role("width", 2.0, note="FWHM = 2 sigma sqrt(2^(1/expon) - 1)"),
                "expon": Role("shape", start=1.5),
            },
        ),
        Shape(
            "breit_wigner",
            (*x3, "q"),
            {**_D, "q": 1.0},
            "amplitude*(q*sigma/2 + x - center)**2 / ((sigma/2)**2 + (x - center)**2)",
            "Breit-Wigner-Fano resonance (asymmetric; a Lorentzian dip or peak as q changes).\n"
            "amplitude (q sigma/2 + x - center)^2 / ((sigma/2)^2 + (x - center)^2)",
            {
                "amplitude": Role("height", 2.0, note="the maximum is amplitude (1 + q^2)"),
                "center": _CEN,
                "sigma": Role("width", 1.0),
                "q": Role("shape", start=1.0, note="the Fano asymmetry"),
            },
        ),
        Shape(
            "damped_oscillator",
            x3,
            {"amplitude": 1.0, "center": 1.0, "sigma": 0.1},
            f"amplitude / sqrt((1 - (x / max({_T}, abs(center)))**2)**2"
            f" + (2*sigma*x / max({_T}, abs(center)))**2)",
            "Amplitude of a driven damped harmonic oscillator, resonance at center.\n"
            "amplitude / sqrt((1 - (x / center)^2)^2 + (2 sigma x / center)^2)",
            {
                "amplitude": Role("height", 5.0, note="the peak is amplitude / (2 sigma)"),
                "center": _CEN,
                "sigma": Role("shape", start=0.1, note="damping ratio; FWHM ~ 2 sigma center"),
            },
        ),
        Shape(
            "dho",
            (*x3, "gamma"),
            {"amplitude": 1.0, "center": 1.0, "sigma": 1.0, "gamma": 1.0},
            "amplitude*sigma/pi * where(abs(x) <= 1e-8,"
            " 4*gamma*center / (center**2 + sigma**2)**2,"
            " (1 / ((x - center)**2 + sigma**2) - 1 / ((x + center)**2 + sigma**2))"
            f" / where(abs(1 - exp(-x / max({_T}, gamma))) <= {_T}, {_T},"
            f" 1 - exp(-x / max({_T}, gamma))))",
            "Damped harmonic oscillator response with a Bose factor (as in PAN).\n"
            "amplitude sigma / pi (1 / ((x - center)^2 + sigma^2) - 1 / ((x + center)^2"
            " + sigma^2)) / (1 - exp(-x / gamma))",
            {
                "amplitude": Role(
                    "area", 1 / math.pi, note="each Lorentzian's area, near the peak"
                ),
                "center": _CEN,
                "sigma": Role("width", 2.0),
                "gamma": Role("scale", note="kT of the Bose factor, in the units of x"),
            },
        ),
        Shape(
            "logistic",
            x3,
            dict(_D),
            f"amplitude*(1 - 1 / (1 + exp((x - center) / max({_T}, sigma))))",
            "Logistic step from 0 to amplitude, half-way at center.\n"
            "amplitude (1 - 1 / (1 + exp((x - center) / sigma)))",
            {"amplitude": Role("height"), "center": _CEN, "sigma": Role("width", _LOGISTIC_FWHM)},
        ),
        Shape(
            "lognormal",
            x3,
            dict(_D),
            f"amplitude / (max({_T}, x) * max({_T}, sigma*sqrt(2*pi)))"
            f" * exp(-(log(max({_T}, x)) - center)**2 / max({_T}, 2*sigma**2))",
            "Log-normal distribution of area amplitude (x > 0).\n"
            "amplitude / (x sigma sqrt(2 pi)) exp(-(ln x - center)^2 / (2 sigma^2))",
            {
                "amplitude": Role("area", note="area-normalised"),
                "center": Role(
                    "center", note="the mean of ln x: the mode is exp(center - sigma^2)"
                ),
                "sigma": Role("shape", start=1.0, note="the standard deviation of ln x"),
            },
        ),
        Shape(
            "students_t",
            x3,
            dict(_D),
            f"amplitude*(1 + (x - center)**2 / max({_T}, sigma))**(-((sigma + 1)/2))"
            f" * gamma((sigma + 1)/2) / max({_T}, sqrt(sigma*pi)*gamma(max({_T}, sigma/2)))",
            "Student's t distribution of area amplitude, sigma degrees of freedom.\n"
            "amplitude Gamma((sigma + 1)/2) / (sqrt(sigma pi) Gamma(sigma/2))"
            " (1 + (x - center)^2 / sigma)^(-(sigma + 1)/2)",
            {
                "amplitude": Role("height", 1 / math.pi, note="peak at sigma = 1"),
                "center": _CEN,
                "sigma": Role("shape", start=1.0, note="degrees of freedom; FWHM 2 at sigma = 1"),
            },
        ),
        Shape(
            "expgaussian",
            (*x3, "gamma"),
            {**_D, "gamma": 1.0},
            "amplitude*(gamma/2) * exp(gamma*(center + gamma*sigma*sigma/2 - x))"
            f" * erfc((center + gamma*sigma*sigma - x) / max({_T}, sqrt(2)*sigma))",
            "Exponentially modified Gaussian of area amplitude (a Gaussian with a decay tail).\n"
            "amplitude gamma/2 exp(gamma (center + gamma sigma^2/2 - x))"
            " erfc((center + gamma sigma^2 - x) / (sqrt 2 sigma))",
            {
                "amplitude": Role("area", _S2PI, note="height factor for a large gamma"),
                "center": _CEN,
                "sigma": Role("width", _GAUSS_FWHM),
                "gamma": Role("rate", note="the tail's decay rate"),
            },
        ),
        Shape(
            "doniach",
            (*x3, "gamma"),
            {**_D, "gamma": 0.0},
            f"amplitude / max({_T}, sigma**(1 - gamma))"
            f" * cos(pi*gamma/2 + (1 - gamma)*atan((x - center) / max({_T}, sigma)))"
            f" / (1 + ((x - center) / max({_T}, sigma))**2)**((1 - gamma)/2)",
            "Doniach-Sunjic asymmetric lineshape (photo-emission).\n"
            "amplitude / sigma^(1 - gamma) cos(pi gamma/2 + (1 - gamma) atan(u))"
            " / (1 + u^2)^((1 - gamma)/2), u = (x - center) / sigma",
            {
                "amplitude": Role("height", 1.0, note="peak amplitude / sigma at gamma = 0"),
                "center": _CEN,
                "sigma": Role("width", 2.0),
                "gamma": Role("shape", start=0.0, note="the asymmetry, 0 <= gamma < 1"),
            },
        ),
        Shape(
            "skewed_gaussian",
            (*x3, "gamma"),
            {**_D, "gamma": 0.0},
            f"(1 + erf(gamma*(x - center) / max({_T}, sqrt(2)*sigma)))"
            " * gaussian(x, amplitude, center, sigma)",
            "Gaussian of area amplitude skewed by an error function (the skew normal).\n"
            "gaussian(x, amplitude, center, sigma) (1 + erf(gamma (x - center) / (sigma sqrt 2)))",
            {**_peak(_S2PI, _GAUSS_FWHM), "gamma": Role("shape", start=0.0, note="the skew")},
        ),
        Shape(
            "skewed_voigt",
            (*x3, "gamma", "skew"),
            {**_D, "gamma": "sigma", "skew": 0.0},
            f"(1 + erf(skew / max({_T}, sqrt(2)*sigma) * (x - center)))"
            " * voigt(x, amplitude, center, sigma, gamma)",
            "Voigt peak of area amplitude skewed by an error function.\n"
            "voigt(x, amplitude, center, sigma, gamma)"
            " (1 + erf(skew (x - center) / (sigma sqrt 2)))",
            {
                "amplitude": Role("area", 0.2087, note="height factor at gamma = sigma"),
                "center": _CEN,
                "sigma": Role("width", 3.6013, note="FWHM at gamma = sigma"),
                "gamma": Role("width", 3.6013, note="start = sigma"),
                "skew": Role("shape", start=0.0),
            },
        ),
        Shape(
            "sine",
            ("x", "amplitude", "frequency", "shift"),
            {"amplitude": 1.0, "frequency": 1.0, "shift": 0.0},
            "amplitude*sin(x*frequency + shift)",
            "Sine wave (frequency in radians per unit of x).\namplitude sin(frequency x + shift)",
            {
                "amplitude": Role("height"),
                "frequency": Role("rate", 2 * math.pi, note="angular: 2 pi / period"),
                "shift": Role("shape", start=0.0, note="phase, radians"),
            },
        ),
        Shape(
            "expsine",
            ("x", "amplitude", "frequency", "shift", "decay"),
            {"amplitude": 1.0, "frequency": 1.0, "shift": 0.0, "decay": 0.0},
            "amplitude*sin(x*frequency + shift) * exp(-x*decay)",
            "Exponentially damped sine wave.\namplitude sin(frequency x + shift) exp(-decay x)",
            {
                "amplitude": Role("height"),
                "frequency": Role("rate", 2 * math.pi, note="angular: 2 pi / period"),
                "shift": Role("shape", start=0.0, note="phase, radians"),
                "decay": Role("rate", note="the decay rate"),
            },
        ),
        Shape(
            "thermal_bose",
            ("x", "amplitude", "center", "kt"),
            dict(kt),
            _thermal(" - 1"),
            "Bose-Einstein distribution (lmfit's thermal_distribution, form='bose').\n"
            "1 / (amplitude exp((x - center) / kt) - 1)",
            kt_roles,
        ),
        Shape(
            "thermal_maxwell",
            ("x", "amplitude", "center", "kt"),
            dict(kt),
            _thermal(""),
            "Maxwell-Boltzmann distribution (lmfit's thermal_distribution, form='maxwell').\n"
            "1 / (amplitude exp((x - center) / kt))",
            kt_roles,
        ),
        Shape(
            "thermal_fermi",
            ("x", "amplitude", "center", "kt"),
            dict(kt),
            _thermal(" + 1"),
            "Fermi-Dirac distribution (lmfit's thermal_distribution, form='fermi').\n"
            "1 / (amplitude exp((x - center) / kt) + 1)",
            kt_roles,
        ),
        Shape(
            "bose",
            ("x", "amplitude", "center", "kt"),
            dict(kt),
            f"amplitude / where(abs(exp((x - center) / {_nz('kt')}) - 1) < {_T}**2, {_T}**2,"
            f" exp((x - center) / {_nz('kt')}) - 1)",
            "Bose-Einstein occupation scaled by amplitude (lmfit's bose).\n"
            "amplitude / (exp((x - center) / kt) - 1)",
            {**kt_roles, "amplitude": Role("height")},
        ),
        Shape(
            "fermi",
            ("x", "amplitude", "center", "kt"),
            dict(kt),
            f"amplitude / (exp((x - center) / {_nz('kt')}) + 1)",
            "Fermi-Dirac occupation scaled by amplitude (lmfit's fermi): a falling step.\n"
            "amplitude / (exp((x - center) / kt) + 1)",
            {**kt_roles, "amplitude": Role("height")},
        ),
        Shape(
            "step_linear",
            x3,
            dict(_D),
            f"amplitude*min(1, max(0, {_STEP_ARG} + 0.5))",
            "Linear ramp from 0 to amplitude, centred at center, sigma wide (falls if sigma < 0).\n"
            "amplitude min(1, max(0, (x - center) / sigma + 1/2))",
            {**_STEP_ROLES, "sigma": Role("width", 1.0)},
        ),
        Shape(
            "step_atan",
            x3,
            dict(_D),
            f"amplitude*(0.5 + atan({_STEP_ARG})/pi)",
            "Arctangent step from 0 to amplitude (falls if sigma < 0).\n"
            "amplitude (1/2 + atan((x - center) / sigma) / pi)",
            {**_STEP_ROLES, "sigma": Role("width", 2.0)},
        ),
        Shape(
            "step_erf",
            x3,
            dict(_D),
            f"amplitude*(0.5*(1 + erf({_STEP_ARG})))",
            "Error-function step from 0 to amplitude (falls if sigma < 0).\n"
            "amplitude (1 + erf((x - center) / sigma)) / 2",
            {**_STEP_ROLES, "sigma": Role("width", _ERF_FWHM)},
        ),
        Shape(
            "step_logistic",
            x3,
            dict(_D),
            f"amplitude*(1 - 1/(1 + exp({_STEP_ARG})))",
            "Logistic step from 0 to amplitude (falls if sigma < 0).\n"
            "amplitude (1 - 1 / (1 + exp((x - center) / sigma)))",
            {**_STEP_ROLES, "sigma": Role("width", _LOGISTIC_FWHM)},
        ),
        Shape(
            "rectangle_linear",
            ("x", *_RECT_DEFAULTS),
            dict(_RECT_DEFAULTS),
            f"amplitude*(0.5*(min(1, max(-1, {_RECT_ARG1})) + min(1, max(-1, {_RECT_ARG2}))))",
            "Rectangle of linear ramps: up at center1 (width 2 sigma1), down at center2.\n"
            "amplitude (clip(u1, -1, 1) + clip(u2, -1, 1)) / 2,"
            " u1 = (x - center1) / sigma1, u2 = (center2 - x) / sigma2",
            _rect_roles(2.0),
        ),
        Shape(
            "rectangle_atan",
            ("x", *_RECT_DEFAULTS),
            dict(_RECT_DEFAULTS),
            f"amplitude*((atan({_RECT_ARG1}) + atan({_RECT_ARG2}))/pi)",
            "Rectangle of arctangent steps: up at center1, down at center2.\n"
            "amplitude (atan(u1) + atan(u2)) / pi,"
            " u1 = (x - center1) / sigma1, u2 = (center2 - x) / sigma2",
            _rect_roles(2.0),
        ),
        Shape(
            "rectangle_erf",
            ("x", *_RECT_DEFAULTS),
            dict(_RECT_DEFAULTS),
            f"amplitude*(0.5*(erf({_RECT_ARG1}) + erf({_RECT_ARG2})))",
            "Rectangle of error-function steps: up at center1, down at center2.\n"
            "amplitude (erf(u1) + erf(u2)) / 2,"
            " u1 = (x - center1) / sigma1, u2 = (center2 - x) / sigma2",
            _rect_roles(_ERF_FWHM),
        ),
        Shape(
            "rectangle_logistic",
            ("x", *_RECT_DEFAULTS),
            dict(_RECT_DEFAULTS),
            f"amplitude*(1 - 1/(1 + exp({_RECT_ARG1})) - 1/(1 + exp({_RECT_ARG2})))",
            "Rectangle of logistic steps: up at center1, down at center2.\n"
            "amplitude (1 - 1 / (1 + exp(u1)) - 1 / (1 + exp(u2))),"
            " u1 = (x - center1) / sigma1, u2 = (center2 - x) / sigma2",
            _rect_roles(_LOGISTIC_FWHM),
        ),
        Shape(
            "exponential",
            ("x", "amplitude", "decay"),
            {"amplitude": 1.0, "decay": 1.0},
            f"amplitude*exp(-x / {_nz('decay')})",
            "Exponential decay (decay is a length; negative for growth).\n"
            "amplitude exp(-x / decay)",
            {"amplitude": Role("height", note="the value at x = 0"), "decay": Role("scale")},
        ),
        Shape(
            "powerlaw",
            ("x", "amplitude", "exponent"),
            {"amplitude": 1.0, "exponent": 1.0},
            "amplitude*x**exponent",
            "Power law.\namplitude x^exponent",
            {
                "amplitude": Role("height", note="the value at x = 1"),
                "exponent": Role("shape", start=1.0),
            },
        ),
        Shape(
            "linear",
            ("x", "slope", "intercept"),
            {"slope": 1.0, "intercept": 0.0},
            "slope*x + intercept",
            "Straight line.\nslope x + intercept",
            {
                "slope": Role("background_slope"),
                "intercept": Role("background_level"),
            },
        ),
        Shape(
            "parabolic",
            ("x", "a", "b", "c"),
            {"a": 0.0, "b": 0.0, "c": 0.0},
            "a*x**2 + b*x + c",
            "Parabola.\na x^2 + b x + c",
            {
                "a": Role("shape", start=0.0, note="the curvature"),
                "b": Role("background_slope"),
                "c": Role("background_level"),
            },
        ),
    ]
    shapes += _more()
    return tuple(shapes)


def _more() -> list[Shape]:
    """Shapes lmfit does not have: enzyme kinetics, dose-response, growth, decays, rates."""
    f = "fitcli"
    return [
        Shape(
            "hill",
            ("x", "vmax", "k", "n"),
            {"vmax": 1.0, "k": 1.0, "n": 1.0},
            "vmax * x**n / (k**n + x**n)",
            "Hill equation: cooperative binding, half-saturation at x = k.\nvmax x^n / (k^n + x^n)",
            {
                "vmax": Role("height", note="the plateau"),
                "k": Role("center", note="the half-saturation point"),
                "n": Role("shape", start=1.0, note="the Hill coefficient"),
            },
            f,
        ),
        Shape(
            "michaelis_menten",
            ("x", "vmax", "km"),
            {"vmax": 1.0, "km": 1.0},
            "vmax * x / (km + x)",
            "Michaelis-Menten enzyme kinetics: rate at substrate concentration x.\n"
            "vmax x / (km + x)",
            {
                "vmax": Role("height", note="the plateau"),
                "km": Role("center", note="the half-saturation point"),
            },
            f,
        ),
        Shape(
            "dose_response4",
            ("x", "bottom", "top", "ec50", "hill"),
            {"bottom": 0.0, "top": 1.0, "ec50": 1.0, "hill": 1.0},
            "bottom + (top - bottom) / (1 + (ec50 / x)**hill)",
            "Four-parameter logistic dose-response (4PL), half-way at x = ec50 (x > 0).\n"
            "bottom + (top - bottom) / (1 + (ec50 / x)^hill)",
            {
                "bottom": Role("background_level", note="the response at x -> 0 (hill > 0)"),
                "top": Role("height", note="the response at x -> infinity (hill > 0)"),
                "ec50": Role("center", note="the half-way dose, on the x scale"),
                "hill": Role("shape", start=1.0, note="the Hill slope; negative: falling"),
            },
            f,
        ),
        Shape(
            "dose_response5",
            ("x", "bottom", "top", "ec50", "hill", "asym"),
            {"bottom": 0.0, "top": 1.0, "ec50": 1.0, "hill": 1.0, "asym": 1.0},
            "bottom + (top - bottom) / (1 + (ec50 / x)**hill)**asym",
            "Five-parameter logistic dose-response (5PL, asymmetric; 4PL for asym = 1).\n"
            "bottom + (top - bottom) / (1 + (ec50 / x)^hill)^asym",
            {
                "bottom": Role("background_level", note="the response at x -> 0 (hill > 0)"),
                "top": Role("height", note="the response at x -> infinity (hill > 0)"),
                "ec50": Role("center", note="half-way only for asym = 1"),
                "hill": Role("shape", start=1.0, note="the Hill slope"),
                "asym": Role("shape", start=1.0, note="the asymmetry"),
            },
            f,
        ),
        Shape(
            "gompertz",
            ("x", "amplitude", "displacement", "rate"),
            {"amplitude": 1.0, "displacement": 1.0, "rate": 1.0},
            "amplitude * exp(-displacement * exp(-rate * x))",
            "Gompertz growth curve: the inflection at x = ln(displacement) / rate.\n"
            "amplitude exp(-displacement exp(-rate x))",
            {
                "amplitude": Role("height", note="the plateau"),
                "displacement": Role("shape", start=1.0),
                "rate": Role("rate", note="the growth rate"),
            },
            f,
        ),
        Shape(
            "richards",
            ("x", "amplitude", "center", "rate", "nu"),
            {"amplitude": 1.0, "center": 0.0, "rate": 1.0, "nu": 1.0},
            "amplitude / (1 + nu * exp(-rate * (x - center)))**(1 / nu)",
            "Richards generalised logistic growth (a logistic for nu = 1).\n"
            "amplitude / (1 + nu exp(-rate (x - center)))^(1/nu)",
            {
                "amplitude": Role("height", note="the plateau"),
                "center": Role("center", note="half-way for nu = 1"),
                "rate": Role("rate", 1 / _LOGISTIC_FWHM, note="1 / the logistic's sigma"),
                "nu": Role("shape", start=1.0),
            },
            f,
        ),
        Shape(
            "double_exponential",
            ("x", "amplitude1", "decay1", "amplitude2", "decay2"),
            {"amplitude1": 1.0, "decay1": 1.0, "amplitude2": 1.0, "decay2": 10.0},
            f"amplitude1*exp(-x / {_nz('decay1')}) + amplitude2*exp(-x / {_nz('decay2')})",
            "Sum of two exponential decays with decay lengths (two lmfit exponentials).\n"
            "amplitude1 exp(-x / decay1) + amplitude2 exp(-x / decay2)",
            {
                "amplitude1": Role("height"),
                "decay1": Role("scale", 0.1, note="the fast one"),
                "amplitude2": Role("height"),
                "decay2": Role("scale", 1.0, note="the slow one"),
            },
            f,
        ),
        Shape(
            "biexponential_decay",
            ("x", "span_fast", "rate_fast", "span_slow", "rate_slow", "plateau"),
            {
                "span_fast": 1.0,
                "rate_fast": 1.0,
                "span_slow": 1.0,
                "rate_slow": 0.1,
                "plateau": 0.0,
            },
            "plateau + span_fast*exp(-rate_fast*x) + span_slow*exp(-rate_slow*x)",
            "Two-phase (bi-exponential) decay with rates and a plateau, as in pharmacology.\n"
            "plateau + span_fast exp(-rate_fast x) + span_slow exp(-rate_slow x)",
            {
                "span_fast": Role("height"),
                "rate_fast": Role("rate", 10.0, note="the fast one"),
                "span_slow": Role("height"),
                "rate_slow": Role("rate", 1.0, note="the slow one"),
                "plateau": Role("background_level"),
            },
            f,
        ),
        Shape(
            "stretched_exponential",
            ("x", "amplitude", "tau", "beta"),
            {"amplitude": 1.0, "tau": 1.0, "beta": 1.0},
            "amplitude * exp(-(x / tau)**beta)",
            "Stretched exponential (Kohlrausch-Williams-Watts) relaxation, x >= 0.\n"
            "amplitude exp(-(x / tau)^beta)",
            {
                "amplitude": Role("height", note="the value at x = 0"),
                "tau": Role("scale"),
                "beta": Role("shape", start=1.0, note="the stretching exponent, 0 < beta <= 1"),
            },
            f,
        ),
        Shape(
            "powerlaw_cutoff",
            ("x", "amplitude", "exponent", "cutoff"),
            {"amplitude": 1.0, "exponent": -1.0, "cutoff": 1.0},
            "amplitude * x**exponent * exp(-x / cutoff)",
            "Power law with an exponential cutoff.\namplitude x^exponent exp(-x / cutoff)",
            {
                "amplitude": Role("height", note="about the value at x = 1 for a large cutoff"),
                "exponent": Role("shape", start=-1.0),
                "cutoff": Role("scale"),
            },
            f,
        ),
        Shape(
            "sigmoid_step",
            ("x", "bottom", "top", "center", "width"),
            {"bottom": 0.0, "top": 1.0, "center": 0.0, "width": 1.0},
            "bottom + (top - bottom) * sigmoid((x - center) / width)",
            "Sigmoid (Boltzmann) step from bottom to top, half-way at center.\n"
            "bottom + (top - bottom) / (1 + exp(-(x - center) / width))",
            {
                "bottom": Role("background_level"),
                "top": Role("height"),
                "center": _CEN,
                "width": Role("width", _LOGISTIC_FWHM),
            },
            f,
        ),
        Shape(
            "arrhenius",
            ("x", "prefactor", "activation"),
            {"prefactor": 1.0, "activation": 1.0},
            "prefactor * exp(-activation / x)",
            "Arrhenius rate at temperature x; activation is Ea / R (or Ea / kB) in x's units.\n"
            "prefactor exp(-activation / x)",
            {
                "prefactor": Role("height", note="the rate as x -> infinity"),
                "activation": Role("scale", note="Ea / R, in the units of x"),
            },
            f,
        ),
    ]


SHAPES: dict[str, Shape] = {shape.name: shape for shape in _build()}
"""Every lineshape by name, in the order `fitcli shapes` lists them."""

UNAVAILABLE: dict[str, str] = {}
"""lmfit lineshapes fitcli does not provide yet, with why."""


def lookup(name: str) -> Shape:
    """The lineshape called `name`; an unknown name is an `InputError` with close matches."""
    shape = SHAPES.get(name)
    if shape is not None:
        return shape
    if name in UNAVAILABLE:
        raise InputError(f"lineshape {name!r} is not available yet: it {UNAVAILABLE[name]}")
    close = difflib.get_close_matches(name, list(SHAPES), n=3, cutoff=0.6)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else "`fitcli shapes` lists them"
    )
    raise InputError(f"unknown lineshape {name!r}; {hint}")


def describe(shape: Shape) -> dict[str, Any]:
    """A lineshape as plain data (what `fitcli shapes --json` prints)."""
    return {
        "name": shape.name,
        "signature": signature(shape),
        "summary": shape.summary,
        "doc": shape.doc,
        "args": list(shape.args),
        "defaults": dict(shape.defaults),
        "formula": shape.formula,
        "roles": {arg: asdict(role) for arg, role in shape.roles.items()},
        "source": shape.source,
    }
