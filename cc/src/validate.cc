// Argument validation for the C API (see validate.h for the order of checks and the statuses).
#include "cc/src/validate.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "cc/base/status.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cuda/device.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/quantize.h"
#include "cc/src/backend.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kDataAlignment = 16;  // CUDA kernels load data with 16-byte vectors
constexpr int64_t kMetaAlignment = 4;   // int32 / fp32 metadata

// ---- small helpers ----------------------------------------------------------------------------

std::string Address(const void* ptr) {
  char buffer[32];
  snprintf(buffer, sizeof(buffer), "%p", ptr);
  return buffer;
}

// Metadata on the host may sit at any address (the CPU backend needs no alignment).
int32_t ReadI32(const int32_t* base, int64_t index) {
  int32_t v;
  memcpy(&v, reinterpret_cast<const uint8_t*>(base) + index * 4, 4);
  return v;
}

// round_up(x, m) for x >= 0; -1 when it would overflow (reported by CheckBuffers).
int64_t RoundUpOrOverflow(int64_t x, int64_t m) {
  if (x < 0 || x > kInt64Max - m) return -1;
  return format::RoundUp(x, m);
}

// ---- dims and enums ---------------------------------------------------------------------------

mxmoe_status CheckNonNegative(const char* name, int64_t value) {
  if (value < 0) return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, " must be >= 0, got ", value);
  return MXMOE_STATUS_OK;
}

// A K-like dimension: >= 0 and a multiple of the 32-element block.
mxmoe_status CheckBlockDim(const char* name, int64_t value) {
  MXMOE_RETURN_IF_ERROR(CheckNonNegative(name, value));
  if (value % format::kBlockSize != 0) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, " must be a multiple of 32, got ", value);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckNumExperts(const char* name, int64_t value) {
  if (value < 1 || value > kMaxExperts) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, " must be in [1, ", kMaxExperts, "], got ",
                value);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckActivationDtype(const char* name, int32_t dtype) {
  if (dtype != MXMOE_DTYPE_BF16 && dtype != MXMOE_DTYPE_FP16) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, " must be BF16 (0) or FP16 (1), got ",
                dtype);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckAnyDtype(const char* name, int32_t dtype) {
  if (dtype != MXMOE_DTYPE_BF16 && dtype != MXMOE_DTYPE_FP16 && dtype != MXMOE_DTYPE_FP32) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name,
                " must be BF16 (0), FP16 (1) or FP32 (2), got ", dtype);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckScaleLayout(const char* name, int32_t layout) {
  if (layout != MXMOE_SCALE_LAYOUT_LINEAR && layout != MXMOE_SCALE_LAYOUT_SWIZZLED_128X4) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name,
                " must be LINEAR (0) or SWIZZLED_128X4 (1), got ", layout);
  }
  return MXMOE_STATUS_OK;
}

int64_t DtypeBytes(int32_t dtype) { return dtype == MXMOE_DTYPE_FP32 ? 4 : 2; }

// ---- buffers ----------------------------------------------------------------------------------

// One pointer argument: its name, its dims (elements) and element size, and the alignment a
// CUDA backend needs.
struct Buffer {
  std::string name;
  const void* ptr;
  std::vector<int64_t> dims;
  int64_t element_bytes;
  int64_t cuda_alignment;
};

std::string ShapeString(const Buffer& buffer) {
  std::string s = "[";
  for (size_t i = 0; i < buffer.dims.size(); ++i) {
    if (i > 0) s += ", ";
    // A negative dim is a padded size that overflowed (RoundUpOrOverflow).
    s += buffer.dims[i] < 0 ? std::string("<overflow>") : std::to_string(buffer.dims[i]);
  }
  return s + "]";
}

// Bytes of `buffer`, failing when a dim overflowed or when the extents times the element size
// overflow int64. A zero extent counts as one in that product: whether [0, 2^40, 2^40] is
// accepted must not depend on where its zero stands, and kernels index with the other extents
// even when the buffer is empty.
mxmoe_status BufferBytes(const Buffer& buffer, int64_t* bytes) {
  int64_t extent = buffer.element_bytes;
  bool empty = false;
  for (int64_t d : buffer.dims) {
    if (d < 0 || (d > 0 && extent > kInt64Max / d)) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "size of ", buffer.name, " (", ShapeString(buffer),
                  " x ", buffer.element_bytes, " bytes) overflows int64");
    }
    if (d == 0) empty = true;
    extent *= d > 0 ? d : 1;
  }
  *bytes = empty ? 0 : extent;
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckSizes(const std::vector<Buffer>& buffers) {
  for (const Buffer& buffer : buffers) {
    int64_t bytes;
    MXMOE_RETURN_IF_ERROR(BufferBytes(buffer, &bytes));
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckNotNull(const std::vector<Buffer>& buffers) {
  for (const Buffer& buffer : buffers) {
    int64_t bytes;
    MXMOE_RETURN_IF_ERROR(BufferBytes(buffer, &bytes));
    if (buffer.ptr == nullptr && bytes > 0) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, buffer.name, " must not be NULL: it is ",
                  ShapeString(buffer), " (", bytes, " bytes)");
    }
  }
  return MXMOE_STATUS_OK;
}

// CUDA backends: alignment, then (when a device is visible) that each pointer is on the device.
mxmoe_status CheckPlacement(const std::vector<Buffer>& buffers, mxmoe_backend backend,
                            const mxmoe_device& device) {
  if (backend == MXMOE_BACKEND_CPU) return MXMOE_STATUS_OK;
  for (const Buffer& buffer : buffers) {
    if (buffer.ptr == nullptr) continue;
    if (reinterpret_cast<uintptr_t>(buffer.ptr) % buffer.cuda_alignment != 0) {
      return Fail(MXMOE_STATUS_MISALIGNED, buffer.name, " must be ", buffer.cuda_alignment,
                  "-byte aligned for the ", mxmoe_backend_name(backend), " backend, got address ",
                  Address(buffer.ptr));
    }
  }
  if (cuda::DeviceCount() == 0) return MXMOE_STATUS_OK;
  for (const Buffer& buffer : buffers) {
    if (buffer.ptr == nullptr) continue;
    bool on_device = false;
    MXMOE_RETURN_IF_ERROR(cuda::PointerIsOnDevice(buffer.ptr, device.id, &on_device));
    if (!on_device) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, buffer.name, " (", Address(buffer.ptr),
                  ") is not memory on ", DeviceString(device),
                  " (mismatched devices: every pointer must be on args.device)");
    }
  }
  return MXMOE_STATUS_OK;
}

Buffer Data(const char* name, const void* ptr, std::vector<int64_t> dims, int64_t element_bytes) {
  return Buffer{name, ptr, std::move(dims), element_bytes, kDataAlignment};
}

Buffer Meta(const char* name, const void* ptr, std::vector<int64_t> dims) {
  return Buffer{name, ptr, std::move(dims), 4, kMetaAlignment};
}

// Scales of one or `batch` [rows, cols] matrices in `layout`.
Buffer Scales(const char* name, const void* ptr, int64_t batch, int64_t rows, int64_t cols,
              int32_t layout) {
  if (layout == MXMOE_SCALE_LAYOUT_LINEAR) return Data(name, ptr, {batch, rows, cols}, 1);
  return Data(name, ptr,
              {batch, RoundUpOrOverflow(rows, format::kSwizzleRows),
               RoundUpOrOverflow(cols, format::kSwizzleCols)},
              1);
}

// ---- expert weights ---------------------------------------------------------------------------

// Checks a weight struct's own fields and adds its buffers.
mxmoe_status CheckExpertWeights(const std::string& name, const mxmoe_expert_weights& w,
                                std::vector<Buffer>* buffers) {
  MXMOE_RETURN_IF_ERROR(CheckNumExperts((name + ".num_experts").c_str(), w.num_experts));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative((name + ".n").c_str(), w.n));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim((name + ".k").c_str(), w.k));
  const std::string packed = name + ".packed";
  const std::string scales = name + ".scales";
  switch (w.format) {
    case MXMOE_WEIGHT_FORMAT_LINEAR:
    case MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4:
      buffers->push_back(Data(packed.c_str(), w.packed, {w.num_experts, w.n, w.k / 2}, 1));
      buffers->push_back(Scales(scales.c_str(), w.scales, w.num_experts, w.n, w.k / 32,
                                w.format == MXMOE_WEIGHT_FORMAT_LINEAR
                                    ? MXMOE_SCALE_LAYOUT_LINEAR
                                    : MXMOE_SCALE_LAYOUT_SWIZZLED_128X4));
      break;
    case MXMOE_WEIGHT_FORMAT_PREPARED:
      if (w.scales != nullptr) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, scales,
                    " must be NULL for PREPARED weights (the prepared buffer holds the scales), "
                    "got ",
                    Address(w.scales));
      }
      // Its length is checked against the backend's size once the backend is known
      // (CheckPreparedFor); here it must be a length and exist when non-empty.
      if (w.prepared_bytes > static_cast<uint64_t>(kInt64Max)) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, ".prepared_bytes is not a length, got ",
                    w.prepared_bytes);
      }
      buffers->push_back(
          Data(packed.c_str(), w.packed, {static_cast<int64_t>(w.prepared_bytes)}, 1));
      break;
    default:
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name,
                  ".format must be LINEAR (0), SWIZZLED_128X4 (1) or PREPARED (2), got ", w.format);
  }
  return MXMOE_STATUS_OK;
}

// A weight struct used by an operation: its dims must match the operation's.
mxmoe_status CheckWeightsMatch(const std::string& name, const mxmoe_expert_weights& w,
                               int64_t num_experts, const char* experts_desc, int64_t n,
                               const char* n_desc, int64_t k, const char* k_desc,
                               std::vector<Buffer>* buffers) {
  if (w.num_experts != num_experts) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, ".num_experts must equal ", experts_desc,
                " = ", num_experts, ", got ", w.num_experts);
  }
  if (w.n != n) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, ".n must equal ", n_desc, " = ", n, ", got ",
                w.n);
  }
  if (w.k != k) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, ".k must equal ", k_desc, " = ", k, ", got ",
                w.k);
  }
  return CheckExpertWeights(name, w, buffers);
}

mxmoe_status CheckPreparedBytes(const std::string& name, const mxmoe_expert_weights& w,
                                mxmoe_backend backend, const mxmoe_device& device);

// PREPARED weights are read only by the backend that prepared them, and their buffer must hold
// what that backend's mxmoe_prepare_weights_size says.
mxmoe_status CheckPreparedFor(const std::string& name, const mxmoe_expert_weights& w,
                              mxmoe_backend backend, const mxmoe_device& device) {
  if (w.format != MXMOE_WEIGHT_FORMAT_PREPARED) return MXMOE_STATUS_OK;
  if (w.backend == backend) return CheckPreparedBytes(name, w, backend, device);
  // Only cast values inside the enum's range (anything else is "unknown").
  const bool known = w.backend >= MXMOE_BACKEND_AUTO && w.backend <= MXMOE_BACKEND_SM100;
  const char* prepared_by =
      known ? mxmoe_backend_name(static_cast<mxmoe_backend>(w.backend)) : "unknown";
  return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, " was prepared for backend '", prepared_by,
              "' (", name, ".backend=", w.backend, ") but device ", DeviceString(device),
              " is served by backend '", mxmoe_backend_name(backend),
              "'; prepare the weights for that backend");
}

// The backends' prepared-size formulas multiply the dims (with padding): bound them first,
// generously (two bytes per padded weight, far above any layout's 4.25 bits).
mxmoe_status CheckPreparedSizeBound(const std::string& name, const mxmoe_expert_weights& w) {
  int64_t bound = 0;
  return BufferBytes(
      Data((name + " (prepared)").c_str(), w.packed,
           {w.num_experts, RoundUpOrOverflow(w.n, 256), RoundUpOrOverflow(w.k, 256)}, 2),
      &bound);
}

mxmoe_status CheckPreparedBytes(const std::string& name, const mxmoe_expert_weights& w,
                                mxmoe_backend backend, const mxmoe_device& device) {
  MXMOE_RETURN_IF_ERROR(CheckPreparedSizeBound(name, w));
  mxmoe_prepare_weights_args as_prepared{};
  as_prepared.weights = w;
  as_prepared.weights.format = MXMOE_WEIGHT_FORMAT_LINEAR;
  as_prepared.weights.scales = nullptr;
  as_prepared.backend = backend;
  as_prepared.device = device;
  size_t needed = 0;
  MXMOE_RETURN_IF_ERROR(PrepareWeightsSizeFor(as_prepared, backend, &needed));
  if (w.prepared_bytes < needed) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, name, ".prepared_bytes must be at least ", needed,
                " (mxmoe_prepare_weights_size for ", w.num_experts, " experts, n=", w.n,
                ", k=", w.k, ", backend ", mxmoe_backend_name(backend), "), got ",
                w.prepared_bytes);
  }
  return MXMOE_STATUS_OK;
}

// ---- CPU metadata -----------------------------------------------------------------------------

mxmoe_status CheckGroupedOffsets(const int32_t* expert_offsets, const int32_t* blockscale_offsets,
                                 int32_t num_experts, int64_t rows, const char* rows_name,
                                 int64_t scale_rows, const char* scale_rows_name) {
  const int32_t first = ReadI32(expert_offsets, 0);
  if (first != 0) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "expert_offsets[0] must be 0, got ", first);
  }
  for (int32_t e = 0; e < num_experts; ++e) {
    const int32_t lo = ReadI32(expert_offsets, e);
    const int32_t hi = ReadI32(expert_offsets, e + 1);
    if (hi < lo) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "expert_offsets must be non-decreasing: expert_offsets[", e + 1, "]=", hi,
                  " < expert_offsets[", e, "]=", lo);
    }
  }
  const int32_t last = ReadI32(expert_offsets, num_experts);
  if (last > rows) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "expert_offsets[", num_experts, "]=", last,
                " exceeds ", rows_name, "=", rows);
  }
  const int32_t scale_first = ReadI32(blockscale_offsets, 0);
  if (scale_first != 0) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "blockscale_offsets[0] must be 0, got ",
                scale_first);
  }
  for (int32_t e = 0; e < num_experts; ++e) {
    const int64_t m = int64_t{ReadI32(expert_offsets, e + 1)} - ReadI32(expert_offsets, e);
    const int64_t lo = ReadI32(blockscale_offsets, e);
    const int64_t hi = ReadI32(blockscale_offsets, e + 1);
    const int64_t padded = format::RoundUp(m, format::kSwizzleRows);
    if (hi - lo != padded) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "blockscale_offsets[", e + 1, "]=", hi,
                  " must be blockscale_offsets[", e, "] + round_up(m_", e, ", 128) = ", lo, " + ",
                  padded, " (m_", e, "=", m, ")");
    }
  }
  const int32_t scale_last = ReadI32(blockscale_offsets, num_experts);
  if (scale_last > scale_rows) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "blockscale_offsets[", num_experts, "]=",
                scale_last, " exceeds ", scale_rows_name, "=", scale_rows);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckProblemSizes(const int32_t* problem_sizes, const int32_t* expert_offsets,
                               int32_t num_experts, int64_t n, int64_t k) {
  for (int32_t e = 0; e < num_experts; ++e) {
    const int64_t m = int64_t{ReadI32(expert_offsets, e + 1)} - ReadI32(expert_offsets, e);
    const int32_t pm = ReadI32(problem_sizes, 3 * int64_t{e});
    const int32_t pn = ReadI32(problem_sizes, 3 * int64_t{e} + 1);
    const int32_t pk = ReadI32(problem_sizes, 3 * int64_t{e} + 2);
    if (pm != m || pn != n || pk != k) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "problem_sizes[", e, "] must be (m_", e,
                  ", n, k) = (", m, ", ", n, ", ", k, "), got (", pm, ", ", pn, ", ", pk, ")");
    }
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckDeviceAndBackend(const mxmoe_device& device, mxmoe_backend* backend) {
  return ResolveBackend(device, backend);
}

// ---- kernel limits ----------------------------------------------------------------------------
// Each CUDA kernel states its limits beyond the contract in one function (cuda::CanImplement*,
// after CUTLASS's can_implement); they are asked here, for the size queries and the runs alike,
// and the kernels do not check again. The CPU backend implements the whole contract.

mxmoe_status CheckRowQuantizeLimits(const char* op, int64_t k, mxmoe_backend backend) {
  if (backend == MXMOE_BACKEND_CPU) return MXMOE_STATUS_OK;
  return cuda::CanImplementRowQuantize(op, k);
}

mxmoe_status CheckGroupedGemmLimits(int64_t rows, int64_t n, int64_t k, int32_t num_experts,
                                    mxmoe_backend backend, const mxmoe_device& device) {
  switch (backend) {
    case MXMOE_BACKEND_SM90: {
      int num_sms = 0;
      MXMOE_RETURN_IF_ERROR(cuda::MultiprocessorCount(device.id, &num_sms));
      return cuda::CanImplementGroupedGemmSm90(rows, n, k, num_experts, num_sms);
    }
    case MXMOE_BACKEND_SM100:
      return cuda::CanImplementGroupedGemmSm100(n, k);
    default:
      return MXMOE_STATUS_OK;
  }
}

// The CUDA MoE runs two grouped GEMMs over its T * top_k routed rows (w13: n = 2I, k = H; w2:
// n = H, k = I) and the fused SiLU-and-mul quantizer (n = I); their limits are its own.
mxmoe_status CheckMoeForwardKernelLimits(const mxmoe_moe_forward_args& a, mxmoe_backend backend) {
  if (backend == MXMOE_BACKEND_CPU) return MXMOE_STATUS_OK;
  const int64_t rows = a.num_tokens * a.top_k;
  const int64_t h = a.hidden_size;
  const int64_t inter = a.intermediate_size;
  MXMOE_RETURN_IF_ERROR(CheckGroupedGemmLimits(rows, 2 * inter, h, a.num_local_experts, backend,
                                               a.device));
  MXMOE_RETURN_IF_ERROR(
      CheckGroupedGemmLimits(rows, h, inter, a.num_local_experts, backend, a.device));
  return cuda::CanImplementExpertsQuantize("moe_forward", inter, a.num_local_experts);
}

}  // namespace

mxmoe_status PrepareWeightsSizeFor(const mxmoe_prepare_weights_args& args, mxmoe_backend backend,
                                   size_t* bytes) {
  switch (backend) {
    case MXMOE_BACKEND_CPU:
      *bytes = cpu::PrepareWeightsSize(args.weights);
      return MXMOE_STATUS_OK;
    case MXMOE_BACKEND_SM90:
      return cuda::PrepareWeightsSm90Size(args, bytes);
    case MXMOE_BACKEND_SM100:
      return cuda::PrepareWeightsSm100Size(args, bytes);
    default:
      return Fail(MXMOE_STATUS_INTERNAL, "no prepare_weights size for backend ", backend);
  }
}

// ---- entry points -----------------------------------------------------------------------------

mxmoe_status ValidateQuantize(const mxmoe_quantize_args& a, mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("rows", a.rows));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim("k", a.k));
  MXMOE_RETURN_IF_ERROR(CheckActivationDtype("input_dtype", a.input_dtype));
  MXMOE_RETURN_IF_ERROR(CheckScaleLayout("scale_layout", a.scale_layout));
  const std::vector<Buffer> buffers = {
      Data("input", a.input, {a.rows, a.k}, 2),
      Data("packed", a.packed, {a.rows, a.k / 2}, 1),
      Scales("scales", a.scales, 1, a.rows, a.k / 32, a.scale_layout),
  };
  MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, backend));
  MXMOE_RETURN_IF_ERROR(CheckRowQuantizeLimits("quantize", a.k, *backend));
  return CheckPlacement(buffers, *backend, a.device);
}

mxmoe_status ValidateDequantize(const mxmoe_dequantize_args& a, mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("rows", a.rows));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim("k", a.k));
  MXMOE_RETURN_IF_ERROR(CheckScaleLayout("scale_layout", a.scale_layout));
  MXMOE_RETURN_IF_ERROR(CheckAnyDtype("output_dtype", a.output_dtype));
  const std::vector<Buffer> buffers = {
      Data("packed", a.packed, {a.rows, a.k / 2}, 1),
      Scales("scales", a.scales, 1, a.rows, a.k / 32, a.scale_layout),
      Data("output", a.output, {a.rows, a.k}, DtypeBytes(a.output_dtype)),
  };
  MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, backend));
  MXMOE_RETURN_IF_ERROR(CheckRowQuantizeLimits("dequantize", a.k, *backend));
  return CheckPlacement(buffers, *backend, a.device);
}

namespace {

// The shared part of experts_quantize and silu_mul_experts_quantize. `k` is the output width,
// `input_cols` the input's (k, or 2n for the fused SiLU).
mxmoe_status ValidateGroupedQuantize(const char* op, const mxmoe_device& device, int64_t rows,
                                     int64_t k, const char* k_name, int64_t input_cols,
                                     int32_t num_experts,
                                     const void* input, int32_t input_dtype,
                                     const int32_t* expert_offsets,
                                     const int32_t* blockscale_offsets, const uint8_t* packed,
                                     const uint8_t* scales, int64_t scale_rows,
                                     mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(device));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("rows", rows));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim(k_name, k));
  MXMOE_RETURN_IF_ERROR(CheckNumExperts("num_experts", num_experts));
  MXMOE_RETURN_IF_ERROR(CheckActivationDtype("input_dtype", input_dtype));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("scale_rows", scale_rows));
  const std::vector<Buffer> buffers = {
      Data("input", input, {rows, input_cols}, 2),
      Meta("expert_offsets", expert_offsets, {int64_t{num_experts} + 1}),
      Meta("blockscale_offsets", blockscale_offsets, {int64_t{num_experts} + 1}),
      Data("packed", packed, {rows, k / 2}, 1),
      Data("scales", scales, {scale_rows, RoundUpOrOverflow(k / 32, format::kSwizzleCols)}, 1),
  };
  MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(device, backend));
  if (*backend != MXMOE_BACKEND_CPU) {
    MXMOE_RETURN_IF_ERROR(cuda::CanImplementExpertsQuantize(op, k, num_experts));
  }
  MXMOE_RETURN_IF_ERROR(CheckPlacement(buffers, *backend, device));
  if (*backend == MXMOE_BACKEND_CPU) {
    MXMOE_RETURN_IF_ERROR(CheckGroupedOffsets(expert_offsets, blockscale_offsets, num_experts,
                                              rows, "rows", scale_rows, "scale_rows"));
  }
  return MXMOE_STATUS_OK;
}

}  // namespace

mxmoe_status ValidateExpertsQuantize(const mxmoe_experts_quantize_args& a,
                                     mxmoe_backend* backend) {
  return ValidateGroupedQuantize("experts_quantize", a.device, a.rows, a.k, "k", a.k,
                                 a.num_experts, a.input, a.input_dtype, a.expert_offsets,
                                 a.blockscale_offsets, a.packed, a.scales, a.scale_rows, backend);
}

mxmoe_status ValidateSiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args& a,
                                            mxmoe_backend* backend) {
  // 2n must not overflow before the buffer check sees it.
  if (a.n > kInt64Max / 2) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "n is too large, got ", a.n);
  }
  // A negative n is reported as such below; doubling it could overflow (n = INT64_MIN).
  const int64_t input_cols = a.n < 0 ? a.n : 2 * a.n;
  return ValidateGroupedQuantize("silu_mul_experts_quantize", a.device, a.rows, a.n, "n",
                                 input_cols, a.num_experts, a.input, a.input_dtype,
                                 a.expert_offsets, a.blockscale_offsets, a.packed, a.scales,
                                 a.scale_rows, backend);
}

mxmoe_status ValidateSwizzleScales(const mxmoe_swizzle_scales_args& a, bool unswizzle,
                                   mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("batch", a.batch));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("rows", a.rows));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("cols", a.cols));
  constexpr int32_t kLinear = MXMOE_SCALE_LAYOUT_LINEAR;
  constexpr int32_t kSwizzled = MXMOE_SCALE_LAYOUT_SWIZZLED_128X4;
  const int32_t in_layout = unswizzle ? kSwizzled : kLinear;
  const int32_t out_layout = unswizzle ? kLinear : kSwizzled;
  const std::vector<Buffer> buffers = {
      Scales("input", a.input, a.batch, a.rows, a.cols, in_layout),
      Scales("output", a.output, a.batch, a.rows, a.cols, out_layout),
  };
  MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, backend));
  return CheckPlacement(buffers, *backend, a.device);
}

mxmoe_status ValidateQuantizeWeights(const mxmoe_quantize_weights_args& a,
                                     mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  MXMOE_RETURN_IF_ERROR(CheckNumExperts("num_experts", a.num_experts));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("n", a.n));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim("k", a.k));
  MXMOE_RETURN_IF_ERROR(CheckActivationDtype("weights_dtype", a.weights_dtype));
  MXMOE_RETURN_IF_ERROR(CheckScaleLayout("scale_layout", a.scale_layout));
  const std::vector<Buffer> buffers = {
      Data("weights", a.weights, {a.num_experts, a.n, a.k}, 2),
      Data("packed", a.packed, {a.num_experts, a.n, a.k / 2}, 1),
      Scales("scales", a.scales, a.num_experts, a.n, a.k / 32, a.scale_layout),
  };
  MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, backend));
  MXMOE_RETURN_IF_ERROR(CheckRowQuantizeLimits("quantize_weights", a.k, *backend));
  return CheckPlacement(buffers, *backend, a.device);
}

mxmoe_status ValidatePrepareWeights(const mxmoe_prepare_weights_args& a, ValidationMode mode,
                                    mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  if (a.weights.format != MXMOE_WEIGHT_FORMAT_LINEAR) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "weights.format must be LINEAR (0) for prepare_weights, got ", a.weights.format);
  }
  std::vector<Buffer> buffers;
  MXMOE_RETURN_IF_ERROR(CheckExpertWeights("weights", a.weights, &buffers));
  MXMOE_RETURN_IF_ERROR(CheckPreparedSizeBound("weights", a.weights));
  if (a.backend < MXMOE_BACKEND_AUTO || a.backend > MXMOE_BACKEND_SM100) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "backend must be AUTO (0), CPU (1), SM90 (2) or SM100 (3), got ", a.backend);
  }
  MXMOE_RETURN_IF_ERROR(CheckSizes(buffers));
  if (mode == ValidationMode::kFull) MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  mxmoe_backend serving;
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, &serving));
  if (a.backend != MXMOE_BACKEND_AUTO && a.backend != serving) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "backend=",
                mxmoe_backend_name(static_cast<mxmoe_backend>(a.backend)),
                " cannot prepare weights on device ", DeviceString(a.device),
                ", which is served by backend '", mxmoe_backend_name(serving), "'");
  }
  *backend = serving;
  if (serving == MXMOE_BACKEND_SM90) {
    MXMOE_RETURN_IF_ERROR(cuda::CanImplementPrepareWeightsSm90(a.weights));
  }
  if (mode == ValidationMode::kFull) {
    MXMOE_RETURN_IF_ERROR(CheckPlacement(buffers, serving, a.device));
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status CheckPreparedBuffer(const mxmoe_prepare_weights_args& a, size_t needed) {
  if (a.prepared_bytes < needed) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "prepared_bytes must be at least ", needed,
                " (mxmoe_prepare_weights_size), got ", a.prepared_bytes);
  }
  if (a.prepared == nullptr && needed > 0) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "prepared must not be NULL: it needs ", needed,
                " bytes");
  }
  mxmoe_backend backend;
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, &backend));
  const std::vector<Buffer> buffers = {
      Data("prepared", a.prepared, {static_cast<int64_t>(needed)}, 1)};
  return CheckPlacement(buffers, backend, a.device);
}

mxmoe_status ValidateGroupedGemm(const mxmoe_grouped_gemm_args& a, ValidationMode mode,
                                 mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("rows", a.rows));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("n", a.n));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim("k", a.k));
  MXMOE_RETURN_IF_ERROR(CheckNumExperts("num_experts", a.num_experts));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("a_scale_rows", a.a_scale_rows));
  MXMOE_RETURN_IF_ERROR(CheckActivationDtype("c_dtype", a.c_dtype));
  std::vector<Buffer> buffers = {
      Data("a", a.a, {a.rows, a.k / 2}, 1),
      Data("a_scales", a.a_scales,
           {a.a_scale_rows, RoundUpOrOverflow(a.k / 32, format::kSwizzleCols)}, 1),
      Meta("expert_offsets", a.expert_offsets, {int64_t{a.num_experts} + 1}),
      Meta("blockscale_offsets", a.blockscale_offsets, {int64_t{a.num_experts} + 1}),
      Data("c", a.c, {a.rows, a.n}, 2),
  };
  MXMOE_RETURN_IF_ERROR(CheckWeightsMatch("b", a.b, a.num_experts, "num_experts", a.n, "n", a.k,
                                          "k", &buffers));
  MXMOE_RETURN_IF_ERROR(CheckSizes(buffers));
  if (mode == ValidationMode::kFull) MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, backend));
  MXMOE_RETURN_IF_ERROR(CheckPreparedFor("b", a.b, *backend, a.device));
  MXMOE_RETURN_IF_ERROR(
      CheckGroupedGemmLimits(a.rows, a.n, a.k, a.num_experts, *backend, a.device));
  if (mode == ValidationMode::kShapesOnly) return MXMOE_STATUS_OK;
  if (a.problem_sizes != nullptr) {  // optional: checked only when given
    buffers.push_back(Meta("problem_sizes", a.problem_sizes, {a.num_experts, 3}));
  }
  MXMOE_RETURN_IF_ERROR(CheckPlacement(buffers, *backend, a.device));
  if (*backend == MXMOE_BACKEND_CPU) {
    MXMOE_RETURN_IF_ERROR(CheckGroupedOffsets(a.expert_offsets, a.blockscale_offsets,
                                              a.num_experts, a.rows, "rows", a.a_scale_rows,
                                              "a_scale_rows"));
    if (a.problem_sizes != nullptr) {
      MXMOE_RETURN_IF_ERROR(
          CheckProblemSizes(a.problem_sizes, a.expert_offsets, a.num_experts, a.n, a.k));
    }
  }
  return MXMOE_STATUS_OK;
}

// The model options of the MoE forward (activation, biases, routing mode, shared experts): dims
// and enums only; bias buffers are added to `buffers`.
mxmoe_status CheckMoeModelOptions(const mxmoe_moe_forward_args& a, std::vector<Buffer>* buffers) {
  if (a.num_shared_experts < 0 || a.num_shared_experts >= a.num_local_experts) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "num_shared_experts must be in [0, ",
                "num_local_experts - 1 = ", a.num_local_experts - 1,
                "] (shared experts are the last of the E_local weight experts and at least one "
                "routed expert must remain), got ",
                a.num_shared_experts);
  }
  switch (a.activation) {
    case MXMOE_ACTIVATION_SILU_AND_MUL:
      break;
    case MXMOE_ACTIVATION_SWIGLU_OAI:
      if (!std::isfinite(a.swiglu_alpha)) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "swiglu_alpha must be finite, got ",
                    a.swiglu_alpha);
      }
      if (!(a.swiglu_limit > 0.0f)) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "swiglu_limit must be > 0, got ",
                    a.swiglu_limit);
      }
      break;
    default:
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "activation must be SILU_AND_MUL (0) or SWIGLU_OAI (1), got ", a.activation);
  }
  if (a.w13_bias != nullptr) {
    MXMOE_RETURN_IF_ERROR(CheckAnyDtype("w13_bias_dtype", a.w13_bias_dtype));
    buffers->push_back(Data("w13_bias", a.w13_bias,
                            {a.num_local_experts, 2 * a.intermediate_size},
                            DtypeBytes(a.w13_bias_dtype)));
  }
  if (a.w2_bias != nullptr) {
    MXMOE_RETURN_IF_ERROR(CheckAnyDtype("w2_bias_dtype", a.w2_bias_dtype));
    buffers->push_back(Data("w2_bias", a.w2_bias, {a.num_local_experts, a.hidden_size},
                            DtypeBytes(a.w2_bias_dtype)));
  }
  if (!(a.routed_scaling_factor == 0.0f ||
        (a.routed_scaling_factor > 0.0f && std::isfinite(a.routed_scaling_factor)))) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "routed_scaling_factor must be > 0 and finite, or 0 (= 1), got ",
                a.routed_scaling_factor);
  }
  // Precomputed top-k: its weights are used as they are. With no tokens there is nothing to
  // route, and an empty router_logits tensor may well have a NULL data pointer (DLPack and torch
  // give zero-size tensors one), so the routing fields are not tied to it then.
  if (a.router_logits == nullptr && a.num_tokens > 0) {
    if (a.routing != MXMOE_ROUTING_SOFTMAX_TOPK) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "routing applies to router_logits only; with precomputed topk_ids it must be "
                  "0, got ",
                  a.routing);
    }
    if (a.routed_scaling_factor != 0.0f && a.routed_scaling_factor != 1.0f) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "routed_scaling_factor applies to router_logits only (precomputed "
                  "topk_weights are used as given); it must be 0 or 1, got ",
                  a.routed_scaling_factor);
    }
    if (a.e_score_correction_bias != nullptr) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "e_score_correction_bias applies to router_logits only; with precomputed "
                  "topk_ids it must be NULL, got ",
                  Address(a.e_score_correction_bias));
    }
  }
  if (a.routing != MXMOE_ROUTING_SOFTMAX_TOPK && a.routing != MXMOE_ROUTING_TOPK_SOFTMAX &&
      a.routing != MXMOE_ROUTING_SIGMOID_GROUPED_TOPK) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "routing must be SOFTMAX_TOPK (0), TOPK_SOFTMAX (1) or SIGMOID_GROUPED_TOPK (2), "
                "got ",
                a.routing);
  }
  if (a.routing != MXMOE_ROUTING_SIGMOID_GROUPED_TOPK) {
    if (a.num_expert_groups != 0 && a.num_expert_groups != 1) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "num_expert_groups applies to SIGMOID_GROUPED_TOPK routing only; with routing ",
                  a.routing, " it must be 0 or 1, got ", a.num_expert_groups);
    }
    if (a.topk_groups != 0 && a.topk_groups != 1) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "topk_groups applies to SIGMOID_GROUPED_TOPK routing only; with routing ",
                  a.routing, " it must be 0 or 1, got ", a.topk_groups);
    }
    if (a.e_score_correction_bias != nullptr) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                  "e_score_correction_bias applies to SIGMOID_GROUPED_TOPK routing only; with "
                  "routing ",
                  a.routing, " it must be NULL, got ", Address(a.e_score_correction_bias));
    }
    return MXMOE_STATUS_OK;
  }
  const int64_t groups = a.num_expert_groups == 0 ? 1 : a.num_expert_groups;
  if (groups < 1 || groups > a.num_global_experts || a.num_global_experts % groups != 0) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "num_expert_groups must be 0 or a divisor of num_global_experts = ",
                a.num_global_experts, ", got ", a.num_expert_groups);
  }
  const int64_t kept_groups = a.topk_groups == 0 ? groups : a.topk_groups;
  if (kept_groups < 1 || kept_groups > groups) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "topk_groups must be in [0, num_expert_groups = ",
                groups, "], got ", a.topk_groups);
  }
  const int64_t kept_experts = kept_groups * (a.num_global_experts / groups);
  if (a.top_k > kept_experts) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "top_k must be <= the ", kept_experts,
                " experts of the kept groups (topk_groups = ", kept_groups, " of ", groups,
                " groups of ", a.num_global_experts / groups, " experts), got ", a.top_k);
  }
  if (a.e_score_correction_bias != nullptr) {
    MXMOE_RETURN_IF_ERROR(
        CheckAnyDtype("e_score_correction_bias_dtype", a.e_score_correction_bias_dtype));
    const int64_t bytes = DtypeBytes(a.e_score_correction_bias_dtype);
    buffers->push_back(Buffer{"e_score_correction_bias", a.e_score_correction_bias,
                              {a.num_global_experts}, bytes, bytes});
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status ValidateMoeForward(const mxmoe_moe_forward_args& a, ValidationMode mode,
                                mxmoe_backend* backend) {
  MXMOE_RETURN_IF_ERROR(CheckDevice(a.device));
  MXMOE_RETURN_IF_ERROR(CheckNonNegative("num_tokens", a.num_tokens));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim("hidden_size", a.hidden_size));
  MXMOE_RETURN_IF_ERROR(CheckBlockDim("intermediate_size", a.intermediate_size));
  MXMOE_RETURN_IF_ERROR(CheckNumExperts("num_global_experts", a.num_global_experts));
  MXMOE_RETURN_IF_ERROR(CheckNumExperts("num_local_experts", a.num_local_experts));
  if (a.top_k < 1 || a.top_k > a.num_global_experts) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "top_k must be in [1, num_global_experts=",
                a.num_global_experts, "], got ", a.top_k);
  }
  if (a.renormalize != 0 && a.renormalize != 1) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "renormalize must be 0 or 1, got ", a.renormalize);
  }
  MXMOE_RETURN_IF_ERROR(CheckActivationDtype("activation_dtype", a.activation_dtype));
  if (a.hidden_size > kInt64Max / 2 || a.intermediate_size > kInt64Max / 2) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "hidden_size / intermediate_size too large");
  }
  std::vector<Buffer> buffers = {
      Data("hidden_states", a.hidden_states, {a.num_tokens, a.hidden_size}, 2),
      Data("output", a.output, {a.num_tokens, a.hidden_size}, 2),
  };
  MXMOE_RETURN_IF_ERROR(CheckMoeModelOptions(a, &buffers));
  // Sorted rows and their padded scale rows are indexed with int32 (expert_offsets).
  const int64_t slots_per_token = int64_t{a.top_k} + a.num_shared_experts;
  if (a.num_tokens > kInt32Max / slots_per_token) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                "num_tokens * (top_k + num_shared_experts) must fit int32, got ", a.num_tokens,
                " * ", slots_per_token);
  }
  const int64_t slots = a.num_tokens * slots_per_token;
  if (format::MaxScaleRows(slots, a.num_local_experts) > kInt32Max) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "num_tokens * (top_k + num_shared_experts) = ",
                slots, " routed rows plus their 128-row scale padding must fit int32");
  }
  {
    // Every backend's workspace is fewer than 16 slices of at most [routed rows + scale padding,
    // max(H, 2I, E_global)] elements of 4 bytes: bounding that sum here means no size computation
    // in a *_workspace_size can wrap (T=7, H=2.4e17, top_k=6 once came back OK, wrapped).
    const int64_t padded_rows =
        std::max<int64_t>(format::MaxScaleRows(slots, a.num_local_experts), a.num_tokens);
    const int64_t widest = std::max({a.hidden_size, 2 * a.intermediate_size,
                                     int64_t{a.num_global_experts}});
    int64_t bytes = 0;
    MXMOE_RETURN_IF_ERROR(BufferBytes(
        Data("the workspace (16 slices of [routed rows, max(H, 2I, E_global)] x 4 bytes)", nullptr,
             {16, padded_rows, widest}, 4),
        &bytes));
  }
  const int32_t routed_local = a.num_local_experts - a.num_shared_experts;
  MXMOE_RETURN_IF_ERROR(CheckWeightsMatch("w13", a.w13, a.num_local_experts, "num_local_experts",
                                          2 * a.intermediate_size, "2 * intermediate_size",
                                          a.hidden_size, "hidden_size", &buffers));
  MXMOE_RETURN_IF_ERROR(CheckWeightsMatch("w2", a.w2, a.num_local_experts, "num_local_experts",
                                          a.hidden_size, "hidden_size", a.intermediate_size,
                                          "intermediate_size", &buffers));
  if (a.router_logits != nullptr) {
    MXMOE_RETURN_IF_ERROR(CheckAnyDtype("router_logits_dtype", a.router_logits_dtype));
  }
  if (mode == ValidationMode::kFull) {
    if (a.router_logits != nullptr) {
      if (a.topk_ids != nullptr || a.topk_weights != nullptr) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                    "give either router_logits or topk_ids + topk_weights, not both ",
                    "(router_logits=", Address(a.router_logits), ", topk_ids=", Address(a.topk_ids),
                    ", topk_weights=", Address(a.topk_weights), ")");
      }
      buffers.push_back(Data("router_logits", a.router_logits,
                             {a.num_tokens, a.num_global_experts},
                             DtypeBytes(a.router_logits_dtype)));
    } else {
      if (a.num_tokens > 0 && a.topk_ids == nullptr && a.topk_weights == nullptr) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT,
                    "router_logits is NULL, so topk_ids and topk_weights ([", a.num_tokens, ", ",
                    a.top_k, "]) must be given; both are NULL");
      }
      buffers.push_back(Meta("topk_ids", a.topk_ids, {a.num_tokens, a.top_k}));
      buffers.push_back(Meta("topk_weights", a.topk_weights, {a.num_tokens, a.top_k}));
    }
    if (a.expert_map != nullptr) {
      buffers.push_back(Meta("expert_map", a.expert_map, {a.num_global_experts}));
    } else if (a.num_global_experts != routed_local) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "expert_map is NULL, so num_global_experts (",
                  a.num_global_experts, ") must equal num_local_experts - num_shared_experts (",
                  a.num_local_experts, " - ", a.num_shared_experts, " = ", routed_local, ")");
    }
  }
  MXMOE_RETURN_IF_ERROR(CheckSizes(buffers));
  if (mode == ValidationMode::kFull) MXMOE_RETURN_IF_ERROR(CheckNotNull(buffers));
  MXMOE_RETURN_IF_ERROR(CheckDeviceAndBackend(a.device, backend));
  MXMOE_RETURN_IF_ERROR(CheckPreparedFor("w13", a.w13, *backend, a.device));
  MXMOE_RETURN_IF_ERROR(CheckPreparedFor("w2", a.w2, *backend, a.device));
  MXMOE_RETURN_IF_ERROR(CheckMoeForwardKernelLimits(a, *backend));
  if (mode == ValidationMode::kShapesOnly) return MXMOE_STATUS_OK;
  MXMOE_RETURN_IF_ERROR(CheckPlacement(buffers, *backend, a.device));
  if (*backend != MXMOE_BACKEND_CPU) return MXMOE_STATUS_OK;

  if (a.router_logits == nullptr) {
    for (int64_t i = 0; i < a.num_tokens * a.top_k; ++i) {
      const int32_t id = ReadI32(a.topk_ids, i);
      if (id < 0 || id >= a.num_global_experts) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "topk_ids[", i, "] (token ", i / a.top_k,
                    ", slot ", i % a.top_k, ") must be in [0, num_global_experts=",
                    a.num_global_experts, "), got ", id);
      }
      // topk_weights may be non-finite, like router logits (mxmoe.h): they are data, confined to
      // their token's output, and no CUDA backend could reject them without a synchronisation.
    }
  }
  if (a.expert_map != nullptr) {
    for (int32_t g = 0; g < a.num_global_experts; ++g) {
      const int32_t local = ReadI32(a.expert_map, g);
      if (local < -1 || local >= routed_local) {
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "expert_map[", g,
                    "] must be in [-1, num_local_experts - num_shared_experts = ", routed_local,
                    "), got ", local);
      }
    }
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status ValidateWorkspace(const char* query, const void* workspace, size_t workspace_bytes,
                               size_t needed, mxmoe_backend backend, const mxmoe_device& device) {
  if (workspace_bytes < needed) {
    return Fail(MXMOE_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes must be at least ", needed,
                " (", query, "), got ", workspace_bytes);
  }
  if (needed == 0) return MXMOE_STATUS_OK;
  if (workspace == nullptr) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "workspace must not be NULL: ", needed,
                " bytes are needed (", query, ")");
  }
  const std::vector<Buffer> buffers = {
      Data("workspace", workspace, {static_cast<int64_t>(needed)}, 1)};
  return CheckPlacement(buffers, backend, device);
}

// ---- workspace overlap -------------------------------------------------------------------------

namespace {

struct Range {
  std::string name;
  const void* ptr;
  int64_t bytes;
};

int64_t Product(std::initializer_list<int64_t> dims) {  // of validated dims: cannot overflow
  int64_t p = 1;
  for (int64_t d : dims) p *= d;
  return p;
}

void AddWeightRanges(const char* name, const mxmoe_expert_weights& w, std::vector<Range>* out) {
  const std::string n = name;
  if (w.format == MXMOE_WEIGHT_FORMAT_PREPARED) {
    out->push_back({n + ".packed", w.packed, static_cast<int64_t>(w.prepared_bytes)});
    return;
  }
  out->push_back({n + ".packed", w.packed, Product({w.num_experts, w.n, w.k / 2})});
  const int64_t scale_bytes =
      w.format == MXMOE_WEIGHT_FORMAT_LINEAR
          ? Product({w.num_experts, w.n, w.k / 32})
          : Product({w.num_experts, format::RoundUp(w.n, format::kSwizzleRows),
                     format::RoundUp(w.k / 32, format::kSwizzleCols)});
  out->push_back({n + ".scales", w.scales, scale_bytes});
}

mxmoe_status CheckNoOverlap(const void* workspace, size_t needed,
                            const std::vector<Range>& ranges) {
  if (workspace == nullptr || needed == 0) return MXMOE_STATUS_OK;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(workspace);
  const uintptr_t end = needed > UINTPTR_MAX - begin ? UINTPTR_MAX : begin + needed;
  for (const Range& r : ranges) {
    if (r.ptr == nullptr || r.bytes <= 0) continue;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(r.ptr);
    const uintptr_t hi = static_cast<uint64_t>(r.bytes) > UINTPTR_MAX - lo
                             ? UINTPTR_MAX
                             : lo + static_cast<uintptr_t>(r.bytes);
    if (lo < end && begin < hi) {
      return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "workspace (", Address(workspace), ", the ",
                  needed, " bytes the operation uses) overlaps ", r.name, " (", Address(r.ptr),
                  ", ", r.bytes, " bytes): the operation would overwrite its own arguments");
    }
  }
  return MXMOE_STATUS_OK;
}

}  // namespace

mxmoe_status CheckWorkspaceOverlap(const mxmoe_grouped_gemm_args& a, const void* workspace,
                                   size_t needed) {
  std::vector<Range> ranges = {
      {"a", a.a, Product({a.rows, a.k / 2})},
      {"a_scales", a.a_scales,
       Product({a.a_scale_rows, format::RoundUp(a.k / 32, format::kSwizzleCols)})},
      {"expert_offsets", a.expert_offsets, Product({int64_t{a.num_experts} + 1, 4})},
      {"blockscale_offsets", a.blockscale_offsets, Product({int64_t{a.num_experts} + 1, 4})},
      {"problem_sizes", a.problem_sizes, Product({a.num_experts, 3, 4})},
      {"c", a.c, Product({a.rows, a.n, 2})},
  };
  AddWeightRanges("b", a.b, &ranges);
  return CheckNoOverlap(workspace, needed, ranges);
}

mxmoe_status CheckWorkspaceOverlap(const mxmoe_moe_forward_args& a, const void* workspace,
                                   size_t needed) {
  const int64_t t = a.num_tokens;
  std::vector<Range> ranges = {
      {"hidden_states", a.hidden_states, Product({t, a.hidden_size, 2})},
      {"output", a.output, Product({t, a.hidden_size, 2})},
      {"router_logits", a.router_logits,
       Product({t, a.num_global_experts, DtypeBytes(a.router_logits_dtype)})},
      {"topk_ids", a.topk_ids, Product({t, a.top_k, 4})},
      {"topk_weights", a.topk_weights, Product({t, a.top_k, 4})},
      {"expert_map", a.expert_map, Product({a.num_global_experts, 4})},
  };
  AddWeightRanges("w13", a.w13, &ranges);
  AddWeightRanges("w2", a.w2, &ranges);
  return CheckNoOverlap(workspace, needed, ranges);
}

// ---- operations with nothing to write -------------------------------------------------------------

bool WritesNothing(const mxmoe_quantize_args& a) { return a.rows == 0 || a.k == 0; }

bool WritesNothing(const mxmoe_dequantize_args& a) { return a.rows == 0 || a.k == 0; }

bool WritesNothing(const mxmoe_experts_quantize_args& a) {
  return a.k == 0 || (a.rows == 0 && a.scale_rows == 0);
}

bool WritesNothing(const mxmoe_silu_mul_experts_quantize_args& a) {
  return a.n == 0 || (a.rows == 0 && a.scale_rows == 0);
}

bool WritesNothing(const mxmoe_swizzle_scales_args& a) {
  // The swizzled side is padded (rows to 128, cols to 4), so it is empty only with a zero extent,
  // like the linear side: both directions write nothing exactly when an extent is 0.
  return a.batch == 0 || a.rows == 0 || a.cols == 0;
}

bool WritesNothing(const mxmoe_quantize_weights_args& a) { return a.n == 0 || a.k == 0; }

bool WritesNothing(const mxmoe_grouped_gemm_args& a) { return a.rows == 0 || a.n == 0; }

bool WritesNothing(const mxmoe_moe_forward_args& a) {
  return a.num_tokens == 0 || a.hidden_size == 0;
}

}  // namespace mxmoe
