"""Losses beyond least squares, against independent references: scipy's `least_squares` for the
robust losses, numpy Newton / scipy `minimize` solutions and analytic Hessians for the
likelihoods (poisson, bce, student_t); config errors through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import only_run_dir
from scipy.optimize import least_squares, minimize

import fitcli.lm_optim as lm_optim
from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.prepare import prepare
from fitcli.train import train

RTOL = 1e-6  # six significant digits


def write_csv(path, x, y, sigma=None):
    cols = [x, y] if sigma is None else [x, y, sigma]
    header = "x,y" if sigma is None else "x,y,sigma"
    np.savetxt(path, np.column_stack(cols), delimiter=",", header=header, comments="")
    return str(path)


def raw_config(data_file, expr, params, loss, optimizer=None, epochs=200, **extra):
    return {
        "name": "loss",
        "device": "cpu",
        "epochs": epochs,
        "snapshots": 2,
        "data": {"file": data_file, **extra.pop("data", {})},
        "model": {"expr": expr, "params": params},
        "loss": loss,
        "optimizer": optimizer or {"name": "LM"},
        **extra,
    }


def fit(raw):
    cfg = config_from_dict(raw)
    prep = prepare(cfg)
    result = train(prep.model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss)
    return prep, result


def run_dir_summary(runner, tmp_path, raw):
    from fitcli.config import dump_yaml

    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(raw))
    out = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(path), "--out", str(out), "--progress", "none"])
    assert result.exit_code == 0, result.output
    return json.loads((only_run_dir(out) / "summary.json").read_text())


def decay_with_outliers():
    rng = np.random.default_rng(3)
    x = np.linspace(0, 4, 60)
    y = 2.5 * np.exp(-1.3 * x) + 0.3 + rng.normal(0, 0.05, x.size)
    y[[5, 17, 40, 52]] += [1.5, -1.0, 2.0, 0.8]
    return x, y


# -- robust losses: LM against scipy.optimize.least_squares -----------------------------------


@pytest.mark.parametrize("path", ["numpy", "torch"])
@pytest.mark.parametrize("f_scale", [1.0, 0.5])
@pytest.mark.parametrize("name", ["cauchy", "soft_l1", "arctan"])
def test_robust_lm_matches_scipy_least_squares(tmp_path, monkeypatch, name, f_scale, path):
    if path == "torch":  # LM's autograd Jacobians instead of the numpy model
        monkeypatch.setattr(lm_optim, "host_eligible", lambda x, theta: False)
    x, y = decay_with_outliers()
    data = write_csv(tmp_path / "d.csv", x, y)
    loss = {"name": name, "f_scale": f_scale}
    prep, result = fit(raw_config(data, "a*exp(-b*x) + c", {"a": 1, "b": 1, "c": 0}, loss))
    assert (prep.stepper.lm.host is not None) == (path == "numpy")
    ref = least_squares(
        lambda p: p[0] * np.exp(-p[1] * x) + p[2] - y,
        [1.0, 1.0, 0.0],
        loss=name,
        f_scale=f_scale,
        method="trf",
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    got = prep.model.values()
    np.testing.assert_allclose([got["a"], got["b"], got["c"]], ref.x, rtol=RTOL)
    # The reported loss is the mean of C^2 rho(z): scipy's cost is half its sum.
    assert result.final_loss == pytest.approx(2 * ref.cost / x.size, rel=1e-10)
    # Least squares ends elsewhere: the outliers pull it.
    plain = least_squares(lambda p: p[0] * np.exp(-p[1] * x) + p[2] - y, [1.0, 1.0, 0.0])
    assert abs(plain.x[2] - ref.x[2]) > 1e-3


def test_robust_lm_with_sigma_matches_scipy(tmp_path):
    """With a sigma column the residuals are (y - m) / sigma, as scipy's on the same f."""
    x, y = decay_with_outliers()
    sigma = 0.05 + 0.02 * x
    data = write_csv(tmp_path / "d.csv", x, y, sigma)
    raw = raw_config(
        data,
        "a*exp(-b*x) + c",
        {"a": 1, "b": 1, "c": 0},
        {"name": "soft_l1", "f_scale": 2.0},
        data={"columns": {"sigma": "sigma"}},
    )
    prep, _ = fit(raw)
    ref = least_squares(
        lambda p: (p[0] * np.exp(-p[1] * x) + p[2] - y) / sigma,
        [1.0, 1.0, 0.0],
        loss="soft_l1",
        f_scale=2.0,
        ftol=1e-15,
        xtol=1e-15,
        gtol=1e-15,
    )
    got = prep.model.values()
    np.testing.assert_allclose([got["a"], got["b"], got["c"]], ref.x, rtol=RTOL)


def robust_rho(name, z):
    """rho, rho', rho'' as scipy documents them (least_squares, `loss`)."""
    if name == "soft_l1":
        return 2 * ((1 + z) ** 0.5 - 1), (1 + z) ** -0.5, -0.5 * (1 + z) ** -1.5
    if name == "cauchy":
        return np.log1p(z), 1 / (1 + z), -1 / (1 + z) ** 2
    return np.arctan(z), 1 / (1 + z**2), -2 * z / (1 + z**2) ** 2


@pytest.mark.parametrize("name", ["soft_l1", "cauchy"])
def test_robust_error_bars_are_the_sandwich(runner, tmp_path, name):
    """cov = n/(n-p) H^-1 B H^-1 with H and B of the cost, analytic for a straight line."""
    rng = np.random.default_rng(5)
    x = np.linspace(-2, 2, 40)
    y = 0.7 + 1.9 * x + rng.normal(0, 0.3, x.size)
    y[[3, 20, 33]] += [3.0, -2.5, 4.0]
    data = write_csv(tmp_path / "d.csv", x, y)
    C = 0.5
    raw = raw_config(data, "a + b*x", {"a": 0, "b": 1}, {"name": name, "f_scale": C})
    summary = run_dir_summary(runner, tmp_path, raw)
    assert summary["loss"] == name and summary["loss_options"] == {"f_scale": C}
    ref = least_squares(
        lambda p: p[0] + p[1] * x - y, [0.0, 1.0], loss=name, f_scale=C, ftol=1e-15, xtol=1e-15
    )
    got = summary["params"]
    np.testing.assert_allclose([got["a"], got["b"]], ref.x, rtol=RTOL)
    f = y - (ref.x[0] + ref.x[1] * x)
    z = (f / C) ** 2
    _, d1, d2 = robust_rho(name, z)
    X = np.column_stack([np.ones_like(x), x])
    H = (X * (d1 + 2 * d2 * z)[:, None]).T @ X
    G = X * (d1 * f)[:, None]
    Hi = np.linalg.inv(H)
    n, p = x.size, 2
    cov = n / (n - p) * Hi @ (G.T @ G) @ Hi
    np.testing.assert_allclose(np.array(summary["covariance"]), cov, rtol=1e-5)
    np.testing.assert_allclose(
        [summary["stderr"]["a"], summary["stderr"]["b"]], np.sqrt(np.diag(cov)), rtol=1e-5
    )
    assert summary["uncertainty"]["status"] == "ok" and summary["converged"] is True
    assert summary["aic"] is None and summary["chi2_reduced"] is None


@pytest.mark.parametrize("name", ["soft_l1", "arctan"])
def test_robust_loss_with_adam_reaches_scipys_optimum(tmp_path, name):
    rng = np.random.default_rng(6)
    x = np.linspace(-2, 2, 40)
    y = 0.7 + 1.9 * x + rng.normal(0, 0.3, x.size)
    y[[3, 20, 33]] += [3.0, -2.5, 4.0]
    data = write_csv(tmp_path / "d.csv", x, y)
    loss = {"name": name, "f_scale": 0.5}
    adam = {"name": "Adam", "lr": 0.05}
    prep, _ = fit(raw_config(data, "a + b*x", {"a": 0, "b": 1}, loss, adam, epochs=800))
    ref = least_squares(
        lambda p: p[0] + p[1] * x - y, [0.0, 1.0], loss=name, f_scale=0.5, ftol=1e-15, xtol=1e-15
    )
    got = prep.model.values()
    np.testing.assert_allclose([got["a"], got["b"]], ref.x, rtol=1e-5)


# -- likelihoods ------------------------------------------------------------------------------


def newton(grad_hess, p0, steps=100):
    p = np.array(p0, dtype=float)
    for _ in range(steps):
        g, h = grad_hess(p)
        step = np.linalg.solve(h, g)
        p = p - step
        if np.abs(step).max() < 1e-15 * max(1.0, np.abs(p).max()):
            break
    return p


def test_poisson_matches_the_log_linear_glm_and_its_fisher_information(runner, tmp_path):
    rng = np.random.default_rng(1)
    x = np.linspace(0, 2, 50)
    y = rng.poisson(np.exp(1.0 + 0.8 * x)).astype(float)
    data = write_csv(tmp_path / "d.csv", x, y)
    raw = raw_config(data, "exp(a + b*x)", {"a": 0.5, "b": 0.5}, "poisson")
    summary = run_dir_summary(runner, tmp_path, raw)
    X = np.column_stack([np.ones_like(x), x])

    def grad_hess(p):  # of the negative log-likelihood sum(mu - y log mu), mu = exp(X p)
        mu = np.exp(X @ p)
        return X.T @ (mu - y), (X * mu[:, None]).T @ X

    p = newton(grad_hess, [0.5, 0.5])
    got = summary["params"]
    np.testing.assert_allclose([got["a"], got["b"]], p, rtol=RTOL)
    cov = np.linalg.inv(grad_hess(p)[1])
    np.testing.assert_allclose(
        [summary["stderr"]["a"], summary["stderr"]["b"]], np.sqrt(np.diag(cov)), rtol=1e-6
    )
    mu = np.exp(X @ p)
    deviance = 2 * np.sum(np.where(y > 0, y * np.log(np.where(y > 0, y, 1) / mu), 0) - (y - mu))
    assert summary["final_loss"] == pytest.approx(deviance / x.size, rel=1e-9)
    assert summary["loss"] == "poisson" and summary["loss_options"] == {}
    assert summary["uncertainty"]["status"] == "ok"
    assert summary["reason"].endswith("converged: at the minimum of the loss")


def test_poisson_nonlinear_model_matches_minimize_with_observed_information(tmp_path):
    """A peak on a background: not a GLM, so observed and expected information differ; the
    error bars are the observed one's (the Hessian of the NLL, by finite differences of its
    analytic gradient here)."""
    from fitcli.stats import run_report

    rng = np.random.default_rng(2)
    x = np.linspace(-3, 3, 80)

    def model(p, x=x):
        return p[0] * np.exp(-0.5 * ((x - p[1]) / p[2]) ** 2) + p[3]

    y = rng.poisson(model([30.0, 0.3, 0.7, 4.0])).astype(float)
    data = write_csv(tmp_path / "d.csv", x, y)
    expr = "A*exp(-0.5*((x - c)/s)**2) + B"
    start = {"A": 20, "c": 0, "s": 1, "B": 3}
    prep, _ = fit(raw_config(data, expr, start, "poisson"))

    def nll(p):
        mu = model(p)
        return np.sum(mu - y * np.log(mu)) if np.all(mu > 0) else np.inf

    ref = minimize(
        nll,
        list(start.values()),
        method="Nelder-Mead",
        options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 40000, "maxfev": 40000},
    )
    ref = minimize(nll, ref.x, method="BFGS", options={"gtol": 1e-10})
    got = prep.model.values()
    np.testing.assert_allclose([got[k] for k in start], ref.x, rtol=RTOL)

    def grad(p):
        mu = model(p)
        u = (x - p[1]) / p[2]
        e = np.exp(-0.5 * u**2)
        dmu = np.column_stack([e, p[0] * e * u / p[2], p[0] * e * u**2 / p[2], np.ones_like(x)])
        return dmu.T @ (1 - y / mu)

    p = np.array([got[k] for k in start])
    h = 1e-5 * np.abs(p)
    H = np.column_stack(
        [(grad(p + h[j] * e) - grad(p - h[j] * e)) / (2 * h[j]) for j, e in enumerate(np.eye(4))]
    )
    se = np.sqrt(np.diag(np.linalg.inv(0.5 * (H + H.T))))
    report = run_report(prep.model, prep.x, torch.as_tensor(y), loss="poisson")
    np.testing.assert_allclose([report["stderr"][k] for k in start], se, rtol=1e-5)


def test_poisson_with_lm_on_the_torch_path_and_adam(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    x = np.linspace(0, 2, 40)
    y = rng.poisson(np.exp(0.5 + 1.1 * x)).astype(float)
    data = write_csv(tmp_path / "d.csv", x, y)
    X = np.column_stack([np.ones_like(x), x])
    p = newton(lambda p: (X.T @ (np.exp(X @ p) - y), (X * np.exp(X @ p)[:, None]).T @ X), [0, 0])
    monkeypatch.setattr(lm_optim, "host_eligible", lambda x, theta: False)
    prep, _ = fit(raw_config(data, "exp(a + b*x)", {"a": 0.2, "b": 0.2}, "poisson"))
    got = prep.model.values()
    np.testing.assert_allclose([got["a"], got["b"]], p, rtol=RTOL)
    adam = {"name": "Adam", "lr": 0.05}
    prep, result = fit(
        raw_config(data, "exp(a + b*x)", {"a": 0.2, "b": 0.2}, "poisson", adam, epochs=800)
    )
    got = prep.model.values()
    np.testing.assert_allclose([got["a"], got["b"]], p, rtol=RTOL)
    assert result.status == "completed"


@pytest.mark.parametrize("soft", [False, True])
def test_bce_is_logistic_regression(runner, tmp_path, soft):
    rng = np.random.default_rng(7)
    x = np.linspace(-3, 3, 120)
    prob = 1 / (1 + np.exp(-(0.4 + 1.7 * x)))
    y = prob.round(3) if soft else (rng.uniform(size=x.size) < prob).astype(float)
    data = write_csv(tmp_path / "d.csv", x, y)
    raw = raw_config(data, "a + b*x", {"a": 0, "b": 0}, "bce")
    summary = run_dir_summary(runner, tmp_path, raw)
    X = np.column_stack([np.ones_like(x), x])

    def grad_hess(p):
        q = 1 / (1 + np.exp(-(X @ p)))
        return X.T @ (q - y), (X * (q * (1 - q))[:, None]).T @ X

    p = newton(grad_hess, [0.0, 0.0])
    got = summary["params"]
    np.testing.assert_allclose([got["a"], got["b"]], p, rtol=RTOL)
    cov = np.linalg.inv(grad_hess(p)[1])
    np.testing.assert_allclose(
        [summary["stderr"]["a"], summary["stderr"]["b"]], np.sqrt(np.diag(cov)), rtol=1e-6
    )
    eta = X @ p
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.as_tensor(eta), torch.as_tensor(y)
    )
    assert summary["final_loss"] == pytest.approx(float(bce), rel=1e-9)


def test_bce_with_adam_reaches_the_newton_solution(tmp_path):
    rng = np.random.default_rng(8)
    x = np.linspace(-3, 3, 100)
    y = (rng.uniform(size=x.size) < 1 / (1 + np.exp(-(0.4 + 1.7 * x)))).astype(float)
    data = write_csv(tmp_path / "d.csv", x, y)
    X = np.column_stack([np.ones_like(x), x])

    def grad_hess(p):
        q = 1 / (1 + np.exp(-(X @ p)))
        return X.T @ (q - y), (X * (q * (1 - q))[:, None]).T @ X

    p = newton(grad_hess, [0.0, 0.0])
    adam = {"name": "Adam", "lr": 0.1}
    prep, _ = fit(raw_config(data, "a + b*x", {"a": 0, "b": 0}, "bce", adam, epochs=800))
    got = prep.model.values()
    np.testing.assert_allclose([got["a"], got["b"]], p, rtol=RTOL)


def test_student_t_matches_minimize_of_its_likelihood(runner, tmp_path):
    """Scale convention: f_scale is the Student-t scale of the (sigma-weighted) residuals,
    fixed, so the covariance is the inverse observed information of that likelihood."""
    rng = np.random.default_rng(9)
    x = np.linspace(0, 5, 60)
    y = 1.0 + 0.6 * x + 0.4 * rng.standard_t(3, x.size)
    y[[10, 45]] += [5.0, -4.0]
    data = write_csv(tmp_path / "d.csv", x, y)
    nu, s = 4.0, 0.4
    raw = raw_config(
        data, "a + b*x", {"a": 0, "b": 1}, {"name": "student_t", "nu": nu, "f_scale": s}
    )
    summary = run_dir_summary(runner, tmp_path, raw)
    assert summary["loss_options"] == {"nu": nu, "f_scale": s}

    def nll(p):
        f = y - p[0] - p[1] * x
        return (nu + 1) / 2 * np.sum(np.log1p(f**2 / (nu * s**2)))

    ref = minimize(nll, [0.0, 1.0], method="BFGS", options={"gtol": 1e-12})
    got = summary["params"]
    np.testing.assert_allclose([got["a"], got["b"]], ref.x, rtol=RTOL)
    f = y - ref.x[0] - ref.x[1] * x
    X = np.column_stack([np.ones_like(x), x])
    d2 = (nu + 1) * (nu * s**2 - f**2) / (nu * s**2 + f**2) ** 2  # d^2 NLL_i / d f^2
    cov = np.linalg.inv((X * d2[:, None]).T @ X)
    np.testing.assert_allclose(
        [summary["stderr"]["a"], summary["stderr"]["b"]], np.sqrt(np.diag(cov)), rtol=1e-5
    )


# -- the batched sweep program ------------------------------------------------------------------


def test_batched_sweep_takes_the_new_losses_bit_identically():
    from sweep_helpers import SEED

    import fitcli.sweep as sw

    plan = sw.make_plan(
        SEED,
        [
            "epochs=30",
            "data.x.num=100",
            "optimizer.name=Adam",
            "optimizer.lr=0.01,0.05",
            "loss={name: soft_l1, f_scale: 0.5}",
        ],
    )
    cfgs = [plan.cfg(r) for r in plan.runs]
    assert len({sw.batch_key(c) for c in cfgs}) == 1
    preps = [prepare(c) for c in cfgs]
    assert sw.batchable(preps)
    traces = sw.compute_batch(preps, list(range(len(cfgs))))
    for cfg, trace in zip(cfgs, traces, strict=True):
        prep = prepare(cfg)
        result = train(
            prep.model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss
        )
        n = result.epochs_run
        assert trace.losses[:n] == result.history.losses[:n]
        assert trace.params[-1].tolist() == prep.model.raw.tolist()


# -- config and data errors --------------------------------------------------------------------


def check(runner, tmp_path, raw, *overrides):
    from fitcli.config import dump_yaml

    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(raw))
    out = tmp_path / "runs"
    result = runner.invoke(
        app, ["train", str(path), "--out", str(out), "--progress", "none", *overrides]
    )
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    return result


@pytest.mark.parametrize(
    "loss, expected",
    [
        (
            {"name": "soft_l1", "f_scal": 0.5},
            "loss.f_scal: soft_l1 takes no option 'f_scal'; did you mean 'f_scale'? "
            "it takes f_scale",
        ),
        ({"name": "cauchy", "f_scale": 0}, "loss.f_scale: must be a finite number > 0 (got 0)"),
        ({"name": "student_t", "nu": -1}, "loss.nu: must be a finite number > 0 (got -1)"),
        ({"name": "student_t"}, "loss.nu: student_t needs nu"),
        ("student_t", "loss: student_t needs nu: write the mapping form"),
        (
            {"name": "poisson", "f_scale": 1},
            "loss.f_scale: poisson takes no option 'f_scale'; it takes no options",
        ),
        (
            "possion",
            "loss: must be one of mse, l1, huber, smooth_l1, poisson, bce, student_t, cauchy, "
            "soft_l1, arctan (got 'possion'); did you mean 'poisson'?",
        ),
        ({"f_scale": 1}, "loss.name: required key is missing"),
    ],
)
def test_loss_config_errors_exit_2_naming_the_key(runner, tmp_path, loss, expected):
    data = write_csv(tmp_path / "d.csv", np.arange(5.0), np.arange(5.0))
    result = check(runner, tmp_path, raw_config(data, "a + b*x", {"a": 1, "b": 1}, loss))
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


def test_loss_option_override_on_a_named_loss(tmp_path):
    from fitcli.config import load_config

    x, y = decay_with_outliers()
    data = write_csv(tmp_path / "d.csv", x, y)
    path = tmp_path / "c.yaml"
    from fitcli.config import dump_yaml

    path.write_text(
        dump_yaml(raw_config(data, "a*exp(-b*x) + c", {"a": 1, "b": 1, "c": 0}, "cauchy"))
    )
    cfg = load_config(path, ["loss.f_scale=0.5"])
    assert cfg.loss.name == "cauchy" and cfg.loss.f_scale == 0.5


@pytest.mark.parametrize(
    "loss, y, extra, expected",
    [
        ("poisson", [1, 2, -1, 3, 4], {}, "loss: poisson fits counts, but"),
        ("bce", [0, 1, 1.5, 0, 1], {}, "loss: bce needs y in [0, 1]"),
        (
            "poisson",
            [1, 2, 3, 3, 4],
            {"data": {"columns": {"sigma": "sigma"}}},
            "loss: poisson is a likelihood whose variance follows from the model; "
            "it takes no sigma",
        ),
    ],
)
def test_likelihood_data_errors_name_the_file_and_column(
    runner, tmp_path, loss, y, extra, expected
):
    x = np.arange(5.0)
    data = write_csv(tmp_path / "d.csv", x, np.array(y, float), np.ones(5))
    result = check(
        runner, tmp_path, raw_config(data, "exp(a + b*x)", {"a": 0, "b": 0}, loss, **extra)
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert expected in text
    if "sigma" not in expected:
        assert "d.csv, the second column (y)" in text


def test_poisson_model_not_positive_at_the_start_is_exit_2(runner, tmp_path):
    data = write_csv(tmp_path / "d.csv", np.arange(5.0), np.arange(5.0))
    result = check(runner, tmp_path, raw_config(data, "a + b*x", {"a": -1, "b": 1}, "poisson"))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert (
        "model.expr: loss poisson needs a positive model (the expected count), "
        "but it is -1 at x = 0" in text
    )


def test_lm_refuses_the_losses_it_cannot_minimise(tmp_path):
    from fitcli.errors import ConfigError

    data = write_csv(tmp_path / "d.csv", np.arange(5.0), np.arange(5.0))
    with pytest.raises(ConfigError) as err:
        prepare(config_from_dict(raw_config(data, "a + b*x", {"a": 1, "b": 1}, "huber")))
    assert (
        "must be one of mse, poisson, bce, student_t, cauchy, soft_l1, arctan (got 'huber')"
        in str(err.value)
    )
