// The MoE forward on a CUDA device (issue 5): routing, metadata, fused gather + quantize, two
// grouped GEMMs (sm90 or sm100 backend), fused SiLU-and-mul + quantize, weighted top-k reduce.
//
// Launch sequence (7 launches, no host synchronisation, no allocation, CUDA-graph capturable):
//   1. RoutingKernel           router logits -> top-k (fp32 softmax, ties to the lower id) or
//                              copy of precomputed top-k; expert_map applied -> local ids.
//   2. MetadataKernel          one block: per-expert counts, expert_offsets, blockscale_offsets,
//                              problem sizes, row permutation (slot -> row, row -> slot).
//   3. GatherQuantizeKernel    hidden rows straight into the expert-sorted MXFP4 layout (no bf16
//                              copy in between), swizzled scales, padding bytes zeroed.
//   4. grouped GEMM 1          [rows, H] x w13 -> [rows, 2I] activation dtype.
//   5. SiluMulExpertsQuantize  (cc/cuda/quantize.h).
//   6. grouped GEMM 2          [rows, I] x w2 -> [rows, H] activation dtype.
//   7. WeightedReduceKernel    out[t] = sum over slots of w * y, fp32, rounded once.
// Device-side inputs the host cannot check: a precomputed top-k id outside [0, E_global) and an
// expert_map entry outside [0, E_local) make that slot contribute nothing (never out of bounds).
// Limits: E_local <= 1024 (one metadata block), top_k <= 32, E_global <= 4096.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/quantize.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {
namespace {

namespace fmt = ::mxmoe::format;

constexpr int kMaxLocalExperts = 1024;
constexpr int kMaxTopK = 32;
constexpr int kMaxGlobalExperts = 4096;
constexpr int kMetadataThreads = 1024;
constexpr size_t kSliceAlignment = 256;

// ---- workspace layout ---------------------------------------------------------------------------

struct Layout {
  int64_t slots = 0;        // T * top_k
  int64_t scale_rows = 0;   // bound on blockscale_offsets[E]
  size_t topk_ids = 0, topk_weights = 0, local_expert = 0, slot_row = 0, row_slot = 0;
  size_t expert_offsets = 0, blockscale_offsets = 0, problem_sizes1 = 0, problem_sizes2 = 0;
  size_t a1 = 0, a1_scales = 0, c1 = 0, a2 = 0, a2_scales = 0, c2 = 0, gemm = 0;
  size_t total = 0;
};

size_t Carve(size_t* cursor, size_t bytes) {
  const size_t offset = (*cursor + kSliceAlignment - 1) / kSliceAlignment * kSliceAlignment;
  *cursor = offset + bytes;
  return offset;
}

int64_t ScaleCols(int64_t k) { return fmt::RoundUp(k / 32, fmt::kSwizzleCols); }

Layout MakeLayout(const mxmoe_moe_forward_args& args, size_t gemm_bytes) {
  Layout l;
  const int64_t t = args.num_tokens, k = args.top_k, h = args.hidden_size;
  const int64_t inter = args.intermediate_size, e = args.num_local_experts;
  l.slots = t * k;
  // Each expert with rows pads up to 127 rows; at most min(slots, E) experts have rows.
  l.scale_rows = fmt::RoundUp(l.slots + (l.slots < e ? l.slots : e) * 127, fmt::kSwizzleRows);
  const int64_t act_bytes = 2;
  size_t c = 0;
  l.topk_ids = Carve(&c, sizeof(int32_t) * l.slots);
  l.topk_weights = Carve(&c, sizeof(float) * l.slots);
  l.local_expert = Carve(&c, sizeof(int32_t) * l.slots);
  l.slot_row = Carve(&c, sizeof(int32_t) * l.slots);
  l.row_slot = Carve(&c, sizeof(int32_t) * l.slots);
  l.expert_offsets = Carve(&c, sizeof(int32_t) * (e + 1));
  l.blockscale_offsets = Carve(&c, sizeof(int32_t) * (e + 1));
  l.problem_sizes1 = Carve(&c, sizeof(int32_t) * 3 * e);
  l.problem_sizes2 = Carve(&c, sizeof(int32_t) * 3 * e);
  l.a1 = Carve(&c, l.slots * h / 2);
  l.a1_scales = Carve(&c, l.scale_rows * ScaleCols(h));
  l.c1 = Carve(&c, l.slots * 2 * inter * act_bytes);
  l.a2 = Carve(&c, l.slots * inter / 2);
  l.a2_scales = Carve(&c, l.scale_rows * ScaleCols(inter));
  l.c2 = Carve(&c, l.slots * h * act_bytes);
  l.gemm = Carve(&c, gemm_bytes);
  l.total = c + kSliceAlignment;  // the caller's base pointer may not be 256-aligned
  return l;
}

// ---- activation dtype helpers ----------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float ToFloat(T v);
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float ToFloat<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float ToFloat<float>(float v) {
  return v;
}

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

// ---- 1. routing --------------------------------------------------------------------------------

struct RoutingParams {
  const void* logits;
  const int32_t* given_ids;
  const float* given_weights;
  const int32_t* expert_map;
  int32_t* topk_ids;
  float* topk_weights;
  int32_t* local_expert;
  int64_t num_tokens;
  int32_t num_global_experts;
  int32_t num_local_experts;
  int32_t top_k;
  int32_t renormalize;
};

__device__ __forceinline__ int32_t MapToLocal(const RoutingParams& p, int32_t global_id) {
  if (global_id < 0 || global_id >= p.num_global_experts) return -1;
  const int32_t local = p.expert_map != nullptr ? p.expert_map[global_id] : global_id;
  return (local >= 0 && local < p.num_local_experts) ? local : -1;
}

// Precomputed top-k: copy and map. One thread per slot.
__global__ void CopyTopKKernel(RoutingParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.num_tokens * p.top_k) return;
  const int32_t id = p.given_ids[i];
  p.topk_ids[i] = id;
  p.topk_weights[i] = p.given_weights[i];
  p.local_expert[i] = MapToLocal(p, id);
}

// One warp per token. Top-k is chosen on the fp32 logits (softmax is monotone), ties to the lower
// id; weights are the fp32 softmax probabilities of the chosen experts, optionally renormalised.
template <typename LogitT>
__global__ void RoutingKernel(RoutingParams p) {
  const int warps_per_block = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  extern __shared__ uint32_t taken_bits[];  // per warp: ceil(E/32) words
  const int words = (p.num_global_experts + 31) / 32;
  uint32_t* taken = taken_bits + (threadIdx.x / 32) * words;
  if (token >= p.num_tokens) return;
  const LogitT* row = static_cast<const LogitT*>(p.logits) + token * p.num_global_experts;
  for (int w = lane; w < words; w += 32) taken[w] = 0;

  float max_logit = -INFINITY;
  for (int e = lane; e < p.num_global_experts; e += 32) max_logit = fmaxf(max_logit, ToFloat(row[e]));
  for (int o = 16; o > 0; o /= 2) max_logit = fmaxf(max_logit, __shfl_xor_sync(~0u, max_logit, o));
  float sum = 0.f;
  for (int e = lane; e < p.num_global_experts; e += 32) {
    sum = MXMOE_ADD(sum, fmt::ExpF32(MXMOE_ADD(ToFloat(row[e]), -max_logit)));
  }
  for (int o = 16; o > 0; o /= 2) sum = MXMOE_ADD(sum, __shfl_xor_sync(~0u, sum, o));
  __syncwarp();

  float chosen_sum = 0.f;
  float my_weight = 0.f;  // lane j < top_k keeps slot j
  int32_t my_id = -1;
  for (int j = 0; j < p.top_k; ++j) {
    float best = -INFINITY;
    int32_t best_id = 0x7FFFFFFF;
    for (int e = lane; e < p.num_global_experts; e += 32) {
      if (taken[e / 32] & (1u << (e % 32))) continue;
      const float v = ToFloat(row[e]);
      if (best_id == 0x7FFFFFFF || v > best) {  // lanes scan ids in increasing order
        best = v;
        best_id = e;
      }
    }
    for (int o = 16; o > 0; o /= 2) {
      const float other = __shfl_xor_sync(~0u, best, o);
      const int32_t other_id = __shfl_xor_sync(~0u, best_id, o);
      if (other > best || (other == best && other_id < best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    // NaN logits never compare greater: a row of NaNs picks the lowest free ids.
    if (best_id == 0x7FFFFFFF) best_id = 0;
    if (lane == 0) taken[best_id / 32] |= 1u << (best_id % 32);
    __syncwarp();
    const float prob = fmt::ExpF32(MXMOE_ADD(best, -max_logit)) / sum;
    chosen_sum = MXMOE_ADD(chosen_sum, prob);
    if (lane == j) {
      my_weight = prob;
      my_id = best_id;
    }
  }
  if (lane < p.top_k) {
    const float weight = p.renormalize ? my_weight / chosen_sum : my_weight;
    const int64_t slot = token * p.top_k + lane;
    p.topk_ids[slot] = my_id;
    p.topk_weights[slot] = weight;
    p.local_expert[slot] = MapToLocal(p, my_id);
  }
}

// ---- 2. metadata ------------------------------------------------------------------------------

struct MetadataParams {
  const int32_t* local_expert;  // [slots]
  int32_t* slot_row;            // [slots] row in the expert-sorted layout, or -1
  int32_t* row_slot;            // [slots] inverse (rows past expert_offsets[E] untouched)
  int32_t* expert_offsets;      // [E+1]
  int32_t* blockscale_offsets;  // [E+1]
  int32_t* problem_sizes1;      // [E, 3] (m_e, 2I, H)
  int32_t* problem_sizes2;      // [E, 3] (m_e, H, I)
  int64_t slots;
  int32_t num_experts;
  int32_t hidden_size;
  int32_t intermediate_size;
};

// Inclusive scan of one value per thread across the block (blockDim.x = kMetadataThreads).
__device__ int BlockInclusiveScan(int value, int* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 1; o < 32; o *= 2) {
    const int other = __shfl_up_sync(~0u, value, o);
    if (lane >= o) value += other;
  }
  if (lane == 31) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int total = warp_totals[lane];
    for (int o = 1; o < 32; o *= 2) {
      const int other = __shfl_up_sync(~0u, total, o);
      if (lane >= o) total += other;
    }
    warp_totals[lane] = total;
  }
  __syncthreads();
  return value + (warp > 0 ? warp_totals[warp - 1] : 0);
}

__global__ void __launch_bounds__(kMetadataThreads) MetadataKernel(MetadataParams p) {
  __shared__ int counts[kMaxLocalExperts];
  __shared__ int cursor[kMaxLocalExperts];
  __shared__ int warp_totals[32];
  const int tid = threadIdx.x;
  for (int e = tid; e < kMaxLocalExperts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t i = tid; i < p.slots; i += blockDim.x) {
    const int e = p.local_expert[i];
    if (e >= 0) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  const int my_count = tid < p.num_experts ? counts[tid] : 0;
  const int my_padded = (my_count + 127) / 128 * 128;
  const int end = BlockInclusiveScan(my_count, warp_totals);
  __syncthreads();
  const int padded_end = BlockInclusiveScan(my_padded, warp_totals);
  if (tid < p.num_experts) {
    p.expert_offsets[tid + 1] = end;
    p.blockscale_offsets[tid + 1] = padded_end;
    cursor[tid] = end - my_count;
    p.problem_sizes1[3 * tid + 0] = my_count;
    p.problem_sizes1[3 * tid + 1] = 2 * p.intermediate_size;
    p.problem_sizes1[3 * tid + 2] = p.hidden_size;
    p.problem_sizes2[3 * tid + 0] = my_count;
    p.problem_sizes2[3 * tid + 1] = p.hidden_size;
    p.problem_sizes2[3 * tid + 2] = p.intermediate_size;
  }
  if (tid == 0) {
    p.expert_offsets[0] = 0;
    p.blockscale_offsets[0] = 0;
  }
  __syncthreads();
  // Rows within an expert come in atomic order; each row's result does not depend on its
  // position, so the output is still deterministic.
  for (int64_t i = tid; i < p.slots; i += blockDim.x) {
    const int e = p.local_expert[i];
    int row = -1;
    if (e >= 0) {
      row = atomicAdd(&cursor[e], 1);
      p.row_slot[row] = static_cast<int32_t>(i);
    }
    p.slot_row[i] = row;
  }
}

// ---- 3. gather + quantize ---------------------------------------------------------------------

struct GatherParams {
  const void* hidden;            // [T, H]
  const int32_t* row_slot;       // [rows]
  const int32_t* expert_offsets;
  const int32_t* blockscale_offsets;
  uint8_t* packed;               // [slots, H/2]
  uint8_t* scales;               // [scale_rows, round_up(H/32,4)]
  int64_t scale_row_bound;       // grid covers this many padded rows
  int32_t num_experts;
  int32_t top_k;
  int32_t hidden_size;
};

// One thread per (padded row, scale column): quantizes one 32-element block of a real row, or
// writes a zero scale for a padding row / padding column.
template <typename ActT>
__global__ void GatherQuantizeKernel(GatherParams p) {
  extern __shared__ int32_t offsets[];  // [2 * (E+1)]: expert_offsets then blockscale_offsets
  const int e_count = p.num_experts;
  for (int i = threadIdx.x; i <= e_count; i += blockDim.x) {
    offsets[i] = p.expert_offsets[i];
    offsets[e_count + 1 + i] = p.blockscale_offsets[i];
  }
  __syncthreads();
  const int32_t* bso = offsets + e_count + 1;
  const int64_t blocks_per_row = p.hidden_size / 32;
  const int64_t cols = fmt::RoundUp(blocks_per_row, fmt::kSwizzleCols);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t padded_row = item / cols;
  const int64_t col = item % cols;
  if (padded_row >= p.scale_row_bound || padded_row >= bso[e_count]) return;
  // Expert whose padded scale block holds this row: last e with bso[e] <= padded_row.
  int lo = 0, hi = e_count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (bso[mid] <= padded_row) lo = mid; else hi = mid - 1;
  }
  const int e = lo;
  const int64_t local = padded_row - bso[e];
  const int64_t m_e = offsets[e + 1] - offsets[e];
  uint8_t* scale_out = p.scales + static_cast<int64_t>(bso[e]) * cols +
                       fmt::SwizzledOffset(local, col, blocks_per_row);
  if (local >= m_e || col >= blocks_per_row) {
    *scale_out = 0;
    return;
  }
  const int64_t row = offsets[e] + local;
  const int64_t token = p.row_slot[row] / p.top_k;
  const ActT* src = static_cast<const ActT*>(p.hidden) + token * p.hidden_size + col * 32;
  float v[32];
  const uint4* src4 = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 chunk = __ldg(src4 + q);
    const ActT* h = reinterpret_cast<const ActT*>(&chunk);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[q * 8 + j] = ToFloat(h[j]);
  }
  float amax = 0.f;
  bool has_nan = false;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    has_nan |= fmt::IsNaN(v[j]);
    amax = fmaxf(amax, fabsf(v[j]));
  }
  uint4 out = make_uint4(0, 0, 0, 0);
  uint8_t scale = fmt::kScaleNaN;
  if (!has_nan) {
    scale = fmt::ScaleFromAmax(amax);
    const float mult = fmt::QuantMultiplier(scale);
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        word |= static_cast<uint32_t>(fmt::FloatToE2M1(MXMOE_MUL(v[w * 8 + j], mult))) << (4 * j);
      }
      words[w] = word;
    }
    out = make_uint4(words[0], words[1], words[2], words[3]);
  }
  *reinterpret_cast<uint4*>(p.packed + row * (p.hidden_size / 2) + col * 16) = out;
  *scale_out = scale;
}

// ---- 7. weighted reduce ---------------------------------------------------------------------

template <typename ActT>
__global__ void WeightedReduceKernel(const ActT* __restrict__ y, const int32_t* __restrict__ slot_row,
                                     const float* __restrict__ topk_weights, ActT* __restrict__ out,
                                     int64_t num_tokens, int32_t top_k, int32_t hidden_size) {
  // One thread per 8 output elements (16 bytes).
  const int64_t vecs_per_row = hidden_size / 8;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= num_tokens * vecs_per_row) return;
  const int64_t token = item / vecs_per_row;
  const int64_t vec = item % vecs_per_row;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < top_k; ++s) {
    const int32_t row = slot_row[token * top_k + s];
    if (row < 0) continue;
    const float w = topk_weights[token * top_k + s];
    const uint4 chunk = *reinterpret_cast<const uint4*>(y + row * hidden_size + vec * 8);
    const ActT* h = reinterpret_cast<const ActT*>(&chunk);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = fmaf(w, ToFloat(h[j]), acc[j]);
  }
  uint4 result;
  ActT* r = reinterpret_cast<ActT*>(&result);
#pragma unroll
  for (int j = 0; j < 8; ++j) r[j] = FromFloat<ActT>(acc[j]);
  *reinterpret_cast<uint4*>(out + token * hidden_size + vec * 8) = result;
}

// ---- host side --------------------------------------------------------------------------------

mxmoe_status CheckLimits(const mxmoe_moe_forward_args& args) {
  if (args.num_local_experts > kMaxLocalExperts) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "num_local_experts must be <= ", kMaxLocalExperts,
                " on CUDA, got ", args.num_local_experts);
  }
  if (args.top_k > kMaxTopK) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "top_k must be <= ", kMaxTopK, " on CUDA, got ",
                args.top_k);
  }
  if (args.num_global_experts > kMaxGlobalExperts) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "num_global_experts must be <= ", kMaxGlobalExperts,
                " on CUDA, got ", args.num_global_experts);
  }
  if (args.num_tokens * args.top_k > INT32_MAX / 2) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "num_tokens * top_k must be < 2^30 on CUDA, got ",
                args.num_tokens * args.top_k);
  }
  return MXMOE_STATUS_OK;
}

mxmoe_grouped_gemm_args GemmArgs(const mxmoe_moe_forward_args& args, const Layout& l, char* base,
                                 int gemm_index) {
  mxmoe_grouped_gemm_args g = {};
  g.rows = l.slots;
  g.num_experts = args.num_local_experts;
  g.expert_offsets = reinterpret_cast<const int32_t*>(base + l.expert_offsets);
  g.blockscale_offsets = reinterpret_cast<const int32_t*>(base + l.blockscale_offsets);
  g.a_scale_rows = l.scale_rows;
  g.c_dtype = args.activation_dtype;
  g.device = args.device;
  if (gemm_index == 1) {
    g.n = 2 * args.intermediate_size;
    g.k = args.hidden_size;
    g.a = reinterpret_cast<const uint8_t*>(base + l.a1);
    g.a_scales = reinterpret_cast<const uint8_t*>(base + l.a1_scales);
    g.b = args.w13;
    g.problem_sizes = reinterpret_cast<const int32_t*>(base + l.problem_sizes1);
    g.c = base + l.c1;
  } else {
    g.n = args.hidden_size;
    g.k = args.intermediate_size;
    g.a = reinterpret_cast<const uint8_t*>(base + l.a2);
    g.a_scales = reinterpret_cast<const uint8_t*>(base + l.a2_scales);
    g.b = args.w2;
    g.problem_sizes = reinterpret_cast<const int32_t*>(base + l.problem_sizes2);
    g.c = base + l.c2;
  }
  return g;
}

mxmoe_status GemmWorkspaceSize(const mxmoe_grouped_gemm_args& g, mxmoe_backend backend,
                               size_t* bytes) {
  if (backend == MXMOE_BACKEND_SM90) return GroupedGemmSm90WorkspaceSize(g, bytes);
  if (backend == MXMOE_BACKEND_SM100) return GroupedGemmSm100WorkspaceSize(g, bytes);
  return Fail(MXMOE_STATUS_INTERNAL, "moe_forward (cuda): unexpected backend ", backend);
}

mxmoe_status RunGemm(const mxmoe_grouped_gemm_args& g, mxmoe_backend backend, void* workspace,
                     size_t bytes, void* stream) {
  if (backend == MXMOE_BACKEND_SM90) return GroupedGemmSm90(g, workspace, bytes, stream);
  if (backend == MXMOE_BACKEND_SM100) return GroupedGemmSm100(g, workspace, bytes, stream);
  return Fail(MXMOE_STATUS_INTERNAL, "moe_forward (cuda): unexpected backend ", backend);
}

// Workspace bytes, the GEMMs' own scratch included (both GEMMs share one slice).
mxmoe_status ComputeLayout(const mxmoe_moe_forward_args& args, mxmoe_backend backend,
                           Layout* layout) {
  MXMOE_RETURN_IF_ERROR(CheckLimits(args));
  const Layout probe = MakeLayout(args, 0);
  char* null_base = nullptr;
  size_t gemm1 = 0, gemm2 = 0;
  MXMOE_RETURN_IF_ERROR(GemmWorkspaceSize(GemmArgs(args, probe, null_base, 1), backend, &gemm1));
  MXMOE_RETURN_IF_ERROR(GemmWorkspaceSize(GemmArgs(args, probe, null_base, 2), backend, &gemm2));
  *layout = MakeLayout(args, gemm1 > gemm2 ? gemm1 : gemm2);
  return MXMOE_STATUS_OK;
}

template <typename ActT>
mxmoe_status LaunchActivationKernels(const mxmoe_moe_forward_args& args, const Layout& l,
                                     char* base, cudaStream_t stream, bool gather) {
  const int32_t* slot_row = reinterpret_cast<const int32_t*>(base + l.slot_row);
  if (gather) {
    GatherParams g;
    g.hidden = args.hidden_states;
    g.row_slot = reinterpret_cast<const int32_t*>(base + l.row_slot);
    g.expert_offsets = reinterpret_cast<const int32_t*>(base + l.expert_offsets);
    g.blockscale_offsets = reinterpret_cast<const int32_t*>(base + l.blockscale_offsets);
    g.packed = reinterpret_cast<uint8_t*>(base + l.a1);
    g.scales = reinterpret_cast<uint8_t*>(base + l.a1_scales);
    g.scale_row_bound = l.scale_rows;
    g.num_experts = args.num_local_experts;
    g.top_k = args.top_k;
    g.hidden_size = static_cast<int32_t>(args.hidden_size);
    const int64_t items = l.scale_rows * ScaleCols(args.hidden_size);
    const int threads = 256;
    const int64_t blocks = (items + threads - 1) / threads;
    const size_t smem = sizeof(int32_t) * 2 * (args.num_local_experts + 1);
    GatherQuantizeKernel<ActT><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(g);
    MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  } else {
    const int64_t items = args.num_tokens * args.hidden_size / 8;
    const int threads = 256;
    const int64_t blocks = (items + threads - 1) / threads;
    WeightedReduceKernel<ActT><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        reinterpret_cast<const ActT*>(base + l.c2), slot_row,
        reinterpret_cast<const float*>(base + l.topk_weights),
        static_cast<ActT*>(args.output), args.num_tokens, args.top_k,
        static_cast<int32_t>(args.hidden_size));
    MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();
  }
  return MXMOE_STATUS_OK;
}

}  // namespace

mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args& args, mxmoe_backend backend,
                                     size_t* bytes) {
  Layout layout;
  MXMOE_RETURN_IF_ERROR(ComputeLayout(args, backend, &layout));
  *bytes = layout.total;
  return MXMOE_STATUS_OK;
}

mxmoe_status MoeForward(const mxmoe_moe_forward_args& args, mxmoe_backend backend,
                        void* workspace, size_t workspace_bytes, void* stream_ptr) {
  Layout l;
  MXMOE_RETURN_IF_ERROR(ComputeLayout(args, backend, &l));
  if (workspace_bytes < l.total) {
    return Fail(MXMOE_STATUS_WORKSPACE_TOO_SMALL, "workspace_bytes must be >= ", l.total,
                " for moe_forward (cuda), got ", workspace_bytes);
  }
  if (args.num_tokens == 0) return MXMOE_STATUS_OK;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(workspace);
  char* base = reinterpret_cast<char*>((raw + kSliceAlignment - 1) / kSliceAlignment *
                                       kSliceAlignment);

  // 1. routing
  RoutingParams r;
  r.logits = args.router_logits;
  r.given_ids = args.topk_ids;
  r.given_weights = args.topk_weights;
  r.expert_map = args.expert_map;
  r.topk_ids = reinterpret_cast<int32_t*>(base + l.topk_ids);
  r.topk_weights = reinterpret_cast<float*>(base + l.topk_weights);
  r.local_expert = reinterpret_cast<int32_t*>(base + l.local_expert);
  r.num_tokens = args.num_tokens;
  r.num_global_experts = args.num_global_experts;
  r.num_local_experts = args.num_local_experts;
  r.top_k = args.top_k;
  r.renormalize = args.renormalize;
  if (args.router_logits == nullptr) {
    const int threads = 256;
    const int64_t blocks = (l.slots + threads - 1) / threads;
    CopyTopKKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(r);
  } else {
    const int warps = 4;
    const int64_t blocks = (args.num_tokens + warps - 1) / warps;
    const size_t smem = sizeof(uint32_t) * warps * ((args.num_global_experts + 31) / 32);
    switch (args.router_logits_dtype) {
      case MXMOE_DTYPE_FP32:
        RoutingKernel<float><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(r);
        break;
      case MXMOE_DTYPE_BF16:
        RoutingKernel<__nv_bfloat16>
            <<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(r);
        break;
      case MXMOE_DTYPE_FP16:
        RoutingKernel<__half><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(r);
        break;
      default:
        return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "router_logits_dtype must be FP32, BF16 or "
                    "FP16, got ", args.router_logits_dtype);
    }
  }
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();

  // 2. metadata
  MetadataParams m;
  m.local_expert = r.local_expert;
  m.slot_row = reinterpret_cast<int32_t*>(base + l.slot_row);
  m.row_slot = reinterpret_cast<int32_t*>(base + l.row_slot);
  m.expert_offsets = reinterpret_cast<int32_t*>(base + l.expert_offsets);
  m.blockscale_offsets = reinterpret_cast<int32_t*>(base + l.blockscale_offsets);
  m.problem_sizes1 = reinterpret_cast<int32_t*>(base + l.problem_sizes1);
  m.problem_sizes2 = reinterpret_cast<int32_t*>(base + l.problem_sizes2);
  m.slots = l.slots;
  m.num_experts = args.num_local_experts;
  m.hidden_size = static_cast<int32_t>(args.hidden_size);
  m.intermediate_size = static_cast<int32_t>(args.intermediate_size);
  MetadataKernel<<<1, kMetadataThreads, 0, stream>>>(m);
  MXMOE_CUDA_RETURN_IF_LAUNCH_ERROR();

  // 3. gather + quantize
  const bool bf16 = args.activation_dtype == MXMOE_DTYPE_BF16;
  MXMOE_RETURN_IF_ERROR(bf16 ? LaunchActivationKernels<__nv_bfloat16>(args, l, base, stream, true)
                             : LaunchActivationKernels<__half>(args, l, base, stream, true));

  // 4. GEMM 1
  const size_t gemm_bytes = l.total - kSliceAlignment - l.gemm;
  MXMOE_RETURN_IF_ERROR(RunGemm(GemmArgs(args, l, base, 1), backend, base + l.gemm, gemm_bytes,
                                stream_ptr));

  // 5. SiLU-and-mul + quantize
  mxmoe_silu_mul_experts_quantize_args s = {};
  s.rows = l.slots;
  s.n = args.intermediate_size;
  s.num_experts = args.num_local_experts;
  s.input = base + l.c1;
  s.input_dtype = args.activation_dtype;
  s.expert_offsets = m.expert_offsets;
  s.blockscale_offsets = m.blockscale_offsets;
  s.packed = reinterpret_cast<uint8_t*>(base + l.a2);
  s.scales = reinterpret_cast<uint8_t*>(base + l.a2_scales);
  s.scale_rows = l.scale_rows;
  s.device = args.device;
  MXMOE_RETURN_IF_ERROR(SiluMulExpertsQuantize(s, stream_ptr));

  // 6. GEMM 2
  MXMOE_RETURN_IF_ERROR(RunGemm(GemmArgs(args, l, base, 2), backend, base + l.gemm, gemm_bytes,
                                stream_ptr));

  // 7. weighted reduce
  return bf16 ? LaunchActivationKernels<__nv_bfloat16>(args, l, base, stream, false)
              : LaunchActivationKernels<__half>(args, l, base, stream, false);
}

}  // namespace cuda
}  // namespace mxmoe
