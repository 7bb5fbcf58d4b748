#pragma once
namespace embkern {
// Space-separated instruction-set extensions the CPU kernels were compiled for.
const char* compiled_isa();
}  // namespace embkern
