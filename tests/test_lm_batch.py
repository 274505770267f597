"""The batched Levenberg-Marquardt core (`fitcli.lm_batch`): each lane against scipy's MINPACK
LM on the same problem, held parameters, lanes that stop at different iterations, float32,
blocks, compaction, and an interrupted solve continued by a second call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from fitcli import lm_batch
from fitcli.lm_batch import LMOptions, Stop

X = np.linspace(0.0, 4.0, 40)
TRUTH = np.array([[3.0, 1.2, 0.5], [1.0, 0.4, -0.2], [5.0, 2.5, 1.0], [2.0, 0.8, 0.0]])


def model(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    return theta[0] * np.exp(-theta[1] * x) + theta[2]


def data(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean = np.stack([model(t, X) for t in TRUTH])
    return clean + rng.normal(0.0, 0.05, clean.shape)


class Decays:
    """a*exp(-b*x) + c, each lane with its own y; records the batch sizes it is asked for."""

    def __init__(self, y: torch.Tensor, x: torch.Tensor, sizes: list[int] | None = None):
        self.y, self.x = y, x
        self.sizes = [] if sizes is None else sizes

    def take(self, idx: torch.Tensor) -> Decays:
        return Decays(self.y[idx], self.x, self.sizes)

    def linearize(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.sizes.append(theta.shape[0])
        a, b, c = (theta[:, k, None] for k in range(3))
        e = torch.exp(-b * self.x)
        jac = torch.stack([e, -a * self.x * e, torch.ones_like(e)], dim=-1)
        return self.y - (a * e + c), jac


def lanes(y: np.ndarray, dtype=torch.float64, sizes=None) -> Decays:
    return Decays(torch.tensor(y, dtype=dtype), torch.tensor(X, dtype=dtype), sizes)


def scipy_fit(y: np.ndarray, start: np.ndarray, fixed: dict[int, float] | None = None):
    fixed = fixed or {}
    free = [k for k in range(3) if k not in fixed]

    def resid(v: np.ndarray) -> np.ndarray:
        t = np.array(start, dtype=float)
        t[free] = v
        for k, val in fixed.items():
            t[k] = val
        return model(t, X) - y

    sol = least_squares(
        resid, np.asarray(start, float)[free], method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    out = np.array(start, dtype=float)
    out[free] = sol.x
    for k, val in fixed.items():
        out[k] = val
    return out


START = np.array([[2.0, 1.0, 0.0], [1.5, 0.6, 0.0], [4.0, 2.0, 0.5], [1.0, 1.0, 1.0]])


def test_each_lane_equals_scipy_lm_on_its_problem():
    y = data()
    sol = lm_batch.solve(lanes(y), torch.tensor(START), LMOptions())
    assert bool(sol.converged().all()), sol.code
    for k in range(len(y)):
        ref = scipy_fit(y[k], START[k])
        np.testing.assert_allclose(sol.theta[k].numpy(), ref, rtol=1e-6)
        # The returned normal equations are those at the final parameters.
        r, jac = lanes(y[k : k + 1]).linearize(sol.theta[k : k + 1])
        np.testing.assert_allclose(sol.jtj[k].numpy(), (jac[0].T @ jac[0]).numpy(), rtol=1e-12)
        np.testing.assert_allclose(2 * sol.cost[k].item(), float((r * r).sum()), rtol=1e-12)


def test_held_parameters_stay_and_the_others_equal_scipy_with_them_fixed():
    y = data(1)
    free = torch.ones(4, 3, dtype=torch.bool)
    free[0, 1] = False  # lane 0 holds b at 1.5, lane 2 holds a and c
    free[2, 0] = free[2, 2] = False
    start = START.copy()
    start[0, 1] = 1.5
    sol = lm_batch.solve(lanes(y), torch.tensor(start), LMOptions(), free=free)
    assert bool(sol.converged().all())
    assert sol.theta[0, 1].item() == 1.5
    assert sol.theta[2, 0].item() == start[2, 0] and sol.theta[2, 2].item() == start[2, 2]
    refs = [
        scipy_fit(y[0], start[0], {1: 1.5}),
        scipy_fit(y[1], start[1]),
        scipy_fit(y[2], start[2], {0: start[2, 0], 2: start[2, 2]}),
        scipy_fit(y[3], start[3]),
    ]
    np.testing.assert_allclose(sol.theta.numpy(), np.array(refs), rtol=1e-6)


def test_lanes_stopping_at_different_iterations_give_each_lane_alone_and_compact(monkeypatch):
    monkeypatch.setattr(lm_batch, "COMPACT_MIN_CELLS", 0)  # compact even this small batch
    y = data(2)
    start = START.copy()
    start[3] = [20.0, 5.0, -3.0]  # far from its minimum: many more iterations than the others
    sizes: list[int] = []
    sol = lm_batch.solve(lanes(y, sizes=sizes), torch.tensor(start), LMOptions())
    assert bool(sol.converged().all())
    its = sol.iterations.numpy()
    assert its[3] > its[:3].max() + 3, its
    # Once the easy lanes stopped, only the running one was evaluated.
    assert sizes[0] == 4 and sizes[-1] == 1
    for k in range(4):
        alone = lm_batch.solve(lanes(y[k : k + 1]), torch.tensor(start[k : k + 1]), LMOptions())
        np.testing.assert_allclose(sol.theta[k].numpy(), alone.theta[0].numpy(), rtol=1e-12)
        assert sol.iterations[k] == alone.iterations[0]
        assert sol.code[k] == alone.code[0]


def test_blocks_give_the_same_lanes():
    y = np.concatenate([data(3), data(4)])
    start = np.concatenate([START, START])
    whole = lm_batch.solve(lanes(y), torch.tensor(start), LMOptions())
    blocks = lm_batch.solve(lanes(y), torch.tensor(start), LMOptions(), chunk=3)
    np.testing.assert_allclose(blocks.theta.numpy(), whole.theta.numpy(), rtol=1e-12)
    assert torch.equal(blocks.iterations, whole.iterations)


def test_float32_lanes_reach_the_float64_minimum():
    y = data(5)
    sol = lm_batch.solve(
        lanes(y, torch.float32), torch.tensor(START, dtype=torch.float32), LMOptions()
    )
    assert sol.theta.dtype == torch.float32
    assert bool(sol.converged().all()), sol.code
    refs = np.array([scipy_fit(y[k], START[k]) for k in range(4)])
    np.testing.assert_allclose(sol.theta.numpy(), refs, rtol=2e-4, atol=2e-4)


def test_should_stop_interrupts_and_a_second_call_continues_to_the_same_answer():
    y = data(6)
    start = START.copy()
    start[3] = [20.0, 5.0, -3.0]
    asked = []

    def after_three() -> bool:
        asked.append(1)
        return len(asked) > 3

    first = lm_batch.solve(lanes(y), torch.tensor(start), LMOptions(), should_stop=after_three)
    assert Stop.INTERRUPTED in first.code.tolist()
    stopped = first.code == int(Stop.INTERRUPTED)
    assert bool((first.iterations[stopped] == 3).all())
    assert first.damping.shape == (4,)
    second = lm_batch.solve(lanes(y), first.theta, LMOptions(), damping=first.damping)
    assert bool(second.converged().all())
    whole = lm_batch.solve(lanes(y), torch.tensor(start), LMOptions())
    np.testing.assert_allclose(second.theta.numpy(), whole.theta.numpy(), rtol=1e-9)


def test_the_iteration_limit_and_a_non_finite_start_are_their_own_stops():
    y = data(7)
    start = START.copy()
    start[1] = [1.0, -1e3, 0.0]  # exp(1e3 x) overflows: non-finite residuals at the start
    sol = lm_batch.solve(lanes(y), torch.tensor(start), LMOptions(max_iter=2))
    assert sol.code[1] == Stop.NONFINITE_START
    assert sol.code[3] == Stop.LIMIT and sol.iterations[3] == 2
    assert lm_batch.reason(int(sol.code[3]), LMOptions(max_iter=2), 2).startswith("iteration limit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_lanes_equal_cpu_lanes():
    y = data(8)
    cpu = lm_batch.solve(lanes(y), torch.tensor(START), LMOptions())
    dev = torch.device("cuda")
    gpu_lanes = Decays(torch.tensor(y, device=dev), torch.tensor(X, device=dev))
    gpu = lm_batch.solve(gpu_lanes, torch.tensor(START, device=dev), LMOptions())
    np.testing.assert_allclose(gpu.theta.cpu().numpy(), cpu.theta.numpy(), rtol=1e-9)
