"""Launcher of the CUDA bit-cipher kernel (``embkern._C_cuda.bit_cipher``, src/cuda/bit_cipher.cu).

Everything lives on one CUDA device as torch tensors (so the accumulator and
the workspace come from torch's caching allocator and follow its stream
semantics); the kernels are enqueued on the current stream of that device.
The compiled code receives one ``Problem`` of ``ArrayView`` s plus host copies
of the document offsets and the window offsets, which it checks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _backends


def _mod():
    return _backends.cuda_module().bit_cipher


def code_mask(codes: np.ndarray) -> np.ndarray:
    """(V, ceil(b / 64)) uint64: bit j of a type's code as bit j % 64 of word j // 64."""
    V, b = codes.shape
    W = (b + 63) // 64
    padded = np.zeros((V, W * 64), dtype=np.uint8)
    padded[:, :b] = codes
    bits = np.packbits(padded.reshape(V, W, 8, 8)[:, :, :, ::-1], axis=-1)  # one byte per 8 bits, bit 0 lowest
    return np.ascontiguousarray(bits.reshape(V, W * 8)).view("<u8").reshape(V, W)


def count(tokens: Tensor, doc_offsets: Tensor, mask: Tensor, wa: Tensor, ws, wpad: Tensor, deltas: Tensor,
          A: Tensor, concat: bool, debug: dict | None = None) -> None:
    """Adds one chunk's exact sums into A (V, nb, b + 2, 2) int64 (unsigned 128-bit (lo, hi) words) on its
    device; wa, ws (n_off, V) and wpad (n_off,) are int64 quanta of 2^-62 in [0, 2^62].

    debug: a dict to hand back the call's intermediate arrays (for tests that check the stages on a GPU).
    It gets "workspace" (the uint8 device workspace the kernels used, kept alive by the dict),
    "layout" (``workspace_layout``'s byte offsets into it: pos, keys, spos, doc_of, start, end, cub,
    cub_bytes, total), "tokens" and "doc_offsets" (the int32 / int64 device arrays the kernels read).
    The kernels are asynchronous: synchronise the device before reading the workspace. None: nothing
    is kept; the launch is the same either way."""
    mod = _mod()
    dev = A.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()

    keep = []  # contiguous copies must outlive the launch: the kernels read them by raw pointer

    def view(t: Tensor):
        t = t.contiguous()
        keep.append(t)
        name = {torch.int32: "int32", torch.int64: "int64", torch.float64: "float64",
                torch.uint64: "uint64"}[t.dtype]
        return mod.ArrayView(t.data_ptr(), t.numel(), name)

    tok = tokens.to(device=dev, dtype=torch.int32).contiguous()
    off = doc_offsets.to(device=dev, dtype=torch.int64).contiguous()
    V, _, E, _ = A.shape  # (V, nb, b + 2, 2): 128-bit sums as (lo, hi) words
    problem = mod.Problem(
        tokens=view(tok), doc_offsets=view(off), doc_offsets_host=doc_offsets.cpu().to(torch.int64).numpy(),
        code_mask=view(mask), wa=view(wa), ws=None if ws is None else view(ws), wpad=view(wpad),
        deltas=view(deltas), deltas_host=deltas.cpu().numpy(), concat=bool(concat), vocab_size=V, bits=E - 2,
        A=view(A))
    # the compiled code makes `index` the calling thread's current device (cudaSetDevice), which torch
    # shares: the guard puts torch's previous device back afterwards
    with torch.cuda.device(index):
        nbytes = mod.workspace_bytes(tok.numel(), V, index)
        workspace = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=dev)
        stream = torch.cuda.current_stream(index).cuda_stream
        mod.count(problem, workspace=workspace.data_ptr(), workspace_bytes=int(nbytes), device=index,
                  stream=stream)
        if debug is not None:
            debug.update(workspace=workspace, layout=dict(mod.workspace_layout(tok.numel(), V, index)),
                         tokens=tok, doc_offsets=off)
    A_buf = keep[-1]  # view(A): A itself, or its contiguous copy that the kernel added into
    if A_buf.data_ptr() != A.data_ptr():
        A.copy_(A_buf)
