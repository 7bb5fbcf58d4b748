"""nn.Module layers built on embkern's fused ops.

Hypercomplex knowledge-graph embeddings (``embkern.nn.hypercomplex``):
:class:`QuatE`, :class:`DihedronKGE`, :class:`Tetra`. Training and filtered
link-prediction metrics for them are study helpers in
:mod:`embkern.contrib.kg_training` (``fit``, ``evaluate``, ``kinships_benchmark``).
"""

from .hypercomplex import (  # noqa: F401
    DihedronKGE,
    HypercomplexKGE,
    KGTables,
    QuatE,
    Tetra,
)

__all__ = ["HypercomplexKGE", "KGTables", "QuatE", "DihedronKGE", "Tetra"]
