// Backend selection: which backend serves pointers on a device, from the device type, the CUDA
// device's compute capability and the MXMOE_BACKEND environment variable (cpu|sm90|sm100; unset,
// empty or "auto" means no override). Every failure says why, naming the device, the capability
// and the variable's value.
#ifndef MXMOE_SRC_BACKEND_H_
#define MXMOE_SRC_BACKEND_H_

#include <string>

#include "mxmoe/mxmoe.h"

namespace mxmoe {

// "cpu:0", "cuda:1" (or "device type 7:0" for an invalid type), for messages.
std::string DeviceString(const mxmoe_device& device);

// INVALID_ARGUMENT unless device.type is CPU (id 0) or CUDA (id >= 0).
mxmoe_status CheckDevice(const mxmoe_device& device);

// The backend serving `device` (already checked by CheckDevice):
//   CPU  -> cpu (MXMOE_BACKEND=sm90|sm100 -> UNSUPPORTED);
//   CUDA -> sm90 for compute capability 9.x, sm100 for 10.x, else UNSUPPORTED naming it;
//           MXMOE_BACKEND=cpu -> UNSUPPORTED; =sm90|sm100 on a device of another capability ->
//           UNSUPPORTED; no visible CUDA device -> UNSUPPORTED; id beyond the device count ->
//           INVALID_ARGUMENT.
// An unknown MXMOE_BACKEND value is INVALID_ARGUMENT. MXMOE_BACKEND is read once per process, at
// the first call that selects a backend; later changes to the environment have no effect.
mxmoe_status ResolveBackend(const mxmoe_device& device, mxmoe_backend* backend);

// Re-reads MXMOE_BACKEND: for tests that try several values in one process. Racy against a
// concurrent setenv like any getenv, so never called by the library itself.
void ReloadBackendEnvForTesting();

}  // namespace mxmoe

#endif  // MXMOE_SRC_BACKEND_H_
