// Placeholders until the sm90 / sm100 grouped GEMMs and the CUDA MoE forward land (issues 4, 5,
// 6): each reports UNSUPPORTED with a message; nothing falls back silently to another backend.
// Whoever implements a family deletes its functions from this file.
#include "cc/cuda/grouped_gemm.h"
#include "cc/src/status.h"

namespace mxmoe {
namespace cuda {
namespace {
mxmoe_status NotYet(const char* op) {
  return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": not implemented in this build yet");
}
}  // namespace

mxmoe_status PrepareWeightsSm90Size(const mxmoe_prepare_weights_args&, size_t*) {
  return NotYet("prepare_weights (sm90)");
}
mxmoe_status PrepareWeightsSm90(const mxmoe_prepare_weights_args&, void*) {
  return NotYet("prepare_weights (sm90)");
}
mxmoe_status GroupedGemmSm90WorkspaceSize(const mxmoe_grouped_gemm_args&, size_t*) {
  return NotYet("grouped_gemm (sm90)");
}
mxmoe_status GroupedGemmSm90(const mxmoe_grouped_gemm_args&, void*, size_t, void*) {
  return NotYet("grouped_gemm (sm90)");
}
mxmoe_status PrepareWeightsSm100Size(const mxmoe_prepare_weights_args&, size_t*) {
  return NotYet("prepare_weights (sm100)");
}
mxmoe_status PrepareWeightsSm100(const mxmoe_prepare_weights_args&, void*) {
  return NotYet("prepare_weights (sm100)");
}
mxmoe_status GroupedGemmSm100WorkspaceSize(const mxmoe_grouped_gemm_args&, size_t*) {
  return NotYet("grouped_gemm (sm100)");
}
mxmoe_status GroupedGemmSm100(const mxmoe_grouped_gemm_args&, void*, size_t, void*) {
  return NotYet("grouped_gemm (sm100)");
}
mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args&, mxmoe_backend, size_t*) {
  return NotYet("moe_forward (cuda)");
}
mxmoe_status MoeForward(const mxmoe_moe_forward_args&, mxmoe_backend, void*, size_t, void*) {
  return NotYet("moe_forward (cuda)");
}

}  // namespace cuda
}  // namespace mxmoe
