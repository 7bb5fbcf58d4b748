"""embkern: fast, reference-checked kernels for embedding and attention techniques.

Every public function takes ``backend=None`` (auto: the fastest available) or
one of ``"reference" | "cpu" | "triton" | "cuda"``; ``python -m embkern info``
shows which backends are active here and why the others are not.
"""

__version__ = "0.1.0"

from . import reference  # noqa: E402,F401
from .ops.hypercomplex import (  # noqa: E402
    dihedron_product,
    hamilton_product,
    one_to_n_loss,
    rank_all,
    score_all,
    topk_all,
)
from .ops.fde import FDEConfig, FDEEncoder, chamfer, chamfer_rerank, fde_encode  # noqa: E402
from .ops.selective_attention import selective_attention, selective_temperatures  # noqa: E402
from .ops.rel_conv_attention import causal_depthwise_conv, relative_attention  # noqa: E402
from .ops.bit_cipher import (  # noqa: E402
    BitCipher,
    CooccurrenceCounts,
    cipher_patterns,
    cooccurrence_vectors,
    tokenize_file,
)


def __getattr__(name):
    # nn and testing import lazily so `import embkern` stays light; distributed
    # also because it imports Dask, an optional extra.
    if name in ("nn", "testing", "bench", "contrib", "distributed"):
        import importlib

        return importlib.import_module(f"embkern.{name}")
    raise AttributeError(f"module 'embkern' has no attribute {name!r}")


__all__ = [
    "__version__",
    "hamilton_product",
    "dihedron_product",
    "score_all",
    "rank_all",
    "topk_all",
    "one_to_n_loss",
    "reference",
    "FDEConfig",
    "FDEEncoder",
    "fde_encode",
    "chamfer",
    "chamfer_rerank",
    "selective_attention",
    "selective_temperatures",
    "relative_attention",
    "causal_depthwise_conv",
    "cipher_patterns",
    "BitCipher",
    "CooccurrenceCounts",
    "cooccurrence_vectors",
    "tokenize_file",
]
