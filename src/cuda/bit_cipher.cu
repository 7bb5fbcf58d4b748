// CUDA kernels of bit-cipher co-occurrence counting (see embkern/bit_cipher_cuda.h
// for the shapes and the exactness argument; docs/ops/bit_cipher.md, "CUDA").
//
// Per call:
//   1. doc_of[i]: the document of position i (binary search in the offsets);
//      pos[i] = i.
//   2. A stable radix sort of (tokens, pos) pairs (CUB): the positions of each
//      type, ascending; then seg[t] = [start, end) of type t.
//   3. One thread block per type with occurrences; each thread owns elements
//      (block o, entry j) of the type's row of A and walks the type's
//      positions in order, and for each the offsets of its block in
//      ascending order, adding what the CPU kernel adds to that element:
//      wpad[o] to entry 0 at a position outside the document, wa[o][c] to
//      bit entry j + 1 when the context type c has bit j, ws[o][c] to the q
//      entry -- integers (quanta of 2^-62), summed exactly in a 128-bit
//      (lo, hi) register pair, so the result equals the CPU's whatever the
//      order. All threads of a block read the same context tokens (L1
//      broadcasts); b = 64 is 66 elements a block, so about half the threads
//      of a 128-thread block idle in sum mode -- the price of owning each
//      element, which keeps the kernel free of atomics.
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "embkern/bit_cipher_cuda.h"

namespace embkern {
namespace bit_cipher_cuda {
namespace {

constexpr int kThreads = 128;

int64_t align_up(int64_t x) { return (x + 255) & ~int64_t(255); }

__global__ void positions_kernel(const int64_t* __restrict__ off, int64_t n_docs, int64_t n, int32_t* pos,
                                 int32_t* doc_of) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  pos[i] = static_cast<int32_t>(i);
  // the last document d with off[d] <= i (it then has off[d + 1] > i)
  int64_t lo = 0, hi = n_docs;  // invariant: off[lo] <= i < off[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (off[mid] <= i)
      lo = mid;
    else
      hi = mid;
  }
  doc_of[i] = static_cast<int32_t>(lo);
}

__global__ void segments_kernel(const int32_t* __restrict__ keys, int64_t n, int64_t V, int32_t* start,
                                int32_t* end) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n) return;
  const int32_t t = keys[k];
  if (t < 0 || t >= V) return;  // ids outside [0, V) are rejected in Python; never written out of bounds here
  if (k == 0 || keys[k - 1] != t) start[t] = static_cast<int32_t>(k);
  if (k == n - 1 || keys[k + 1] != t) end[t] = static_cast<int32_t>(k + 1);
}

struct Args {
  const int32_t* tok;
  const int64_t* off;
  const int32_t* doc_of;
  const int32_t* spos;
  const int32_t* start;
  const int32_t* end;
  const uint64_t* mask;
  const uint64_t* wa;
  const uint64_t* ws;
  const uint64_t* wpad;
  const int64_t* deltas;
  int64_t W, n_off, V, E, nb;
  bool concat;
  uint64_t* A;  // (V, nb, E, 2): (lo, hi) words
};

// (lo, hi) += x as one unsigned 128-bit integer.
__device__ __forceinline__ void add128(uint64_t& lo, uint64_t& hi, uint64_t x) {
  lo += x;
  hi += lo < x;
}

__global__ void __launch_bounds__(kThreads) count_kernel(Args a) {
  const int64_t t = blockIdx.x;
  const int32_t s0 = a.start[t], s1 = a.end[t];
  if (s0 >= s1) return;
  const int64_t row_len = a.nb * a.E;
  uint64_t* row = a.A + 2 * t * row_len;
  for (int64_t e = threadIdx.x; e < row_len; e += blockDim.x) {
    const int64_t blk = e / a.E, j = e - blk * a.E;
    const int64_t o0 = a.concat ? blk : 0, o1 = a.concat ? blk + 1 : a.n_off;
    const bool pad_entry = j == 0, q_entry = j == a.E - 1;
    const int64_t bit = j - 1;
    uint64_t sum_lo = row[2 * e], sum_hi = row[2 * e + 1];
    for (int32_t k = s0; k < s1; ++k) {
      const int64_t i = a.spos[k];
      const int32_t d = a.doc_of[i];
      const int64_t lo = a.off[d], hi = a.off[d + 1];
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t jp = i + a.deltas[o];
        const bool outside = jp < lo || jp >= hi;
        if (pad_entry) {
          if (outside) add128(sum_lo, sum_hi, a.wpad[o]);
          continue;
        }
        if (outside) continue;
        const int64_t c = a.tok[jp];
        if (c < 0 || c >= a.V) continue;  // see segments_kernel
        if (q_entry) {
          if (a.ws != nullptr) add128(sum_lo, sum_hi, a.ws[o * a.V + c]);
        } else if ((a.mask[c * a.W + (bit >> 6)] >> (bit & 63)) & 1ull) {
          add128(sum_lo, sum_hi, a.wa[o * a.V + c]);
        }
      }
    }
    row[2 * e] = sum_lo;
    row[2 * e + 1] = sum_hi;
  }
}

// The sort compares bits [0, end_bit) of the keys: the fewest that hold every
// id in [0, V). The size query and the sort itself both use this range, as
// CUB requires (the temporary storage it needs depends on the number of
// digit passes).
int end_bit_for(int64_t V) {
  int b = 1;
  while (b < 31 && (int64_t(1) << b) < V) ++b;
  return b;
}

bool layout(int64_t n, int64_t V, WorkspaceLayout* L, std::string* error) {
  size_t cub_bytes = 0;
  cudaError_t st = cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr),
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), static_cast<int>(n), 0,
                                                   end_bit_for(V));
  if (st != cudaSuccess) {
    if (error) *error = std::string("embkern bit_cipher (CUDA): sort size query: ") + cudaGetErrorString(st);
    return false;
  }
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t here = at;
    at += align_up(bytes);
    return here;
  };
  L->pos = take(4 * n);
  L->keys = take(4 * n);
  L->spos = take(4 * n);
  L->doc_of = take(4 * n);
  L->start = take(4 * V);
  L->end = take(4 * V);
  L->cub_bytes = static_cast<int64_t>(cub_bytes);
  L->cub = take(L->cub_bytes);
  L->total = at;
  return true;
}

Status fail(cudaError_t st, const char* what, std::string* error) {
  if (error) *error = std::string("embkern bit_cipher (CUDA): ") + what + ": " + cudaGetErrorString(st);
  return Status::CudaError;
}

}  // namespace

int64_t workspace_bytes(int64_t num_tokens, int64_t vocab_size, int device, std::string* error) {
  cudaError_t st = cudaSetDevice(device);
  if (st != cudaSuccess) {
    fail(st, "cudaSetDevice", error);
    return -1;
  }
  WorkspaceLayout L;
  if (!layout(num_tokens, vocab_size, &L, error)) return -1;
  return L.total;
}

bool workspace_layout(int64_t num_tokens, int64_t vocab_size, int device, WorkspaceLayout* out,
                      std::string* error) {
  cudaError_t st = cudaSetDevice(device);
  if (st != cudaSuccess) {
    fail(st, "cudaSetDevice", error);
    return false;
  }
  return layout(num_tokens, vocab_size, out, error);
}

Status count(const Problem& p, void* workspace, int64_t workspace_bytes_given, int device, void* stream_ptr,
             std::string* error) {
  const int64_t n = p.num_tokens, V = p.vocab_size;
  if (n == 0) return Status::Ok;
  cudaError_t st = cudaSetDevice(device);
  if (st != cudaSuccess) return fail(st, "cudaSetDevice", error);
  WorkspaceLayout L;
  if (!layout(n, V, &L, error)) return Status::CudaError;
  if (workspace_bytes_given < L.total) {
    if (error) *error = "embkern bit_cipher (CUDA): workspace smaller than workspace_bytes()";
    return Status::CudaError;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);
  int32_t* pos = reinterpret_cast<int32_t*>(ws + L.pos);
  int32_t* keys = reinterpret_cast<int32_t*>(ws + L.keys);
  int32_t* spos = reinterpret_cast<int32_t*>(ws + L.spos);
  int32_t* doc_of = reinterpret_cast<int32_t*>(ws + L.doc_of);
  int32_t* start = reinterpret_cast<int32_t*>(ws + L.start);
  int32_t* end = reinterpret_cast<int32_t*>(ws + L.end);
  const unsigned grid_n = static_cast<unsigned>((n + 255) / 256);
  positions_kernel<<<grid_n, 256, 0, stream>>>(p.doc_offsets, p.num_docs, n, pos, doc_of);
  if ((st = cudaGetLastError()) != cudaSuccess) return fail(st, "positions kernel", error);
  size_t cub_bytes = static_cast<size_t>(L.cub_bytes);
  st = cub::DeviceRadixSort::SortPairs(ws + L.cub, cub_bytes, p.tokens, keys, pos, spos, static_cast<int>(n), 0,
                                       end_bit_for(V), stream);
  if (st != cudaSuccess) return fail(st, "radix sort", error);
  if ((st = cudaMemsetAsync(start, 0, 4 * V, stream)) != cudaSuccess) return fail(st, "memset", error);
  if ((st = cudaMemsetAsync(end, 0, 4 * V, stream)) != cudaSuccess) return fail(st, "memset", error);
  segments_kernel<<<grid_n, 256, 0, stream>>>(keys, n, V, start, end);
  if ((st = cudaGetLastError()) != cudaSuccess) return fail(st, "segments kernel", error);
  Args a{p.tokens, p.doc_offsets, doc_of, spos, start, end, p.code_mask, p.wa, p.ws, p.wpad, p.deltas,
         p.mask_words, p.num_offsets, V, p.bits + 2, p.concat ? p.num_offsets : 1, p.concat, p.A};
  count_kernel<<<static_cast<unsigned>(V), kThreads, 0, stream>>>(a);
  if ((st = cudaGetLastError()) != cudaSuccess) return fail(st, "count kernel", error);
  return Status::Ok;
}

}  // namespace bit_cipher_cuda
}  // namespace embkern
