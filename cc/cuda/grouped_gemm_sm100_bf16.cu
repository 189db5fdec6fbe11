// The sm100 MXFP4 grouped GEMM with bfloat16 output: the one CUTLASS instantiation of this file
// (see grouped_gemm_sm100_kernel.cuh). Compiled for sm_100a only; never run on hardware here.
#include "cc/cuda/grouped_gemm_sm100_kernel.cuh"

namespace mxmoe {
namespace cuda {
namespace sm100 {

using ConfigBf16 = GroupedGemmSm100Config<cutlass::bfloat16_t>;

mxmoe_status GroupedGemmSm100WorkspaceBytesBf16(int32_t num_experts, int sm_count, size_t* bytes) {
  return WorkspaceBytesSm100<ConfigBf16>(num_experts, sm_count, bytes);
}

mxmoe_status RunGroupedGemmSm100Bf16(const GroupedGemmSm100Launch& launch) {
  return RunSm100<ConfigBf16>(launch);
}

}  // namespace sm100
}  // namespace cuda
}  // namespace mxmoe
