#include <cuda_runtime.h>

#include "embkern/cuda_device.h"

namespace embkern {
namespace cuda {

int device_count(std::string* error) {
  int n = 0;
  cudaError_t st = cudaGetDeviceCount(&n);
  if (st != cudaSuccess) {
    if (error) *error = cudaGetErrorString(st);
    cudaGetLastError();  // clear the sticky error so later queries start clean
    return 0;
  }
  return n;
}

bool device_info(int index, DeviceInfo* out, std::string* error) {
  cudaDeviceProp p;
  cudaError_t st = cudaGetDeviceProperties(&p, index);
  if (st != cudaSuccess) {
    if (error) *error = cudaGetErrorString(st);
    cudaGetLastError();
    return false;
  }
  out->index = index;
  out->name = p.name;
  out->major = p.major;
  out->minor = p.minor;
  out->multiprocessors = p.multiProcessorCount;
  out->total_memory = p.totalGlobalMem;
  return true;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace cuda
}  // namespace embkern
