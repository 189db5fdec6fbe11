// The extern "C" entry points of mxmoe.h: each clears the thread's last error, validates its
// arguments completely (validate.h, each kernel's limits included), returns OK at once when
// there is no output byte to write (WritesNothing), chooses the backend and calls
// mxmoe::cpu::X or, with args.device current, mxmoe::cuda::X. No C++ exception crosses this
// boundary: anything thrown below becomes MXMOE_STATUS_INTERNAL with a message. Outputs
// (including *bytes of the size queries) are written only after validation passed.
#include <new>
#include <stdexcept>

#include "cc/base/status.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cuda/device.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/quantize.h"
#include "cc/src/backend.h"
#include "cc/src/validate.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace {

#define MXMOE_STRINGIFY_(x) #x
#define MXMOE_STRINGIFY(x) MXMOE_STRINGIFY_(x)

// Turns the exception in flight into INTERNAL with a message. Building the message allocates;
// if even that fails, INTERNAL comes back without one rather than an exception escaping.
mxmoe_status InternalError(const char* op) noexcept {
  try {
    try {
      throw;
    } catch (const std::bad_alloc&) {
      return Fail(MXMOE_STATUS_INTERNAL, op, ": out of host memory");
    } catch (const std::exception& e) {
      return Fail(MXMOE_STATUS_INTERNAL, op, ": internal error: ", e.what());
    } catch (...) {
      return Fail(MXMOE_STATUS_INTERNAL, op, ": unknown internal error");
    }
  } catch (...) {
    return MXMOE_STATUS_INTERNAL;
  }
}

// Runs one entry point's body with the error state cleared and exceptions contained.
template <typename Body>
mxmoe_status Guarded(const char* op, const Body& body) noexcept {
  try {
    ClearLastError();
    const mxmoe_status status = body();
    // Every failure must explain itself; a silent one is a bug below this layer.
    if (status != MXMOE_STATUS_OK && LastError()[0] == '\0') {
      return Fail(status, op, " failed with ", mxmoe_status_string(status), " and no message");
    }
    return status;
  } catch (...) {
    return InternalError(op);
  }
}

mxmoe_status NullArgs() {
  return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "args must not be NULL");
}

mxmoe_status NullBytes() {
  return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "bytes (the size output) must not be NULL");
}

// Every CUDA entry point runs with args.device current, restored on return: a stream belongs to
// one device, and a launch from another fails or lands on the wrong GPU. The one place that
// switches devices; cuda::X run on the current device.
mxmoe_status EnterDevice(mxmoe_backend backend, const mxmoe_device& device,
                         cuda::ScopedDevice* scoped) {
  if (backend == MXMOE_BACKEND_CPU) return MXMOE_STATUS_OK;
  return scoped->Enter(device.id);
}

}  // namespace
}  // namespace mxmoe

using mxmoe::Fail;
using mxmoe::Guarded;
using mxmoe::ValidationMode;

extern "C" {

const char* mxmoe_last_error(void) { return mxmoe::LastError(); }

const char* mxmoe_status_string(mxmoe_status status) {
  switch (status) {
    case MXMOE_STATUS_OK:
      return "OK";
    case MXMOE_STATUS_INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case MXMOE_STATUS_UNSUPPORTED:
      return "UNSUPPORTED";
    case MXMOE_STATUS_MISALIGNED:
      return "MISALIGNED";
    case MXMOE_STATUS_WORKSPACE_TOO_SMALL:
      return "WORKSPACE_TOO_SMALL";
    case MXMOE_STATUS_CUDA_ERROR:
      return "CUDA_ERROR";
    case MXMOE_STATUS_INTERNAL:
      return "INTERNAL";
  }
  return "UNKNOWN_STATUS";
}

const char* mxmoe_version(void) {
  return MXMOE_STRINGIFY(MXMOE_VERSION_MAJOR) "." MXMOE_STRINGIFY(
      MXMOE_VERSION_MINOR) "." MXMOE_STRINGIFY(MXMOE_VERSION_PATCH);
}

const char* mxmoe_backend_name(mxmoe_backend backend) {
  switch (backend) {
    case MXMOE_BACKEND_AUTO:
      return "auto";
    case MXMOE_BACKEND_CPU:
      return "cpu";
    case MXMOE_BACKEND_SM90:
      return "sm90";
    case MXMOE_BACKEND_SM100:
      return "sm100";
  }
  return "unknown";
}

mxmoe_status mxmoe_backend_for_device(mxmoe_device device, mxmoe_backend* backend) {
  return Guarded("mxmoe_backend_for_device", [&] {
    if (backend == nullptr) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "backend (the output) must not be NULL");
    }
    MXMOE_RETURN_IF_ERROR(mxmoe::CheckDevice(device));
    mxmoe_backend chosen;
    MXMOE_RETURN_IF_ERROR(mxmoe::ResolveBackend(device, &chosen));
    *backend = chosen;
    return MXMOE_STATUS_OK;
  });
}

int32_t mxmoe_cuda_device_count(void) {
  try {
    return mxmoe::cuda::DeviceCount();
  } catch (...) {
    return 0;
  }
}

mxmoe_status mxmoe_quantize(const mxmoe_quantize_args* args, void* stream) {
  return Guarded("mxmoe_quantize", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateQuantize(*args, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::Quantize(*args)
                                        : mxmoe::cuda::Quantize(*args, stream);
  });
}

mxmoe_status mxmoe_dequantize(const mxmoe_dequantize_args* args, void* stream) {
  return Guarded("mxmoe_dequantize", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateDequantize(*args, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::Dequantize(*args)
                                        : mxmoe::cuda::Dequantize(*args, stream);
  });
}

mxmoe_status mxmoe_experts_quantize(const mxmoe_experts_quantize_args* args, void* stream) {
  return Guarded("mxmoe_experts_quantize", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateExpertsQuantize(*args, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::ExpertsQuantize(*args)
                                        : mxmoe::cuda::ExpertsQuantize(*args, stream);
  });
}

mxmoe_status mxmoe_silu_mul_experts_quantize(const mxmoe_silu_mul_experts_quantize_args* args,
                                             void* stream) {
  return Guarded("mxmoe_silu_mul_experts_quantize", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateSiluMulExpertsQuantize(*args, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::SiluMulExpertsQuantize(*args)
                                        : mxmoe::cuda::SiluMulExpertsQuantize(*args, stream);
  });
}

mxmoe_status mxmoe_swizzle_scales(const mxmoe_swizzle_scales_args* args, void* stream) {
  return Guarded("mxmoe_swizzle_scales", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateSwizzleScales(*args, /*unswizzle=*/false, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::SwizzleScales(*args)
                                        : mxmoe::cuda::SwizzleScales(*args, stream);
  });
}

mxmoe_status mxmoe_unswizzle_scales(const mxmoe_swizzle_scales_args* args, void* stream) {
  return Guarded("mxmoe_unswizzle_scales", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateSwizzleScales(*args, /*unswizzle=*/true, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::UnswizzleScales(*args)
                                        : mxmoe::cuda::UnswizzleScales(*args, stream);
  });
}

mxmoe_status mxmoe_quantize_weights(const mxmoe_quantize_weights_args* args, void* stream) {
  return Guarded("mxmoe_quantize_weights", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateQuantizeWeights(*args, &backend));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    return backend == MXMOE_BACKEND_CPU ? mxmoe::cpu::QuantizeWeights(*args)
                                        : mxmoe::cuda::QuantizeWeights(*args, stream);
  });
}

}  // extern "C"

namespace mxmoe {
namespace {

mxmoe_status GroupedGemmWorkspaceSizeFor(const mxmoe_grouped_gemm_args& args,
                                         mxmoe_backend backend, size_t* bytes) {
  switch (backend) {
    case MXMOE_BACKEND_CPU:
      *bytes = cpu::GroupedGemmWorkspaceSize(args);
      return MXMOE_STATUS_OK;
    case MXMOE_BACKEND_SM90:
      return cuda::GroupedGemmSm90WorkspaceSize(args, bytes);
    case MXMOE_BACKEND_SM100:
      return cuda::GroupedGemmSm100WorkspaceSize(args, bytes);
    default:
      return Fail(MXMOE_STATUS_INTERNAL, "no grouped_gemm workspace size for backend ", backend);
  }
}

mxmoe_status MoeForwardWorkspaceSizeFor(const mxmoe_moe_forward_args& args,
                                        mxmoe_backend backend, size_t* bytes) {
  if (backend == MXMOE_BACKEND_CPU) return cpu::MoeForwardWorkspaceSize(args, bytes);
  return cuda::MoeForwardWorkspaceSize(args, backend, bytes);
}

}  // namespace
}  // namespace mxmoe

extern "C" {

mxmoe_status mxmoe_prepare_weights_size(const mxmoe_prepare_weights_args* args, size_t* bytes) {
  return Guarded("mxmoe_prepare_weights_size", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    if (bytes == nullptr) return mxmoe::NullBytes();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(
        mxmoe::ValidatePrepareWeights(*args, ValidationMode::kShapesOnly, &backend));
    size_t size = 0;
    MXMOE_RETURN_IF_ERROR(mxmoe::PrepareWeightsSizeFor(*args, backend, &size));
    *bytes = size;
    return MXMOE_STATUS_OK;
  });
}

mxmoe_status mxmoe_prepare_weights(const mxmoe_prepare_weights_args* args, void* stream) {
  return Guarded("mxmoe_prepare_weights", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidatePrepareWeights(*args, ValidationMode::kFull, &backend));
    size_t size = 0;
    MXMOE_RETURN_IF_ERROR(mxmoe::PrepareWeightsSizeFor(*args, backend, &size));
    MXMOE_RETURN_IF_ERROR(mxmoe::CheckPreparedBuffer(*args, size));
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    switch (backend) {
      case MXMOE_BACKEND_CPU:
        return mxmoe::cpu::PrepareWeights(*args);
      case MXMOE_BACKEND_SM90:
        return mxmoe::cuda::PrepareWeightsSm90(*args, stream);
      default:
        return mxmoe::cuda::PrepareWeightsSm100(*args, stream);
    }
  });
}

mxmoe_status mxmoe_grouped_gemm_workspace_size(const mxmoe_grouped_gemm_args* args,
                                               size_t* bytes) {
  return Guarded("mxmoe_grouped_gemm_workspace_size", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    if (bytes == nullptr) return mxmoe::NullBytes();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(
        mxmoe::ValidateGroupedGemm(*args, ValidationMode::kShapesOnly, &backend));
    size_t size = 0;
    MXMOE_RETURN_IF_ERROR(mxmoe::GroupedGemmWorkspaceSizeFor(*args, backend, &size));
    *bytes = size;
    return MXMOE_STATUS_OK;
  });
}

mxmoe_status mxmoe_grouped_gemm(const mxmoe_grouped_gemm_args* args, void* workspace,
                                size_t workspace_bytes, void* stream) {
  return Guarded("mxmoe_grouped_gemm", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateGroupedGemm(*args, ValidationMode::kFull, &backend));
    size_t needed = 0;
    MXMOE_RETURN_IF_ERROR(mxmoe::GroupedGemmWorkspaceSizeFor(*args, backend, &needed));
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateWorkspace("mxmoe_grouped_gemm_workspace_size", workspace,
                                                   workspace_bytes, needed, backend,
                                                   args->device));
    MXMOE_RETURN_IF_ERROR(mxmoe::CheckWorkspaceOverlap(*args, workspace, needed));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    switch (backend) {
      case MXMOE_BACKEND_CPU:
        return mxmoe::cpu::GroupedGemm(*args);
      case MXMOE_BACKEND_SM90:
        return mxmoe::cuda::GroupedGemmSm90(*args, workspace, workspace_bytes, stream);
      default:
        return mxmoe::cuda::GroupedGemmSm100(*args, workspace, workspace_bytes, stream);
    }
  });
}

mxmoe_status mxmoe_moe_forward_workspace_size(const mxmoe_moe_forward_args* args, size_t* bytes) {
  return Guarded("mxmoe_moe_forward_workspace_size", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    if (bytes == nullptr) return mxmoe::NullBytes();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(
        mxmoe::ValidateMoeForward(*args, ValidationMode::kShapesOnly, &backend));
    size_t size = 0;
    MXMOE_RETURN_IF_ERROR(mxmoe::MoeForwardWorkspaceSizeFor(*args, backend, &size));
    *bytes = size;
    return MXMOE_STATUS_OK;
  });
}

mxmoe_status mxmoe_moe_forward(const mxmoe_moe_forward_args* args, void* workspace,
                               size_t workspace_bytes, void* stream) {
  return Guarded("mxmoe_moe_forward", [&] {
    if (args == nullptr) return mxmoe::NullArgs();
    mxmoe_backend backend = MXMOE_BACKEND_AUTO;
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateMoeForward(*args, ValidationMode::kFull, &backend));
    size_t needed = 0;
    MXMOE_RETURN_IF_ERROR(mxmoe::MoeForwardWorkspaceSizeFor(*args, backend, &needed));
    MXMOE_RETURN_IF_ERROR(mxmoe::ValidateWorkspace("mxmoe_moe_forward_workspace_size", workspace,
                                                   workspace_bytes, needed, backend,
                                                   args->device));
    MXMOE_RETURN_IF_ERROR(mxmoe::CheckWorkspaceOverlap(*args, workspace, needed));
    if (mxmoe::WritesNothing(*args)) return MXMOE_STATUS_OK;
    mxmoe::cuda::ScopedDevice scoped;
    MXMOE_RETURN_IF_ERROR(mxmoe::EnterDevice(backend, args->device, &scoped));
    if (backend == MXMOE_BACKEND_CPU) {
      return mxmoe::cpu::MoeForward(*args, workspace, workspace_bytes);
    }
    return mxmoe::cuda::MoeForward(*args, backend, workspace, workspace_bytes, stream);
  });
}

}  // extern "C"
