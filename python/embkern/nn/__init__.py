"""nn.Module layers built on embkern's fused ops.

Hypercomplex knowledge-graph embeddings (``embkern.nn.hypercomplex``):
:class:`QuatE`, :class:`DihedronKGE`, :class:`Tetra`, the training helper
:func:`fit` and the filtered link-prediction metrics :func:`evaluate`.
"""

from .hypercomplex import (  # noqa: F401
    DihedronKGE,
    HypercomplexKGE,
    KGTables,
    QuatE,
    Tetra,
    evaluate,
    fit,
    kinships_benchmark,
)

__all__ = ["HypercomplexKGE", "KGTables", "QuatE", "DihedronKGE", "Tetra", "fit", "evaluate", "kinships_benchmark"]
