// Placeholder until the sm100 grouped GEMM lands (issue 6): reports UNSUPPORTED with a message; nothing
// falls back silently to another backend. Delete this file when the real implementation lands.
#include "cc/cuda/grouped_gemm.h"
#include "cc/src/status.h"

namespace mxmoe {
namespace cuda {
namespace {
mxmoe_status NotYet(const char* op) {
  return Fail(MXMOE_STATUS_UNSUPPORTED, op, ": not implemented in this build yet");
}
}  // namespace

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
}  // namespace cuda
}  // namespace mxmoe
