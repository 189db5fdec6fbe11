// CUDA grouped GEMM backends (sm90: E2M1->E4M3 folding on FP8 WGMMA; sm100: CUTLASS block-scaled
// MXF4) and the CUDA MoE forward. Arguments arrive validated by cc/src; each function launches
// asynchronously on `stream`, uses only the caller's workspace and never synchronises.
#ifndef MXMOE_CUDA_GROUPED_GEMM_H_
#define MXMOE_CUDA_GROUPED_GEMM_H_

#include <stddef.h>

#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

// sm90 (Hopper)
mxmoe_status PrepareWeightsSm90Size(const mxmoe_prepare_weights_args& args, size_t* bytes);
mxmoe_status PrepareWeightsSm90(const mxmoe_prepare_weights_args& args, void* stream);
mxmoe_status GroupedGemmSm90WorkspaceSize(const mxmoe_grouped_gemm_args& args, size_t* bytes);
mxmoe_status GroupedGemmSm90(const mxmoe_grouped_gemm_args& args, void* workspace,
                             size_t workspace_bytes, void* stream);

// sm100 (Blackwell)
mxmoe_status PrepareWeightsSm100Size(const mxmoe_prepare_weights_args& args, size_t* bytes);
mxmoe_status PrepareWeightsSm100(const mxmoe_prepare_weights_args& args, void* stream);
mxmoe_status GroupedGemmSm100WorkspaceSize(const mxmoe_grouped_gemm_args& args, size_t* bytes);
mxmoe_status GroupedGemmSm100(const mxmoe_grouped_gemm_args& args, void* workspace,
                              size_t workspace_bytes, void* stream);

// MoE forward on a CUDA device (routing, permutation, quantize, two grouped GEMMs, reduce).
mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args& args, mxmoe_backend backend,
                                     size_t* bytes);
mxmoe_status MoeForward(const mxmoe_moe_forward_args& args, mxmoe_backend backend,
                        void* workspace, size_t workspace_bytes, void* stream);

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_H_
