// sm100 (Blackwell, sm_100a) backend of mxmoe_prepare_weights and mxmoe_grouped_gemm: argument
// checks specific to this kernel, the runtime architecture check, weight preparation (a copy of
// the e2m1 codes and a 128x4 swizzle of the E8M0 scales), workspace carving, and dispatch to the
// CUTLASS instantiation for the output type (grouped_gemm_sm100_{bf16,fp16}.cu). No CUTLASS here,
// so this file compiles in seconds.
//
// NOT RUN ON HARDWARE: no Blackwell GPU was available when this was written. The code is compiled
// for sm_100a and its setup logic is tested on the CPU (tests/cc/grouped_gemm_sm100_setup_test.cc);
// it has never executed on a B200/GB200. Arguments arrive validated by cc/src, this kernel's
// limits included (CanImplementGroupedGemmSm100: n % 8 == 0, k > 0, n and k < 2^31; TMA's
// 16-byte alignment is the contract's); the run checks only what needs the device (its compute
// capability and this build's sm_100a image).
//
// Weights, by format (mxmoe_expert_weights.format):
//   PREPARED (backend sm100)  one buffer, PreparedWeightsLayoutSm100: read as is. Fastest.
//   SWIZZLED_128X4            packed [E,n,k/2] + scales [E, round_up(n,128), round_up(k/32,4)]:
//                             read as is (same bytes as PREPARED, two pointers).
//   LINEAR                    scales [E,n,k/32] are swizzled into the workspace on every call
//                             (one extra kernel over E*n*k/32 bytes); prepare them once instead.
// Activations' scales must be SWIZZLED_128X4 with blockscale_offsets (the public contract); they
// are consumed in place, never converted (the CUTLASS layout is the same, see the setup header).
// The contract's zero padding matters here: when k % 128 != 0 the kernel multiplies the padding
// scale columns by the zero-filled K tail, so a padding byte of 0xFF (NaN) would poison the row.
#include <cuda_runtime.h>
#include <stdint.h>

#include <limits>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/base/workspace.h"
#include "cc/cuda/device.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/grouped_gemm_sm100_instances.h"
#include "cc/cuda/grouped_gemm_sm100_setup.h"

namespace mxmoe {
namespace cuda {
namespace {

using sm100::GroupedGemmSm100Launch;
using sm100::GroupedGemmSm100Problem;
using sm100::MakePreparedWeightsLayoutSm100;
using sm100::PreparedWeightsLayoutSm100;

// TMA needs 16-byte aligned global addresses: the contract's alignment of CUDA data pointers
// (16 bytes, checked by cc/src/validate.cc) gives the bases, and every per-expert address is a
// base plus a multiple of 16 bytes (k % 32 == 0, n % 8 == 0, scale atoms of 512 bytes).
constexpr char kGemmOp[] = "grouped_gemm (sm100)";

// linear [E, rows, cols] -> swizzled [E, round_up(rows,128), round_up(cols,4)], padding 0.
// One thread per output byte, so the writes are coalesced; reads are 4 consecutive bytes per
// row. Weight preparation runs once per model load, so this is not tuned further.
__global__ void SwizzleWeightScalesKernel(const uint8_t* __restrict__ linear,
                                          uint8_t* __restrict__ swizzled, int64_t num_experts,
                                          int64_t rows, int64_t cols) {
  const int64_t expert_bytes = format::RoundUp(rows, format::kSwizzleRows) *
                               format::RoundUp(cols, format::kSwizzleCols);
  const int64_t total = num_experts * expert_bytes;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / expert_bytes;
    int64_t row = 0;
    int64_t col = 0;
    sm100::SwizzledPositionSm100(i % expert_bytes, cols, &row, &col);
    swizzled[i] = (row < rows && col < cols) ? linear[(e * rows + row) * cols + col] : 0;
  }
}

mxmoe_status LaunchSwizzleWeightScales(const uint8_t* linear, uint8_t* swizzled,
                                       int64_t num_experts, int64_t rows, int64_t cols,
                                       cudaStream_t stream) {
  const int64_t total = num_experts * format::SwizzledBytes(rows, cols);
  if (total == 0) return MXMOE_STATUS_OK;
  constexpr int kThreads = 256;
  const int64_t blocks = format::CeilDiv(total, kThreads);
  SwizzleWeightScalesKernel<<<static_cast<unsigned>(blocks < 8192 ? blocks : 8192), kThreads, 0,
                              stream>>>(linear, swizzled, num_experts, rows, cols);
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return MXMOE_STATUS_OK;
}

// Makes `device` current (for this scope) after checking that it is compute capability 10.x and
// can run this build's sm_100a code: arch-specific "a" code runs on 10.0 only, so a 10.3 part
// (B300) would need an sm_100f or sm_103a build. The probe asks the runtime for a kernel of this
// file, which fails when the current device has no compatible image.
mxmoe_status EnterDeviceSm100(const mxmoe_device& device, const char* op, ScopedDevice* scoped) {
  if (device.type != MXMOE_DEVICE_CUDA) {
    return Fail(MXMOE_STATUS_INVALID_ARGUMENT, op, " (sm100): device.type must be CUDA (",
                static_cast<int>(MXMOE_DEVICE_CUDA), "), got ", device.type);
  }
  int major = 0;
  int minor = 0;
  MXMOE_RETURN_IF_ERROR(ComputeCapability(device.id, &major, &minor));
  if (major != 10) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, " (sm100): CUDA device ", device.id,
                " has compute capability ", major, ".", minor,
                "; the sm100 backend needs 10.x (B200/GB200)");
  }
  MXMOE_RETURN_IF_ERROR(scoped->Enter(device.id));
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, SwizzleWeightScalesKernel);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Fail(MXMOE_STATUS_UNSUPPORTED, op, " (sm100): this build carries sm_100a code only, ",
                "which CUDA device ", device.id, " (compute capability ", major, ".", minor,
                ") cannot run: ", cudaGetErrorName(err));
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status InstanceWorkspaceBytes(int32_t c_dtype, int32_t num_experts, int sm_count,
                                    size_t* bytes) {
  return c_dtype == MXMOE_DTYPE_BF16
             ? sm100::GroupedGemmSm100WorkspaceBytesBf16(num_experts, sm_count, bytes)
             : sm100::GroupedGemmSm100WorkspaceBytesFp16(num_experts, sm_count, bytes);
}

// The call's workspace: [swizzled weight scales, LINEAR weights only] [the instance's slice].
// Measured and carved by the same function, so the size query and the call cannot disagree.
mxmoe_status CarveGemmWorkspace(const mxmoe_grouped_gemm_args& args, int sm_count,
                                WorkspaceCarver* carver, uint8_t** weight_scales,
                                uint8_t** instance, size_t* instance_bytes) {
  const PreparedWeightsLayoutSm100 w =
      MakePreparedWeightsLayoutSm100(args.num_experts, args.n, args.k);
  const size_t scale_bytes =
      args.b.format == MXMOE_WEIGHT_FORMAT_LINEAR ? static_cast<size_t>(w.scales_bytes) : 0;
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 swizzled weight scales", scale_bytes, weight_scales));
  MXMOE_RETURN_IF_ERROR(
      InstanceWorkspaceBytes(args.c_dtype, args.num_experts, sm_count, instance_bytes));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 grouped GEMM", *instance_bytes, instance));
  return MXMOE_STATUS_OK;
}

}  // namespace

mxmoe_status CanImplementGroupedGemmSm100(int64_t n, int64_t k) {
  if (n == 0) return MXMOE_STATUS_OK;  // c has no columns: nothing to compute or write
  // c rows are stored by TMA: their pitch (n * 2 bytes) must be a multiple of 16 bytes.
  if (n % 8 != 0) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, kGemmOp,
                ": n must be a multiple of 8 (16-byte rows of c for TMA), got ", n);
  }
  if (k == 0) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, kGemmOp,
                ": k = 0 (an empty reduction, c = 0) is not implemented by this backend");
  }
  if (n > std::numeric_limits<int32_t>::max() || k > std::numeric_limits<int32_t>::max()) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, kGemmOp, ": n and k must be below 2^31, got n=", n,
                " k=", k);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_status PrepareWeightsSm100Size(const mxmoe_prepare_weights_args& args, size_t* bytes) {
  const mxmoe_expert_weights& w = args.weights;
  *bytes = static_cast<size_t>(MakePreparedWeightsLayoutSm100(w.num_experts, w.n, w.k).total_bytes);
  return MXMOE_STATUS_OK;
}

mxmoe_status PrepareWeightsSm100(const mxmoe_prepare_weights_args& args, void* stream) {
  size_t needed = 0;
  MXMOE_RETURN_IF_ERROR(PrepareWeightsSm100Size(args, &needed));
  if (needed == 0) return MXMOE_STATUS_OK;
  const mxmoe_expert_weights& w = args.weights;
  ScopedDevice scoped_device;
  MXMOE_RETURN_IF_ERROR(EnterDeviceSm100(args.device, "prepare_weights", &scoped_device));

  const PreparedWeightsLayoutSm100 layout =
      MakePreparedWeightsLayoutSm100(w.num_experts, w.n, w.k);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  uint8_t* out = args.prepared;
  MXMOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out + layout.packed_offset, w.packed,
                                             static_cast<size_t>(layout.packed_bytes),
                                             cudaMemcpyDeviceToDevice, s));
  // The alignment gap is zeroed so the prepared bytes are a pure function of the weights.
  const int64_t gap = layout.scales_offset - layout.packed_bytes;
  if (gap > 0) {
    MXMOE_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(out + layout.packed_bytes, 0, static_cast<size_t>(gap), s));
  }
  return LaunchSwizzleWeightScales(w.scales, out + layout.scales_offset, w.num_experts, w.n,
                                   w.k / format::kBlockSize, s);
}

mxmoe_status GroupedGemmSm100WorkspaceSize(const mxmoe_grouped_gemm_args& args, size_t* bytes) {
  int sm_count = 0;
  MXMOE_RETURN_IF_ERROR(MultiprocessorCount(args.device.id, &sm_count));
  WorkspaceCarver measure;
  uint8_t* weight_scales = nullptr;
  uint8_t* instance = nullptr;
  size_t instance_bytes = 0;
  MXMOE_RETURN_IF_ERROR(
      CarveGemmWorkspace(args, sm_count, &measure, &weight_scales, &instance, &instance_bytes));
  *bytes = measure.RequiredBytes();
  return MXMOE_STATUS_OK;
}

mxmoe_status GroupedGemmSm100(const mxmoe_grouped_gemm_args& args, void* workspace,
                              size_t workspace_bytes, void* stream) {
  // No rows or no columns: nothing is written.
  if (args.rows == 0 || args.n == 0) return MXMOE_STATUS_OK;

  const mxmoe_expert_weights& b = args.b;
  const PreparedWeightsLayoutSm100 prepared =
      MakePreparedWeightsLayoutSm100(args.num_experts, args.n, args.k);
  const uint8_t* b_packed = b.packed;
  const uint8_t* b_scales =
      b.format == MXMOE_WEIGHT_FORMAT_PREPARED ? b.packed + prepared.scales_offset : b.scales;
  ScopedDevice scoped_device;
  MXMOE_RETURN_IF_ERROR(EnterDeviceSm100(args.device, "grouped_gemm", &scoped_device));
  int sm_count = 0;
  MXMOE_RETURN_IF_ERROR(MultiprocessorCount(args.device.id, &sm_count));

  WorkspaceCarver carver(workspace, workspace_bytes);
  uint8_t* swizzled_weight_scales = nullptr;
  uint8_t* instance = nullptr;
  size_t instance_bytes = 0;
  MXMOE_RETURN_IF_ERROR(CarveGemmWorkspace(args, sm_count, &carver, &swizzled_weight_scales,
                                           &instance, &instance_bytes));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (b.format == MXMOE_WEIGHT_FORMAT_LINEAR) {
    MXMOE_RETURN_IF_ERROR(LaunchSwizzleWeightScales(b.scales, swizzled_weight_scales,
                                                    args.num_experts, args.n,
                                                    args.k / format::kBlockSize, s));
    b_scales = swizzled_weight_scales;
  }

  GroupedGemmSm100Launch launch;
  GroupedGemmSm100Problem& p = launch.problem;
  p.num_experts = args.num_experts;
  p.rows = args.rows;
  p.n = args.n;
  p.k = args.k;
  p.a_scale_rows = args.a_scale_rows;
  p.a = reinterpret_cast<uint64_t>(args.a);
  p.a_scales = reinterpret_cast<uint64_t>(args.a_scales);
  p.b = reinterpret_cast<uint64_t>(b_packed);
  p.b_scales = reinterpret_cast<uint64_t>(b_scales);
  p.c = reinterpret_cast<uint64_t>(args.c);
  p.c_element_bytes = 2;
  launch.expert_offsets = args.expert_offsets;
  launch.blockscale_offsets = args.blockscale_offsets;
  launch.problem_sizes = args.problem_sizes;
  launch.workspace = instance;
  launch.workspace_bytes = instance_bytes;
  launch.device_id = args.device.id;
  launch.sm_count = sm_count;
  launch.stream = stream;
  return args.c_dtype == MXMOE_DTYPE_BF16 ? sm100::RunGroupedGemmSm100Bf16(launch)
                                          : sm100::RunGroupedGemmSm100Fp16(launch);
}

}  // namespace cuda
}  // namespace mxmoe
