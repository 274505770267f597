"""The Faddeeva function and the Voigt profile against scipy.special, and through `fitcli train`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from fitcli.config import config_from_dict
from fitcli.expr import parse_expression
from fitcli.faddeeva import voigt_profile, voigt_profile_numpy, wofz, wofz_and_derivative
from fitcli.prepare import prepare
from fitcli.symdiff import compile_jacobian
from fitcli.train import train


def log_polar_grid() -> np.ndarray:
    """|z| from 1e-6 to 1e6 (700 radii) at 361 angles over all four quadrants, plus the real
    and imaginary axes (both signs) and rays just off them: 2.6e5 points."""
    r = np.logspace(-6, 6, 700)
    theta = np.linspace(-math.pi, math.pi, 361)
    near = np.array([1e-12, 1e-9, 1e-6, 1e-3])
    rays = np.concatenate(
        [theta, near, -near, math.pi - near, near - math.pi, math.pi / 2 + near,
         math.pi / 2 - near, -math.pi / 2 + near, -math.pi / 2 - near]
    )  # fmt: skip
    z = (r[None, :] * np.exp(1j * rays[:, None])).ravel()
    return np.concatenate([z, r, -r, 1j * r, -1j * r])


def relative_error(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(ours - ref) / np.abs(ref)


def test_wofz_matches_scipy_to_1e_13_on_a_dense_grid():
    z = log_polar_grid()
    ref = special.wofz(z)
    ours = wofz(torch.from_numpy(z)).numpy()
    finite = np.isfinite(ref)  # exp(-z^2) overflows below the real axis for |y| > |x| + ...
    assert finite.sum() > 2e5
    assert np.isfinite(ours[finite]).all()
    assert not np.isfinite(ours[~finite]).any()
    err = relative_error(ours[finite], ref[finite])
    assert err.max() <= 1e-13, z[finite][err.argmax()]
    # on the real axis Re w = exp(-x^2) and Im w = 2 Dawson(x) / sqrt(pi), each to 1e-13
    x = np.concatenate([np.logspace(-6, 6, 2000), -np.logspace(-6, 6, 2000)])
    w = wofz(torch.from_numpy(x.astype(np.complex128))).numpy()
    ref = special.wofz(x.astype(np.complex128))
    assert relative_error(w.imag, ref.imag).max() <= 1e-13
    big = np.exp(-(x**2)) > 1e-300
    assert relative_error(w.real[big], ref.real[big]).max() <= 1e-13


def test_wofz_complex64_within_float32_rounding_of_scipy():
    z = log_polar_grid()
    ref = special.wofz(z)
    ours = wofz(torch.from_numpy(z).to(torch.complex64)).numpy().astype(np.complex128)
    # where w and the float32-rounded z are representable in float32
    z32 = z.astype(np.complex64).astype(np.complex128)
    ref = special.wofz(z32)
    ok = np.isfinite(ref) & (np.abs(ref) > 1e-30) & (np.abs(ref) < 1e30)
    assert ok.sum() > 1.5e5
    assert relative_error(ours[ok], ref[ok]).max() <= 1.2e-7


def test_derivative_is_minus_2zw_plus_2i_over_sqrt_pi_by_complex_differences():
    rng = np.random.default_rng(1)
    z = 10 ** rng.uniform(-3, 2, 400) * np.exp(1j * rng.uniform(-math.pi, math.pi, 400))
    z = z[np.isfinite(special.wofz(z)) & (np.abs(special.wofz(z)) < 1e250)]
    _, dw = wofz_and_derivative(torch.from_numpy(z))
    # the identity, against scipy's w
    identity = -2 * z * special.wofz(z) + 2j / math.sqrt(math.pi)
    assert relative_error(dw.numpy(), identity).max() < 1e-9
    # complex central differences of scipy's wofz along both axes (w is holomorphic)
    z = z[np.abs(z) < 10]  # beyond, exp(-z^2) varies on a scale 1/|z| below the real axis
    _, dw = wofz_and_derivative(torch.from_numpy(z))
    h = 1e-5 * np.minimum(np.maximum(np.abs(z), 1e-2), 1.0)
    along_x = (special.wofz(z + h) - special.wofz(z - h)) / (2 * h)
    along_y = (special.wofz(z + 1j * h) - special.wofz(z - 1j * h)) / (2j * h)
    scale = np.abs(dw.numpy()) + 1e-8 * np.abs(special.wofz(z)) / np.abs(z)
    assert (np.abs(dw.numpy() - along_x) / scale).max() < 1e-6
    assert (np.abs(dw.numpy() - along_y) / scale).max() < 1e-6


def test_wofz_autograd_passes_gradcheck():
    z = torch.tensor(
        [0.3 + 0.2j, 5 + 0.01j, -3 - 2j, 30 + 40j, 1e-4 + 2j, 7.5 + 1e-12j, 2e3 - 1e3j],
        dtype=torch.complex128,
        requires_grad=True,
    )
    assert torch.autograd.gradcheck(wofz, (z,))


def test_large_z_derivative_does_not_cancel():
    # -2 z w + 2i/sqrt(pi) loses |z|^2 digits; asymptotically w' = -i/(sqrt(pi) z^2) (1 + ...)
    z = np.array([1e3 + 1e3j, 1e5 + 1j, 3e4j, 1e6 + 1e-3j, 2e100 + 1e100j])
    _, dw = wofz_and_derivative(torch.from_numpy(z))
    iz2 = (1 / z) ** 2
    expected = -1j / math.sqrt(math.pi) * iz2 * (1 + 1.5 * iz2 + 3.75 * iz2 * iz2)
    assert relative_error(dw.numpy(), expected).max() < 1e-13


def voigt_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 3000
    x = np.concatenate([rng.normal(0, 5, n), 10 ** rng.uniform(-3, 4, 200)])
    sigma = np.concatenate([10 ** rng.uniform(-3, 2, n), 10 ** rng.uniform(-3, 1, 200)])
    gamma = np.concatenate([10 ** rng.uniform(-4, 2, n), 10 ** rng.uniform(-6, 1, 200)])
    x[:10] = 0.0
    sigma[10:20] = 0.0  # Lorentzian
    gamma[20:30] = 0.0  # Gaussian
    sigma[30:33] = gamma[30:33] = 0.0
    x[30] = 0.0  # the delta: inf at x = 0
    return x, sigma, gamma


def test_voigt_profile_values_match_scipy():
    x, sigma, gamma = voigt_grid()
    ref = special.voigt_profile(x, sigma, gamma)
    ours = voigt_profile(*(torch.from_numpy(a) for a in (x, sigma, gamma))).numpy()
    assert np.array_equal(np.isinf(ours), np.isinf(ref)) and np.isinf(ref).sum() == 1
    finite = np.isfinite(ref) & (ref > 0)
    assert relative_error(ours[finite], ref[finite]).max() <= 1e-13
    assert (ours[ref == 0] == 0).all()
    value, _ = voigt_profile_numpy(x, sigma, gamma)
    np.testing.assert_array_equal(value, ref)
    # float32: scipy's value at the float32 arguments, rounded once
    args32 = [torch.from_numpy(a).float() for a in (x, sigma, gamma)]
    ours32 = voigt_profile(*args32)
    assert ours32.dtype == torch.float32
    ref32 = special.voigt_profile(*(a.double().numpy() for a in args32))
    ok = np.isfinite(ref32) & (ref32 > 1e-30) & (ref32 < 1e30)
    assert relative_error(ours32.double().numpy()[ok], ref32[ok]).max() <= 1.2e-7


def test_voigt_profile_partials_match_central_differences_of_scipy():
    x, sigma, gamma = voigt_grid()
    # central differences are truncated by (step / sigma)^2 (x / sigma)^4: moderate x / sigma
    keep = (sigma > 0) & (gamma > 0) & (np.abs(x) < 5 * sigma) & (gamma < 5 * sigma)
    x, sigma, gamma = x[keep], sigma[keep], gamma[keep]
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, sigma, gamma)]
    voigt_profile(*leaves).sum().backward()
    _, partials = voigt_profile_numpy(x, sigma, gamma)
    args = [x, sigma, gamma]
    for k in range(3):
        h = 1e-5 * (sigma + gamma)  # the width over which V changes
        plus = [a + h if i == k else a for i, a in enumerate(args)]
        minus = [a - h if i == k else a for i, a in enumerate(args)]
        fd = (special.voigt_profile(*plus) - special.voigt_profile(*minus)) / (2 * h)
        ours = leaves[k].grad.numpy()
        # differences are good to ~1e-9 of the function's own scale over the step
        scale = np.abs(fd) + 1e-6 * special.voigt_profile(x, sigma, gamma) / sigma
        assert (np.abs(ours - fd) / scale).max() < 1e-4, k
        # the numpy partials (scipy's w) agree with the torch ones (our w)
        assert (np.abs(partials[k] - ours) / (np.abs(ours) + 1e-300)).max() < 1e-9, k


def test_voigt_profile_limits_and_their_partials():
    x = torch.tensor([-1.5, 0.0, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    v = voigt_profile(x, sigma, gamma)
    v.sum().backward()
    xd, gd = x.detach(), gamma.detach()
    q = xd**2 + gd**2
    torch.testing.assert_close(v.detach(), gd / (math.pi * q), rtol=1e-15, atol=0)
    torch.testing.assert_close(x.grad, -2 * xd * gd / (math.pi * q**2), rtol=1e-15, atol=0)
    torch.testing.assert_close(gamma.grad, ((xd**2 - gd**2) / (math.pi * q**2)).sum())
    assert sigma.grad.item() == 0.0  # V = L + O(sigma^2)


def test_voigt_profile_gradcheck_forward_and_reverse():
    x = torch.tensor([0.3, -2.0, 5.0, 40.0, 0.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.3], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.2, 0.0, 3.0, 1e-3, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(voigt_profile, (x, s, g))
    assert torch.autograd.gradcheck(
        voigt_profile, (x, s, g), check_forward_ad=True, check_backward_ad=False
    )
    # broadcasting: scalar parameters against a vector x, gradients summed back
    s0 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(voigt_profile, (x, s0, 0.4 + torch.zeros(()).double()))


def test_voigt_profile_is_not_silently_twice_differentiable():
    x = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(voigt_profile(x, 1.0, 0.5).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


def synthetic_voigt(tmp_path, optimizer: dict, epochs: int, start=(1.0, 1.2, 0.3, 0.0)) -> tuple:
    x = np.linspace(-6, 6, 61)
    truth = {"A": 3.0, "s": 0.8, "g": 0.5, "c": 0.1}
    rng = np.random.default_rng(3)
    y = truth["A"] * special.voigt_profile(x, truth["s"], truth["g"]) + truth["c"]
    y = y + rng.normal(0, 1e-3, x.size)
    path = tmp_path / "voigt.csv"
    rows = "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x, y, strict=True))
    path.write_text("x,y\n" + rows)
    return (
        {
            "name": "voigt",
            "device": "cpu",
            "dtype": "float64",
            "epochs": epochs,
            "snapshots": 2,
            "data": {"file": str(path)},
            "model": {
                "expr": "A*voigt_profile(x, s, g) + c",
                "params": dict(zip(["A", "s", "g", "c"], start, strict=True)),
            },
            "optimizer": optimizer,
        },
        truth,
        (x, y),
    )


def least_squares_reference(x, y):
    from scipy.optimize import least_squares

    def residual(p):
        return p[0] * special.voigt_profile(x, p[1], p[2]) + p[3] - y

    return least_squares(residual, [1.0, 1.2, 0.3, 0.0], method="lm", xtol=1e-15, ftol=1e-15).x


def test_lm_fits_a_voigt_peak_on_the_numpy_path(tmp_path):
    raw, truth, (x, y) = synthetic_voigt(tmp_path, {"name": "LevenbergMarquardt"}, 200)
    prep = prepare(config_from_dict(raw))
    train(prep.model, prep.stepper, epochs=raw["epochs"], evaluate_loss=prep.evaluate_loss)
    levmar = prep.stepper.lm
    assert levmar.host is not None  # host_ok accepted symdiff's Jacobian
    fitted = prep.model.values()
    ref = least_squares_reference(x, y)
    for k, name in enumerate(["A", "s", "g", "c"]):
        assert fitted[name] == pytest.approx(ref[k], rel=1e-7, abs=1e-9)
        assert fitted[name] == pytest.approx(truth[name], rel=2e-2, abs=2e-3)


def test_adam_recovers_a_voigt_peak(tmp_path):
    raw, truth, _ = synthetic_voigt(
        tmp_path, {"name": "Adam", "lr": 0.02}, 800, (2.5, 1.0, 0.4, 0.0)
    )
    prep = prepare(config_from_dict(raw))
    train(prep.model, prep.stepper, epochs=raw["epochs"], evaluate_loss=prep.evaluate_loss)
    fitted = prep.model.values()
    for name in ["A", "s", "g", "c"]:
        assert fitted[name] == pytest.approx(truth[name], rel=5e-2, abs=1e-2)


def test_symdiff_jacobian_equals_torch_jacrev():
    expression = parse_expression("A*voigt_profile(x, s, g) + c*voigt_profile(x - 1, g, s)")
    names = ["A", "s", "g", "c"]
    x = np.linspace(-30, 30, 301)
    values = {"A": 2.0, "s": 0.7, "g": 0.3, "c": 0.5}
    y, jac = compile_jacobian(expression, names)(x, values)
    xt = torch.from_numpy(x)

    def model(theta):
        return expression(xt, dict(zip(names, theta, strict=True)))

    theta = torch.tensor([values[n] for n in names], dtype=torch.float64)
    ref = torch.func.jacrev(model)(theta).numpy()
    np.testing.assert_allclose(y, model(theta).numpy(), rtol=1e-13, atol=0)
    # entries to 1e-12 relative, or 1e-12 of their column's scale where two terms cancel
    np.testing.assert_allclose(jac, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(torch.func.jacfwd(model)(theta).numpy(), ref, rtol=1e-14, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    z = torch.from_numpy(log_polar_grid())
    ref = special.wofz(z.numpy())
    finite = np.isfinite(ref)
    gpu = wofz(z.cuda()).cpu().numpy()
    assert relative_error(gpu[finite], ref[finite]).max() <= 1e-13
    gpu64 = wofz(z.to(torch.complex64).cuda()).cpu().numpy().astype(np.complex128)
    ref32 = special.wofz(z.to(torch.complex64).numpy().astype(np.complex128))
    ok = np.isfinite(ref32) & (np.abs(ref32) > 1e-30) & (np.abs(ref32) < 1e30)
    assert relative_error(gpu64[ok], ref32[ok]).max() <= 1.2e-7
    x, sigma, gamma = (torch.from_numpy(a).cuda().requires_grad_() for a in voigt_grid())
    v = voigt_profile(x, sigma, gamma)
    v.sum().backward()
    ref_v = special.voigt_profile(*(a.detach().cpu().numpy() for a in (x, sigma, gamma)))
    ok = np.isfinite(ref_v) & (ref_v > 0)
    assert relative_error(v.detach().cpu().numpy()[ok], ref_v[ok]).max() <= 1e-13
    assert x.grad.is_cuda and torch.isfinite(x.grad[torch.from_numpy(ok).cuda()]).all()
