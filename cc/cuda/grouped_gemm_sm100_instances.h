// The seam between grouped_gemm_sm100.cu (validation, dispatch, weight preparation; no CUTLASS)
// and the two CUTLASS instantiations, one per output type, each in its own .cu file so Bazel
// compiles and caches them separately (grouped_gemm_sm100_bf16.cu, grouped_gemm_sm100_fp16.cu).
// Free of CUDA and CUTLASS types.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM100_INSTANCES_H_
#define MXMOE_CUDA_GROUPED_GEMM_SM100_INSTANCES_H_

#include <stddef.h>
#include <stdint.h>

#include "cc/cuda/grouped_gemm_sm100_setup.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {
namespace sm100 {

struct GroupedGemmSm100Launch {
  GroupedGemmSm100Problem problem;     // b / b_scales already resolved to the swizzled format
  const int32_t* expert_offsets;       // device, [E+1]
  const int32_t* blockscale_offsets;   // device, [E+1]
  const int32_t* problem_sizes;        // device, [E, 3], or nullptr
  void* workspace;                     // this instance's slice (GroupedGemmSm100*WorkspaceBytes)
  size_t workspace_bytes;
  int device_id;                       // the current CUDA device
  int sm_count;                        // of that device; sizes CUTLASS's workspace
  void* stream;                        // cudaStream_t
};

// Workspace of one call: the per-expert argument arrays plus CUTLASS's per-SM tensor maps.
mxmoe_status GroupedGemmSm100WorkspaceBytesBf16(int32_t num_experts, int sm_count, size_t* bytes);
mxmoe_status GroupedGemmSm100WorkspaceBytesFp16(int32_t num_experts, int sm_count, size_t* bytes);

// Launches the setup kernel and the GEMM on launch.stream; never synchronises.
mxmoe_status RunGroupedGemmSm100Bf16(const GroupedGemmSm100Launch& launch);
mxmoe_status RunGroupedGemmSm100Fp16(const GroupedGemmSm100Launch& launch);

}  // namespace sm100
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM100_INSTANCES_H_
