// Saturating size arithmetic, one definition for the bindings' size checks
// (csrc/common.h) and the kernels' scratch-memory estimates (`scratch_bytes`,
// checked against the memory budget before a kernel runs). Operands are
// element counts and byte sizes, >= 0; a negative operand can only be an
// earlier overflow, so it saturates like one: the result is then INT64_MAX,
// which no budget admits, never a wrapped small number that would let an
// impossible allocation through.
//
// Internal linkage (an anonymous namespace): the objects that include this are
// compiled once per ISA level, and each keeps its own copy.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace embkern {
namespace {

inline int64_t sat_mul(int64_t a, int64_t b) {
  int64_t r;
  return (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) ? INT64_MAX : r;
}

inline int64_t sat_add(int64_t a, int64_t b) {
  int64_t r;
  return (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) ? INT64_MAX : r;
}

inline int64_t sat_sum(std::initializer_list<int64_t> v) {
  int64_t s = 0;
  for (int64_t x : v) s = sat_add(s, x);
  return s;
}

}  // namespace
}  // namespace embkern
