"""Host-side sanity harness for src/cuda/fde.cu on a machine without a GPU.

Compiles the CUDA source as plain C++ with a small emulation layer (every
thread of a block is an OS thread; __syncthreads is a block barrier and the
warp collectives __ballot_sync / __shfl_xor_sync meet at a 32-thread barrier;
blocks run one after another so __shared__ can be a function-local static),
runs the real host code (validation, chunk planning, launch geometry) and
kernels on host memory, and compares the output bit for bit with
embkern.reference.fde (the numerics contract) on small random configs.

It checks indexing, chunking, the Eigen summation order, fill, the AMS
inverse table and the count sketch -- not GPU-specific behaviour (memory
model, real warp scheduling, intrinsics' hardware rounding, which is IEEE).

    python benchmarks/gpu/fde_cuda_emulate.py [--cases 40] [--seed 0]

Needs g++ >= 11 (C++20 <barrier>). A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHIM = r"""
#pragma once
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <cstdlib>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3e { unsigned x = 0, y = 0, z = 0; };
struct alignas(16) float4 { float x, y, z, w; };
inline thread_local uint3e threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

struct EmuWarp {
  std::barrier<> bar{32};
  uint64_t vals[32];
};
struct EmuCtx {
  std::barrier<>* block;
  EmuWarp* warp;
  int lane;
};
inline thread_local EmuCtx emu_ctx;

inline void __syncthreads() { emu_ctx.block->arrive_and_wait(); }
inline unsigned __ballot_sync(unsigned, bool pred) {
  EmuWarp* w = emu_ctx.warp;
  w->vals[emu_ctx.lane] = pred ? 1 : 0;
  w->bar.arrive_and_wait();
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= unsigned(w->vals[i] & 1) << i;
  w->bar.arrive_and_wait();
  return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int m) {
  static_assert(sizeof(T) <= 8, "");
  EmuWarp* w = emu_ctx.warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->vals[emu_ctx.lane] = bits;
  w->bar.arrive_and_wait();
  uint64_t o = w->vals[emu_ctx.lane ^ m];
  w->bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &o, sizeof(T));
  return r;
}
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  const char* e = std::getenv("EMU_SMS");
  *v = e ? std::atoi(e) : 1;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

template <class F>
void emu_launch(dim3 grid, unsigned threads, F f) {
  std::barrier<> block(threads);
  std::vector<std::unique_ptr<EmuWarp>> warps;
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.emplace_back(new EmuWarp());
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t) {
    ts.emplace_back([&, t]() {
      emu_ctx = EmuCtx{&block, warps[t / 32].get(), int(t % 32)};
      threadIdx.x = t;
      blockDim = dim3(threads);
      gridDim = grid;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
            f();
            block.arrive_and_wait();  // shared statics are reused by the next block
          }
    });
  }
  for (auto& t : ts) t.join();
}
"""

ENTRY = r"""
extern "C" int emu_encode(const float* points, int64_t N, int64_t d, const int64_t* offsets, int64_t B,
                          int64_t R, int k, int64_t dp, int is_doc, int fill, int64_t final_dim,
                          const float* simhash, const int32_t* ams_index, const float* ams_sign,
                          const int64_t* cs_off, const int64_t* cs_mem, const float* cs_sgn, int64_t cs_len,
                          float* out, int64_t budget, char* err, int errlen) {
  using namespace embkern::fde_cuda;
  Problem p;
  p.points = points; p.num_points = N; p.dim = d; p.offsets = offsets; p.offsets_host = offsets;
  p.num_docs = B; p.num_repetitions = R; p.num_simhash = k; p.projection_dim = dp;
  p.is_document = is_doc; p.fill_empty = fill; p.final_dim = final_dim;
  p.simhash = simhash; p.ams_index = ams_index; p.ams_sign = ams_sign;
  p.cs_offsets = cs_off; p.cs_members = cs_mem; p.cs_signs = cs_sgn; p.cs_len = cs_len;
  p.out = out; p.chunk_budget_bytes = budget;
  std::string e;
  int64_t ws = fde_workspace_bytes(p, &e);
  if (ws < 0) { std::snprintf(err, errlen, "%s", e.c_str()); return 1; }
  std::vector<char> w(size_t(ws) + 1);
  Status st = fde_encode(p, w.data(), ws, 0, nullptr, &e);
  if (st != Status::Ok) { std::snprintf(err, errlen, "%s", e.c_str()); return 2; }
  return 0;
}
"""


def _translate(src: str) -> str:
    src = src.replace("#include <cuda_runtime.h>", '#include "emu_shim.h"\n#include <cstdio>')
    out, pos = [], 0
    pat = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<\s*([^,]+?),\s*([^,]+?),\s*[^,]+?,\s*[^>]+?>>>\s*\(")
    while True:
        m = pat.search(src, pos)
        if not m:
            out.append(src[pos:])
            break
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        args = src[m.end():i - 1]
        out.append(src[pos:m.start()])
        out.append(f"emu_launch({m.group(2)}, unsigned({m.group(3)}), [=]() {{ {m.group(1)}({args}); }})")
        pos = i
    return "".join(out)


def build(workdir: str, source: str) -> ctypes.CDLL:
    with open(source) as f:
        src = _translate(f.read())
    with open(os.path.join(workdir, "emu_shim.h"), "w") as f:
        f.write(SHIM)
    cpp = os.path.join(workdir, "fde_emu.cpp")
    with open(cpp, "w") as f:
        f.write(src + ENTRY)
    so = os.path.join(workdir, "fde_emu.so")
    cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread",
           "-I", workdir, "-I", os.path.join(ROOT, "src/include"), cpp, "-o", so]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(so)
    lib.emu_encode.restype = ctypes.c_int
    return lib


def _ptr(a):
    return ctypes.c_void_p(0) if a is None else a.ctypes.data_as(ctypes.c_void_p)


def run_case(lib, ref, rng, case: int, budget: int):
    d = int(rng.choice([3, 5, 8, 16, 33, 64, 130, 700]))  # 700 > 680: Eigen depth blocks
    R = int(rng.integers(1, 4))
    k = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 9]))  # 9: the predicated 16-column kernel
    is_doc = bool(rng.integers(0, 2))
    fill = is_doc and bool(rng.integers(0, 2))
    ams = bool(rng.integers(0, 3) == 0)
    dp = int(rng.choice([1, 3, 8, 16])) if ams else d
    final = int(rng.choice([7, 64])) if rng.integers(0, 3) == 0 else None
    B = int(rng.integers(0, 5)) if case % 8 == 0 else int(rng.integers(1, 5))
    # 1 point: Eigen's GEMV order; lengths not a multiple of 8: interleaved rows
    lengths = [int(rng.choice([0, 1, 2, 5, 8, 13, 20, 40, 57, 100])) for _ in range(B)]
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    N = int(offsets[-1])
    pts = rng.standard_normal((N, d)).astype(np.float32)
    if N and rng.integers(0, 2):
        pts[rng.integers(0, N)] = 0.0  # exact zero dots -> bit 0
    seed = int(rng.integers(0, 1000))
    if N and k and rng.integers(0, 2):
        # Adversarial: points orthogonal (in float64) to one hyperplane, so the
        # float32 dot product is rounding noise whose sign depends on the
        # summation order (~40% of such bits flip under a different order).
        G = ref.simhash_table(seed, d, k, R).astype(np.float64)
        for q in range(N):
            g = G[rng.integers(0, R), :, rng.integers(0, k)]
            x = pts[q].astype(np.float64)
            pts[q] = (x - (x @ g) / (g @ g) * g).astype(np.float32)
    cfg = ref.FDEConfig(dimension=d, num_repetitions=R, num_simhash_projections=k,
                        encoding_type="document" if is_doc else "query",
                        projection_type="ams_sketch" if ams else "identity", seed=seed,
                        projection_dimension=dp if ams else None, fill_empty_partitions=fill,
                        final_projection_dimension=final)
    t = ref.Tables(cfg)
    want = ref.encode(pts, offsets, cfg, t) if B else np.zeros((0, cfg.output_dimension), np.float32)
    # Would a plain sequential dot order have given a different answer? (shows
    # that this case exercises the Eigen order at all)
    real = ref.eigen_matmul
    ref.eigen_matmul = lambda X, W: ref._seq(np.asarray(X, np.float32)[:, :, None] * np.asarray(W, np.float32)[None])
    try:
        naive = ref.encode(pts, offsets, cfg, t) if B else want
    finally:
        ref.eigen_matmul = real
    order_sensitive = not np.array_equal(naive.view(np.int32), want.view(np.int32))
    L = R * (1 << k) * dp
    cs = (None, None, None)
    if final is not None:
        cs = ref.count_sketch_csr(t.cs_bucket, t.cs_sign, final)
    width = final if final is not None else L
    out = np.full((B, width), np.float32(np.nan))  # poison: every element must be written
    err = ctypes.create_string_buffer(512)
    simhash = np.ascontiguousarray(t.simhash, np.float32)
    rc = lib.emu_encode(_ptr(pts), ctypes.c_int64(N), ctypes.c_int64(d), _ptr(offsets), ctypes.c_int64(B),
                        ctypes.c_int64(R), ctypes.c_int(k), ctypes.c_int64(dp), ctypes.c_int(is_doc),
                        ctypes.c_int(fill), ctypes.c_int64(final or 0), _ptr(simhash),
                        _ptr(None if not ams else np.ascontiguousarray(t.ams_index, np.int32)),
                        _ptr(None if not ams else np.ascontiguousarray(t.ams_sign, np.float32)),
                        _ptr(cs[0]), _ptr(cs[1]), _ptr(cs[2]), ctypes.c_int64(L if final else 0), _ptr(out),
                        ctypes.c_int64(budget), err, 512)
    desc = (f"case {case}: B={B} lengths={lengths} d={d} R={R} k={k} {'doc' if is_doc else 'query'} "
            f"fill={fill} ams={dp if ams else None} final={final} budget={budget}"
            f"{' [order-sensitive]' if order_sensitive else ''}")
    if rc != 0:
        return False, desc + f" -> error {err.value.decode()}"
    same = out.view(np.int32) == want.view(np.int32)
    if not same.all():
        bad = np.argwhere(~same)[:5]
        return False, desc + f" -> {int((~same).sum())} mismatches, first {bad.tolist()}: got " \
            f"{[float(out[tuple(b)]) for b in bad]} want {[float(want[tuple(b)]) for b in bad]}"
    return True, desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default=os.path.join(ROOT, "src/cuda/fde.cu"),
                    help="CUDA source to emulate (e.g. a deliberately broken copy, to see the harness fail)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from embkern.reference import fde as ref  # noqa: E402  (numpy only; no compiled module needed)

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.time()
        lib = build(wd, args.source)
        print(f"built emulation in {time.time() - t0:.1f}s")
        fails = 0
        for case in range(args.cases):
            os.environ["EMU_SMS"] = str(int(rng.choice([1, 4])))
            budget = int(rng.choice([1, 4096, 128 << 20]))  # 1 byte -> one document per chunk
            ok, desc = run_case(lib, ref, rng, case, budget)
            print(("ok   " if ok else "FAIL ") + desc, flush=True)
            fails += not ok
    print(f"{args.cases - fails}/{args.cases} cases bit-identical to embkern.reference.fde")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
