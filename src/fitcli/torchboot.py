"""Import torch for a run without paying for torch._dynamo up front.

Every torch.optim step runs `import torch._dynamo; torch._dynamo.graph_break()`, and its methods are
wrapped in `torch._disable_dynamo`, which calls `torch._dynamo.disable(fn)` once. Importing
torch._dynamo costs about as much as importing torch itself, and
outside `torch.compile` both calls do nothing. fitcli never compiles, so until something asks
torch._dynamo for anything else it is a small stand-in module; the first other attribute anyone
reads loads the real torch._dynamo and is answered from it (torch.func.jacrev does this).

Set FITCLI_EAGER_DYNAMO=1 to import the real module as usual.
"""

from __future__ import annotations

import importlib
import os
import sys
import types


class _DeferredDynamo(types.ModuleType):
    """torch._dynamo until it is needed: graph_break and disable are no-ops outside compile."""

    def graph_break(self, *args, **kwargs) -> None:
        return None

    def disable(self, fn=None, recursive=True, **kwargs):
        if fn is None:
            return lambda f: f
        return fn

    def __getattr__(self, name: str):
        if name.startswith("__"):
            # Module introspection (inspect.getmodule probes every module's __file__) must not
            # trigger the real import, possibly in the middle of another one.
            raise AttributeError(name)
        return getattr(load_real_dynamo(), name)


def load_real_dynamo() -> types.ModuleType:
    """Replace the stand-in with the real torch._dynamo and return it."""
    import torch

    current = sys.modules.get("torch._dynamo")
    if isinstance(current, _DeferredDynamo):
        del sys.modules["torch._dynamo"]
        if torch.__dict__.get("_dynamo") is current:
            del torch._dynamo
    return importlib.import_module("torch._dynamo")


def import_torch():
    """`import torch`, with torch._dynamo deferred (see the module docstring)."""
    import torch

    if os.environ.get("FITCLI_EAGER_DYNAMO") == "1" or "torch._dynamo" in sys.modules:
        return torch
    stub = _DeferredDynamo("torch._dynamo", "deferred by fitcli.torchboot")
    sys.modules["torch._dynamo"] = stub
    torch._dynamo = stub
    return torch
