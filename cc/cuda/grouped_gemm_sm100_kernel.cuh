// The sm100 (Blackwell, sm_100a) MXFP4 x MXFP4 grouped GEMM on CUTLASS 4.2: one kernel
// configuration, templated only on the output type, plus the device kernel that writes CUTLASS's
// per-expert argument arrays into the caller's workspace. Included by exactly one .cu file per
// output type (grouped_gemm_sm100_bf16.cu, grouped_gemm_sm100_fp16.cu) so Bazel compiles and
// caches each instantiation on its own. Each costs about a minute of CPU and 4 GB of memory in
// nvcc (measured on the 2-core build host), so keep them to these two. The tile shape is the only
// configuration; with more than one, its choice would go in a heuristics file, not here.
//
// NOT RUN ON HARDWARE: there is no Blackwell GPU where this was written. It is compiled for
// sm_100a, its host-side setup logic is unit-tested on the CPU (grouped_gemm_sm100_setup.h), and
// the scale-layout equivalence with CUTLASS is checked at compile time below; nothing here has
// executed on a B200/GB200.
//
// Kernel: CUTLASS's block-scaled ptr-array grouped GEMM (GemmUniversal over
// GroupProblemShape<(m,n,k)>), collective built for OpClassBlockScaledTensorOp with
// mx_float4_t<float_e2m1_t> operands (E8M0 scales per 32 elements, the MXF4 UMMA kind), schedule
// KernelPtrArrayTmaWarpSpecialized1SmMxf4Sm100, 128x128x128 CTA tile, cluster 1x1x1, fp32
// accumulation, epilogue D = acc (alpha 1, no C) rounded once to bf16/fp16 and stored by TMA.
// A = activations [m_e, k] K-major ("RowMajor"), B = weights [n, k] K-major ("ColumnMajor" in
// CUTLASS's N x K view): the NT problem c = a x b^T of mxmoe_grouped_gemm.
//
// Problem shapes live on the device only (host_problem_shapes = nullptr): the persistent tile
// scheduler reads them, groups with m = 0 produce no tiles, and the kernel rewrites its TMA
// descriptors per group on the device. No host synchronisation anywhere.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM100_KERNEL_CUH_
#define MXMOE_CUDA_GROUPED_GEMM_SM100_KERNEL_CUH_

#include <cuda_runtime.h>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/base/workspace.h"
#include "cc/cuda/grouped_gemm_sm100_instances.h"
#include "cc/cuda/grouped_gemm_sm100_setup.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#if !defined(CUTLASS_ARCH_MMA_SM100_SUPPORTED)
#error "grouped_gemm_sm100 needs CUDA >= 12.8 (CUTLASS_ARCH_MMA_SM100_SUPPORTED)"
#endif

namespace mxmoe {
namespace cuda {
namespace sm100 {

template <typename ElementOutput>
struct GroupedGemmSm100Config {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (m,n,k)

  using ElementA = cutlass::mx_float4_t<cutlass::float_e2m1_t>;  // e2m1 + ue8m0 per 32
  using LayoutA = cutlass::layout::RowMajor;                      // [m, k], K-major
  static constexpr int kAlignmentA = 32;                          // elements: 16 bytes
  using ElementB = cutlass::mx_float4_t<cutlass::float_e2m1_t>;
  using LayoutB = cutlass::layout::ColumnMajor;                   // [n, k], K-major
  static constexpr int kAlignmentB = 32;
  using ElementD = ElementOutput;                                 // bf16 or fp16
  using LayoutD = cutlass::layout::RowMajor;                      // [m, n]
  static constexpr int kAlignmentD = 128 / cutlass::sizeof_bits<ElementD>::value;  // 16 bytes
  using ElementAccumulator = float;

  using ArchTag = cutlass::arch::Sm100;
  using OperatorClass = cutlass::arch::OpClassBlockScaledTensorOp;
  using TileShape = cute::Shape<cute::Int<kTileM>, cute::Int<kTileN>, cute::Int<kTileK>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmMxf4Sm100;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      ArchTag, OperatorClass, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAccumulator, ElementAccumulator,
      void, LayoutD*, kAlignmentD,  // no C operand
      ElementD, LayoutD*, kAlignmentD, EpilogueSchedule>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      ArchTag, OperatorClass, ElementA, LayoutA*, kAlignmentA, ElementB, LayoutB*, kAlignmentB,
      ElementAccumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  using LayoutSFA = typename CollectiveMainloop::InternalLayoutSFA;
  using LayoutSFB = typename CollectiveMainloop::InternalLayoutSFB;
  using ScaleConfig = typename CollectiveMainloop::Sm1xxBlkScaledConfig;
  using DataA = typename Gemm::ElementA;  // float_e2m1_t
  using DataB = typename Gemm::ElementB;
  using ElementSF = typename GemmKernel::ElementSF;  // float_ue8m0_t
  using UnderlyingProblemShape = typename ProblemShape::UnderlyingProblemShape;

  static_assert(ScaleConfig::SFVecSize == format::kBlockSize,
                "MXF4 must use one scale per 32 elements (the mxmoe block)");
  static_assert(cute::is_same_v<ElementSF, cutlass::float_ue8m0_t>, "MXF4 scales are E8M0");
  static_assert(cute::is_same_v<StrideA, cute::Stride<int64_t, cute::_1, cute::_0>> &&
                    cute::is_same_v<StrideB, cute::Stride<int64_t, cute::_1, cute::_0>> &&
                    cute::is_same_v<StrideD, cute::Stride<int64_t, cute::_1, cute::_0>>,
                "A, B and D must be row-pitch-only (K-major A/B, row-major D) strides");
  static_assert(sizeof(UnderlyingProblemShape) == 3 * sizeof(int),
                "problem shapes must be three packed ints");
};

// The CUTLASS per-expert argument arrays, carved from the caller's workspace.
template <typename Config>
struct ExpertArrays {
  typename Config::UnderlyingProblemShape* problem_shapes;
  const typename Config::DataA** a;
  const typename Config::DataB** b;
  const typename Config::ElementSF** a_scales;
  const typename Config::ElementSF** b_scales;
  typename Config::ElementD** d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
  typename Config::LayoutSFA* layout_sfa;
  typename Config::LayoutSFB* layout_sfb;
};

// ---- compile-time proof that the scale layout is mxmoe's SWIZZLED_128X4 ----------------------
// CUTLASS's own layout function, evaluated on awkward shapes (m = 129 rows, k = 2880: 90 scale
// columns padded to 92), must have the shape and strides the twin (ScaleLayoutSm100) describes.
// With those, CUTLASS's offset of (row, col) is the twin's ScaleLayoutOffsetSm100, which the CPU
// test compares with format::SwizzledOffset over every row and column.
template <typename Config>
constexpr bool ScaleLayoutMatchesTwin(int rows, int k) {
  const auto layout = Config::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(rows, 8, k, 1));
  const ScaleLayoutSm100 twin = MakeScaleLayoutSm100(rows, k);
  using cute::get;
  // Static parts: ((32,4) rows x (16,4) bytes) and ((32 elements, 4 columns) x (0, 1) bytes).
  const bool atom = get<0, 0, 0>(layout.shape()) == 32 && get<0, 0, 1>(layout.shape()) == 4 &&
                    get<0, 0, 0>(layout.stride()) == 16 && get<0, 0, 1>(layout.stride()) == 4 &&
                    get<1, 0, 0>(layout.shape()) == 32 && get<1, 0, 1>(layout.shape()) == 4 &&
                    get<1, 0, 0>(layout.stride()) == 0 && get<1, 0, 1>(layout.stride()) == 1;
  // Dynamic parts: 128-row tiles (stride k_tiles*512) and 4-column tiles (stride 512).
  const bool tiles = get<0, 1>(layout.shape()) == twin.mn_tiles &&
                     get<0, 1>(layout.stride()) == twin.mn_tile_stride &&
                     get<1, 1>(layout.shape()) == twin.k_tiles &&
                     get<1, 1>(layout.stride()) == kScaleAtomBytes;
  return atom && tiles;
}

// ---- per-expert setup kernel (device twin of ComputeExpertSetupSm100) ------------------------

template <typename Config>
__global__ void WriteExpertArraysKernel(GroupedGemmSm100Problem problem,
                                        const int32_t* __restrict__ expert_offsets,
                                        const int32_t* __restrict__ blockscale_offsets,
                                        const int32_t* __restrict__ problem_sizes,
                                        ExpertArrays<Config> out) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= problem.num_experts) return;
  const ExpertSetupSm100 s =
      ComputeExpertSetupSm100(problem, e, expert_offsets, blockscale_offsets, problem_sizes);

  out.problem_shapes[e] = typename Config::UnderlyingProblemShape(s.m, s.n, s.k);
  out.a[e] = reinterpret_cast<const typename Config::DataA*>(s.a);
  out.b[e] = reinterpret_cast<const typename Config::DataB*>(s.b);
  out.a_scales[e] = reinterpret_cast<const typename Config::ElementSF*>(s.a_scales);
  out.b_scales[e] = reinterpret_cast<const typename Config::ElementSF*>(s.b_scales);
  out.d[e] = reinterpret_cast<typename Config::ElementD*>(s.c);
  out.stride_a[e] = typename Config::StrideA(s.a_row_stride, cute::_1{}, cute::_0{});
  out.stride_b[e] = typename Config::StrideB(s.b_row_stride, cute::_1{}, cute::_0{});
  out.stride_d[e] = typename Config::StrideD(s.c_row_stride, cute::_1{}, cute::_0{});
  // CUTLASS's own layout functions (proven equal to s.sfa / s.sfb by ScaleLayoutMatchesTwin).
  out.layout_sfa[e] =
      Config::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(s.m, s.n, s.k, 1));
  out.layout_sfb[e] =
      Config::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(s.m, s.n, s.k, 1));
}

// Builds CUTLASS's arguments over the arrays; `arrays` may hold nullptrs when only sizing.
template <typename Config>
typename Config::Gemm::Arguments MakeArguments(int32_t num_experts, int device_id, int sm_count,
                                               const ExpertArrays<Config>& arrays) {
  using Gemm = typename Config::Gemm;
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device_id;
  hw_info.sm_count = sm_count;  // persistent grid: one CTA per SM, tensor maps per SM

  typename Gemm::Arguments arguments;
  arguments.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  arguments.problem_shape = {num_experts, arrays.problem_shapes, /*host_problem_shapes=*/nullptr};
  arguments.mainloop = {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b,
                        arrays.a_scales, arrays.layout_sfa, arrays.b_scales, arrays.layout_sfb};
  auto& fusion = arguments.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  arguments.epilogue.ptr_C = nullptr;
  arguments.epilogue.dC = arrays.stride_d;  // unused without C; same shape as D
  arguments.epilogue.ptr_D = arrays.d;
  arguments.epilogue.dD = arrays.stride_d;
  arguments.hw_info = hw_info;
  return arguments;
}

template <typename Config>
size_t CutlassWorkspaceBytes(int32_t num_experts, int sm_count) {
  return Config::Gemm::get_workspace_size(
      MakeArguments<Config>(num_experts, /*device_id=*/0, sm_count, ExpertArrays<Config>{}));
}

// Carves the arrays (in measuring mode when `carver` measures), then CUTLASS's own workspace.
template <typename Config>
mxmoe_status CarveWorkspace(WorkspaceCarver* carver, int32_t num_experts, int sm_count,
                            ExpertArrays<Config>* arrays, void** cutlass_workspace,
                            size_t* cutlass_bytes) {
  const size_t e = static_cast<size_t>(num_experts);
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 problem shapes", e, &arrays->problem_shapes));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 A pointers", e, &arrays->a));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 B pointers", e, &arrays->b));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 A scale pointers", e, &arrays->a_scales));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 B scale pointers", e, &arrays->b_scales));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 D pointers", e, &arrays->d));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 A strides", e, &arrays->stride_a));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 B strides", e, &arrays->stride_b));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 D strides", e, &arrays->stride_d));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 A scale layouts", e, &arrays->layout_sfa));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 B scale layouts", e, &arrays->layout_sfb));
  *cutlass_bytes = CutlassWorkspaceBytes<Config>(num_experts, sm_count);
  uint8_t* cutlass = nullptr;
  MXMOE_RETURN_IF_ERROR(carver->Carve("sm100 CUTLASS tensor maps", *cutlass_bytes, &cutlass));
  *cutlass_workspace = cutlass;
  return MXMOE_STATUS_OK;
}

template <typename Config>
mxmoe_status WorkspaceBytesSm100(int32_t num_experts, int sm_count, size_t* bytes) {
  WorkspaceCarver measure;
  ExpertArrays<Config> arrays{};
  void* cutlass = nullptr;
  size_t cutlass_bytes = 0;
  MXMOE_RETURN_IF_ERROR(
      CarveWorkspace<Config>(&measure, num_experts, sm_count, &arrays, &cutlass, &cutlass_bytes));
  *bytes = measure.RequiredBytes();
  return MXMOE_STATUS_OK;
}

template <typename Config>
mxmoe_status RunSm100(const GroupedGemmSm100Launch& launch) {
  using Gemm = typename Config::Gemm;
  const GroupedGemmSm100Problem& p = launch.problem;
  static_assert(ScaleLayoutMatchesTwin<Config>(129, 2880) &&
                    ScaleLayoutMatchesTwin<Config>(1, 4096) &&
                    ScaleLayoutMatchesTwin<Config>(256, 32),
                "CUTLASS's SM100 scale-factor layout no longer matches SWIZZLED_128X4");

  WorkspaceCarver carver(launch.workspace, launch.workspace_bytes);
  ExpertArrays<Config> arrays{};
  void* cutlass_workspace = nullptr;
  size_t cutlass_bytes = 0;
  MXMOE_RETURN_IF_ERROR(CarveWorkspace<Config>(&carver, p.num_experts, launch.sm_count, &arrays,
                                               &cutlass_workspace, &cutlass_bytes));

  cudaStream_t stream = static_cast<cudaStream_t>(launch.stream);
  constexpr int kThreads = 128;
  const int blocks = static_cast<int>((p.num_experts + kThreads - 1) / kThreads);
  WriteExpertArraysKernel<Config><<<blocks, kThreads, 0, stream>>>(
      p, launch.expert_offsets, launch.blockscale_offsets, launch.problem_sizes, arrays);
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();

  const typename Gemm::Arguments arguments =
      MakeArguments<Config>(p.num_experts, launch.device_id, launch.sm_count, arrays);
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(arguments);
  if (status != cutlass::Status::kSuccess) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "grouped_gemm (sm100): CUTLASS cannot implement n=",
                p.n, " k=", p.k, " experts=", p.num_experts, ": ",
                cutlassGetStatusString(status));
  }
  // initialize() encodes the TMA descriptor templates on the host (driver calls, no sync) and
  // sets the kernel's shared-memory attribute; run() launches on `stream`.
  status = gemm.initialize(arguments, cutlass_workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    return Fail(MXMOE_STATUS_CUDA_ERROR, "grouped_gemm (sm100): CUTLASS initialize failed: ",
                cutlassGetStatusString(status));
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return Fail(MXMOE_STATUS_CUDA_ERROR, "grouped_gemm (sm100): CUTLASS launch failed: ",
                cutlassGetStatusString(status), " (", cudaGetErrorName(err), ")");
  }
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  return MXMOE_STATUS_OK;
}

}  // namespace sm100
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM100_KERNEL_CUH_
