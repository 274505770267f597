"""The tutorial's way, as a baseline: numpy/torch data, a bare SGD loop, and 11 plotly figures
written with `write_html` and plotly.js embedded in every file.

    python benchmarks/tutorial_baseline.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

out = Path(sys.argv[1] if len(sys.argv) > 1 else "baseline-out")
out.mkdir(parents=True, exist_ok=True)

torch.manual_seed(0)
x = torch.linspace(-10, 10, 1000, dtype=torch.float64)
y_true = 1.5 * torch.sin(x) + 1.2 * torch.cos(x / 4)
y = y_true + torch.randn(1000, dtype=torch.float64)
theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
opt = torch.optim.SGD([theta], lr=0.01)
epochs = 500


def model(x):
    return theta[0] * x + theta[1] * torch.sin(x) + theta[2] * torch.cos(x / 4)


def plot(epoch, loss):
    with torch.no_grad():
        fit = model(x)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x.numpy(), y=y.numpy(), mode="markers", name="observed"))
    fig.add_trace(go.Scatter(x=x.numpy(), y=y_true.numpy(), mode="lines", name="true"))
    fig.add_trace(go.Scatter(x=x.numpy(), y=fit.numpy(), mode="lines", name="fit"))
    fig.update_layout(title=f"epoch {epoch} loss {loss:.4f} theta {theta.detach().numpy()}")
    fig.write_html(out / f"epoch_{epoch:03d}.html", include_plotlyjs=True)


with torch.no_grad():
    plot(0, float(torch.mean((model(x) - y) ** 2)))
for epoch in range(1, epochs + 1):
    opt.zero_grad()
    loss = torch.mean((model(x) - y) ** 2)
    loss.backward()
    opt.step()
    if epoch % (epochs // 10) == 0:
        plot(epoch, loss.item())
print(np.round(theta.detach().numpy(), 6))
