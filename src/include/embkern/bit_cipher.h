// Bit-cipher co-occurrence CPU kernel (docs/ops/bit_cipher.md). Torch-free:
// raw pointers to C-contiguous buffers, sizes as int64_t.
//
// The cipher enters through its rank-1 form ("Kernel view"): a context word c
// contributes psi * r_c = psi * beta_c * eta_c + psi * (1 - beta_c) * q, so
// the kernel scatters the at most popcount(c) equal entries
// wa[o][c] = psi(o, c) * beta_c / popcount(c) into the bits of c, and adds
// ws[o][c] = psi(o, c) * (1 - beta_c) to one scalar per target row and block
// (the q direction, applied once at finalisation), the last entry of the block. The pad (a position
// outside the document) adds wpad[o] to entry 0 of the block. Every table
// value x in [0, 1] arrives quantised: round_half_even(x * 2^62) as an
// integer in [0, 2^62], and A sums those integers exactly.
//
// Shapes (n_off offsets, nb = n_off in concat mode, 1 in sum mode):
//   tokens (N) int32 in [0, V)        doc_offsets (n_docs + 1) int64, CSR over N
//   bit_offsets (V + 1) int64, CSR over bit_index (nnz) int32 in [0, b)
//   wa, ws (n_off, V) uint64 <= 2^62   wpad (n_off) uint64 <= 2^62   deltas (n_off) int64
//   load (V) int64 >= 0: each type's expected share of the work (the counts)
//   A (V, nb, b + 2, 2) uint64, accumulated: unsigned 128-bit integers as (lo, hi)
//   words, per block [pad, bit 0 .. bit b-1, q weight], in quanta of 2^-62
//   (ws null: no noise, the q weight is left alone)
// Preconditions (checked at the csrc/ boundary, trusted here): the shapes
// above, ids and bit indices in range, offsets from 0 non-decreasing to N.
//
// Determinism: the sums are exact integers (2^66 addends of <= 2^62 fit in
// 128 bits), so they are the same bits for any thread count, ISA level,
// split of the corpus into chunks, and grouping of merged shards. Each
// element of A and of each further copy (`parts`) is still written by one
// thread (the threads of a copy deal its rows by `load`): no atomics.
#pragma once
#include <cstdint>

#include "embkern/cpu_isa.h"

namespace embkern {
namespace bit_cipher {

EMBKERN_ISA_BEGIN
#include "embkern/bit_cipher_api.inc"
EMBKERN_ISA_END

}  // namespace bit_cipher
}  // namespace embkern
