// Launch interface of the SM90 W4A4 grouped GEMM kernel (one explicit instantiation per token
// tile width in grouped_gemm_sm90_n*.cu). Host-only declarations: no CUDA device code here.
//
// The kernel computes, for every expert e and its rows [expert_offsets[e], expert_offsets[e+1]):
//   C[row, n] = sum over 128-wide K chunks of FP8(B chunk) . FP8(A chunk) * 2^(refB-127) *
//   2^(refA-127), with B = prepared weights (grouped_gemm_sm90_layout.h) and A = converted
//   activations. Weights are on WGMMA's M side (64 rows per math warpgroup, 128 per tile), tokens
//   on its N side (kBlockN per tile): the swap-AB arrangement, good for small m.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM90_KERNEL_H_
#define MXMOE_CUDA_GROUPED_GEMM_SM90_KERNEL_H_

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cc/cuda/grouped_gemm_sm90_layout.h"
#include "cc/cuda/quantize_device.cuh"
#include "cc/cuda/weighted_reduce.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {
namespace sm90 {

struct GemmKernelParams {
  const uint8_t* prepared;         // [E][P][C][kRecordBytes]
  const int32_t* expert_offsets;   // [E+1], device
  const float* factors;            // [C][factor_stride] fp32 activation chunk factors
  int64_t factor_stride;           // >= round_up(rows, 4) + kFactorSlack floats
  void* c;                         // [rows, n] bf16/fp16
  int64_t rows;                    // rows of a8 and c (writes past it are dropped)
  int32_t num_experts;
  int32_t n;
  int32_t num_panels;  // ceil(n / 64)
  int32_t num_chunks;  // ceil(k / 128)
  int32_t c_is_fp16;
  int32_t pingpong;    // token tile 128: the math warpgroups take turns issuing WGMMAs
};

struct GemmKernelLaunch {
  CUtensorMap act_map;     // a8 [rows, Kp] uint8, box {128, block_n}, 128B swizzle
  GemmKernelParams params;
  int grid;
};

// Shared-memory plan (bytes), shared by the kernel and the host: a ring of stages, each holding
// the activation tile (block_n x 128 E4M3, 128B-swizzled, 1024-aligned), two weight records
// (2 x kRecordBytes) and block_n activation factors; then the barriers and the scheduler's
// expert_offsets / tile prefix arrays.
// The factors of a token tile are fetched by one 1-D bulk copy of block_n + 4 floats starting at
// the 16-byte aligned row below row_base; rows of the factor array past `rows` are slack.
constexpr int kFactorSlack = 128 + 4;
constexpr int GemmFactorBytes(int block_n) { return (block_n + 4) * 4; }
constexpr int GemmStageBytes(int block_n) {
  return (block_n * 128 + 2 * kRecordBytes + GemmFactorBytes(block_n) + 1023) / 1024 * 1024;
}
// Narrow token tiles (decode) run two CTAs per SM: the per-chunk decode -> WGMMA -> promotion
// chain of one CTA leaves the SM mostly idle (latency-bound), a second CTA overlaps it. Their
// registers are capped at 80 per thread (65536 / 768), so no setmaxnreg and one chunk
// accumulator; their rings are sized to fit two CTAs in 227 KB.
constexpr int GemmCtasPerSm(int block_n) { return block_n <= 32 ? 2 : 1; }
constexpr int GemmStages(int block_n) {
  return block_n >= 128 ? 7 : block_n >= 64 ? 10 : block_n >= 32 ? 7 : 8;
}
// Epilogue staging, one [block_n tokens][64 rows] bf16/fp16 tile per math warpgroup, rows padded
// to 144 bytes so that the fragment stores are conflict-free and the 16-byte reads aligned.
constexpr int kEpilogueRowBytes = 144;
constexpr int GemmEpilogueOffset(int block_n) {
  return GemmStages(block_n) * GemmStageBytes(block_n);
}
constexpr int GemmBarrierOffset(int block_n) {
  return GemmEpilogueOffset(block_n) + 2 * block_n * kEpilogueRowBytes;
}
// After the barriers: the scheduler's arrays (the E4M3 tables live in static shared memory: no
// room for them here).
constexpr int GemmExpertOffset(int block_n) {
  return GemmBarrierOffset(block_n) + 2 * GemmStages(block_n) * 8;
}
inline size_t GemmKernelSmemBytes(int block_n, int num_experts) {
  return 1024 /* alignment slack */ + GemmExpertOffset(block_n) + 2 * 4 * (num_experts + 1);
}

// ---- the CUDA-core path for a few rows per expert (grouped_gemm_sm90_gemv.cu) ----------------
// Reads the MXFP4 activations as they are (no E4M3 conversion) and the prepared weights, or, in
// the MoE chain, the bf16/fp16 rows the chain's quantize kernel would read (GemvSource).
constexpr int kGemvMaxTokens = 4;  // rows of one expert per pass (more rows: more passes)
constexpr int kGemvCtasPerSm = 2;  // resident CTAs per SM (its __launch_bounds__)

// Where the kernel's activations come from: MXFP4 codes and swizzled scales (a, a_scales), or
// 16-bit rows of c's dtype that each CTA quantizes itself (GemmChain::source in grouped_gemm.h).
enum class GemvSource : int32_t { kMxfp4 = 0, kGather = 1, kSiluMul = 2, kGeneral = 3 };

struct GemvKernelParams {
  const uint8_t* prepared;            // [E][P][C][kRecordBytes]
  const uint8_t* a;                   // [rows, k/2] MXFP4 codes
  const uint8_t* a_scales;            // swizzled 128x4, grouped by blockscale_offsets
  const int32_t* expert_offsets;      // [E+1], device
  const int32_t* blockscale_offsets;  // [E+1], device
  void* c;                            // [rows, n] bf16/fp16
  int64_t rows;
  int32_t num_experts;
  int32_t n;
  int32_t k;
  int32_t num_panels;
  int32_t num_chunks;
  int32_t c_is_fp16;
  // Set only from the MoE layer's chain (GemmChain in grouped_gemm.h), with PREPARED weights: the
  // CTA reads the expert offsets, finds its expert and issues its first weight loads before its
  // PdlWait (see pdl.cuh: they were written two or more kernels earlier).
  int32_t offsets_before_wait;
  // The fused weighted reduce (reduce.output != NULL, num_tokens * slots_per_token <=
  // kGemvReduceMaxPairs, n == hidden_size): each CTA stores its y rows to c as usual, then counts
  // itself in reduce_counters[panel] (zero on entry); the panel's last CTA reduces the panel's
  // columns of every token into reduce.output with weighted_reduce.cuh's arithmetic.
  ReduceParams reduce;
  int32_t* reduce_counters;  // [num_panels]
  // GemvSource other than kMxfp4 (a and a_scales unused): the 16-bit rows (c's dtype) and, per
  // kind, the gather's slot table or the activation's options (GemmChain::source).
  GemvSource source;
  const void* src;
  const int32_t* row_source;
  int32_t slots_per_token;
  int32_t source_rows;
  quant::ActivationSpec activation;  // kGeneral
};

// The most (token, slot) pairs the fused reduce stages in shared memory.
constexpr int kGemvReduceMaxPairs = 16;

// Dynamic shared memory of the kernel: the experts' offsets, kGemvMaxTokens staged activation
// rows of K padded to 128 (int8) and their block factors, and the cross-warp partial sums.
int64_t GemvSmemBytes(int32_t num_experts, int64_t k);
// The heuristic takes the CUDA-core path only where its shared memory allows two CTAs per SM.
constexpr int64_t kGemvSmemLimit = 100 * 1024;

// One CTA per (expert slot, weight panel); num_slots >= the number of experts with rows
// (min(rows, num_experts) always suffices).
mxmoe_status LaunchGemvKernel(const GemvKernelParams& params, int num_slots,
                              cudaStream_t stream);

// Launches on `stream`; block_n in {16, 32, 64, 128}. Returns UNSUPPORTED for other values.
mxmoe_status LaunchGemmKernel(int block_n, const GemmKernelLaunch& launch, cudaStream_t stream);

template <int kBlockN>
mxmoe_status LaunchGemmKernelN(const GemmKernelLaunch& launch, cudaStream_t stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM90_KERNEL_H_
