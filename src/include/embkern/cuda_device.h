// Device queries for the CUDA extension. Torch-free; never throws: errors
// come back as cudaGetErrorString text so a GPU-less machine imports cleanly.
#pragma once
#include <string>

namespace embkern {
namespace cuda {

struct DeviceInfo {
  int index = -1;
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  size_t total_memory = 0;
};

// Number of visible devices; 0 and a reason in *error when the driver or a
// device is missing.
int device_count(std::string* error);
// Properties of one device; false and a reason in *error on failure.
bool device_info(int index, DeviceInfo* out, std::string* error);
// CUDA runtime version this module was built against, e.g. 13000.
int runtime_version();

}  // namespace cuda
}  // namespace embkern
