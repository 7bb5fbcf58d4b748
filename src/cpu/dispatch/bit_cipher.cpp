// embkern::bit_cipher entry points: forward to the active ISA level's kernel
// (src/cpu/bit_cipher.cpp, compiled once per level; see embkern/cpu_isa.h).
#include "embkern/bit_cipher.h"

namespace embkern {
namespace bit_cipher {
#define EMBKERN_API_INC "embkern/bit_cipher_api.inc"
#include "embkern/isa_levels.inc"

void count(const int32_t* tokens, int64_t n_tokens, const int64_t* doc_offsets, int64_t n_docs,
           const int64_t* bit_offsets, const int32_t* bit_index, const uint64_t* wa, const uint64_t* ws,
           const uint64_t* wpad, const int64_t* deltas, int64_t n_off, bool concat, int64_t V, int64_t bits,
           const int64_t* load, uint64_t* A, uint64_t* parts, int64_t n_parts) {
  EMBKERN_DISPATCH(count, tokens, n_tokens, doc_offsets, n_docs, bit_offsets, bit_index, wa, ws, wpad, deltas, n_off,
                   concat, V, bits, load, A, parts, n_parts);
}

void fold(uint64_t* A, uint64_t* parts, int64_t n_parts, int64_t n) { EMBKERN_DISPATCH(fold, A, parts, n_parts, n); }

void to_double(const uint64_t* A, int64_t n, double* out) { EMBKERN_DISPATCH(to_double, A, n, out); }

}  // namespace bit_cipher
}  // namespace embkern
