// Bit-cipher co-occurrence counting on the GPU (docs/ops/bit_cipher.md,
// "CUDA"). Torch-free: raw device pointers to C-contiguous arrays, sizes as
// int64_t; the caller owns the stream, the accumulator and the workspace (the
// Python layer allocates both through torch's caching allocator).
//
// Shapes (n_off offsets, nb = n_off in concat mode else 1, E = b + 2, W = ceil(b / 64)):
//   tokens (N) int32 in [0, V)          doc_offsets (n_docs + 1) int64 CSR over N
//   code_mask (V, W) uint64: bit j of type c is bit j % 64 of word j / 64
//   wa, ws (n_off, V) uint64 quanta <= 2^62 (ws null: no noise)   wpad (n_off) uint64 quanta
//   deltas (n_off) int64, |delta| < 2^40
//   A (V, nb, E, 2) uint64, accumulated: unsigned 128-bit integers as (lo, hi)
//   words, per block [pad, bit 0 .. bit b-1, q weight], in quanta of 2^-62
//
// The same sums as the CPU kernel (src/cpu/bit_cipher.cpp), bit for bit, by
// construction: both add the same integer table values exactly, and integer
// addition does not depend on order. The positions are still stable-sorted
// by type (sort-and-segment: a radix sort of (type, position) pairs) and one
// thread owns each element of A, keeping its 128-bit sum in two registers:
// no atomics, no dependence on the launch configuration.
#pragma once
#include <cstdint>
#include <string>

namespace embkern {
namespace bit_cipher_cuda {

// Positions of one call are int32 (the sort's values): N < 2^31.
constexpr int64_t kMaxTokens = 0x7fffffffLL;

struct Problem {
  const int32_t* tokens = nullptr;
  int64_t num_tokens = 0;  // N
  const int64_t* doc_offsets = nullptr;
  int64_t num_docs = 0;
  const uint64_t* code_mask = nullptr;
  int64_t mask_words = 0;  // W
  const uint64_t* wa = nullptr;
  const uint64_t* ws = nullptr;
  const uint64_t* wpad = nullptr;
  const int64_t* deltas = nullptr;
  int64_t num_offsets = 0;  // n_off
  bool concat = false;
  int64_t vocab_size = 0;  // V
  int64_t bits = 0;        // b
  uint64_t* A = nullptr;
};

// Preconditions (checked at the csrc/ boundary): 0 <= N <= kMaxTokens,
// V >= 1, b >= 1, W == ceil(b / 64), n_off >= 1, every id in [0, V), the
// offsets a CSR over N, the buffers of the shapes above.

enum class Status : int { Ok = 0, CudaError = 2 };

// Bytes of device workspace count() needs (a host-side size query).
int64_t workspace_bytes(int64_t num_tokens, int64_t vocab_size, int device, std::string* error);

// Where count() keeps its intermediate arrays in the workspace: byte offsets
// from the workspace's start, each a multiple of 256. pos, keys, spos and
// doc_of hold N int32 each (the sort's input values, its output keys and
// values, the document of each position), start and end V int32 each (the
// [start, end) run of each type in keys; 0, 0 for an absent type), cub the
// sort's temporary storage (cub_bytes). total is workspace_bytes(). Once a
// count() has finished on its stream they hold that call's stages, which is
// how a test reads them back.
struct WorkspaceLayout {
  int64_t pos = 0, keys = 0, spos = 0, doc_of = 0, start = 0, end = 0, cub = 0, cub_bytes = 0, total = 0;
};

// The layout count() uses for N tokens and V types on `device` (a host-side
// query, as workspace_bytes). False, with cudaGetErrorString text in *error,
// when the CUDA runtime fails.
bool workspace_layout(int64_t num_tokens, int64_t vocab_size, int device, WorkspaceLayout* layout,
                      std::string* error);

// Enqueue the counting of one chunk on `stream` (cudaStream_t; 0 = legacy
// default) of `device`. Asynchronous. Launch failures come back as
// Status::CudaError with cudaGetErrorString text; nothing aborts.
Status count(const Problem& p, void* workspace, int64_t workspace_bytes, int device, void* stream,
             std::string* error);

}  // namespace bit_cipher_cuda
}  // namespace embkern
