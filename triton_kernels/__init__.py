"""Triton kernels of embkern, installed as ``embkern.triton_kernels``.

One module per op (``hypercomplex``, ...), each holding ``@triton.jit``
kernels and their launchers. Importing this package does not import Triton:
``embkern._backends`` imports the op module on demand, so ``import embkern``
works where Triton is absent or broken.
"""
