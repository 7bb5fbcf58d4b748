// The FDE configuration checks both FDE bindings run (csrc/fde.cpp for the
// CPU encoder and the tables, csrc/fde_cuda.cpp for the GPU encoder): one
// bound and one wording for each size. Buffer, CSR and size helpers are in
// common.h.
#pragma once
#include <cstdint>
#include <string>

#include "common.h"
#include "embkern/fde.h"

namespace embkern {
namespace fde_checks {

// k: the number of SimHash hyperplanes, 2^k partitions.
inline void check_simhash_k(int64_t k) {
  if (k < 0 || k > fde::kMaxSimhash)
    value_error("num_simhash_projections: expected 0 <= k <= " + std::to_string(fde::kMaxSimhash) + ", got " +
                std::to_string(k));
}

inline void check_repetitions(int64_t R, int64_t max_R = INT64_MAX) {
  if (R < 1 || R > max_R)
    value_error("num_repetitions: expected " +
                (max_R == INT64_MAX ? std::string(">= 1") : "1 <= R <= " + std::to_string(max_R)) + ", got " +
                std::to_string(R));
}

// d_p and D index int32 tables: at most `max` (fde::kMaxProjection = 2^31 - 1
// on the CPU).
inline void check_projection(int64_t v, const char* name, int64_t max = fde::kMaxProjection) {
  if (v <= 0 || v > max)
    value_error(std::string(name) + ": expected in [1, " +
                (max == fde::kMaxProjection ? std::string("2^31 - 1 = ") : std::string()) + std::to_string(max) +
                "] (indices are stored as int32), got " + std::to_string(v));
}

// d: AMS term indices are int32 too, and identity means d_p = d.
inline void check_dimension(int64_t d, int64_t max = fde::kMaxProjection) {
  if (d <= 0 || d > max)
    value_error("dimension: expected in [1, " +
                (max == fde::kMaxProjection ? std::string("2^31 - 1 = ") : std::string()) + std::to_string(max) +
                "], got " + std::to_string(d));
}

inline void check_fill(bool fill, bool is_document) {
  if (fill && !is_document) value_error("fill_empty_partitions: query encodings do not support fill");
}

// The identity projection (no AMS tables) keeps d_p == d.
inline void check_identity(int64_t dp, int64_t d, const char* name) {
  if (dp != d)
    value_error(std::string(name) + ": the identity projection needs d_p == d = " + std::to_string(d) + ", got " +
                std::to_string(dp));
}

}  // namespace fde_checks
}  // namespace embkern
