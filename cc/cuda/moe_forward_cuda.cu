// The MoE forward on a CUDA device: routing, metadata, fused gather + quantize, two grouped GEMMs
// (sm90 or sm100), activation (+ w13 bias) + quantize, weighted reduce (+ w2 bias). The arithmetic
// is the contract of docs/format.md ("MoE forward"), the same as the CPU backend's
// (cc/cpu/moe_forward.cc) at every step except the GEMMs' accumulation order.
//
// Launch sequence (at most 7 launches, no host synchronisation, no allocation, CUDA-graph
// capturable):
//   1. RoutingKernel / CopyTopKKernel   one warp per token: SOFTMAX_TOPK, TOPK_SOFTMAX or
//                             SIGMOID_GROUPED_TOPK (fp32, format.h / moe_numerics.h numerics, the
//                             softmax denominator in the contract's 32-lane order), or a copy of
//                             precomputed top-k; expert_map applied; shared-expert slots appended.
//   2. MetadataKernel         one block: per-expert counts, expert_offsets, blockscale_offsets,
//                             problem sizes, row permutation (slot -> row, row -> slot); zeroes
//                             the fused reduce's panel counters.
//      (1 + 2: RoutingMetadataKernel, one block, for router logits with T <= 16 and E <= 256.)
//   3. gather + quantize      hidden rows straight into the expert-sorted MXFP4 layout, swizzled
//                             scales, padding zeroed: cuda::ExpertsQuantizeRows (quantize.cu,
//                             the experts_quantize kernel) reading each sorted row's token.
//   4. grouped GEMM 1         [rows, H] x w13 -> [rows, 2I] activation dtype.
//   5. activation + quantize  cuda::ExpertsQuantizeRows again: SILU_AND_MUL without bias is the
//                             silu_mul_experts_quantize kernel; otherwise its kGeneral form (bias
//                             add and rounding, SiLU or SwiGLU-OAI, quantize_device.cuh).
//   6. grouped GEMM 2         [rows, I] x w2 -> [rows, H] activation dtype.
//   7. WeightedReduceKernel   out[t] = sum over slots of w * (y [+ w2 bias, rounded]), fp32,
//                             separately rounded products and sums, rounded once
//                             (weighted_reduce.cuh). With few rows on sm90 (T * slots <= 16, the
//                             CUDA-core GEMM) it is folded into GEMM 2's epilogue instead: the
//                             last CTA of each weight panel reduces that panel's columns, with the
//                             same device function (GemmChain in grouped_gemm.h).
// With few rows on sm90 (T * slots <= 16, the CUDA-core GEMM) steps 3 and 5 may be done inside
// GEMMs 1 and 2 instead: the step's ExpertsQuantizeJob goes to the GEMM (GemmChain::source in
// grouped_gemm.h), whose CTAs read the 16-bit rows (the gathered tokens; GEMM 1's output) and
// quantize them with the quantize kernels' device functions, bit-identical to the separate step.
// By default only where that was measured faster (the GEMM's grid one wave of CTAs; the gather
// and plain SiLU: GroupedGemmSm90TakesSource), e.g. qwen3 at T = 1: 3 launches (routing +
// metadata, GEMM 1, GEMM 2 + reduce).
// MXMOE_SM90_GEMV_QUANTIZE forces it (0 never; mask 1 gather, 2 activation): tests, A/B runs.
// PDL: a GEMM that follows a quantize kernel, or GEMM 2 after GEMM 1, finds its expert and
// starts its weight loads before its own wait (the kernel before it waits first, so the
// metadata is complete); GEMM 1 right after the metadata kernel waits first.
// Device-side inputs the host cannot check: a precomputed top-k id outside [0, E_global) and an
// expert_map entry outside [0, E_local - num_shared) make that slot contribute nothing (never out
// of bounds).
// Limits (CheckLimits, asked by the size query and the run): E_local <= 1024 (one metadata
// block), top_k + num_shared_experts <= 32 (one warp per token), E_global <= 4096, at most 32
// expert groups, T * (top_k + num_shared_experts) < 2^30.
//
// Status: tested on an NVIDIA H200 (sm90) on 2026-12-04 at 371a9c2 (the whole GPU suite): every
// activation, bias dtype, routing mode and shared experts against the CPU backend, CUDA-graph
// replay; compute-sanitizer memcheck, racecheck and synccheck clean over tests/gpu/test_moe_gpu.py
// and the in-GEMM quantize test (at 49bc7c6 over all of test_moe_options_gpu.py). The sm100
// build is compiled for sm_100a and has never run (no Blackwell GPU here).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cc/base/cuda_check.h"
#include "cc/base/status.h"
#include "cc/base/workspace.h"
#include "cc/cuda/device.h"
#include "cc/cuda/dispatch.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/grouped_gemm_sm90_layout.h"
#include "cc/cuda/pdl.cuh"
#include "cc/cuda/quantize.h"
#include "cc/cuda/quantize_device.cuh"
#include "cc/cuda/weighted_reduce.cuh"
#include "mxmoe/format.h"
#include "mxmoe/moe_numerics.h"

namespace mxmoe {
namespace cuda {
namespace {

namespace fmt = ::mxmoe::format;

constexpr int kMaxLocalExperts = 1024;
constexpr int kMaxSlotsPerToken = 32;  // top_k + shared experts: one lane each
constexpr int kMaxGlobalExperts = 4096;
constexpr int kMaxExpertGroups = 32;  // one lane per group
constexpr int kMetadataThreads = 1024;
constexpr int kThreads = 256;
constexpr size_t kRoutingSharedBytes = 32 * 1024;
// Up to this many tokens, routing and metadata run as one block (RoutingMetadataKernel): warp t
// routes token t (grouped routing: 16 x 256 x 4 bytes of shared memory at most).
constexpr int64_t kFusedRoutingMaxTokens = 16;

int64_t ScaleCols(int64_t k) { return fmt::RoundUp(k / fmt::kBlockSize, fmt::kSwizzleCols); }

int32_t SlotsPerToken(const mxmoe_moe_forward_args& args) {
  return args.top_k + args.num_shared_experts;
}

// ---- workspace ----------------------------------------------------------------------------------

struct MoeWorkspace {
  int64_t slots = 0;                       // T * (top_k + S)
  int64_t scale_rows = 0;                  // bound on blockscale_offsets[E]
  int32_t* topk_ids = nullptr;             // [T, top_k] global ids
  float* topk_weights = nullptr;           // [T, top_k]
  int32_t* local_expert = nullptr;         // [slots] local expert or -1
  int32_t* slot_row = nullptr;             // [slots] sorted row or -1
  int32_t* row_slot = nullptr;             // [slots] inverse
  int32_t* expert_offsets = nullptr;       // [E_local + 1]
  int32_t* blockscale_offsets = nullptr;   // [E_local + 1]
  int32_t* problem_sizes1 = nullptr;       // [E_local, 3]
  int32_t* problem_sizes2 = nullptr;       // [E_local, 3]
  uint8_t* hidden_packed = nullptr;        // [slots, H/2]
  uint8_t* hidden_scales = nullptr;        // [scale_rows, round_up(H/32, 4)]
  uint16_t* gemm1_output = nullptr;        // [slots, 2I] activation dtype
  uint8_t* intermediate_packed = nullptr;  // [slots, I/2]
  uint8_t* intermediate_scales = nullptr;  // [scale_rows, round_up(I/32, 4)]
  uint16_t* gemm2_output = nullptr;        // [slots, H] activation dtype
  int32_t* reduce_counters = nullptr;      // [num_reduce_counters] zeroed by the metadata kernel
  int32_t num_reduce_counters = 0;         // sm90::NumPanels(H): one per GEMM 2 weight panel
  uint8_t* gemm_workspace = nullptr;       // both GEMMs' scratch (shared)
  size_t gemm_bytes = 0;
};

mxmoe_status CarveMoeWorkspace(const mxmoe_moe_forward_args& args, size_t gemm_bytes,
                               WorkspaceCarver* carver, MoeWorkspace* ws) {
  const size_t t = static_cast<size_t>(args.num_tokens);
  const size_t h = static_cast<size_t>(args.hidden_size);
  const size_t inter = static_cast<size_t>(args.intermediate_size);
  const size_t e = static_cast<size_t>(args.num_local_experts);
  ws->slots = args.num_tokens * SlotsPerToken(args);
  // Each expert with rows pads up to 127 rows; at most min(slots, E) experts have rows.
  ws->scale_rows = fmt::MaxScaleRows(ws->slots, args.num_local_experts);
  const size_t slots = static_cast<size_t>(ws->slots);
  const size_t scale_rows = static_cast<size_t>(ws->scale_rows);
  const size_t routed = t * static_cast<size_t>(args.top_k);
  MXMOE_RETURN_IF_ERROR(carver->Carve("topk_ids", routed, &ws->topk_ids));
  MXMOE_RETURN_IF_ERROR(carver->Carve("topk_weights", routed, &ws->topk_weights));
  MXMOE_RETURN_IF_ERROR(carver->Carve("local_expert", slots, &ws->local_expert));
  MXMOE_RETURN_IF_ERROR(carver->Carve("slot_row", slots, &ws->slot_row));
  MXMOE_RETURN_IF_ERROR(carver->Carve("row_slot", slots, &ws->row_slot));
  MXMOE_RETURN_IF_ERROR(carver->Carve("expert_offsets", e + 1, &ws->expert_offsets));
  MXMOE_RETURN_IF_ERROR(carver->Carve("blockscale_offsets", e + 1, &ws->blockscale_offsets));
  MXMOE_RETURN_IF_ERROR(carver->Carve("problem_sizes1", 3 * e, &ws->problem_sizes1));
  MXMOE_RETURN_IF_ERROR(carver->Carve("problem_sizes2", 3 * e, &ws->problem_sizes2));
  MXMOE_RETURN_IF_ERROR(carver->Carve("hidden_packed", slots * h / 2, &ws->hidden_packed));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("hidden_scales", scale_rows * ScaleCols(args.hidden_size), &ws->hidden_scales));
  MXMOE_RETURN_IF_ERROR(carver->Carve("gemm1_output", slots * 2 * inter, &ws->gemm1_output));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("intermediate_packed", slots * inter / 2, &ws->intermediate_packed));
  MXMOE_RETURN_IF_ERROR(carver->Carve("intermediate_scales",
                                      scale_rows * ScaleCols(args.intermediate_size),
                                      &ws->intermediate_scales));
  MXMOE_RETURN_IF_ERROR(carver->Carve("gemm2_output", slots * h, &ws->gemm2_output));
  ws->num_reduce_counters = static_cast<int32_t>(sm90::NumPanels(args.hidden_size));
  MXMOE_RETURN_IF_ERROR(carver->Carve("reduce_counters",
                                      static_cast<size_t>(ws->num_reduce_counters),
                                      &ws->reduce_counters));
  MXMOE_RETURN_IF_ERROR(carver->Carve("gemm_workspace", gemm_bytes, &ws->gemm_workspace));
  ws->gemm_bytes = gemm_bytes;
  return MXMOE_STATUS_OK;
}

using quant::LoadAsFloat;
using quant::RoundTo;

// ---- 1. routing ---------------------------------------------------------------------------------

struct RoutingParams {
  const void* logits;
  int32_t logits_dtype;
  const int32_t* given_ids;
  const float* given_weights;
  const int32_t* expert_map;
  const void* correction_bias;
  int32_t correction_bias_dtype;
  int32_t* topk_ids;
  float* topk_weights;
  int32_t* local_expert;
  int64_t num_tokens;
  int32_t num_global_experts;
  int32_t num_routed_local;  // E_local - S
  int32_t num_shared;
  int32_t top_k;
  int32_t renormalize;
  int32_t routing;
  int32_t groups;       // >= 1
  int32_t kept_groups;  // in [1, groups]
  float scaling;
};

__device__ __forceinline__ int32_t MapToLocal(const RoutingParams& p, int32_t global_id) {
  if (global_id < 0 || global_id >= p.num_global_experts) return -1;
  const int32_t local = p.expert_map != nullptr ? p.expert_map[global_id] : global_id;
  return (local >= 0 && local < p.num_routed_local) ? local : -1;
}

// Local expert of slot `s` of a token whose routed slot s (< top_k) names `global_id`.
__device__ __forceinline__ int32_t SlotExpert(const RoutingParams& p, int s, int32_t global_id) {
  return s < p.top_k ? MapToLocal(p, global_id) : p.num_routed_local + (s - p.top_k);
}

// Precomputed top-k: copy, map, append the shared slots. One thread per slot.
__global__ void CopyTopKKernel(RoutingParams p) {
  PdlWait();  // programmatic dependent launch: cc/cuda/pdl.cuh
  PdlLaunchDependents();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int per_token = p.top_k + p.num_shared;
  if (i >= p.num_tokens * per_token) return;
  const int64_t token = i / per_token;
  const int s = static_cast<int>(i % per_token);
  int32_t id = -1;
  if (s < p.top_k) {
    id = p.given_ids[token * p.top_k + s];
    p.topk_ids[token * p.top_k + s] = id;
    p.topk_weights[token * p.top_k + s] = p.given_weights[token * p.top_k + s];
  }
  p.local_expert[i] = SlotExpert(p, s, id);
}

// The warp's best (value, id) by RanksBefore among the experts its lanes offer (id < 0: none).
// Used for the expert groups (one lane per group).
__device__ __forceinline__ void WarpBest(float* value, int32_t* id) {
  for (int o = 16; o > 0; o /= 2) {
    const float other = __shfl_xor_sync(~0u, *value, o);
    const int32_t other_id = __shfl_xor_sync(~0u, *id, o);
    if (other_id >= 0 && (*id < 0 || fmt::RanksBefore(other, other_id, *value, *id))) {
      *value = other;
      *id = other_id;
    }
  }
}

// RanksBefore as one unsigned key: a ranks before b exactly when RankKey(a) > RankKey(b), or the
// keys are equal and a's id is lower. Numbers map monotonically (+0 and -0 to one key, as they
// compare equal), every NaN to 1: below every number, above kNoCandidate.
constexpr uint32_t kNoCandidate = 0;
__device__ __forceinline__ uint32_t RankKey(float v) {
  if (fmt::IsNaN(v)) return 1u;
  const uint32_t u = v == 0.0f ? 0u : __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Elements lane, lane + 32, ... (< count) of a bf16/fp16/fp32 vector at `base`, as raw bits
// (zeros past count), and LaneBitsAsFloat below converts them. The raw loads all go out first, in
// one branch on the dtype (uniform across the warp), and are converted after: a load inside each
// element's dtype branch makes the warp wait for every load in turn (one DRAM latency per element
// at T = 1); two vectors' raw loads issued before either is converted wait one latency, not two.
template <int V, int kUnroll>
__device__ __forceinline__ void LoadLaneBits(const void* base, int32_t dtype, int64_t offset,
                                             int lane, int count, uint32_t (&raw)[V]) {
  if (dtype == MXMOE_DTYPE_FP32) {
    const uint32_t* src = static_cast<const uint32_t*>(base) + offset;
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) raw[i] = lane + 32 * i < count ? src[lane + 32 * i] : 0u;
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) raw[i] = lane + 32 * i < count ? src[lane + 32 * i] : 0u;
  }
}

template <int V, int kUnroll>
__device__ __forceinline__ void LaneBitsAsFloat(const uint32_t (&raw)[V], int32_t dtype,
                                                float (&out)[V]) {
#pragma unroll kUnroll
  for (int i = 0; i < V; ++i) out[i] = quant::BitsAsFloat(raw[i], dtype);
}

// A lane's candidates: its experts lane, lane + 32, ... held in registers (value[i] is expert
// lane + 32 * i), with a bit per register that is still available.
template <int V>
struct LaneExperts {
  static constexpr int kWords = (V + 31) / 32;
  // Up to 16 values per lane (E <= 512) the loops unroll and the values live in registers; the
  // 128-value budget (E > 512, rare) keeps them in local memory so that its code stays small.
  static constexpr int kUnroll = V <= 16 ? V : 1;
  float value[V];
  float aux[V];  // SIGMOID_GROUPED_TOPK: the sigmoid (the weight), before the correction bias
  uint32_t available[kWords];
  // The lane's best available candidate: the highest key, the lowest id among equal keys (ids grow
  // with i, so the first maximum).
  uint32_t best_key;
  int best_index;
  float best_value;
  float best_aux;

  __device__ __forceinline__ bool Available(int i) const {
    return (available[i / 32] >> (i % 32)) & 1u;
  }
  __device__ __forceinline__ void FindBest() {
    best_key = kNoCandidate;
    best_index = -1;
    best_value = 0.0f;
    best_aux = 0.0f;
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) {
      if (!Available(i)) continue;
      const uint32_t key = RankKey(value[i]);
      if (key > best_key) {
        best_key = key;
        best_index = i;
        best_value = value[i];
        best_aux = aux[i];
      }
    }
  }
};

// One token's routing by one whole warp, the token's E <= 32 * V rank values in registers (V per
// lane; in local memory for V = 128). `shared_value`: E floats of shared memory for the warp,
// used by grouped routing only (the group scores).
template <int V>
__device__ __forceinline__ void RouteToken(const RoutingParams& p, int64_t token, int lane,
                                           float* shared_value) {
  constexpr int kUnroll = LaneExperts<V>::kUnroll;
  const int num_experts = p.num_global_experts;
  const int64_t row = token * num_experts;
  const bool sigmoid = p.routing == MXMOE_ROUTING_SIGMOID_GROUPED_TOPK;

  // Rank values: probabilities, logits or choices (coalesced: the warp's lanes read consecutive
  // experts; every load in flight at once).
  LaneExperts<V> x;
  uint32_t raw_logits[V], raw_bias[V];
  LoadLaneBits<V, kUnroll>(p.logits, p.logits_dtype, row, lane, num_experts, raw_logits);
  const bool with_bias = sigmoid && p.correction_bias != nullptr;
  if (with_bias) {
    LoadLaneBits<V, kUnroll>(p.correction_bias, p.correction_bias_dtype, 0, lane, num_experts,
                             raw_bias);
  }
  LaneBitsAsFloat<V, kUnroll>(raw_logits, p.logits_dtype, x.value);
  float bias[V];
  if (with_bias) LaneBitsAsFloat<V, kUnroll>(raw_bias, p.correction_bias_dtype, bias);
#pragma unroll kUnroll
  for (int w = 0; w < LaneExperts<V>::kWords; ++w) x.available[w] = 0;
#pragma unroll kUnroll
  for (int i = 0; i < V; ++i) {
    x.aux[i] = 0.0f;
    const int e = lane + 32 * i;
    if (e >= num_experts) continue;
    x.available[i / 32] |= 1u << (i % 32);
    if (sigmoid) {
      const float s = fmt::SigmoidF32(x.value[i]);
      x.aux[i] = s;
      x.value[i] = with_bias ? MXMOE_ADD(s, bias[i]) : s;
    }
  }
  if (p.routing == MXMOE_ROUTING_SOFTMAX_TOPK) {
    float max_logit = -INFINITY;
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) {
      if (x.Available(i) && x.value[i] > max_logit) max_logit = x.value[i];  // NaN ignored
    }
    for (int o = 16; o > 0; o /= 2) {
      const float other = __shfl_xor_sync(~0u, max_logit, o);
      max_logit = other > max_logit ? other : max_logit;
    }
    // The contract's 32-lane order: lane j sums experts j, j+32, ...; then the xor butterfly.
    float sum = 0.0f;
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) {
      if (!x.Available(i)) continue;
      x.value[i] = fmt::ExpF32(MXMOE_ADD(x.value[i], -max_logit));
      sum = MXMOE_ADD(sum, x.value[i]);
    }
    for (int o = 16; o > 0; o /= 2) sum = MXMOE_ADD(sum, __shfl_xor_sync(~0u, sum, o));
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) {
      if (x.Available(i)) x.value[i] = x.value[i] / sum;
    }
  }

  // Grouped routing: each group scored by its two best choices (RanksBefore order), the
  // kept_groups best groups kept (ties to the lower group); the other groups' experts stop being
  // available.
  if (sigmoid && p.kept_groups < p.groups) {
    const int group_size = num_experts / p.groups;
    uint32_t kept_mask = 0;
    if (group_size == 32) {
      // Expert e is lane e % 32's register e / 32, so group g is register g across the warp: its
      // best two are warp reductions on rank keys (equal keys: the lower lane, the lower id), and
      // every lane learns every group's score, so the kept groups need no shuffles (DeepSeek-V3:
      // 8 groups of 32).
      float group_score[V];
#pragma unroll kUnroll
      for (int g = 0; g < V; ++g) {
        group_score[g] = 0.0f;
        if (g >= p.groups) continue;  // uniform across the warp
        const uint32_t key = RankKey(x.value[g]);
        const uint32_t first_key = __reduce_max_sync(~0u, key);
        const int first_lane = __reduce_min_sync(~0u, key == first_key ? lane : 32);
        const uint32_t rest = lane == first_lane ? kNoCandidate : key;  // every number's key > 1
        const uint32_t second_key = __reduce_max_sync(~0u, rest);
        const int second_lane = __reduce_min_sync(~0u, rest == second_key ? lane : 32);
        group_score[g] = MXMOE_ADD(__shfl_sync(~0u, x.value[g], first_lane),
                                   __shfl_sync(~0u, x.value[g], second_lane));
      }
      for (int k = 0; k < p.kept_groups; ++k) {
        float best = 0.0f;
        int best_group = -1;
#pragma unroll kUnroll
        for (int g = 0; g < V; ++g) {
          if (g >= p.groups || ((kept_mask >> g) & 1u)) continue;
          if (best_group < 0 || fmt::RanksBefore(group_score[g], g, best, best_group)) {
            best = group_score[g];
            best_group = g;
          }
        }
        kept_mask |= 1u << best_group;
      }
    } else {
      // Any other group size: lane g scores group g from shared memory (a group's experts lie
      // across lanes), a serial walk of its experts; then kept_groups warp-wide rounds.
#pragma unroll kUnroll
      for (int i = 0; i < V; ++i) {
        if (x.Available(i)) shared_value[lane + 32 * i] = x.value[i];
      }
      __syncwarp();
      float score = 0.0f;
      if (lane < p.groups) {
        float first = 0.0f, second = 0.0f;
        int32_t first_id = -1, second_id = -1;
        for (int j = 0; j < group_size; ++j) {
          const int e = lane * group_size + j;
          const float v = shared_value[e];
          if (first_id < 0 || fmt::RanksBefore(v, e, first, first_id)) {
            second = first;
            second_id = first_id;
            first = v;
            first_id = e;
          } else if (second_id < 0 || fmt::RanksBefore(v, e, second, second_id)) {
            second = v;
            second_id = e;
          }
        }
        score = second_id >= 0 ? MXMOE_ADD(first, second) : first;
      }
      for (int k = 0; k < p.kept_groups; ++k) {
        float best = score;
        int32_t best_id = (lane < p.groups && !((kept_mask >> lane) & 1u)) ? lane : -1;
        WarpBest(&best, &best_id);
        kept_mask |= 1u << best_id;
      }
    }
#pragma unroll kUnroll
    for (int i = 0; i < V; ++i) {
      const int e = lane + 32 * i;
      if (x.Available(i) && !((kept_mask >> (e / group_size)) & 1u)) {
        x.available[i / 32] &= ~(1u << (i % 32));
      }
    }
  }

  // Top-k, best first; lane j keeps slot j. Each round: the warp's best key (one redux), the
  // lowest id holding it (another), its value from the owning lane; that lane alone rescans.
  x.FindBest();
  int32_t my_id = -1;
  float my_value = 0.0f;
  float my_aux = 0.0f;
  float chosen_sum = 0.0f;
  float max_chosen = -INFINITY;
  for (int j = 0; j < p.top_k; ++j) {
    const uint32_t top = __reduce_max_sync(~0u, x.best_key);
    const int candidate =
        (x.best_index >= 0 && x.best_key == top) ? lane + 32 * x.best_index : INT32_MAX;
    int32_t best_id = __reduce_min_sync(~0u, candidate);
    float best = __shfl_sync(~0u, x.best_value, best_id % 32);
    float best_aux = __shfl_sync(~0u, x.best_aux, best_id % 32);
    if (top == kNoCandidate) {  // unreachable: validation keeps top_k <= the kept experts
      best_id = 0;
      best = 0.0f;
      best_aux = fmt::SigmoidF32(LoadAsFloat(p.logits, p.logits_dtype, row));  // expert 0's
    } else if (lane == best_id % 32) {
      const int i = best_id / 32;
      x.available[LaneExperts<V>::kWords == 1 ? 0 : i / 32] &= ~(1u << (i % 32));
      x.FindBest();
    }
    if (lane == j) {
      my_id = best_id;
      my_value = best;
      my_aux = best_aux;
    }
    max_chosen = best > max_chosen ? best : max_chosen;  // slot order, NaN ignored
    chosen_sum = MXMOE_ADD(chosen_sum, best);            // used by SOFTMAX_TOPK
  }

  float weight = my_value;  // SOFTMAX_TOPK: the probability
  if (p.routing == MXMOE_ROUTING_TOPK_SOFTMAX) {
    weight = fmt::ExpF32(MXMOE_ADD(my_value, -max_chosen));
  } else if (sigmoid) {
    weight = lane < p.top_k ? my_aux : 0.0f;  // sigmoid(logit) of the chosen expert
  }
  const bool normalize = p.routing == MXMOE_ROUTING_TOPK_SOFTMAX || p.renormalize;
  if (normalize && p.routing != MXMOE_ROUTING_SOFTMAX_TOPK) {
    chosen_sum = 0.0f;  // the weights above, summed in slot order
    for (int j = 0; j < p.top_k; ++j)
      chosen_sum = MXMOE_ADD(chosen_sum, __shfl_sync(~0u, weight, j));
  }
  if (normalize) weight = weight / chosen_sum;
  weight = MXMOE_MUL(weight, p.scaling);

  const int per_token = p.top_k + p.num_shared;
  if (lane < p.top_k) {
    p.topk_ids[token * p.top_k + lane] = my_id;
    p.topk_weights[token * p.top_k + lane] = weight;
  }
  if (lane < per_token) p.local_expert[token * per_token + lane] = SlotExpert(p, lane, my_id);
}

// One warp per token. Dynamic shared memory: E floats per warp (grouped routing only).
template <int V>
__global__ void RoutingKernel(RoutingParams p) {
  PdlWait();  // programmatic dependent launch: cc/cuda/pdl.cuh
  PdlLaunchDependents();
  const int warps_per_block = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp;
  extern __shared__ float routing_shared[];
  if (token >= p.num_tokens) return;  // whole warps only: no shuffle misses a lane
  RouteToken<V>(p, token, lane, routing_shared + warp * p.num_global_experts);
}

// ---- 2. metadata --------------------------------------------------------------------------------

struct MetadataParams {
  const int32_t* local_expert;  // [slots]
  int32_t* slot_row;            // [slots] row in the expert-sorted layout, or -1
  int32_t* row_slot;            // [slots] inverse (rows past expert_offsets[E] untouched)
  int32_t* expert_offsets;      // [E+1]
  int32_t* blockscale_offsets;  // [E+1]
  int32_t* problem_sizes1;      // [E, 3] (m_e, 2I, H)
  int32_t* problem_sizes2;      // [E, 3] (m_e, H, I)
  int32_t* reduce_counters;     // [num_counters] zeroed for the fused reduce (GemmChain)
  int32_t num_counters;
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

// The metadata of every slot, by one block of kMetadataThreads threads (local_expert final and
// visible to the block).
__device__ __forceinline__ void BuildMetadata(const MetadataParams& p) {
  __shared__ int counts[kMaxLocalExperts];
  __shared__ int cursor[kMaxLocalExperts];
  __shared__ int warp_totals[32];
  const int tid = threadIdx.x;
  for (int e = tid; e < kMaxLocalExperts; e += blockDim.x) counts[e] = 0;
  for (int i = tid; i < p.num_counters; i += blockDim.x) p.reduce_counters[i] = 0;
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

__global__ void __launch_bounds__(kMetadataThreads) MetadataKernel(MetadataParams p) {
  PdlWait();  // programmatic dependent launch: cc/cuda/pdl.cuh
  PdlLaunchDependents();
  BuildMetadata(p);
}

// Steps 1 and 2 in one block for few tokens (kFusedRoutingMaxTokens): warp t routes token t,
// then the whole block builds the metadata from the routing's local_expert (written by this
// block: __syncthreads makes it visible). V <= 8 (E <= 256) keeps the routing within the 64
// registers a 1024-thread block allows. Dynamic shared memory: as RoutingKernel's, per token.
template <int V>
__global__ void __launch_bounds__(kMetadataThreads)
    RoutingMetadataKernel(RoutingParams r, MetadataParams m) {
  PdlWait();  // programmatic dependent launch: cc/cuda/pdl.cuh
  PdlLaunchDependents();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  extern __shared__ float routing_shared[];
  if (warp < r.num_tokens) {
    RouteToken<V>(r, warp, lane, routing_shared + warp * r.num_global_experts);
  }
  __syncthreads();
  BuildMetadata(m);
}

// ---- 7. weighted reduce -----------------------------------------------------------------------

// One thread per 8 output elements (16 bytes); slots in order, separately rounded mul and add.
template <typename T>
__global__ void __launch_bounds__(kThreads) WeightedReduceKernel(ReduceParams p) {
  PdlWait();  // programmatic dependent launch: cc/cuda/pdl.cuh
  PdlLaunchDependents();
  const int64_t vecs_per_row = p.hidden_size / quant::kElemsPerLane;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= p.num_tokens * vecs_per_row) return;
  const int64_t token = item / vecs_per_row;
  const int64_t column = (item % vecs_per_row) * quant::kElemsPerLane;
  const int64_t first_slot = token * p.slots_per_token;
  const uint4 result = ReduceEight<T>(
      p.slots_per_token, p.bias != nullptr, [&](int s) { return p.slot_row[first_slot + s]; },
      [&](int s) { return s < p.top_k ? p.topk_weights[token * p.top_k + s] : 1.0f; },
      [&](int, int32_t row) {
        return quant::AsLane8(*reinterpret_cast<const uint4*>(
            p.expert_outputs + static_cast<int64_t>(row) * p.hidden_size + column));
      },
      [&](int s, int j) {
        const int64_t bias_row =
            static_cast<int64_t>(p.local_expert[first_slot + s]) * p.hidden_size;
        return LoadAsFloat(p.bias, p.bias_dtype, bias_row + column + j);
      });
  *reinterpret_cast<uint4*>(p.output + token * p.hidden_size + column) = result;
}

// ---- host side ----------------------------------------------------------------------------------

mxmoe_status CheckLimits(const mxmoe_moe_forward_args& args) {
  if (args.num_local_experts > kMaxLocalExperts) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "num_local_experts must be <= ", kMaxLocalExperts,
                " on CUDA, got ", args.num_local_experts);
  }
  if (SlotsPerToken(args) > kMaxSlotsPerToken) {
    return Fail(MXMOE_STATUS_UNSUPPORTED,
                "top_k + num_shared_experts must be <= ", kMaxSlotsPerToken, " on CUDA, got ",
                args.top_k, " + ", args.num_shared_experts);
  }
  if (args.num_global_experts > kMaxGlobalExperts) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "num_global_experts must be <= ", kMaxGlobalExperts,
                " on CUDA, got ", args.num_global_experts);
  }
  if (args.num_expert_groups > kMaxExpertGroups) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "num_expert_groups must be <= ", kMaxExpertGroups,
                " on CUDA, got ", args.num_expert_groups);
  }
  if (args.num_tokens * SlotsPerToken(args) > INT32_MAX / 2) {
    return Fail(MXMOE_STATUS_UNSUPPORTED,
                "num_tokens * (top_k + num_shared_experts) must be < 2^30 on CUDA, got ",
                args.num_tokens * SlotsPerToken(args));
  }
  return MXMOE_STATUS_OK;
}

// The one backend switch: which grouped GEMM serves the two expert GEMMs.
struct GemmBackend {
  mxmoe_status (*workspace_size)(const mxmoe_grouped_gemm_args&, size_t*);
  // The chain's requests (grouped_gemm.h); *reduced: the weighted reduce was folded in.
  mxmoe_status (*run)(const mxmoe_grouped_gemm_args&, void*, size_t, void*, const GemmChain&,
                      bool* reduced);
  // Whether run takes a GemmChain::source with this activation (quantizes A itself) for these
  // arguments.
  bool (*takes_source)(const mxmoe_grouped_gemm_args&, ExpertsActivation);
};

// sm100 takes none of the chain's requests.
mxmoe_status GroupedGemmSm100InChain(const mxmoe_grouped_gemm_args& args, void* workspace,
                                     size_t workspace_bytes, void* stream, const GemmChain&,
                                     bool* reduced) {
  *reduced = false;
  return GroupedGemmSm100(args, workspace, workspace_bytes, stream);
}

bool GroupedGemmSm100TakesSource(const mxmoe_grouped_gemm_args&, ExpertsActivation) {
  return false;
}

mxmoe_status GemmBackendFor(mxmoe_backend backend, GemmBackend* gemm) {
  switch (backend) {
    case MXMOE_BACKEND_SM90:
      *gemm = {GroupedGemmSm90WorkspaceSize, GroupedGemmSm90Chained, GroupedGemmSm90TakesSource};
      return MXMOE_STATUS_OK;
    case MXMOE_BACKEND_SM100:
      *gemm = {GroupedGemmSm100WorkspaceSize, GroupedGemmSm100InChain,
               GroupedGemmSm100TakesSource};
      return MXMOE_STATUS_OK;
    default:
      return Fail(MXMOE_STATUS_INTERNAL, "moe_forward (cuda): unexpected backend ", backend);
  }
}

mxmoe_grouped_gemm_args GemmArgs(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws,
                                 int gemm_index) {
  mxmoe_grouped_gemm_args g = {};
  g.rows = ws.slots;
  g.num_experts = args.num_local_experts;
  g.expert_offsets = ws.expert_offsets;
  g.blockscale_offsets = ws.blockscale_offsets;
  g.a_scale_rows = ws.scale_rows;
  g.c_dtype = args.activation_dtype;
  g.device = args.device;
  if (gemm_index == 1) {
    g.n = 2 * args.intermediate_size;
    g.k = args.hidden_size;
    g.a = ws.hidden_packed;
    g.a_scales = ws.hidden_scales;
    g.b = args.w13;
    g.problem_sizes = ws.problem_sizes1;
    g.c = ws.gemm1_output;
  } else {
    g.n = args.hidden_size;
    g.k = args.intermediate_size;
    g.a = ws.intermediate_packed;
    g.a_scales = ws.intermediate_scales;
    g.b = args.w2;
    g.problem_sizes = ws.problem_sizes2;
    g.c = ws.gemm2_output;
  }
  return g;
}

// The GEMMs' scratch: both share one slice, sized for the larger.
mxmoe_status GemmScratchBytes(const mxmoe_moe_forward_args& args, const GemmBackend& gemm,
                              size_t* bytes) {
  WorkspaceCarver measure;
  MoeWorkspace probe;
  MXMOE_RETURN_IF_ERROR(CarveMoeWorkspace(args, 0, &measure, &probe));
  size_t gemm1 = 0, gemm2 = 0;
  MXMOE_RETURN_IF_ERROR(gemm.workspace_size(GemmArgs(args, probe, 1), &gemm1));
  MXMOE_RETURN_IF_ERROR(gemm.workspace_size(GemmArgs(args, probe, 2), &gemm2));
  *bytes = gemm1 > gemm2 ? gemm1 : gemm2;
  return MXMOE_STATUS_OK;
}

unsigned Blocks(int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

RoutingParams MakeRoutingParams(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws) {
  RoutingParams r = {};
  r.logits = args.router_logits;
  r.logits_dtype = args.router_logits_dtype;
  r.given_ids = args.topk_ids;
  r.given_weights = args.topk_weights;
  r.expert_map = args.expert_map;
  r.correction_bias = args.e_score_correction_bias;
  r.correction_bias_dtype = args.e_score_correction_bias_dtype;
  r.topk_ids = ws.topk_ids;
  r.topk_weights = ws.topk_weights;
  r.local_expert = ws.local_expert;
  r.num_tokens = args.num_tokens;
  r.num_global_experts = args.num_global_experts;
  r.num_routed_local = args.num_local_experts - args.num_shared_experts;
  r.num_shared = args.num_shared_experts;
  r.top_k = args.top_k;
  r.renormalize = args.renormalize;
  r.routing = args.routing;
  r.groups = args.num_expert_groups == 0 ? 1 : args.num_expert_groups;
  r.kept_groups = args.topk_groups == 0 ? r.groups : args.topk_groups;
  r.scaling = args.routed_scaling_factor == 0.0f ? 1.0f : args.routed_scaling_factor;
  return r;
}

// Whether the routing scores expert groups (RoutingKernel's shared memory: E floats per warp).
bool GroupedRouting(const RoutingParams& r) {
  return r.routing == MXMOE_ROUTING_SIGMOID_GROUPED_TOPK && r.kept_groups < r.groups;
}

// Rank values per lane: ceil(E / 32), in one of four budgets (E <= 4096).
int RankValuesPerLane(int num_experts) {
  const int e = num_experts;
  return e <= 4 * 32 ? 4 : e <= 8 * 32 ? 8 : e <= 16 * 32 ? 16 : 128;
}

mxmoe_status LaunchRouting(const RoutingParams& r, cudaStream_t stream) {
  const bool grouped = GroupedRouting(r);
  const size_t per_warp = grouped ? sizeof(float) * r.num_global_experts : 0;
  const int warps = static_cast<int>(
      grouped ? std::max<size_t>(1, std::min<size_t>(4, kRoutingSharedBytes / per_warp)) : 4);
  const int values = RankValuesPerLane(r.num_global_experts);
  return DispatchValue<4, 8, 16, 128>(values, "routing rank values per lane", [&](auto v) {
    MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(RoutingKernel<decltype(v)::value>,
                                         dim3(Blocks(r.num_tokens, warps)), dim3(warps * 32),
                                         warps * per_warp, stream, r));
    return MXMOE_STATUS_OK;
  });
}

mxmoe_status LaunchCopyTopK(const RoutingParams& r, cudaStream_t stream) {
  MXMOE_CUDA_RETURN_IF_ERROR(
      LaunchPdl(CopyTopKKernel, dim3(Blocks(r.num_tokens * (r.top_k + r.num_shared), kThreads)),
                dim3(kThreads), 0, stream, r));
  return MXMOE_STATUS_OK;
}

MetadataParams MakeMetadataParams(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws) {
  MetadataParams m;
  m.local_expert = ws.local_expert;
  m.slot_row = ws.slot_row;
  m.row_slot = ws.row_slot;
  m.expert_offsets = ws.expert_offsets;
  m.blockscale_offsets = ws.blockscale_offsets;
  m.problem_sizes1 = ws.problem_sizes1;
  m.problem_sizes2 = ws.problem_sizes2;
  m.reduce_counters = ws.reduce_counters;
  m.num_counters = ws.num_reduce_counters;
  m.slots = ws.slots;
  m.num_experts = args.num_local_experts;
  m.hidden_size = static_cast<int32_t>(args.hidden_size);
  m.intermediate_size = static_cast<int32_t>(args.intermediate_size);
  return m;
}

mxmoe_status LaunchMetadata(const MetadataParams& m, cudaStream_t stream) {
  MXMOE_CUDA_RETURN_IF_ERROR(
      LaunchPdl(MetadataKernel, dim3(1), dim3(kMetadataThreads), 0, stream, m));
  return MXMOE_STATUS_OK;
}

// Routing (from router logits) and metadata in one launch: few tokens, at most 8 rank values per
// lane (E <= 256).
bool RoutingMetadataFused(const RoutingParams& r) {
  return r.num_tokens <= kFusedRoutingMaxTokens && RankValuesPerLane(r.num_global_experts) <= 8;
}

mxmoe_status LaunchRoutingMetadata(const RoutingParams& r, const MetadataParams& m,
                                   cudaStream_t stream) {
  const size_t smem = GroupedRouting(r) ? sizeof(float) * r.num_global_experts * r.num_tokens : 0;
  return DispatchValue<4, 8>(RankValuesPerLane(r.num_global_experts),
                             "fused routing rank values per lane", [&](auto v) {
    MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(RoutingMetadataKernel<decltype(v)::value>, dim3(1),
                                         dim3(kMetadataThreads), smem, stream, r, m));
    return MXMOE_STATUS_OK;
  });
}

// Stages 3 and 5: the per-expert quantize of cc/cuda/quantize.cu over the sorted rows (ws.slots
// bounds them; rows past expert_offsets[E] are skipped there), padding rows zeroed by its padding
// CTAs. Stage 3 gathers each row's token from hidden_states; stage 5 applies the activation.
ExpertsQuantizeJob QuantizeJob(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws,
                               int stage) {
  ExpertsQuantizeJob job;
  job.rows = ws.slots;
  job.num_experts = args.num_local_experts;
  job.input_dtype = args.activation_dtype;
  job.expert_offsets = ws.expert_offsets;
  job.blockscale_offsets = ws.blockscale_offsets;
  job.scale_rows = ws.scale_rows;
  job.device = args.device.id;
  if (stage == 3) {
    job.k = args.hidden_size;
    job.input = args.hidden_states;
    job.packed = ws.hidden_packed;
    job.scales = ws.hidden_scales;
    job.row_source = ws.row_slot;
    job.slots_per_token = SlotsPerToken(args);
    job.source_rows = args.num_tokens;
  } else {
    job.k = args.intermediate_size;
    job.input = ws.gemm1_output;
    job.packed = ws.intermediate_packed;
    job.scales = ws.intermediate_scales;
    // SiLU without a bias is the tested silu_mul_experts_quantize kernel (and its variants).
    const bool plain_silu =
        args.activation == MXMOE_ACTIVATION_SILU_AND_MUL && args.w13_bias == nullptr;
    job.activation = plain_silu ? ExpertsActivation::kSiluMul : ExpertsActivation::kGeneral;
    job.bias = args.w13_bias;
    job.bias_dtype = args.w13_bias_dtype;
    job.activation_kind = args.activation;
    job.swiglu_alpha = args.swiglu_alpha;
    job.swiglu_limit = args.swiglu_limit;
  }
  return job;
}

ReduceParams MakeReduceParams(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws) {
  ReduceParams r;
  r.expert_outputs = ws.gemm2_output;
  r.slot_row = ws.slot_row;
  r.local_expert = ws.local_expert;
  r.topk_weights = ws.topk_weights;
  r.bias = args.w2_bias;
  r.bias_dtype = args.w2_bias_dtype;
  r.output = static_cast<uint16_t*>(args.output);
  r.num_tokens = args.num_tokens;
  r.top_k = args.top_k;
  r.slots_per_token = SlotsPerToken(args);
  r.hidden_size = static_cast<int32_t>(args.hidden_size);
  return r;
}

template <typename T>
mxmoe_status LaunchWeightedReduce(const ReduceParams& r, cudaStream_t stream) {
  MXMOE_CUDA_RETURN_IF_ERROR(LaunchPdl(
      WeightedReduceKernel<T>,
      dim3(Blocks(r.num_tokens * r.hidden_size / quant::kElemsPerLane, kThreads)),
      dim3(kThreads), 0, stream, r));
  return MXMOE_STATUS_OK;
}

// Stages 3 to 7 for one activation dtype. Where the GEMM takes a source (the sm90 CUDA-core
// path, at most 16 rows), stage 3 or 5 is done inside GEMM 1 or 2 and its own launch is skipped.
template <typename T>
mxmoe_status RunExperts(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws,
                        const GemmBackend& gemm, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  bool reduced = false;
  const mxmoe_grouped_gemm_args gemm1 = GemmArgs(args, ws, 1);
  const mxmoe_grouped_gemm_args gemm2 = GemmArgs(args, ws, 2);
  // Stages 3 and 5, run by ExpertsQuantizeRows or, where the GEMM takes them, inside it.
  const ExpertsQuantizeJob gather = QuantizeJob(args, ws, 3);
  const ExpertsQuantizeJob activation = QuantizeJob(args, ws, 5);
  const bool gather_in_gemm = gemm.takes_source(gemm1, gather.activation);
  const bool activation_in_gemm = gemm.takes_source(gemm2, activation.activation);

  GemmChain chain1;
  if (gather_in_gemm) {
    // GEMM 1 follows the metadata kernel, which writes the expert offsets after it lets its
    // dependents launch: GEMM 1 must read them after its wait (pdl.cuh).
    chain1.offsets_before_wait = false;
    chain1.source = &gather;
  } else {
    MXMOE_RETURN_IF_ERROR(ExpertsQuantizeRows(gather, stream_ptr));
    chain1.offsets_before_wait = true;  // it follows the quantize kernel, which waits first
  }
  MXMOE_RETURN_IF_ERROR(
      gemm.run(gemm1, ws.gemm_workspace, ws.gemm_bytes, stream_ptr, chain1, &reduced));

  // GEMM 2 follows a kernel of this chain that waits before it lets its dependents launch (the
  // quantize kernel or GEMM 1, which never writes the offsets): the metadata kernel that wrote
  // them is complete before GEMM 2 launches.
  GemmChain chain2;
  chain2.offsets_before_wait = true;
  if (activation_in_gemm) {
    chain2.source = &activation;
  } else {
    MXMOE_RETURN_IF_ERROR(ExpertsQuantizeRows(activation, stream_ptr));
  }
  const ReduceParams reduce = MakeReduceParams(args, ws);
  chain2.reduce = &reduce;
  chain2.reduce_counters = ws.reduce_counters;
  MXMOE_RETURN_IF_ERROR(
      gemm.run(gemm2, ws.gemm_workspace, ws.gemm_bytes, stream_ptr, chain2, &reduced));
  return reduced ? MXMOE_STATUS_OK : LaunchWeightedReduce<T>(reduce, stream);
}

}  // namespace

mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args& args, mxmoe_backend backend,
                                     size_t* bytes) {
  MXMOE_RETURN_IF_ERROR(CheckLimits(args));
  GemmBackend gemm;
  MXMOE_RETURN_IF_ERROR(GemmBackendFor(backend, &gemm));
  size_t gemm_bytes = 0;
  MXMOE_RETURN_IF_ERROR(GemmScratchBytes(args, gemm, &gemm_bytes));
  WorkspaceCarver measure;
  MoeWorkspace ws;
  MXMOE_RETURN_IF_ERROR(CarveMoeWorkspace(args, gemm_bytes, &measure, &ws));
  *bytes = measure.RequiredBytes();
  return MXMOE_STATUS_OK;
}

mxmoe_status MoeForward(const mxmoe_moe_forward_args& args, mxmoe_backend backend, void* workspace,
                        size_t workspace_bytes, void* stream_ptr) {
  MXMOE_RETURN_IF_ERROR(CheckLimits(args));
  GemmBackend gemm;
  MXMOE_RETURN_IF_ERROR(GemmBackendFor(backend, &gemm));
  size_t gemm_bytes = 0;
  MXMOE_RETURN_IF_ERROR(GemmScratchBytes(args, gemm, &gemm_bytes));
  WorkspaceCarver carver(workspace, workspace_bytes);
  MoeWorkspace ws;
  MXMOE_RETURN_IF_ERROR(CarveMoeWorkspace(args, gemm_bytes, &carver, &ws));
  if (args.num_tokens == 0) return MXMOE_STATUS_OK;
  ScopedDevice scoped;  // the stream and every pointer belong to args.device
  MXMOE_RETURN_IF_ERROR(scoped.Enter(args.device.id));
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

  const RoutingParams routing = MakeRoutingParams(args, ws);
  const MetadataParams metadata = MakeMetadataParams(args, ws);
  if (args.router_logits != nullptr && RoutingMetadataFused(routing)) {
    MXMOE_RETURN_IF_ERROR(LaunchRoutingMetadata(routing, metadata, stream));
  } else {
    MXMOE_RETURN_IF_ERROR(args.router_logits != nullptr ? LaunchRouting(routing, stream)
                                                        : LaunchCopyTopK(routing, stream));
    MXMOE_RETURN_IF_ERROR(LaunchMetadata(metadata, stream));
  }
  return args.activation_dtype == MXMOE_DTYPE_BF16
             ? RunExperts<quant::Bf16>(args, ws, gemm, stream_ptr)
             : RunExperts<quant::Fp16>(args, ws, gemm, stream_ptr);
}

}  // namespace cuda
}  // namespace mxmoe
