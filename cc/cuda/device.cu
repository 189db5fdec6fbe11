// Host-side CUDA device helpers (see device.h). Host code only, compiled for sm_90a and sm_100a
// like every .cu that is not architecture-specific.
#include "cc/cuda/device.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include <mutex>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"

namespace mxmoe {
namespace cuda {
namespace {

constexpr int kMaxDevices = 64;

// One attribute-query result per device, filled once.
struct AttributeCache {
  std::once_flag once[kMaxDevices];
  int value[kMaxDevices][2] = {};
  cudaError_t error[kMaxDevices] = {};
};

mxmoe_status CheckDeviceId(int device_id) {
  const int count = DeviceCount();
  if (device_id < 0 || device_id >= count || device_id >= kMaxDevices) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "device.id must be a visible CUDA device in [0, ",
                count, "), got ", device_id);
  }
  return MXMOE_STATUS_OK;
}

// Queries `first` (and `second`, unless it equals `first`) of device_id once; later calls read
// the cache.
mxmoe_status CachedAttributes(AttributeCache& cache, int device_id, cudaDeviceAttr first,
                              cudaDeviceAttr second, int* a, int* b) {
  MXMOE_RETURN_IF_ERROR(CheckDeviceId(device_id));
  std::call_once(cache.once[device_id], [&] {
    cudaError_t err = cudaDeviceGetAttribute(&cache.value[device_id][0], first, device_id);
    if (err == cudaSuccess && second != first) {
      err = cudaDeviceGetAttribute(&cache.value[device_id][1], second, device_id);
    }
    if (err != cudaSuccess) cudaGetLastError();  // a failed query must not surface later
    cache.error[device_id] = err;
  });
  MXMOE_CUDA_RETURN_IF_ERROR(cache.error[device_id]);
  *a = cache.value[device_id][0];
  if (b != nullptr) *b = cache.value[device_id][1];
  return MXMOE_STATUS_OK;
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
  static AttributeCache cache;
  return CachedAttributes(cache, device_id, cudaDevAttrComputeCapabilityMajor,
                          cudaDevAttrComputeCapabilityMinor, major, minor);
}

mxmoe_status MultiprocessorCount(int device_id, int* count) {
  static AttributeCache cache;
  return CachedAttributes(cache, device_id, cudaDevAttrMultiProcessorCount,
                          cudaDevAttrMultiProcessorCount, count, nullptr);
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

ScopedDevice::~ScopedDevice() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

mxmoe_status ScopedDevice::Enter(int device_id) {
  int current = 0;
  MXMOE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  if (current != device_id) {
    MXMOE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_id));
    if (previous_ < 0) previous_ = current;
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckAligned(const void* ptr, size_t alignment, const char* op, const char* name) {
  if (reinterpret_cast<uintptr_t>(ptr) % alignment != 0) {
    return Fail(MXMOE_STATUS_MISALIGNED, op, ": ", name, " must be ", alignment,
                "-byte aligned for the CUDA kernel, got address ",
                static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(ptr)));
  }
  return MXMOE_STATUS_OK;
}

}  // namespace cuda
}  // namespace mxmoe
