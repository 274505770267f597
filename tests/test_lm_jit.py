"""The compiled fit of independent groups (`fitcli.lm_jit`): its translation of expressions
against torch's autograd, its steps against `fitcli.lm_batch` lane by lane, and its fallbacks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit

from fitcli import groups, lm_batch, lm_jit
from fitcli.expr import parse_expression
from fitcli.lm_batch import LMOptions, Stop
from fitcli.model import ExprModel, ParamInfo

pytestmark = pytest.mark.skipif(not lm_jit.available(), reason="numba is not installed")


def make_model(expr: str, values: dict[str, float], variables=("x",), dtype=torch.float64, **info):
    expression = parse_expression(expr, allow_params=True, variables=variables)
    infos = [ParamInfo(n, float(values.get(n, 1.0)), **info.get(n, {})) for n in expression.params]
    return ExprModel(expression, infos, dtype)


def packed(x: np.ndarray, y: np.ndarray, dtype=torch.float64, sigma=None) -> groups.Packed:
    """Groups of equal size: x [G, n] (or [G, n, k]) and y [G, n]."""
    g, n = y.shape
    flat_x = x.reshape(g * n, *x.shape[2:])
    label = np.repeat(np.arange(g), n)
    s = None if sigma is None else sigma.reshape(-1)
    return groups.pack(flat_x, y.reshape(-1), s, label, g, dtype, torch.device("cpu"))


def all_per_group(model) -> groups.Layout:
    return groups.Layout(list(range(len(model.free_names))), [])


def start(model, g: int) -> torch.Tensor:
    return model.raw.detach().expand(g, len(model.free_names)).clone()


# One expression per function and construct the translation covers, with x where it is defined.
CASES = [
    ("a*sin(b*x) + c*cos(x) + tan(0.3*x)*c", (-1.0, 1.0)),
    ("a*asin(b*x) + c*acos(0.5*x) + arcsin(0.2*x)*c", (-0.9, 0.9)),
    ("a*atan(b*x) + arctan(c*x) + arccos(0.1*x)", (-3.0, 3.0)),
    ("a*sinh(b*x) + c*cosh(x/2) + tanh(c*x)", (-2.0, 2.0)),
    ("a*exp(-b*x) + c*log(x) + log10(b*x) + log2(c*x)", (0.5, 4.0)),
    ("a*sqrt(b*x) + abs(x - c) + log1p(b*x)", (0.1, 3.0)),
    ("a*erf(b*x) + c*erfc(x - c)", (-2.0, 2.0)),
    ("a*x**b + c**x + (x - c)**2 + x**3 * a + x**0 * b - (b*x)**-1.5", (0.5, 2.0)),
    ("-a*x/(b + x**2) / c - (a - b*x)/(c*x + 3)", (0.1, 2.0)),
    ("where(x < b, a*x, c*x + a) + max(a*x, b, c) + min(x, c*x)", (-2.0, 2.0)),
    ("where(0 < x <= b, a*exp(x), c) + atan2(a*x, b + x**2)", (-1.0, 2.0)),
]
VALUES = {"a": 1.3, "b": 0.7, "c": 0.4}


@pytest.mark.parametrize(("expr", "domain"), CASES, ids=[c[0][:30] for c in CASES])
def test_the_translation_equals_autograd_on_every_function(expr, domain):
    # J^T J, J^T r and the RSS of each group, as torch's autograd gives them (groups.jacobian).
    model = make_model(expr, VALUES)
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(*domain, (3, 40)), axis=1)
    y = rng.normal(0, 1, (3, 40))
    data = packed(x, y, sigma=rng.uniform(0.5, 2.0, (3, 40)))
    theta = start(model, 3) * torch.tensor([[1.0], [0.9], [1.1]], dtype=torch.float64)
    program = lm_jit.compile_groups(model, torch.float64)
    assert program is not None, expr
    cost, jtj, jtr = program.linearize(*groups._arrays(data), theta.numpy())
    a, _, r = groups.jacobian(model, all_per_group(model), data, theta, torch.zeros(0))
    at = a.transpose(-1, -2)
    np.testing.assert_allclose(cost, 0.5 * (r * r).sum(-1).numpy(), rtol=1e-11)
    np.testing.assert_allclose(jtj, (at @ a).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jtr, (at @ r[..., None])[..., 0].numpy(), rtol=1e-10, atol=1e-12)
    assert groups.compiled(program, model, all_per_group(model), data, theta) is program


def gaussians(g: int, seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.tile(np.linspace(-4, 4, n), (g, 1))
    truth = np.array([5.0, 0.0, 1.0]) + rng.uniform(-1, 1, (g, 3)) * [1.0, 0.5, 0.2]
    y = truth[:, :1] * np.exp(-((x - truth[:, 1:2]) ** 2) / (2 * truth[:, 2:3] ** 2))
    return x, y + rng.normal(0, 0.1, y.shape)


GAUSS = "a*exp(-(x - c)**2/(2*s**2))"


def lm_batch_fit(model, data, theta, opts):
    lanes = groups._GroupLanes(model, all_per_group(model), data)
    damping = torch.full((data.groups,), opts.damping, dtype=torch.float64)
    return lm_batch.solve(lanes, theta, opts, damping=damping)


def test_each_group_takes_the_steps_of_lm_batch_and_stops_alike():
    # Ordinary groups, one whose data hold a NaN (non-finite start), an inf, a flat group whose
    # centre and width are not determined, and a run at the iteration limit.
    model = make_model(GAUSS, {"a": 4.0, "c": 0.2, "s": 1.2})
    x, y = gaussians(12)
    y[3, 7] = math.nan
    y[5, 0] = math.inf
    y[8] = 0.0
    data = packed(x, y)
    theta = start(model, 12)
    for opts in (LMOptions(max_iter=200), LMOptions(max_iter=3)):
        program = lm_jit.compile_groups(model, torch.float64)
        assert program is not None
        got = program.fit(*groups._arrays(data), theta.numpy(), np.full(12, 1e-3), opts)
        want = lm_batch_fit(model, data, theta, opts)
        # The same stop, except between two convergence tests decided at rounding level (the
        # gradient cosine against gtol = 1e-15, say), where the iteration may differ by one.
        conv = np.isin(want.code.numpy(), lm_batch.CONVERGED)
        assert np.isin(got["code"][conv], lm_batch.CONVERGED).all()
        assert got["code"][~conv].tolist() == want.code.numpy()[~conv].tolist()
        gap = np.abs(got["iterations"] - want.iterations.numpy())
        assert (gap[~conv] == 0).all() and (gap[conv] <= 1).all()
        fin = np.isfinite(want.theta.numpy())
        np.testing.assert_allclose(
            got["theta"][fin], want.theta.numpy()[fin], rtol=1e-9, atol=1e-12
        )
        # Near a minimum the damping follows ratios of rounding-level decrements; before, the same.
        np.testing.assert_allclose(got["damping"][~conv], want.damping.numpy()[~conv], rtol=1e-9)
    assert got["code"][3] == got["code"][5] == Stop.NONFINITE_START
    assert set(got["code"].tolist()) >= {Stop.LIMIT}


def test_an_exact_fit_stops_at_once():
    # Integers throughout: the residuals are exactly zero in any order of the arithmetic.
    model = make_model("a + b*x", {"a": 2.0, "b": 3.0})
    x = np.tile(np.arange(8.0), (3, 1))
    y = 2.0 + 3.0 * x
    y[1] += 1.0
    program = lm_jit.compile_groups(model, torch.float64)
    assert program is not None
    got = program.fit(*groups._arrays(packed(x, y)), start(model, 3).numpy(), np.full(3, 1e-3),
                      LMOptions())  # fmt: skip
    assert got["code"][0] == got["code"][2] == Stop.EXACT
    assert got["iterations"][0] == 0 and got["code"][1] in lm_batch.CONVERGED
    np.testing.assert_allclose(got["theta"][1], [3.0, 3.0], rtol=1e-12)


def test_compiled_groups_equal_a_curve_fit_loop_in_float64_and_float32():
    x, y = gaussians(40, seed=1)
    ref = np.array(
        [curve_fit(lambda t, a, c, s: a * np.exp(-((t - c) ** 2) / (2 * s**2)), x[j], y[j],
                   p0=[4.0, 0.2, 1.2], method="lm", xtol=1e-14, ftol=1e-14)[0] for j in range(40)]
    )  # fmt: skip
    iterations = {}
    for dtype, rtol in ((torch.float64, 1e-8), (torch.float32, 2e-4)):
        model = make_model(GAUSS, {"a": 4.0, "c": 0.2, "s": 1.2}, dtype=dtype)
        data = packed(x, y, dtype=dtype)
        layout = all_per_group(model)
        program = lm_jit.compile_groups(model, dtype)
        assert groups.compiled(program, model, layout, data, start(model, 40)) is program
        fit = groups.fit_independent(
            model, layout, data, start(model, 40), LMOptions(), program=program
        )
        assert set(fit.status) == {"converged"}
        np.testing.assert_allclose(fit.theta.double().numpy(), ref, rtol=rtol, atol=rtol)
        iterations[dtype] = fit.iterations
    # float32 parameters stop improving sooner: no more iterations than float64 takes (float32
    # arithmetic's noise kept them going until the steps vanished, 60% more on average).
    assert (iterations[torch.float32] <= iterations[torch.float64]).all()


def test_a_fit_that_is_compiled_never_reaches_lm_batch(monkeypatch):
    # The benchmark's models take the compiled path: the batched tensor program is not called.
    def refuse(*args, **kwargs):
        raise AssertionError("lm_batch.solve called")

    monkeypatch.setattr(lm_batch, "solve", refuse)
    model = make_model(
        "a*exp(-((u - xc)**2 + (v - yc)**2)/(2*s**2)) + b",
        {"a": 50, "xc": 3, "yc": 3, "s": 1.5, "b": 2},
        variables=("u", "v"),
    )
    u, v = (m.ravel() for m in np.meshgrid(np.arange(7.0), np.arange(7.0), indexing="ij"))
    rng = np.random.default_rng(2)
    uv = np.tile(np.stack([u, v], axis=1), (5, 1, 1))
    z = 50 * np.exp(-((u - 3.2) ** 2 + (v - 2.9) ** 2) / (2 * 1.4**2)) + 2
    data = packed(uv, z + rng.normal(0, 0.5, (5, u.size)))
    program = lm_jit.compile_groups(model, torch.float64)
    fit = groups.fit_independent(
        model, all_per_group(model), data, start(model, 5), LMOptions(), program=program
    )
    assert set(fit.status) == {"converged"}
    np.testing.assert_allclose(fit.theta[:, 1].numpy(), 3.2, atol=0.2)


def test_models_outside_the_translation_use_lm_batch_with_the_same_answers(monkeypatch):
    # A function the translation lacks (gamma), and a tie.
    gamma = make_model("a*exp(-(x - c)**2/(2*s**2)) + 0*gamma(s + 3)", {"a": 4, "c": 0.2, "s": 1.2})
    tied = make_model(GAUSS + " + b", {"a": 4, "c": 0.2, "s": 1.2}, b={"expr": "0*a"})
    assert lm_jit.compile_groups(gamma, torch.float64) is None
    assert lm_jit.compile_groups(tied, torch.float64) is None
    x, y = gaussians(6, seed=3)
    plain = make_model(GAUSS, {"a": 4, "c": 0.2, "s": 1.2})
    data = packed(x, y)
    want = groups.fit_independent(plain, all_per_group(plain), data, start(plain, 6), LMOptions())
    for model in (gamma, tied):
        got = groups.fit_independent(
            model, all_per_group(model), data, start(model, 6), LMOptions()
        )
        values = groups.external_values(model, all_per_group(model), got.theta, torch.zeros(0))
        np.testing.assert_allclose(values.numpy(), want.theta.numpy(), rtol=1e-7)


@pytest.mark.parametrize(
    "info",
    [
        {"s": {"min": 0.1, "max": 5.0}, "c": {"min": -2.0}},
        {"a": {"max": 50.0}, "s": {"min": 0.05}},
        {"b": {"vary": False}, "s": {"min": 0.05}},
    ],
    ids=["both-and-lower", "upper-and-lower", "fixed"],
)
def test_bounded_and_fixed_parameters_compile_to_the_batched_fits_answers(info):
    # Internal values through torch's sigmoid / softplus (threshold 20), and fixed values as
    # constants: the compiled steps, values and error bars are the batched program's.
    model = make_model(GAUSS + " + b", {"a": 4, "c": 0.2, "s": 1.2, "b": 0.0}, **info)
    program = lm_jit.compile_groups(model, torch.float64)
    assert program is not None
    x, y = gaussians(8, seed=9)
    data = packed(x, y)
    layout = all_per_group(model)
    theta0 = start(model, 8)
    assert groups.compiled(program, model, layout, data, theta0) is program
    got = groups.fit_independent(model, layout, data, theta0, LMOptions(), program=program)
    want = groups.fit_independent(model, layout, data, theta0, LMOptions())
    assert set(got.status) == set(want.status) == {"converged"}
    values = [groups.external_values(model, layout, f.theta, torch.zeros(0)) for f in (got, want)]
    np.testing.assert_allclose(values[0].numpy(), values[1].numpy(), rtol=1e-7, atol=1e-9)
    se_got, _ = groups.stderr_independent(model, layout, data, got.theta, True, program)
    se_want, _ = groups.stderr_independent(model, layout, data, want.theta, True)
    np.testing.assert_allclose(se_got, se_want, rtol=1e-6)


def test_a_translation_that_disagrees_with_autograd_is_not_used(monkeypatch):
    model = make_model(GAUSS, {"a": 4, "c": 0.2, "s": 1.2})
    x, y = gaussians(4, seed=4)
    data = packed(x, y)
    program = lm_jit.compile_groups(model, torch.float64)
    assert program is not None
    honest = program.linearize

    def off(*args):
        cost, jtj, jtr = honest(*args)
        return cost, jtj * (1 + 1e-6), jtr

    monkeypatch.setattr(program, "linearize", off)
    monkeypatch.setattr(groups, "_AGREES", {})
    assert groups.compiled(program, model, all_per_group(model), data, start(model, 4)) is None
    assert groups.verified(program, model, all_per_group(model), data, start(model, 4)) is None


def test_the_set_up_check_is_the_one_the_fit_asks(monkeypatch):
    # A run checks the translation at its set-up (`groups.verified`, on the groups with enough
    # points) and the fit reuses that verdict: the check against autograd runs once.
    model = make_model(GAUSS, {"a": 4, "c": 0.2, "s": 1.2})
    x, y = gaussians(6, seed=6)
    x, y = x.copy(), y.copy()
    x[0, 2:], y[0, 2:] = np.nan, np.nan  # group 0: two points, too few for three parameters
    flat = ~np.isnan(y.reshape(-1))
    label = np.repeat(np.arange(6), x.shape[1])[flat]
    data = groups.pack(
        x.reshape(-1)[flat], y.reshape(-1)[flat], None, label, 6, torch.float64,
        torch.device("cpu"),
    )  # fmt: skip
    program = lm_jit.compile_groups(model, torch.float64)
    layout = all_per_group(model)
    calls = []
    honest = groups._agrees

    def counted(program, model, layout, few, th):
        calls.append(few.counts.tolist())
        return honest(program, model, layout, few, th)

    monkeypatch.setattr(groups, "_AGREES", {})
    monkeypatch.setattr(groups, "_agrees", counted)
    assert groups.verified(program, model, layout, data, start(model, 6)) is program
    fit = groups.fit_independent(model, layout, data, start(model, 6), LMOptions(), program=program)
    # Groups 1-4 once (the RSS of group 0, left unfitted, is a check of its own).
    assert calls.count([x.shape[1]] * 4) == 1
    assert fit.status[0] == "failed" and set(fit.status[1:]) == {"converged"}


def gaussian_fit(g: int, seed: int):
    """The compiled fit of g Gaussian groups from the start, as a call (the same each time)."""
    model = make_model(GAUSS, {"a": 4, "c": 0.2, "s": 1.2})
    x, y = gaussians(g, seed=seed)
    program = lm_jit.compile_groups(model, torch.float64)
    arrays = groups._arrays(packed(x, y))
    return lambda: program.fit(*arrays, start(model, g).numpy(), np.full(g, 1e-3), LMOptions())


def test_a_forked_child_runs_compiled_fits():
    # The helper threads are kept between calls; a child forked after a call has none of them
    # and makes its own (else its fit would wait for threads that do not exist).
    import multiprocessing

    if lm_jit.threads() < 2 or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs two threads and fork")
    fit = gaussian_fit(40, seed=7)
    here = fit()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=lambda: out.put(fit()["theta"]))
    child.start()
    child.join(120)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child's fit did not finish"
    np.testing.assert_array_equal(out.get(timeout=10), here["theta"])


def test_should_stop_interrupts_and_a_second_call_continues():
    model = make_model(GAUSS, {"a": 4.0, "c": 0.2, "s": 1.2})
    x, y = gaussians(6, seed=5)
    data = packed(x, y)
    program = lm_jit.compile_groups(model, torch.float64)
    assert program is not None
    asks = iter(range(100))
    arrays = groups._arrays(data)
    first = program.fit(
        *arrays, start(model, 6).numpy(), np.full(6, 1e-3), LMOptions(), lambda: next(asks) >= 2
    )
    assert first["code"].tolist() == [Stop.INTERRUPTED] * 6
    assert first["iterations"].tolist() == [2] * 6
    again = program.fit(*arrays, first["theta"], first["damping"], LMOptions())
    whole = program.fit(*arrays, start(model, 6).numpy(), np.full(6, 1e-3), LMOptions())
    assert set(again["code"].tolist()) <= set(lm_batch.CONVERGED)
    np.testing.assert_allclose(again["theta"], whole["theta"], rtol=1e-7)


def test_an_unwritable_cache_directory_compiles_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FITCLI_CACHE_DIR", str(blocker))
    lm_jit._program.cache_clear()
    model = make_model("a*exp(-b*x) + c + 0*x**4", {"a": 2, "b": 0.5, "c": 0.1})
    for name in [m for m in sys.modules if m.startswith("fitcli_kernel_")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        program = lm_jit.compile_groups(model, torch.float64)
        assert program is not None
        x = np.tile(np.linspace(0, 5, 30), (2, 1))
        y = 2 * np.exp(-0.5 * x) + 0.1
        got = program.fit(*groups._arrays(packed(x, y)), start(model, 2).numpy(), np.full(2, 1e-3),
                          LMOptions())  # fmt: skip
        np.testing.assert_allclose(got["theta"], [[2, 0.5, 0.1]] * 2, rtol=1e-9)
        assert not any(blocker.parent.glob("**/*.py"))
    finally:
        lm_jit._program.cache_clear()


def test_the_kernel_cache_lives_in_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("FITCLI_CACHE_DIR", str(tmp_path / "cache"))
    lm_jit._program.cache_clear()
    try:
        model = make_model("a*x + b*x**2 + c*sin(x) + 0*cosh(x/9)", {"a": 1, "b": 2, "c": 3})
        assert lm_jit.compile_groups(model, torch.float64) is not None
        files = list((tmp_path / "cache" / "kernels").glob("fitcli_kernel_*.py"))
        assert len(files) == 1
        assert any((tmp_path / "cache" / "kernels" / "__pycache__").glob("*.nbi"))
    finally:
        lm_jit._program.cache_clear()


def test_runs_compile_from_a_size_on_and_fitcli_jit_decides_otherwise(monkeypatch):
    monkeypatch.delenv("FITCLI_JIT", raising=False)
    assert not lm_jit.worth_it(lm_jit.MIN_CELLS - 1) and lm_jit.worth_it(lm_jit.MIN_CELLS)
    monkeypatch.setenv("FITCLI_JIT", "1")
    assert lm_jit.worth_it(10)
    monkeypatch.setenv("FITCLI_JIT", "0")
    assert not lm_jit.worth_it(10**9)
    model = make_model(GAUSS, {"a": 4.0, "c": 0.2, "s": 1.2})
    assert lm_jit.compile_groups(model, torch.float64) is None


def test_fitcli_train_with_the_compiled_fit_writes_the_batched_fits_results(tmp_path, monkeypatch):
    # The whole run, both ways: groups.csv agrees to rounding, and the compiled run never calls
    # lm_batch.solve.
    from test_groups import ALL_PER_GROUP, config, read_groups, write_wells
    from typer.testing import CliRunner

    from fitcli.cli import app

    def train(run: str) -> list[dict]:
        result = CliRunner().invoke(app, ["train", str(cfg), "--run-dir", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
        return read_groups(tmp_path / run)

    write_wells(tmp_path / "wells.csv", groups=8, n=30)
    cfg = config(tmp_path, ALL_PER_GROUP)
    monkeypatch.setenv("FITCLI_JIT", "0")
    want = train("batched")
    monkeypatch.setenv("FITCLI_JIT", "1")
    solve = lm_batch.solve
    monkeypatch.setattr(lm_batch, "solve", None)
    got = train("compiled")
    monkeypatch.setattr(lm_batch, "solve", solve)
    assert [r["status"] for r in got] == [r["status"] for r in want]
    for name in ("a", "b", "c", "a_stderr", "b_stderr", "c_stderr", "rss", "loss"):
        np.testing.assert_allclose(
            [float(r[name]) for r in got], [float(r[name]) for r in want], rtol=1e-8
        )


def test_a_compiled_run_needs_no_memory_for_the_jacobian(tmp_path, monkeypatch):
    # Between the two estimates: the batched fit is refused with the figure, the compiled one
    # (which never stores J) runs.
    from test_groups import ALL_PER_GROUP, bad, config, write_wells
    from typer.testing import CliRunner

    import fitcli.grouped_run as gr
    from fitcli.cli import app

    write_wells(tmp_path / "wells.csv", groups=5, n=30)
    counts = np.full(5, 30)
    small = groups.packed_bytes(counts, 1, 3, 8, compiled=True)
    big = groups.packed_bytes(counts, 1, 3, 8)
    assert small < big / 2
    monkeypatch.setattr(gr, "available_memory", lambda device: (small + big) // 2)
    cfg = config(tmp_path, ALL_PER_GROUP)
    monkeypatch.setenv("FITCLI_JIT", "0")
    assert "GiB to fit, more than the" in bad(tmp_path, cfg)
    monkeypatch.setenv("FITCLI_JIT", "1")
    result = CliRunner().invoke(app, ["train", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output


def test_compiled_error_bars_and_singular_groups_equal_the_batched_ones():
    # A group measured at one x only: its amplitude, rate and offset are not determined.
    model = make_model("a*exp(-b*x) + c", {"a": 2.0, "b": 0.5, "c": 0.1})
    rng = np.random.default_rng(8)
    x = np.tile(np.linspace(0, 6, 40), (4, 1))
    x[2] = 1.0
    y = 2.0 * np.exp(-0.5 * x) + 0.1 + rng.normal(0, 0.02, x.shape)
    data = packed(x, y)
    layout = all_per_group(model)
    program = lm_jit.compile_groups(model, torch.float64)
    fit = groups.fit_independent(model, layout, data, start(model, 4), LMOptions(), program=program)
    for scale in (True, False):
        got, got_sing = groups.stderr_independent(model, layout, data, fit.theta, scale, program)
        want, want_sing = groups.stderr_independent(model, layout, data, fit.theta, scale)
        assert got_sing.tolist() == want_sing.tolist() == [False, False, True, False]
        ok = ~want_sing
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-8)


def test_the_kernels_exp_is_within_an_ulp_of_numpys_everywhere():
    # lm_kernels.exp (arithmetic and bit operations, so that a model's loop vectorizes) against
    # numpy's exp: normal results within 1.5 ulp, subnormals within one unit of the smallest,
    # and NaN, inf, overflow and underflow alike.
    from numba import njit

    from fitcli.lm_kernels import exp

    @njit
    def each(x, out):
        for i in range(x.size):
            out[i] = exp(x[i])

    rng = np.random.default_rng(5)
    half = 0.5 * math.log(2)
    edges = [math.nan, math.inf, -math.inf, 0.0, -0.0, 709.78, 709.79, 710.0, -708.4, -740.0,
             -745.13, -745.14, -746.0, 1e-300, -1e-300, half, -half]  # fmt: skip
    x = np.concatenate([rng.uniform(-750, 712, 200_000), rng.uniform(-1, 1, 200_000), edges])
    got = np.empty_like(x)
    each(x, got)
    with np.errstate(over="ignore"):
        want = np.exp(x)
    normal = np.isfinite(want) & (want >= np.finfo(float).tiny)
    ulp = np.abs(got[normal] - want[normal]) / np.spacing(want[normal])
    assert ulp.max() <= 1.5
    small = ~normal & np.isfinite(want)
    assert np.abs(got[small] - want[small]).max() <= np.spacing(0.0)
    special = ~np.isfinite(want)
    np.testing.assert_array_equal(got[special], want[special])


def test_several_variables_of_unequal_groups_fit_as_curve_fit_does_and_subsets_alike(monkeypatch):
    # Two variables (stored variable by variable, `groups.Packed`), groups of 30 to 49 points:
    # each group's compiled fit equals its own curve_fit, and a subset of the groups (take)
    # gives those groups' answers.
    rng = np.random.default_rng(8)
    sizes = rng.integers(30, 50, 12)
    truth = np.column_stack([rng.uniform(1, 3, 12), rng.uniform(0.2, 0.6, 12)])
    xs, ys, labels = [], [], []
    for g, n in enumerate(sizes):
        tp = np.column_stack([rng.uniform(0, 4, n), rng.uniform(0, 2, n)])
        xs.append(tp)
        ys.append(truth[g, 0] * np.exp(-truth[g, 1] * tp[:, 0]) * tp[:, 1] + rng.normal(0, 0.01, n))
        labels.append(np.full(n, g))
    x, y, label = np.concatenate(xs), np.concatenate(ys), np.concatenate(labels)
    model = make_model("a*exp(-k*T)*P", {"a": 2.0, "k": 0.4}, variables=("T", "P"))
    monkeypatch.setattr(lm_batch, "solve", None)  # compiled, or this fails
    data = groups.pack(x, y, None, label, 12, torch.float64, torch.device("cpu"))
    np.testing.assert_array_equal(data.x[0, : sizes[0]].numpy(), xs[0])
    program = lm_jit.compile_groups(model, torch.float64)
    fit = groups.fit_independent(
        model, all_per_group(model), data, start(model, 12), LMOptions(), program=program
    )
    ref = np.array(
        [curve_fit(lambda tp, a, k: a * np.exp(-k * tp[0]) * tp[1], xs[g].T, ys[g], p0=[2.0, 0.4],
                   method="lm", xtol=1e-14, ftol=1e-14)[0] for g in range(12)]
    )  # fmt: skip
    np.testing.assert_allclose(fit.theta.numpy(), ref, rtol=1e-8)
    idx = torch.tensor([7, 2, 11])
    part = groups.fit_independent(
        model, all_per_group(model), data.take(idx), start(model, 3), LMOptions(), program=program
    )
    np.testing.assert_allclose(part.theta.numpy(), fit.theta[idx].numpy(), rtol=1e-13)


def test_compiled_covariance_equals_the_exact_inverse_well_or_ill_conditioned():
    # lm_kernels.covariance_range: a Cholesky path where the condition provably allows it, the
    # eigendecomposition otherwise. Against mpmath's inverse and numpy's eigenvalues for the
    # column-scaled singularity test at rcond.
    import mpmath

    from fitcli.lm_kernels import _covariance_cholesky, covariance_range

    mpmath.mp.dps = 50
    rng = np.random.default_rng(11)
    p, rcond = 4, 1e-13
    mats = []
    for k in range(60):
        a = rng.normal(size=(30, p)) * np.logspace(0, 1.5 * (k % 4), p)  # columns scaled
        if k % 5 == 1:
            a[:, 3] = a[:, 0] * 2.0 + a[:, 1] * 1e-3  # exactly dependent: singular
        if k % 5 == 2:  # nearly dependent: condition 1e8 to 1e13, not singular
            a[:, 3] = a[:, 0] + 3e-5 * np.abs(a[:, 0]).max() * rng.normal(size=30)
        mats.append(a.T @ a)
    jtj = np.array(mats)
    var, singular = np.empty((60, p)), np.zeros(60, dtype=bool)
    covariance_range(jtj, 0, 60, rcond, var, singular, np.empty((5, p, p)))
    paths = []
    for k, m in enumerate(jtj):
        d = np.sqrt(np.diag(m))
        ev = np.linalg.eigvalsh(m / d[:, None] / d[None, :])
        want_singular = ev[0] <= rcond * ev[-1]
        assert singular[k] == want_singular, k
        out = np.full(p, np.nan)
        paths.append(_covariance_cholesky(m, rcond, out, np.empty((5, p, p))))
        if paths[-1]:
            assert ev[-1] / ev[0] < 1e8 and not want_singular
            np.testing.assert_array_equal(out, var[k])
        if not want_singular:  # the exact inverse (50 digits) of the rounded matrix
            exact = mpmath.mp.matrix(m.tolist()) ** -1
            want = np.array([float(exact[i, i]) for i in range(p)])
            cond = ev[-1] / ev[0]  # the eigendecomposition's error grows with it
            np.testing.assert_allclose(var[k], want, rtol=1e-11 * max(1.0, cond))
    assert singular.sum() == 12 and sum(paths) >= 30
    assert not any(paths[k] for k in range(60) if k % 5 in (1, 2))  # the eigendecomposition's


def test_padding_groups_to_the_vector_lanes_changes_nothing_but_rounding():
    # A compiled run packs groups to a multiple of lm_jit.LANES points where that adds at most
    # an eighth (pads weigh 0 and add exact zeros): same stops, same iterations, values to
    # rounding, for groups of equal and of unequal size.
    assert [lm_jit.padded_length(n) for n in (100, 10, 225, 56, 57, 8)] == [104, 10, 232, 56, 64, 8]
    rng = np.random.default_rng(3)
    x, y = gaussians(30, seed=4)
    label = np.repeat(np.arange(30), x.shape[1])
    keep = rng.uniform(size=label.size) > 0.15  # unequal groups too
    model = make_model(GAUSS, {"a": 4.0, "c": 0.2, "s": 1.2})
    program = lm_jit.compile_groups(model, torch.float64)
    for rows in (np.ones(label.size, dtype=bool), keep):
        fits = []
        for length in (None, lm_jit.padded_length(x.shape[1]) + 8):
            data = groups.pack(x.reshape(-1)[rows], y.reshape(-1)[rows], None, label[rows], 30,
                               torch.float64, torch.device("cpu"), length)  # fmt: skip
            fits.append(program.fit(*groups._arrays(data), start(model, 30).numpy(),
                                    np.full(30, 1e-3), LMOptions()))  # fmt: skip
        plain, padded = fits
        assert padded is not plain
        np.testing.assert_array_equal(plain["code"], padded["code"])
        np.testing.assert_array_equal(plain["iterations"], padded["iterations"])
        np.testing.assert_allclose(padded["theta"], plain["theta"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(padded["cost"], plain["cost"], rtol=1e-12)


def test_compiling_a_model_writes_nothing_to_stderr(tmp_path, monkeypatch, capfd):
    # LLVM reports every loop it was told to vectorize and could not ("remark: ... loop not
    # vectorized") on the process's own stderr: a first compile printed some twenty such lines
    # into a user's terminal.
    monkeypatch.setenv("FITCLI_CACHE_DIR", str(tmp_path / "cache"))
    lm_jit._program.cache_clear()
    try:
        # A model no other test compiles, so that it compiles here.
        model = make_model("a*exp(-b*x)*cos(c*x) + 0*x**5", {"a": 1, "b": 0.5, "c": 2})
        capfd.readouterr()
        assert lm_jit.compile_groups(model, torch.float64) is not None
        assert any((tmp_path / "cache" / "kernels" / "__pycache__").glob("*.nbi"))
        err = capfd.readouterr().err
        assert "remark" not in err and "vectorized" not in err, err[:500]
    finally:
        lm_jit._program.cache_clear()


def test_the_cli_exits_at_once_after_a_compiled_fit(monkeypatch):
    # The helper threads stay between calls; the CLI's quick exit (no interpreter teardown,
    # which any other live thread prevents) ends them first, and a later fit starts them again.
    import atexit

    from fitcli import cli

    if lm_jit.threads() < 2:
        pytest.skip("needs two threads")
    fit = gaussian_fit(20, seed=8)
    first = fit()
    exits: list = []
    monkeypatch.setattr(cli.os, "_exit", exits.append)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: None)  # not pytest's own handlers
    # As in a plain CLI process: a tracer left by an earlier test (or coverage) would make the
    # exit the ordinary one whatever the threads.
    monkeypatch.setattr(sys, "gettrace", lambda: None)
    monkeypatch.setattr(sys, "getprofile", lambda: None)
    cli._exit_now(SystemExit(0))
    assert exits == [0]
    np.testing.assert_array_equal(fit()["theta"], first["theta"])


def test_the_helper_threads_follow_the_thread_count(monkeypatch):
    # OMP_NUM_THREADS is read at each call: one thread fits alone, more get a pool of their
    # size; the answers are the same bits either way (each group is fitted by one thread).
    fit = gaussian_fit(12, seed=9)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert lm_jit._helpers() is None
    alone = fit()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if lm_jit.threads() < 2:
        pytest.skip("needs two cores")
    assert lm_jit._helpers()._max_workers == 1
    np.testing.assert_array_equal(fit()["theta"], alone["theta"])
