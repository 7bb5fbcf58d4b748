"""nn.Module layers built on embkern's fused ops.

Hypercomplex knowledge-graph embeddings (``embkern.nn.hypercomplex``):
:class:`QuatE`, :class:`DihedronKGE`, :class:`Tetra`. Training and filtered
link-prediction metrics for them are study helpers in
:mod:`embkern.contrib.kg_training` (``fit``, ``evaluate``, ``kinships_benchmark``).

Selective self-attention (``embkern.nn.selective_attention``):
:class:`SelectiveSelfAttention` with its :class:`KVCache`, and
:func:`convert_to_selective` for GPT-2 / nanoGPT-style models.

Relative convolutional attention (``embkern.nn.rel_conv_attention``):
:class:`RelConvMultiHeadAttention` (RCMHA; RMHA with ``conv=None``) with its decoding
:class:`RelConvCache`.

Bit-cipher word vectors (``embkern.nn.bit_cipher``): :class:`CipherEmbedding`,
an embedding layer initialised for another tokenizer's vocabulary.
"""

from .hypercomplex import (  # noqa: F401
    DihedronKGE,
    HypercomplexKGE,
    KGTables,
    QuatE,
    Tetra,
)
from .bit_cipher import CipherEmbedding  # noqa: F401
from .rel_conv_attention import RelConvCache, RelConvMultiHeadAttention  # noqa: F401
from .selective_attention import (  # noqa: F401
    KVCache,
    SelectiveSelfAttention,
    SelectiveTemperature,
    convert_to_selective,
)

__all__ = ["HypercomplexKGE", "KGTables", "QuatE", "DihedronKGE", "Tetra", "SelectiveSelfAttention",
           "SelectiveTemperature", "KVCache", "convert_to_selective", "RelConvMultiHeadAttention", "RelConvCache",
           "CipherEmbedding"]
