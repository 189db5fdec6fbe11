// CUDA device detection used by backend selection. Safe on machines without a GPU or driver:
// DeviceCount() is then 0 and ComputeCapability() fails with a message.
#ifndef MXMOE_CUDA_DEVICE_INFO_H_
#define MXMOE_CUDA_DEVICE_INFO_H_

#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

int DeviceCount();
// major.minor of CUDA device `device_id` (cached after the first query).
mxmoe_status ComputeCapability(int device_id, int* major, int* minor);
// Whether `ptr` is device (or managed) memory on CUDA device `device_id`; host pointers and
// pointers on another device give false. Used to reject mismatched devices.
mxmoe_status PointerIsOnDevice(const void* ptr, int device_id, bool* on_device);

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_DEVICE_INFO_H_
