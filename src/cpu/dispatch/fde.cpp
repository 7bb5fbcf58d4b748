// embkern::fde entry points: forward to the active ISA level's kernels
// (src/cpu/fde.cpp, compiled once per level; see embkern/cpu_isa.h). Every
// level gives the same bits (the file is built with -ffp-contract=off and its
// sums have a fixed order), so a Prepared built at one level encodes at any.
#include "embkern/fde.h"

namespace embkern {
namespace fde {
#define EMBKERN_API_INC "embkern/fde_api.inc"
#include "embkern/isa_levels.inc"

void simhash_table(uint32_t seed, int64_t d, int k, int64_t R, float* out) {
  EMBKERN_DISPATCH(simhash_table, seed, d, k, R, out);
}
void ams_table(uint32_t seed, int64_t d, int64_t dp, int64_t R, int32_t* index, float* sign) {
  EMBKERN_DISPATCH(ams_table, seed, d, dp, R, index, sign);
}
void count_sketch_table(uint32_t seed, int64_t length, int64_t D, int32_t* bucket, float* sign) {
  EMBKERN_DISPATCH(count_sketch_table, seed, length, D, bucket, sign);
}
void count_sketch_csr(const int32_t* bucket, int64_t length, int64_t D, int64_t* offsets, int64_t* members) {
  EMBKERN_DISPATCH(count_sketch_csr, bucket, length, D, offsets, members);
}
void prepare(Prepared* prep, const float* simhash, const int32_t* ams_index, const float* ams_sign,
             const int32_t* cs_bucket, const float* cs_sign) {
  EMBKERN_DISPATCH(prepare, prep, simhash, ams_index, ams_sign, cs_bucket, cs_sign);
}
int64_t row_length(const Prepared& p) { return EMBKERN_ISA_BASE::row_length(p); }
int64_t output_length(const Prepared& p) { return EMBKERN_ISA_BASE::output_length(p); }
// Sizes: plain arithmetic, the same at every level.
int64_t prepare_bytes(const Prepared& p) { return EMBKERN_ISA_BASE::prepare_bytes(p); }
int64_t scratch_bytes(const Prepared& p, int64_t n) { return EMBKERN_ISA_BASE::scratch_bytes(p, n); }
int64_t encode_scratch_bytes(const Prepared& p, const int64_t* offsets, int64_t B) {
  return EMBKERN_ISA_BASE::encode_scratch_bytes(p, offsets, B);
}
int64_t encode(const Prepared& prep, const float* points, const int64_t* offsets, int64_t B, float* out) {
  EMBKERN_DISPATCH(encode, prep, points, offsets, B, out);
}
int64_t first_nonfinite(const float* x, int64_t count) { EMBKERN_DISPATCH(first_nonfinite, x, count); }

}  // namespace fde
}  // namespace embkern
