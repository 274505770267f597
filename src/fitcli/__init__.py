"""fitcli: fit curves with PyTorch autograd from a YAML experiment."""

__version__ = "0.1.0"
