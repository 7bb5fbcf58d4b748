"""torch.library op definitions, one module per op (importing registers the ops)."""
from . import hypercomplex  # noqa: F401
from . import fde  # noqa: F401
from . import selective_attention  # noqa: F401
from . import rel_conv_attention  # noqa: F401
from . import bit_cipher  # noqa: F401

# op name -> its module; `embkern info` and the bench iterate over this.
OPS = {"hypercomplex": hypercomplex, "fde": fde, "selective_attention": selective_attention,
       "rel_conv_attention": rel_conv_attention, "bit_cipher": bit_cipher}
# op name -> its descriptor (what each backend supports; see _backends.OpDescriptor)
DESCRIPTORS = {name: mod.DESCRIPTOR for name, mod in OPS.items()}

__all__ = ["OPS", "DESCRIPTORS", "hypercomplex", "fde", "selective_attention", "rel_conv_attention", "bit_cipher"]
