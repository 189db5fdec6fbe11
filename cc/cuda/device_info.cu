// CUDA device detection for backend selection (compiled for sm_90a and sm_100a like every .cu).
#include <cuda_runtime.h>

#include <mutex>

#include "cc/cuda/cuda_check.h"
#include "cc/cuda/device_info.h"

namespace mxmoe {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

struct CapabilityCache {
  std::once_flag once[kMaxDevices];
  int major[kMaxDevices] = {};
  int minor[kMaxDevices] = {};
  cudaError_t error[kMaxDevices] = {};
};

CapabilityCache& Cache() {
  static CapabilityCache cache;
  return cache;
}

}  // namespace

int DeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

mxmoe_status ComputeCapability(int device_id, int* major, int* minor) {
  const int count = DeviceCount();
  if (device_id < 0 || device_id >= count || device_id >= kMaxDevices) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "device.id must be a visible CUDA device in [0, ",
                count, "), got ", device_id);
  }
  CapabilityCache& cache = Cache();
  std::call_once(cache.once[device_id], [&] {
    cudaError_t err = cudaDeviceGetAttribute(&cache.major[device_id],
                                             cudaDevAttrComputeCapabilityMajor, device_id);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&cache.minor[device_id], cudaDevAttrComputeCapabilityMinor,
                                   device_id);
    }
    cache.error[device_id] = err;
  });
  MXMOE_CUDA_RETURN_IF_ERROR(cache.error[device_id]);
  *major = cache.major[device_id];
  *minor = cache.minor[device_id];
  return MXMOE_STATUS_OK;
}

mxmoe_status PointerIsOnDevice(const void* ptr, int device_id, bool* on_device) {
  cudaPointerAttributes attributes;
  const cudaError_t err = cudaPointerGetAttributes(&attributes, ptr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    *on_device = false;
    return MXMOE_STATUS_OK;
  }
  *on_device = (attributes.type == cudaMemoryTypeDevice ||
                attributes.type == cudaMemoryTypeManaged) &&
               attributes.device == device_id;
  return MXMOE_STATUS_OK;
}

}  // namespace cuda
}  // namespace mxmoe
