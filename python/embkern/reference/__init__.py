"""References: the numerics contract of every embkern op (PyTorch; NumPy for FDE)."""
from . import hypercomplex  # noqa: F401
from . import fde  # noqa: F401
from . import selective_attention  # noqa: F401
from . import rel_conv_attention  # noqa: F401
from . import bit_cipher  # noqa: F401

__all__ = ["hypercomplex", "fde", "selective_attention", "rel_conv_attention", "bit_cipher"]
