// Placeholder until the CUDA MoE forward lands (issue 5): reports UNSUPPORTED with a message; nothing
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

mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args&, mxmoe_backend, size_t*) {
  return NotYet("moe_forward (cuda)");
}
mxmoe_status MoeForward(const mxmoe_moe_forward_args&, mxmoe_backend, void*, size_t, void*) {
  return NotYet("moe_forward (cuda)");
}

}  // namespace cuda
}  // namespace mxmoe
