// The OpenMP runtime embkern._C runs on: the one torch already loaded.
//
// A wheel that links libgomp gets it grafted by auditwheel under a hashed
// name (embkern.libs/libgomp-<hash>.so.1), and torch's wheels carry their own
// (torch/lib/libgomp*.so*): two thread pools in one process, each spinning
// for a while after its regions while the other one wants the cores, and
// torch.set_num_threads not reaching the embkern kernels. So _C is linked
// without an OpenMP library; the GOMP entry points its `#pragma omp` code
// calls are defined here, hidden, and forward to the runtime found at import:
//   1. EMBKERN_OPENMP_LIB=<path or soname>, when set;
//   2. an OpenMP runtime already loaded in the process (torch's libgomp, or an
//      Intel/LLVM libiomp5/libomp, which export the same GOMP_* entry points);
//   3. the system's libgomp.so.1.
// Missing everywhere: `import embkern._C` raises ImportError saying so.
// The build checks that _C references no OpenMP symbol this file lacks.
#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"

namespace {

using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using VoidFn = void (*)();
using CriticalFn = void (*)(void**);
using LoopStartFn = bool (*)(long, long, long, long, long*, long*);
using LoopNextFn = bool (*)(long*, long*);
using IntFn = int (*)();
using SetIntFn = void (*)(int);

struct Runtime {
  ParallelFn parallel = nullptr;
  VoidFn barrier = nullptr, loop_end = nullptr;
  CriticalFn critical_start = nullptr, critical_end = nullptr;
  LoopStartFn dyn_start = nullptr;
  LoopNextFn dyn_next = nullptr;
  IntFn max_threads = nullptr, num_procs = nullptr, num_threads = nullptr, thread_num = nullptr;
  SetIntFn set_threads = nullptr;
  std::string path;
};
Runtime rt;

int find_loaded(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp5", 8) == 0 ||
      std::strncmp(base, "libomp.", 7) == 0) {
    *static_cast<std::string*>(out) = name;
    return 1;  // the first one loaded: torch's, as torch is imported before _C
  }
  return 0;
}

template <typename F>
bool sym(void* h, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(dlsym(h, name));
  if (!*out) *missing += std::string(missing->empty() ? "" : ", ") + name;
  return *out != nullptr;
}

}  // namespace

namespace embkern {

std::string openmp_runtime_path() { return rt.path; }

void load_openmp_runtime() {
  std::string path;
  void* h = nullptr;
  const char* forced = std::getenv("EMBKERN_OPENMP_LIB");
  if (forced && *forced) {
    h = dlopen(forced, RTLD_NOW | RTLD_LOCAL);
    if (!h)
      throw py::import_error(std::string("embkern._C: EMBKERN_OPENMP_LIB=") + forced +
                             " could not be loaded: " + dlerror());
    path = forced;
  } else {
    dl_iterate_phdr(find_loaded, &path);
    if (!path.empty()) h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!h) {
      path = "libgomp.so.1";
      h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    }
    if (!h)
      throw py::import_error(
          "embkern._C: no OpenMP runtime: none is loaded (import torch first; its wheels carry libgomp) and "
          "libgomp.so.1 is not installed; set EMBKERN_OPENMP_LIB to a libgomp/libiomp5 path");
  }
  std::string missing;
  sym(h, "GOMP_parallel", &rt.parallel, &missing);
  sym(h, "GOMP_barrier", &rt.barrier, &missing);
  sym(h, "GOMP_loop_end", &rt.loop_end, &missing);
  sym(h, "GOMP_critical_name_start", &rt.critical_start, &missing);
  sym(h, "GOMP_critical_name_end", &rt.critical_end, &missing);
  sym(h, "GOMP_loop_nonmonotonic_dynamic_start", &rt.dyn_start, &missing);
  sym(h, "GOMP_loop_nonmonotonic_dynamic_next", &rt.dyn_next, &missing);
  sym(h, "omp_get_max_threads", &rt.max_threads, &missing);
  sym(h, "omp_get_num_procs", &rt.num_procs, &missing);
  sym(h, "omp_get_num_threads", &rt.num_threads, &missing);
  sym(h, "omp_get_thread_num", &rt.thread_num, &missing);
  sym(h, "omp_set_num_threads", &rt.set_threads, &missing);
  if (!missing.empty())
    throw py::import_error("embkern._C: the OpenMP runtime " + path + " lacks " + missing +
                           " (GCC >= 6 libgomp or a GOMP-compatible libiomp5/libomp is needed)");
  rt.path = path;
}

}  // namespace embkern

// The entry points GCC's -fopenmp code generation calls (libgomp's ABI).
// Hidden: they serve this module only and never interpose on anyone else's.
#define EMBKERN_OMP_ENTRY extern "C" __attribute__((visibility("hidden")))

EMBKERN_OMP_ENTRY void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  rt.parallel(fn, data, num_threads, flags);
}
EMBKERN_OMP_ENTRY void GOMP_barrier() { rt.barrier(); }
EMBKERN_OMP_ENTRY void GOMP_loop_end() { rt.loop_end(); }
EMBKERN_OMP_ENTRY void GOMP_critical_name_start(void** p) { rt.critical_start(p); }
EMBKERN_OMP_ENTRY void GOMP_critical_name_end(void** p) { rt.critical_end(p); }
EMBKERN_OMP_ENTRY bool GOMP_loop_nonmonotonic_dynamic_start(long start, long end, long incr, long chunk,
                                                            long* istart, long* iend) {
  return rt.dyn_start(start, end, incr, chunk, istart, iend);
}
EMBKERN_OMP_ENTRY bool GOMP_loop_nonmonotonic_dynamic_next(long* istart, long* iend) {
  return rt.dyn_next(istart, iend);
}
EMBKERN_OMP_ENTRY int omp_get_max_threads() { return rt.max_threads(); }
EMBKERN_OMP_ENTRY int omp_get_num_procs() { return rt.num_procs(); }
EMBKERN_OMP_ENTRY int omp_get_num_threads() { return rt.num_threads(); }
EMBKERN_OMP_ENTRY int omp_get_thread_num() { return rt.thread_num(); }
EMBKERN_OMP_ENTRY void omp_set_num_threads(int n) { rt.set_threads(n); }
