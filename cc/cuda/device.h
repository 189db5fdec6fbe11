// Host-side CUDA device helpers shared by backend selection, validation and every CUDA entry
// point: device count, compute capability and multiprocessor count (each queried once per device
// and cached), pointer placement, a scoped "make args.device current", and the alignment check.
// Free of CUDA headers, so plain C++ (cc/src) includes it. Safe on machines without a GPU or
// driver: DeviceCount() is then 0 and the per-device queries fail with a message.
#ifndef MXMOE_CUDA_DEVICE_H_
#define MXMOE_CUDA_DEVICE_H_

#include <stddef.h>

#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

int DeviceCount();
// major.minor of CUDA device `device_id` (cached after the first query).
mxmoe_status ComputeCapability(int device_id, int* major, int* minor);
// Streaming multiprocessors of CUDA device `device_id` (cached after the first query).
mxmoe_status MultiprocessorCount(int device_id, int* count);
// Whether `ptr` is device (or managed) memory on CUDA device `device_id`; host pointers and
// pointers on another device give false. Used to reject mismatched devices.
mxmoe_status PointerIsOnDevice(const void* ptr, int device_id, bool* on_device);

// Makes a device current for the scope of a call and restores the caller's device afterwards
// (a stream belongs to one device; a launch from another fails or runs on the wrong GPU):
//   ScopedDevice scoped;
//   MXMOE_RETURN_IF_ERROR(scoped.Enter(args.device.id));
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice();
  mxmoe_status Enter(int device_id);

 private:
  int previous_ = -1;  // the caller's device when Enter switched away from it, else -1
};

// MISALIGNED unless `ptr` is a multiple of `alignment` bytes; the message names the operation,
// the argument and the address.
mxmoe_status CheckAligned(const void* ptr, size_t alignment, const char* op, const char* name);

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_DEVICE_H_
