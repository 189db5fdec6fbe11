// Argument validation for every C API entry point, run before any memory is written.
//
// Each Validate* function checks, in this order, and stops at the first failure with the
// documented status and a message naming the argument and its value:
//   1. the device (type CPU with id 0, or CUDA with id >= 0);
//   2. dimensions (>= 0; K-like dims % 32 == 0; num_experts in [1, 65536]; top_k in [1, E]),
//      enums (dtype, scale layout, weight format, backend), weight-struct consistency with the
//      operation's dims, and that no buffer's extents (a zero counted as one) times its element
//      size overflow int64, nor any workspace size;                          INVALID_ARGUMENT
//   3. (full mode) pointers: NULL is accepted only for a buffer of 0 bytes;  INVALID_ARGUMENT
//   4. the backend serving the device (backend.h); PREPARED weights must have been prepared by
//      that backend, and prepared_bytes cover its prepared size; UNSUPPORTED / INVALID_ARGUMENT
//   5. (full mode) CUDA backends: data pointers 16-byte aligned, int32/fp32 metadata 4-byte
//      aligned (MISALIGNED), and, when a CUDA device is visible, every pointer on device.id
//      (INVALID_ARGUMENT, "mismatched devices"). The CPU backend needs no alignment.
//   6. (full mode) CPU backend: device metadata read and checked completely: expert_offsets
//      (0 first, non-decreasing, last <= rows), blockscale_offsets (0 first, steps of
//      round_up(m_e, 128), last <= scale rows), problem_sizes rows == (m_e, n, k), topk_ids in
//      [0, E_global), expert_map entries in [-1, E_local). CUDA backends
//      cannot read device memory without a synchronisation; their kernels guard instead.
// Shapes-only mode (the *_size queries) runs steps 1, 2 and 4: a size depends on shapes, dtypes
// and the backend, never on pointers or data.
//
// Buffers that are not workspaces but must be large enough (prepare_weights' `prepared`) fail
// with INVALID_ARGUMENT; a workspace smaller than its query fails with WORKSPACE_TOO_SMALL.
#ifndef MXMOE_SRC_VALIDATE_H_
#define MXMOE_SRC_VALIDATE_H_

#include <stddef.h>

#include "mxmoe/mxmoe.h"

namespace mxmoe {

enum class ValidationMode {
  kShapesOnly,  // size queries
  kFull,        // the operation itself
};

constexpr int64_t kMaxExperts = int64_t{1} << 16;

mxmoe_status ValidateQuantize(const mxmoe_quantize_args& args, mxmoe_backend* backend);
mxmoe_status ValidateDequantize(const mxmoe_dequantize_args& args, mxmoe_backend* backend);
mxmoe_status ValidateExpertsQuantize(const mxmoe_experts_quantize_args& args,
                                     mxmoe_backend* backend);
mxmoe_status ValidateSiluMulExpertsQuantize(const mxmoe_silu_mul_experts_quantize_args& args,
                                            mxmoe_backend* backend);
// `unswizzle` swaps which side (input/output) is the swizzled one.
mxmoe_status ValidateSwizzleScales(const mxmoe_swizzle_scales_args& args, bool unswizzle,
                                   mxmoe_backend* backend);
mxmoe_status ValidateQuantizeWeights(const mxmoe_quantize_weights_args& args,
                                     mxmoe_backend* backend);
// `backend` receives the backend that will prepare (args.backend, or the device's for AUTO).
// prepared / prepared_bytes are checked by the caller once the size is known
// (CheckPreparedBuffer).
mxmoe_status ValidatePrepareWeights(const mxmoe_prepare_weights_args& args, ValidationMode mode,
                                    mxmoe_backend* backend);
mxmoe_status CheckPreparedBuffer(const mxmoe_prepare_weights_args& args, size_t needed);
// What mxmoe_prepare_weights_size answers for `backend` (args.weights' dims already checked).
mxmoe_status PrepareWeightsSizeFor(const mxmoe_prepare_weights_args& args, mxmoe_backend backend,
                                   size_t* bytes);
mxmoe_status ValidateGroupedGemm(const mxmoe_grouped_gemm_args& args, ValidationMode mode,
                                 mxmoe_backend* backend);
mxmoe_status ValidateMoeForward(const mxmoe_moe_forward_args& args, ValidationMode mode,
                                mxmoe_backend* backend);

// workspace_bytes >= needed (WORKSPACE_TOO_SMALL naming both), workspace non-NULL when needed > 0
// (INVALID_ARGUMENT), and on CUDA backends 16-byte aligned and on the device.
mxmoe_status ValidateWorkspace(const char* query, const void* workspace, size_t workspace_bytes,
                               size_t needed, mxmoe_backend backend, const mxmoe_device& device);
// The `needed` bytes the operation carves from `workspace` must not overlap any of its argument
// buffers (INVALID_ARGUMENT naming both): the kernels would overwrite their own inputs.
mxmoe_status CheckWorkspaceOverlap(const mxmoe_grouped_gemm_args& args, const void* workspace,
                                   size_t needed);
mxmoe_status CheckWorkspaceOverlap(const mxmoe_moe_forward_args& args, const void* workspace,
                                   size_t needed);

// True when a validated call has no output byte to write: the entry point then returns OK
// without calling a backend. Work is thereby bounded by the bytes of the buffers, never by a
// dimension alone (rows = 2^62 with cols = 0 once looped 2^62 times).
bool WritesNothing(const mxmoe_quantize_args& args);
bool WritesNothing(const mxmoe_dequantize_args& args);
bool WritesNothing(const mxmoe_experts_quantize_args& args);
bool WritesNothing(const mxmoe_silu_mul_experts_quantize_args& args);
bool WritesNothing(const mxmoe_swizzle_scales_args& args);  // either direction
bool WritesNothing(const mxmoe_quantize_weights_args& args);
bool WritesNothing(const mxmoe_grouped_gemm_args& args);
bool WritesNothing(const mxmoe_moe_forward_args& args);

}  // namespace mxmoe

#endif  // MXMOE_SRC_VALIDATE_H_
