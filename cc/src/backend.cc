// Backend selection (see backend.h).
#include "cc/src/backend.h"

#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <deque>
#include <mutex>
#include <string>

#include "cc/base/status.h"
#include "cc/cuda/device.h"

namespace mxmoe {
namespace {

// The value of MXMOE_BACKEND ("" when unset), read once per process, at the first backend
// selection. getenv races with a setenv on another thread (ASan saw getenv crash while a thread
// changed the environment), and no lock of ours can order a caller's setenv; reading once also
// keeps one process on one backend choice.
std::atomic<const std::string*> backend_env{nullptr};

const std::string& BackendEnv() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (backend_env.load() == nullptr) ReloadBackendEnvForTesting();
  });
  return *backend_env.load();
}

// MXMOE_BACKEND parsed: AUTO when unset, empty or "auto".
mxmoe_status BackendOverride(mxmoe_backend* backend) {
  const char* env = BackendEnv().c_str();
  if (env[0] == '\0' || strcmp(env, "auto") == 0) {
    *backend = MXMOE_BACKEND_AUTO;
  } else if (strcmp(env, "cpu") == 0) {
    *backend = MXMOE_BACKEND_CPU;
  } else if (strcmp(env, "sm90") == 0) {
    *backend = MXMOE_BACKEND_SM90;
  } else if (strcmp(env, "sm100") == 0) {
    *backend = MXMOE_BACKEND_SM100;
  } else {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "MXMOE_BACKEND must be one of cpu, sm90, sm100 (or unset/auto), got '", env, "'");
  }
  return MXMOE_STATUS_OK;
}

}  // namespace

void ReloadBackendEnvForTesting() {
  // Every value read stays alive (a deque never moves its elements): another thread may still
  // be reading the previous one.
  static std::mutex mutex;
  static std::deque<std::string> values;
  std::lock_guard<std::mutex> lock(mutex);
  const char* env = getenv("MXMOE_BACKEND");
  values.emplace_back(env != nullptr ? env : "");
  backend_env.store(&values.back());
}

std::string DeviceString(const mxmoe_device& device) {
  std::string type;
  if (device.type == MXMOE_DEVICE_CPU) {
    type = "cpu";
  } else if (device.type == MXMOE_DEVICE_CUDA) {
    type = "cuda";
  } else {
    type = "device type " + std::to_string(device.type);
  }
  return type + ":" + std::to_string(device.id);
}

mxmoe_status CheckDevice(const mxmoe_device& device) {
  if (device.type == MXMOE_DEVICE_CPU) {
    if (device.id != 0) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "device.id must be 0 for a CPU device, got ",
                  device.id);
    }
    return MXMOE_STATUS_OK;
  }
  if (device.type == MXMOE_DEVICE_CUDA) {
    if (device.id < 0) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "device.id must be >= 0 for a CUDA device, got ",
                  device.id);
    }
    return MXMOE_STATUS_OK;
  }
  return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "device.type must be 1 (CPU) or 2 (CUDA), got ",
              device.type);
}

mxmoe_status ResolveBackend(const mxmoe_device& device, mxmoe_backend* backend) {
  mxmoe_backend requested = MXMOE_BACKEND_AUTO;
  MXMOE_RETURN_IF_ERROR(BackendOverride(&requested));
  const std::string where = DeviceString(device);
  if (device.type == MXMOE_DEVICE_CPU) {
    if (requested != MXMOE_BACKEND_AUTO && requested != MXMOE_BACKEND_CPU) {
      return Fail(MXMOE_STATUS_UNSUPPORTED, "MXMOE_BACKEND=", mxmoe_backend_name(requested),
                  " cannot serve CPU pointers (device ", where,
                  "); only the cpu backend reads host memory");
    }
    *backend = MXMOE_BACKEND_CPU;
    return MXMOE_STATUS_OK;
  }

  if (requested == MXMOE_BACKEND_CPU) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "MXMOE_BACKEND=cpu cannot serve CUDA pointers (device ",
                where, "); copy the tensors to the host or unset MXMOE_BACKEND");
  }
  const int count = cuda::DeviceCount();
  if (count == 0) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "device ", where,
                " is a CUDA device but no CUDA device is visible (no GPU or no driver)");
  }
  if (device.id >= count) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "device.id must be a visible CUDA device in [0, ",
                count, "), got ", device.id);
  }
  int major = 0;
  int minor = 0;
  MXMOE_RETURN_IF_ERROR(cuda::ComputeCapability(device.id, &major, &minor));
  const std::string capability = std::to_string(major) + "." + std::to_string(minor);
  const mxmoe_backend native = major == 9    ? MXMOE_BACKEND_SM90
                               : major == 10 ? MXMOE_BACKEND_SM100
                                             : MXMOE_BACKEND_AUTO;
  if (requested != MXMOE_BACKEND_AUTO && requested != native) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "MXMOE_BACKEND=", mxmoe_backend_name(requested),
                " needs a compute capability ", requested == MXMOE_BACKEND_SM90 ? "9.x" : "10.x",
                " device, but ", where, " has compute capability ", capability);
  }
  if (native == MXMOE_BACKEND_AUTO) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "no mxmoe backend for ", where,
                " with compute capability ", capability,
                " (supported: 9.x -> sm90, 10.x -> sm100)");
  }
  *backend = native;
  return MXMOE_STATUS_OK;
}

}  // namespace mxmoe
