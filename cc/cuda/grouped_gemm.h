// CUDA grouped GEMM backends (sm90: E2M1->E4M3 folding on FP8 WGMMA; sm100: CUTLASS block-scaled
// MXF4) and the CUDA MoE forward. Arguments arrive validated by cc/src (limits included); each
// function makes args.device current, launches asynchronously on `stream`, uses only the
// caller's workspace and never synchronises.
#ifndef MXMOE_CUDA_GROUPED_GEMM_H_
#define MXMOE_CUDA_GROUPED_GEMM_H_

#include <stddef.h>
#include <stdint.h>

#include "cc/cuda/quantize.h"
#include "cc/cuda/weighted_reduce.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

// Each kernel's limits beyond the public contract (CUTLASS's can_implement): cc/src/validate.cc
// asks them for the size query and for the run alike, after the contract's own checks, so a
// limit shows up at size-query time and the entry points below never check again. Shapes only
// (the contract's 16-byte alignment of CUDA data pointers covers every kernel here); host code
// with no CUDA call, so tests/cc/kernel_limits_test.cc runs them without a GPU. n = 0 (nothing
// to write) is always implemented.

// sm90: n % 32 == 0, k > 0, n and k < 2^30, rows < 2^31 - 256, and the experts' offsets in shared
// memory (the activation conversion's 48 KB, the GEMM's 227 KB next to the ring of the token
// tile chosen for this problem on a device with `num_sms` multiprocessors).
mxmoe_status CanImplementPrepareWeightsSm90(const mxmoe_expert_weights& weights);
mxmoe_status CanImplementGroupedGemmSm90(int64_t rows, int64_t n, int64_t k, int32_t num_experts,
                                         int num_sms);
// sm100: n % 8 == 0 (16-byte rows of c for TMA), k > 0, n and k < 2^31.
mxmoe_status CanImplementGroupedGemmSm100(int64_t n, int64_t k);

// sm90 (Hopper)
mxmoe_status PrepareWeightsSm90Size(const mxmoe_prepare_weights_args& args, size_t* bytes);
mxmoe_status PrepareWeightsSm90(const mxmoe_prepare_weights_args& args, void* stream);
mxmoe_status GroupedGemmSm90WorkspaceSize(const mxmoe_grouped_gemm_args& args, size_t* bytes);
mxmoe_status GroupedGemmSm90(const mxmoe_grouped_gemm_args& args, void* workspace,
                             size_t workspace_bytes, void* stream);

// What the MoE layer's kernel chain (moe_forward_cuda.cu) may ask of the sm90 GEMM beyond a
// standalone call, which passes none of it.
// Whether GroupedGemmSm90Chained takes a GemmChain::source with this activation for these
// arguments: where the CUDA-core path serves the GEMM (at most 16 rows) in one wave of CTAs, for
// the gather (kNone) and plain SiLU (measured: elsewhere the quantize kernel is faster);
// MXMOE_SM90_GEMV_QUANTIZE forces it (0 never; a mask: 1 the gather, 2 the activation, wherever
// the path runs).
bool GroupedGemmSm90TakesSource(const mxmoe_grouped_gemm_args& args,
                                ExpertsActivation activation);

struct GemmChain {
  // The kernel right before this GEMM in the stream is one of the chain's own, which waits before
  // it lets its dependents launch (pdl.cuh): whatever earlier kernels wrote (the expert offsets,
  // the routing) is final when this GEMM starts, so the CUDA-core path reads it, and its PREPARED
  // weights, before its own wait.
  bool offsets_before_wait = false;
  // Fold the weighted reduce into the CUDA-core path's epilogue, where that path serves this GEMM
  // and reduce->num_tokens * reduce->slots_per_token <= 16 (n == hidden_size);
  // reduce_counters: sm90::NumPanels(n) int32, zero on entry.
  const ReduceParams* reduce = nullptr;
  int32_t* reduce_counters = nullptr;
  // The chain's quantize step for A (quantize.h) done inside the GEMM instead of by
  // ExpertsQuantizeRows: the GEMM reads source->input (bf16/fp16 rows of c's dtype; gathered
  // through source->row_source for kNone, [gate | up] with the activation otherwise) and
  // quantizes them with the quantize kernels' device functions (quantize_device.cuh), so its
  // result is bit-identical to quantize-then-GEMM; args.a and args.a_scales are unused. Where
  // GroupedGemmSm90TakesSource(args, source->activation) says so; INTERNAL otherwise.
  const ExpertsQuantizeJob* source = nullptr;
};

// GroupedGemmSm90 with the chain's requests; *reduced tells whether the weighted reduce was
// folded in (if not, the caller runs it).
mxmoe_status GroupedGemmSm90Chained(const mxmoe_grouped_gemm_args& args, void* workspace,
                                    size_t workspace_bytes, void* stream, const GemmChain& chain,
                                    bool* reduced);

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
