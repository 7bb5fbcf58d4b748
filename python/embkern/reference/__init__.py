"""Pure-PyTorch references: the numerics contract of every embkern op."""
from . import hypercomplex  # noqa: F401
from . import fde  # noqa: F401

__all__ = ["hypercomplex", "fde"]
