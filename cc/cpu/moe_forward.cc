// CPU MoE forward: the reference for every backend's mxmoe_moe_forward. Stages, each a CPU entry
// point or a short loop; the exact arithmetic of each is the contract of docs/format.md ("MoE
// forward"), summarised here:
//
//  1. Routing (router_logits [T, E_global] -> fp32, exact), by args.routing:
//     SOFTMAX_TOPK: m = max (NaN ignored), p_e = ExpF32(l_e - m), denominator summed in the
//       32-lane order of moe_numerics.h, p_e /= sum; top-k by p; renormalize: w_s = p_s / (p_0 +
//       ... + p_{k-1}) summed in slot order, else w_s = p_s.
//     TOPK_SOFTMAX: top-k by l; m = max of the chosen (NaN ignored); e_s = ExpF32(l_s - m);
//       w_s = e_s / (e_0 + ... + e_{k-1}) summed in slot order.
//     SIGMOID_GROUPED_TOPK: s_e = SigmoidF32(l_e), c_e = s_e + bias_e (c_e = s_e without a
//       bias); group score = c_first + c_second of its two best (c_first alone for groups of one);
//       keep topk_groups groups by score; top-k of their experts by c; w_s = s of the chosen,
//       renormalize: w_s / (sum in slot order).
//     Then w_s *= routed_scaling_factor (0 = 1). Every ranking: moe_numerics.h RanksBefore
//     (descending, NaN last, ties to the lower id). With topk_ids/topk_weights given, they are
//     used as they are.
//  2. Expert map: local = expert_map[global] (-1: slot skipped), identity without a map. Shared
//     expert j of S is slot top_k + j of every token, local expert E_local - S + j, weight 1.
//  3. Rows sorted by (local expert, token, slot) with a counting sort; expert_offsets and
//     blockscale_offsets (cumulative round_up(m_e, 128)) built from the counts.
//  4. Hidden rows gathered into that order, quantized per expert (experts_quantize).
//  5. GEMM1 with w13 ([gate | up] rows), rounded to the activation dtype.
//  6. Activation: g, u from the GEMM1 row (+ w13_bias in fp32, rounded to the activation dtype),
//     silu(g) * u or SwigluOaiF32, rounded to the activation dtype, quantized per expert.
//  7. GEMM2 with w2, rounded to the activation dtype (+ w2_bias in fp32, rounded, in stage 8).
//  8. output[t] = sum over the routed slots in slot order, then the shared experts, of w_s * y,
//     each product and sum rounded to fp32 separately (no FMA), starting from +0, rounded once to
//     the activation dtype. A token with no local slot gets +0.
//
// Workspace: the named slices of CarveMoeWorkspace below, sized for the worst case of
// T * (top_k + S) rows (the size query cannot read the routing). Nothing else is allocated
// except the grouped GEMM's per-thread tile buffers and per-thread routing scratch.
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cc/base/workspace.h"
#include "cc/cpu/activation_simd.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/panel.h"
#include "cc/cpu/parallel.h"
#include "mxmoe/format.h"
#include "mxmoe/moe_numerics.h"

namespace mxmoe {
namespace cpu {
namespace {

struct MoeWorkspace {
  float* router_scores;          // [T, E_global] rank values (probabilities, logits or choices)
  int32_t* topk_ids;             // [T, top_k] global expert ids
  float* topk_weights;           // [T, top_k]
  int32_t* row_of_slot;          // [T * P] sorted row of each (token, slot), -1 if not local
  int32_t* token_of_row;         // [T * P] token of each sorted row (P = top_k + shared)
  int32_t* expert_of_row;        // [T * P] local expert of each sorted row
  int32_t* expert_offsets;       // [E_local + 1]
  int32_t* blockscale_offsets;   // [E_local + 1]
  int32_t* sort_cursor;          // [E_local] next free row of each expert while sorting
  uint8_t* activations;          // [R, H] act dtype: gathered hidden rows, later GEMM2 output
  uint8_t* hidden_packed;        // [R, H/2]
  uint8_t* hidden_scales;        // [scale_rows, round_up(H/32, 4)] swizzled per expert
  uint8_t* gemm1_output;         // [R, 2I] act dtype
  uint8_t* intermediate;         // [R, I] act dtype: the activation's output
  uint8_t* intermediate_packed;  // [R, I/2]
  uint8_t* intermediate_scales;  // [scale_rows, round_up(I/32, 4)] swizzled per expert
};

mxmoe_status CarveMoeWorkspace(const mxmoe_moe_forward_args& args, WorkspaceCarver* carver,
                               MoeWorkspace* ws) {
  const size_t t = static_cast<size_t>(args.num_tokens);
  const size_t h = static_cast<size_t>(args.hidden_size);
  const size_t inter = static_cast<size_t>(args.intermediate_size);
  const size_t routed_slots = t * static_cast<size_t>(args.top_k);
  const size_t slots = t * static_cast<size_t>(args.top_k + args.num_shared_experts);  // R at most
  const size_t e_local = static_cast<size_t>(args.num_local_experts);
  const size_t act = static_cast<size_t>(DtypeBytes(args.activation_dtype));
  const size_t scale_rows = static_cast<size_t>(
      format::MaxScaleRows(static_cast<int64_t>(slots), args.num_local_experts));
  const size_t hidden_scale_cols =
      static_cast<size_t>(format::RoundUp(args.hidden_size / kBlock, format::kSwizzleCols));
  const size_t inter_scale_cols =
      static_cast<size_t>(format::RoundUp(args.intermediate_size / kBlock, format::kSwizzleCols));
  MXMOE_RETURN_IF_ERROR(carver->Carve(
      "router_scores", t * static_cast<size_t>(args.num_global_experts), &ws->router_scores));
  MXMOE_RETURN_IF_ERROR(carver->Carve("topk_ids", routed_slots, &ws->topk_ids));
  MXMOE_RETURN_IF_ERROR(carver->Carve("topk_weights", routed_slots, &ws->topk_weights));
  MXMOE_RETURN_IF_ERROR(carver->Carve("row_of_slot", slots, &ws->row_of_slot));
  MXMOE_RETURN_IF_ERROR(carver->Carve("token_of_row", slots, &ws->token_of_row));
  MXMOE_RETURN_IF_ERROR(carver->Carve("expert_of_row", slots, &ws->expert_of_row));
  MXMOE_RETURN_IF_ERROR(carver->Carve("expert_offsets", e_local + 1, &ws->expert_offsets));
  MXMOE_RETURN_IF_ERROR(carver->Carve("blockscale_offsets", e_local + 1, &ws->blockscale_offsets));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sort_cursor", e_local, &ws->sort_cursor));
  MXMOE_RETURN_IF_ERROR(carver->Carve("activations", slots * h * act, &ws->activations));
  MXMOE_RETURN_IF_ERROR(carver->Carve("hidden_packed", slots * h / 2, &ws->hidden_packed));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("hidden_scales", scale_rows * hidden_scale_cols, &ws->hidden_scales));
  MXMOE_RETURN_IF_ERROR(carver->Carve("gemm1_output", slots * 2 * inter * act, &ws->gemm1_output));
  MXMOE_RETURN_IF_ERROR(carver->Carve("intermediate", slots * inter * act, &ws->intermediate));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("intermediate_packed", slots * inter / 2, &ws->intermediate_packed));
  MXMOE_RETURN_IF_ERROR(carver->Carve("intermediate_scales", scale_rows * inter_scale_cols,
                                      &ws->intermediate_scales));
  return MXMOE_STATUS_OK;
}

float ScalingFactor(const mxmoe_moe_forward_args& args) {
  return args.routed_scaling_factor == 0.0f ? 1.0f : args.routed_scaling_factor;
}

// The softmax denominator in the 32-lane order of moe_numerics.h.
float LaneOrderSum(const float* v, int64_t count) {
  float partial[format::kSoftmaxLanes];
  for (int j = 0; j < format::kSoftmaxLanes; ++j) {
    partial[j] = 0.0f;
    for (int64_t e = j; e < count; e += format::kSoftmaxLanes) {
      partial[j] = MXMOE_ADD(partial[j], v[e]);
    }
  }
  for (int o = format::kSoftmaxLanes / 2; o > 0; o /= 2) {
    float next[format::kSoftmaxLanes];
    for (int j = 0; j < format::kSoftmaxLanes; ++j) next[j] = MXMOE_ADD(partial[j], partial[j ^ o]);
    for (int j = 0; j < format::kSoftmaxLanes; ++j) partial[j] = next[j];
  }
  return partial[0];
}

// The `count` best of `candidates` by `value` (RanksBefore), best first, into `chosen`.
void TopByRank(const float* value, std::vector<int32_t>* candidates, int64_t count,
               int32_t* chosen) {
  auto before = [value](int32_t a, int32_t b) {
    return format::RanksBefore(value[a], a, value[b], b);
  };
  std::partial_sort(candidates->begin(), candidates->begin() + count, candidates->end(), before);
  for (int64_t s = 0; s < count; ++s) chosen[s] = (*candidates)[s];
}

// Stage 1 for tokens [begin, end): ids and weights of the routed slots. One body, compiled
// twice like the activation rows (panel.h, ActivationUsesFma): its exp and sigmoid are
// format.h's, the same bits either way.
__attribute__((always_inline)) inline void RouteTokensBody(const mxmoe_moe_forward_args& args,
                                                           const MoeWorkspace& ws, int64_t begin,
                                                           int64_t end) {
  const int64_t num_experts = args.num_global_experts;
  const int64_t top_k = args.top_k;
  const float scaling = ScalingFactor(args);
  const int64_t groups = args.num_expert_groups == 0 ? 1 : args.num_expert_groups;
  const int64_t kept_groups = args.topk_groups == 0 ? groups : args.topk_groups;
  const int64_t group_size = num_experts / groups;
  std::vector<int32_t> candidates;
  std::vector<float> sigmoid(static_cast<size_t>(num_experts));
  std::vector<float> group_score(static_cast<size_t>(groups));
  std::vector<int32_t> group_order(static_cast<size_t>(groups));
  std::vector<int32_t> kept(static_cast<size_t>(kept_groups));
  std::vector<int32_t> pair(2);
  for (int64_t t = begin; t < end; ++t) {
    float* v = ws.router_scores + t * num_experts;
    int32_t* ids = ws.topk_ids + t * top_k;
    float* weights = ws.topk_weights + t * top_k;
    for (int64_t e = 0; e < num_experts; ++e) {
      v[e] = LoadAsFloat(args.router_logits, args.router_logits_dtype, t * num_experts + e);
    }
    candidates.resize(static_cast<size_t>(num_experts));
    for (int64_t e = 0; e < num_experts; ++e) candidates[e] = static_cast<int32_t>(e);

    if (args.routing == MXMOE_ROUTING_SOFTMAX_TOPK) {
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < num_experts; ++e) max_logit = v[e] > max_logit ? v[e] : max_logit;
      for (int64_t e = 0; e < num_experts; ++e) v[e] = format::ExpF32(MXMOE_ADD(v[e], -max_logit));
      const float sum = LaneOrderSum(v, num_experts);
      for (int64_t e = 0; e < num_experts; ++e) v[e] = v[e] / sum;
      TopByRank(v, &candidates, top_k, ids);
      float selected_sum = 0.0f;
      for (int64_t s = 0; s < top_k; ++s) selected_sum = MXMOE_ADD(selected_sum, v[ids[s]]);
      for (int64_t s = 0; s < top_k; ++s) {
        weights[s] = args.renormalize ? v[ids[s]] / selected_sum : v[ids[s]];
      }
    } else if (args.routing == MXMOE_ROUTING_TOPK_SOFTMAX) {
      TopByRank(v, &candidates, top_k, ids);
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < top_k; ++s) max_logit = v[ids[s]] > max_logit ? v[ids[s]] : max_logit;
      float sum = 0.0f;
      for (int64_t s = 0; s < top_k; ++s) {
        weights[s] = format::ExpF32(MXMOE_ADD(v[ids[s]], -max_logit));
        sum = MXMOE_ADD(sum, weights[s]);
      }
      for (int64_t s = 0; s < top_k; ++s) weights[s] = weights[s] / sum;
    } else {  // SIGMOID_GROUPED_TOPK
      for (int64_t e = 0; e < num_experts; ++e) {
        sigmoid[e] = format::SigmoidF32(v[e]);
        v[e] = args.e_score_correction_bias == nullptr
                   ? sigmoid[e]
                   : MXMOE_ADD(sigmoid[e], LoadAsFloat(args.e_score_correction_bias,
                                                       args.e_score_correction_bias_dtype, e));
      }
      if (kept_groups < groups) {
        for (int64_t g = 0; g < groups; ++g) {
          std::vector<int32_t> members(static_cast<size_t>(group_size));
          for (int64_t j = 0; j < group_size; ++j)
            members[j] = static_cast<int32_t>(g * group_size + j);
          const int64_t best = std::min<int64_t>(2, group_size);
          TopByRank(v, &members, best, pair.data());
          group_score[g] = best == 2 ? MXMOE_ADD(v[pair[0]], v[pair[1]]) : v[pair[0]];
          group_order[g] = static_cast<int32_t>(g);
        }
        TopByRank(group_score.data(), &group_order, kept_groups, kept.data());
        std::sort(kept.begin(), kept.end());
        candidates.clear();
        for (int32_t g : kept) {
          for (int64_t j = 0; j < group_size; ++j)
            candidates.push_back(static_cast<int32_t>(g * group_size + j));
        }
      }
      TopByRank(v, &candidates, top_k, ids);
      float sum = 0.0f;
      for (int64_t s = 0; s < top_k; ++s) sum = MXMOE_ADD(sum, sigmoid[ids[s]]);
      for (int64_t s = 0; s < top_k; ++s) {
        weights[s] = args.renormalize ? sigmoid[ids[s]] / sum : sigmoid[ids[s]];
      }
    }
    for (int64_t s = 0; s < top_k; ++s) weights[s] = MXMOE_MUL(weights[s], scaling);
  }
}

// Stage 6 for rows [begin, end): activation (+ w13 bias) of the GEMM1 row, rounded. One body,
// compiled twice (panel.h, ActivationUsesFma): the same bits either way.
__attribute__((always_inline)) inline void ActivateRowsBody(const mxmoe_moe_forward_args& args,
                                                            const MoeWorkspace& ws,
                                                            int64_t begin, int64_t end) {
  const int64_t inter = args.intermediate_size;
  const int32_t dtype = args.activation_dtype;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t e = ws.expert_of_row[r];
    for (int64_t i = 0; i < inter; ++i) {
      float g = LoadAsFloat(ws.gemm1_output, dtype, r * 2 * inter + i);
      float u = LoadAsFloat(ws.gemm1_output, dtype, r * 2 * inter + inter + i);
      if (args.w13_bias != nullptr) {
        g = RoundToDtype(
            MXMOE_ADD(g, LoadAsFloat(args.w13_bias, args.w13_bias_dtype, e * 2 * inter + i)),
            dtype);
        u = RoundToDtype(MXMOE_ADD(u, LoadAsFloat(args.w13_bias, args.w13_bias_dtype,
                                                  e * 2 * inter + inter + i)),
                         dtype);
      }
      const float y = args.activation == MXMOE_ACTIVATION_SWIGLU_OAI
                          ? format::SwigluOaiF32(g, u, args.swiglu_alpha, args.swiglu_limit)
                          : MXMOE_MUL(format::SiluF32(g), u);
      StoreFromFloat(ws.intermediate, dtype, r * inter + i, y);
    }
  }
}

void RouteTokensPlain(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws, int64_t begin,
                      int64_t end) {
  RouteTokensBody(args, ws, begin, end);
}

MXMOE_CPU_FMA_TARGET void RouteTokensFma(const mxmoe_moe_forward_args& args,
                                         const MoeWorkspace& ws, int64_t begin, int64_t end) {
  RouteTokensBody(args, ws, begin, end);
}

void ActivateRowsPlain(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws,
                       int64_t begin, int64_t end) {
  ActivateRowsBody(args, ws, begin, end);
}

MXMOE_CPU_FMA_TARGET void ActivateRowsFma(const mxmoe_moe_forward_args& args,
                                          const MoeWorkspace& ws, int64_t begin, int64_t end) {
#if defined(__x86_64__)
  if (args.activation != MXMOE_ACTIVATION_SWIGLU_OAI && args.w13_bias == nullptr &&
      args.activation_dtype == MXMOE_DTYPE_BF16) {  // eight lanes at a time (activation_simd.h)
    const int64_t inter = args.intermediate_size;
    const uint16_t* in = reinterpret_cast<const uint16_t*>(ws.gemm1_output);
    uint16_t* out = reinterpret_cast<uint16_t*>(ws.intermediate);
    for (int64_t r = begin; r < end; ++r) {
      SiluMulBf16RowToBf16(in + r * 2 * inter, in + r * 2 * inter + inter, inter,
                           out + r * inter);
    }
    return;
  }
#endif
  ActivateRowsBody(args, ws, begin, end);
}

// Stage 8 for tokens [begin, end): each token's output row = the sum over its slots (routed in
// rank order, then shared) of weight * y, y = the slot's GEMM2 row (+ the w2 bias, rounded to the
// activation dtype first), in fp32, rounded once to the activation dtype. One hidden-size fp32
// row of scratch per call (a failed allocation propagates through ParallelFor). kBf16Lanes (the
// FMA clone, bf16 without a w2 bias): the same operations in the same order, eight lanes at a
// time (activation_simd.h).
template <bool kBf16Lanes>
__attribute__((always_inline)) inline void ReduceTokensBody(const mxmoe_moe_forward_args& args,
                                                            const MoeWorkspace& ws,
                                                            int64_t begin, int64_t end) {
  const int64_t top_k = args.top_k;
  const int64_t per_token = top_k + args.num_shared_experts;
  const int64_t hidden = args.hidden_size;
  const int32_t dtype = args.activation_dtype;
  std::vector<float> acc(static_cast<size_t>(hidden));
  for (int64_t t = begin; t < end; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t s = 0; s < per_token; ++s) {
      const int32_t row = ws.row_of_slot[t * per_token + s];
      if (row < 0) continue;
      const float w = s < top_k ? ws.topk_weights[t * top_k + s] : 1.0f;
#if defined(__x86_64__)
      if constexpr (kBf16Lanes) {
        AccumulateBf16Row(reinterpret_cast<const uint16_t*>(ws.activations) + row * hidden, w,
                          hidden, acc.data());
        continue;
      }
#endif
      const int64_t e = ws.expert_of_row[row];
      for (int64_t h = 0; h < hidden; ++h) {
        float y = LoadAsFloat(ws.activations, dtype, row * hidden + h);
        if (args.w2_bias != nullptr) {
          y = RoundToDtype(
              MXMOE_ADD(y, LoadAsFloat(args.w2_bias, args.w2_bias_dtype, e * hidden + h)),
              dtype);
        }
        acc[h] = MXMOE_ADD(acc[h], MXMOE_MUL(w, y));
      }
    }
#if defined(__x86_64__)
    if constexpr (kBf16Lanes) {
      StoreBf16Row(acc.data(), hidden, reinterpret_cast<uint16_t*>(args.output) + t * hidden);
      continue;
    }
#endif
    for (int64_t h = 0; h < hidden; ++h) StoreFromFloat(args.output, dtype, t * hidden + h, acc[h]);
  }
}

void ReduceTokensPlain(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws,
                       int64_t begin, int64_t end) {
  ReduceTokensBody<false>(args, ws, begin, end);
}

MXMOE_CPU_FMA_TARGET void ReduceTokensFma(const mxmoe_moe_forward_args& args,
                                          const MoeWorkspace& ws, int64_t begin, int64_t end) {
  if (args.w2_bias == nullptr && args.activation_dtype == MXMOE_DTYPE_BF16) {
    ReduceTokensBody<true>(args, ws, begin, end);
  } else {
    ReduceTokensBody<false>(args, ws, begin, end);
  }
}

// A stage over [begin, end) compiled twice (plain and FMA): the clone ActivationUsesFma() picks.
using StageFn = void (*)(const mxmoe_moe_forward_args&, const MoeWorkspace&, int64_t, int64_t);
StageFn PickClone(StageFn plain, StageFn fma) { return ActivationUsesFma() ? fma : plain; }

}  // namespace

mxmoe_status MoeForwardWorkspaceSize(const mxmoe_moe_forward_args& args, size_t* bytes) {
  WorkspaceCarver measure;
  MoeWorkspace ws;
  MXMOE_RETURN_IF_ERROR(CarveMoeWorkspace(args, &measure, &ws));
  *bytes = measure.RequiredBytes();
  return MXMOE_STATUS_OK;
}

mxmoe_status MoeForward(const mxmoe_moe_forward_args& args, void* workspace,
                        size_t workspace_bytes) {
  WorkspaceCarver carver(workspace, workspace_bytes);
  MoeWorkspace ws;
  MXMOE_RETURN_IF_ERROR(CarveMoeWorkspace(args, &carver, &ws));

  const int64_t num_tokens = args.num_tokens;
  const int64_t top_k = args.top_k;
  const int64_t shared = args.num_shared_experts;
  const int64_t per_token = top_k + shared;  // slots of a token: routed, then shared
  const int64_t hidden = args.hidden_size;
  const int64_t inter = args.intermediate_size;
  const int32_t num_local = args.num_local_experts;
  const int32_t first_shared = num_local - static_cast<int32_t>(shared);
  const int32_t dtype = args.activation_dtype;
  const int64_t act_bytes = DtypeBytes(dtype);
  const int64_t routed_slots = num_tokens * top_k;
  const int64_t slots = num_tokens * per_token;

  // 1. Routing.
  if (args.router_logits != nullptr) {
    const StageFn route = PickClone(RouteTokensPlain, RouteTokensFma);
    ParallelFor(num_tokens, std::max<int64_t>(1, 4096 / args.num_global_experts),
                [&](int64_t begin, int64_t end) { route(args, ws, begin, end); });
  } else {
    for (int64_t i = 0; i < routed_slots; ++i) {
      ws.topk_ids[i] = LoadI32(args.topk_ids, i);
      ws.topk_weights[i] = LoadF32(args.topk_weights, i);
    }
  }

  // 2-3. Local expert of every slot, counting sort by (local expert, token, slot).
  auto local_expert = [&](int64_t slot) {
    const int64_t t = slot / per_token;
    const int64_t s = slot % per_token;
    if (s >= top_k) return first_shared + static_cast<int32_t>(s - top_k);
    const int32_t global = ws.topk_ids[t * top_k + s];
    return args.expert_map != nullptr ? LoadI32(args.expert_map, global) : global;
  };
  std::fill(ws.sort_cursor, ws.sort_cursor + num_local, 0);
  for (int64_t i = 0; i < slots; ++i) {
    const int32_t e = local_expert(i);
    if (e >= 0) ++ws.sort_cursor[e];
  }
  ws.expert_offsets[0] = 0;
  ws.blockscale_offsets[0] = 0;
  for (int32_t e = 0; e < num_local; ++e) {
    const int32_t count = ws.sort_cursor[e];
    ws.sort_cursor[e] = ws.expert_offsets[e];
    ws.expert_offsets[e + 1] = ws.expert_offsets[e] + count;
    const int64_t padded = format::RoundUp(count, format::kSwizzleRows);
    ws.blockscale_offsets[e + 1] = ws.blockscale_offsets[e] + static_cast<int32_t>(padded);
  }
  for (int64_t i = 0; i < slots; ++i) {
    const int32_t e = local_expert(i);
    if (e < 0) {
      ws.row_of_slot[i] = -1;
      continue;
    }
    const int32_t row = ws.sort_cursor[e]++;
    ws.row_of_slot[i] = row;
    ws.token_of_row[row] = static_cast<int32_t>(i / per_token);
    ws.expert_of_row[row] = e;
  }
  const int64_t rows = ws.expert_offsets[num_local];
  const int64_t scale_rows = ws.blockscale_offsets[num_local];

  // 4. Gather and quantize the hidden rows.
  const int64_t hidden_row_bytes = hidden * act_bytes;
  const uint8_t* hidden_states = static_cast<const uint8_t*>(args.hidden_states);
  // hidden = 0: no bytes to gather, and ws.activations is then NULL (memcpy(NULL, ...) is UB).
  ParallelFor(hidden_row_bytes > 0 ? rows : 0, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      memcpy(ws.activations + r * hidden_row_bytes,
             hidden_states + ws.token_of_row[r] * hidden_row_bytes,
             static_cast<size_t>(hidden_row_bytes));
    }
  });
  mxmoe_experts_quantize_args quantize_hidden = {};
  quantize_hidden.rows = rows;
  quantize_hidden.k = hidden;
  quantize_hidden.num_experts = num_local;
  quantize_hidden.input = ws.activations;
  quantize_hidden.input_dtype = dtype;
  quantize_hidden.expert_offsets = ws.expert_offsets;
  quantize_hidden.blockscale_offsets = ws.blockscale_offsets;
  quantize_hidden.packed = ws.hidden_packed;
  quantize_hidden.scales = ws.hidden_scales;
  quantize_hidden.scale_rows = scale_rows;
  quantize_hidden.device = args.device;
  MXMOE_RETURN_IF_ERROR(ExpertsQuantize(quantize_hidden));

  // 5. GEMM1: [R, H] x w13[e]^T -> [R, 2I].
  mxmoe_grouped_gemm_args gemm1 = {};
  gemm1.rows = rows;
  gemm1.n = 2 * inter;
  gemm1.k = hidden;
  gemm1.num_experts = num_local;
  gemm1.a = ws.hidden_packed;
  gemm1.a_scales = ws.hidden_scales;
  gemm1.a_scale_rows = scale_rows;
  gemm1.b = args.w13;
  gemm1.expert_offsets = ws.expert_offsets;
  gemm1.blockscale_offsets = ws.blockscale_offsets;
  gemm1.problem_sizes = nullptr;
  gemm1.c = ws.gemm1_output;
  gemm1.c_dtype = dtype;
  gemm1.device = args.device;
  MXMOE_RETURN_IF_ERROR(GroupedGemm(gemm1));

  // 6. Activation (+ w13 bias), quantized per expert.
  const StageFn activate = PickClone(ActivateRowsPlain, ActivateRowsFma);
  ParallelFor(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(inter, 1)),
              [&](int64_t begin, int64_t end) { activate(args, ws, begin, end); });
  mxmoe_experts_quantize_args quantize_intermediate = quantize_hidden;
  quantize_intermediate.k = inter;
  quantize_intermediate.input = ws.intermediate;
  quantize_intermediate.packed = ws.intermediate_packed;
  quantize_intermediate.scales = ws.intermediate_scales;
  MXMOE_RETURN_IF_ERROR(ExpertsQuantize(quantize_intermediate));

  // 7. GEMM2: [R, I] x w2[e]^T -> [R, H], into the (now free) gathered-activation slice.
  mxmoe_grouped_gemm_args gemm2 = gemm1;
  gemm2.n = hidden;
  gemm2.k = inter;
  gemm2.a = ws.intermediate_packed;
  gemm2.a_scales = ws.intermediate_scales;
  gemm2.b = args.w2;
  gemm2.c = ws.activations;
  MXMOE_RETURN_IF_ERROR(GroupedGemm(gemm2));

  // 8. Weighted sum of each token's expert outputs (+ w2 bias, rounded, first).
  const StageFn reduce = PickClone(ReduceTokensPlain, ReduceTokensFma);
  ParallelFor(num_tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(hidden, 1)),
              [&](int64_t begin, int64_t end) { reduce(args, ws, begin, end); });
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
