"""Studies and data helpers around the ops (not kernels; nothing here is imported by ``import embkern``).

* :mod:`embkern.contrib.datasets`: the KG triples (Nations, Kinships, UMLS) that
  ship in the pykeen wheel, read offline; reciprocal relations and tail filters.
* :mod:`embkern.contrib.kg_training`: ``fit`` / ``evaluate`` / ``kinships_benchmark``
  for the :mod:`embkern.nn` hypercomplex models.
* :mod:`embkern.contrib.fde_eval`: FDE retrieval recall against exact Chamfer on
  real MiniLM token vectors.
* :mod:`embkern.contrib.char_lm`: a char LM on real text (gensim's
  head500.noblanks.cor): MHA vs SSA vs RMHA vs RCMHA loss curves.
* ``embkern.contrib._minilm``: the offline all-MiniLM-L6-v2 token encoder
  ``fde_eval`` reads its vectors from.
"""
