"""Host-side harness for src/cuda/bit_cipher.cu on a machine without a GPU.

Compiles the CUDA source as plain C++ with fde_cuda_emulate.py's emulation layer
(threads of a block are OS threads, blocks run one after another) plus a host
stand-in for CUB's stable radix sort over the same bit range, runs the real
host code (layout, workspace check, the four launches) and kernels on host
memory, and compares A word for word with the CPU kernel's.

It checks the kernels' logic -- positions and documents, the sort and the type
segments, the per-element walk, the 128-bit carries -- not GPU-specific
behaviour: CUB itself, the memory model, the launch on a real device, the
Python launcher's device buffers.

    python benchmarks/gpu/bit_cipher_cuda_emulate.py [--cases 12] [--seed 0]

Needs g++ >= 11 (C++20 <barrier>). Under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# CUB's DeviceRadixSort::SortPairs on the host: a stable sort of (key, value) pairs on bits
# [begin_bit, end_bit) of the key, signed keys with the sign bit flipped first, as CUB orders them.
CUB_SORT = r"""
#pragma once
#include <algorithm>
#include <cstddef>
#include <numeric>
#include <type_traits>
#include <vector>
#include "emu_shim.h"

namespace cub {
struct DeviceRadixSort {
  template <class K, class V>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out, const V* vals_in,
                               V* vals_out, int n, int begin_bit = 0, int end_bit = int(sizeof(K) * 8),
                               cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 64;
      return cudaSuccess;
    }
    using U = std::make_unsigned_t<K>;
    auto bits = [&](K k) {
      U u = static_cast<U>(k);
      if (std::is_signed<K>::value) u ^= U(1) << (sizeof(K) * 8 - 1);
      const int w = end_bit - begin_bit;
      const U mask = w >= int(sizeof(K) * 8) ? ~U(0) : ((U(1) << w) - 1);
      return (u >> begin_bit) & mask;
    };
    std::vector<int> idx(static_cast<size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return bits(keys_in[a]) < bits(keys_in[b]); });
    for (int i = 0; i < n; ++i) {
      keys_out[i] = keys_in[idx[i]];
      vals_out[i] = vals_in[idx[i]];
    }
    return cudaSuccess;
  }
};
}  // namespace cub
"""

ENTRY = r"""
extern "C" int emu_count(const int32_t* tok, int64_t N, const int64_t* off, int64_t n_docs, const uint64_t* mask,
                         int64_t W, const uint64_t* wa, const uint64_t* ws, const uint64_t* wpad,
                         const int64_t* deltas, int64_t n_off, int concat, int64_t V, int64_t b, uint64_t* A,
                         char* err, int errlen) {
  using namespace embkern::bit_cipher_cuda;
  Problem p;
  p.tokens = tok; p.num_tokens = N; p.doc_offsets = off; p.num_docs = n_docs; p.code_mask = mask;
  p.mask_words = W; p.wa = wa; p.ws = ws; p.wpad = wpad; p.deltas = deltas; p.num_offsets = n_off;
  p.concat = concat != 0; p.vocab_size = V; p.bits = b; p.A = A;
  std::string e;
  const int64_t bytes = workspace_bytes(N, V, 0, &e);
  if (bytes < 0) { std::snprintf(err, errlen, "%s", e.c_str()); return 1; }
  std::vector<uint64_t> w(size_t(bytes) / 8 + 64);
  // the layout aligns every buffer to 256 bytes from the base: give it an aligned base
  char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(w.data()) + 255) & ~uintptr_t(255));
  if (count(p, base, bytes, 0, nullptr, &e) != Status::Ok) { std::snprintf(err, errlen, "%s", e.c_str()); return 2; }
  return 0;
}
"""


def _fde_emulate():
    spec = importlib.util.spec_from_file_location("fde_cuda_emulate", os.path.join(HERE, "fde_cuda_emulate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(workdir: str, source: str = os.path.join(ROOT, "src", "cuda", "bit_cipher.cu")) -> ctypes.CDLL:
    """Compile ``source`` with the emulation layer into workdir; returns the library (emu_count)."""
    fde = _fde_emulate()
    with open(source) as f:
        src = fde._translate(f.read())
    os.makedirs(os.path.join(workdir, "cub", "device"), exist_ok=True)
    with open(os.path.join(workdir, "emu_shim.h"), "w") as f:
        f.write(fde.SHIM)
    with open(os.path.join(workdir, "cub", "device", "device_radix_sort.cuh"), "w") as f:
        f.write(CUB_SORT)
    cpp = os.path.join(workdir, "bit_cipher_emu.cpp")
    with open(cpp, "w") as f:
        f.write(src + ENTRY)
    so = os.path.join(workdir, "bit_cipher_emu.so")
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-I", workdir, "-I",
                    os.path.join(ROOT, "src", "include"), cpp, "-o", so], check=True)
    lib = ctypes.CDLL(so)
    lib.emu_count.restype = ctypes.c_int
    return lib


def corpus(V: int, N: int, rng):
    """Zipf-ish ids with empty, one-token and long documents."""
    lens = rng.choice([0, 1, 2, 5, 40, 300], size=N // 20 + 1)
    off = np.concatenate([[0], np.cumsum(lens)])
    off = off[off <= N]
    off = np.append(off, N) if off[-1] != N else off
    ids = np.minimum(rng.zipf(1.3, N) - 1, V - 1).astype(np.int64)
    return ids, off.astype(np.int64)


def run_case(lib, rng, case: int):
    """(ok, description): one random (V, b, window, mode, weight, noise) against the CPU kernel."""
    import embkern
    from embkern.ops import _bit_cipher_cuda

    V = int(rng.choice([1, 7, 300, 1000]))
    b = int(rng.choice([10, 64, 70, 130]))
    window = int(rng.choice([1, 3, 5, 400]))
    mode = ("sum", "concat")[case % 2]
    weight = ("none", "inv", "cos2")[case % 3]
    noise = bool(case % 4 < 2)
    ids, off = corpus(V, int(rng.integers(1, 4000)), rng)
    c = embkern.BitCipher.fit(ids, vocab_size=V, bits=b, noise=noise)
    cpu = embkern.CooccurrenceCounts(c, window, mode, weight, backend="cpu").update(ids, off)
    k = embkern.CooccurrenceCounts(c, window, mode, weight, backend="cpu")  # its tables, in the cuda layout
    mask = _bit_cipher_cuda.code_mask(c.reference_cipher().codes)
    A = np.zeros(tuple(k.A.shape), dtype=np.uint64)
    tok = np.ascontiguousarray(ids.astype(np.int32))
    u64 = lambda t: None if t is None else np.ascontiguousarray(t.numpy().view(np.uint64))  # noqa: E731
    wa, ws, wpad = u64(k._wa), u64(k._ws), u64(k._wpad)
    deltas = np.ascontiguousarray(k._deltas.numpy())
    p = lambda a: ctypes.c_void_p(0) if a is None else a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    err = ctypes.create_string_buffer(512)
    rc = lib.emu_count(p(tok), ctypes.c_int64(len(tok)), p(off), ctypes.c_int64(len(off) - 1), p(mask),
                       ctypes.c_int64(mask.shape[1]), p(wa), p(ws), p(wpad), p(deltas), ctypes.c_int64(len(deltas)),
                       ctypes.c_int(mode == "concat"), ctypes.c_int64(V), ctypes.c_int64(b), p(A), err, 512)
    desc = f"case {case}: V={V} b={b} window={window} {mode} {weight} noise={noise} N={len(ids)} docs={len(off) - 1}"
    if rc != 0:
        return False, f"{desc}: emu_count returned {rc}: {err.value.decode()}"
    want = cpu.A.numpy().view(np.uint64)
    bad = np.argwhere(A != want)
    if len(bad):
        t, blk, e, w = bad[0]
        return False, (f"{desc}: {len(bad)} of {A.size} words differ; first at type {t} block {blk} entry {e} "
                       f"word {w}: emulated {A[t, blk, e, w]}, cpu {want[t, blk, e, w]}")
    return True, desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as d:
        lib = build(d)
        bad = 0
        for case in range(args.cases):
            ok, desc = run_case(lib, rng, case)
            bad += not ok
            print(("ok   " if ok else "FAIL ") + desc, flush=True)
    print(f"{args.cases - bad}/{args.cases} cases equal to the CPU kernel word for word")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
