// Tile configuration choice for the SM90 grouped GEMM, kept apart from the kernels.
//
// The host cannot see the per-expert row counts (they live on the device), so the choice uses
// what it knows: total rows, experts, N, K. The token tile (WGMMA N, swap-AB) follows the
// average rows per expert: decode (a few tokens per expert) wants a narrow token tile so that
// no tensor work and no activation bytes are wasted, prefill wants the widest tile the
// accumulators allow (128: two fp32 accumulator sets of 64 registers per thread).
// MXMOE_PRINT_CONFIG=1 prints each distinct (problem, choice) once to stderr.
#ifndef MXMOE_CUDA_GROUPED_GEMM_SM90_HEURISTICS_H_
#define MXMOE_CUDA_GROUPED_GEMM_SM90_HEURISTICS_H_

#include <stdint.h>

#include <string>

namespace mxmoe {
namespace cuda {
namespace sm90 {

struct GemmProblem {
  int64_t rows;  // total activation rows (sum of m_e, or an upper bound)
  int64_t n;
  int64_t k;
  int32_t num_experts;
  int32_t num_sms;
  std::string ToString() const;
};

struct GemmConfig {
  int block_n;  // token tile: 16, 32, 64 or 128
  int grid;     // persistent CTAs
  bool pingpong = true;  // token tile 128: math warpgroups alternate on the tensor cores
  // The CUDA-core kernel (grouped_gemm_sm90_gemv.cu) instead of the WGMMA kernel: at most
  // kGemvMaxRows rows in all (the MoE at T <= 16 / top_k), or at most kGemvWideMaxRows where its
  // grid is at most kGemvWideMaxWaves waves (GemvWaves), where the WGMMA kernel's per-chunk
  // latency with one token per tile dominates; block_n and grid are then unused.
  bool gemv = false;
  std::string ToString() const;
};

// Rows up to which the CUDA-core path is taken (docs/perf-notes.md: measured against the WGMMA
// kernel at T = 1, 2, 4, 8, 16 of the three model shapes on an H200: faster at up to 16 rows,
// i.e. T <= 4 at top-4 and T <= 2 at top-8; slower from 32 rows on).
constexpr int64_t kGemvMaxRows = 16;
// Up to 32 rows (T = 4 at top-8, T = 8 at top-4) the CUDA-core path is also taken where its grid,
// one CTA per (active expert, 64-row panel) with min(rows, experts) experts assumed active, is at
// most 4 waves of resident CTAs: measured on the H200 (docs/perf-notes.md, "32 rows"), it wins
// there for Qwen3-30B-A3B at T = 4 (the layer 70 -> 59 us; 768 and 1024 CTAs) and loses for the
// larger weights of GPT-OSS at T = 8 and DeepSeek-V3 at T = 4 (1440-3584 CTAs).
constexpr int64_t kGemvWideMaxRows = 32;
constexpr int64_t kGemvWideMaxWaves = 4;

// Waves of the CUDA-core kernel's grid for `problem` (at least 1).
int64_t GemvWaves(const GemmProblem& problem);

// Token tiles the kernels are instantiated for (every one is tested).
constexpr int kBlockNChoices[] = {16, 32, 64, 128};

GemmConfig ChooseGemmConfig(const GemmProblem& problem);

// Test hooks: MXMOE_SM90_BLOCK_N=16|32|64|128 forces the token tile of the WGMMA kernel (the
// heuristic otherwise; it also turns the CUDA-core path off);
// MXMOE_SM90_PINGPONG=0 turns the warpgroup ping-pong of the 128 tile off (experiments);
// MXMOE_SM90_GEMV=0 never takes the CUDA-core path, =1 takes it at any row count where its shared
// memory fits (tests of both paths on the same shapes, A/B runs).
GemmConfig ChooseGemmConfigWithOverride(const GemmProblem& problem);

}  // namespace sm90
}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_GROUPED_GEMM_SM90_HEURISTICS_H_
