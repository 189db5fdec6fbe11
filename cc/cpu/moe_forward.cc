// CPU MoE forward: the reference for every backend's mxmoe_moe_forward. Stages, each a CPU entry
// point or a short loop, and the exact arithmetic of each:
//
//  1. Routing. With router_logits [T, E_global]: logits -> fp32 (exact), m = max over experts
//     (NaN ignored), p_e = ExpF32(l_e - m) (format.h, same bits on host and device), sum in fp32
//     in expert order, p_e /= sum. Top-k: descending p, ties to the lower expert id, NaN last.
//     Renormalize: w_s = p_s / (p_0 + ... + p_{k-1}) with the sum in fp32 in slot order;
//     otherwise w_s = p_s. With topk_ids/topk_weights given, they are used as they are.
//  2. Expert map: local = expert_map[global] (-1: slot skipped), identity without a map.
//  3. Rows sorted by (local expert, token, slot) with a counting sort; expert_offsets and
//     blockscale_offsets (cumulative round_up(m_e, 128)) built from the counts.
//  4. Hidden rows gathered into that order, quantized per expert (experts_quantize).
//  5. GEMM1 with w13 ([gate | up] rows), rounded to the activation dtype.
//  6. silu(gate) * up in fp32, rounded to the activation dtype, quantized per expert.
//  7. GEMM2 with w2, rounded to the activation dtype.
//  8. output[t] = sum over slots in slot order of w_s * y, each product and sum rounded to fp32
//     separately (no FMA), starting from +0, rounded once to the activation dtype. A token with
//     no local slot gets +0.
//
// Workspace: the named slices of CarveMoeWorkspace below, sized for the worst case of T * top_k
// routed rows (the size query cannot read the routing). Nothing else is allocated except the
// grouped GEMM's per-thread tile buffers.
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cc/base/workspace.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/mxfp4_block.h"
#include "cc/cpu/parallel.h"
#include "mxmoe/format.h"

namespace mxmoe {
namespace cpu {
namespace {

struct MoeWorkspace {
  float* router_probabilities;   // [T, E_global] softmax of the router logits
  int32_t* topk_ids;             // [T, top_k] global expert ids
  float* topk_weights;           // [T, top_k]
  int32_t* row_of_slot;          // [T * top_k] sorted row of each (token, slot), -1 if not local
  int32_t* token_of_row;         // [T * top_k] token of each sorted row
  int32_t* expert_offsets;       // [E_local + 1]
  int32_t* blockscale_offsets;   // [E_local + 1]
  int32_t* sort_cursor;          // [E_local] next free row of each expert while sorting
  uint8_t* activations;          // [R, H] act dtype: gathered hidden rows, later GEMM2 output
  uint8_t* hidden_packed;        // [R, H/2]
  uint8_t* hidden_scales;        // [scale_rows, round_up(H/32, 4)] swizzled per expert
  uint8_t* gemm1_output;         // [R, 2I] act dtype
  uint8_t* intermediate_packed;  // [R, I/2]
  uint8_t* intermediate_scales;  // [scale_rows, round_up(I/32, 4)] swizzled per expert
};

mxmoe_status CarveMoeWorkspace(const mxmoe_moe_forward_args& args, WorkspaceCarver* carver,
                               MoeWorkspace* ws) {
  const size_t t = static_cast<size_t>(args.num_tokens);
  const size_t h = static_cast<size_t>(args.hidden_size);
  const size_t inter = static_cast<size_t>(args.intermediate_size);
  const size_t slots = t * static_cast<size_t>(args.top_k);  // R at most
  const size_t e_local = static_cast<size_t>(args.num_local_experts);
  const size_t act = static_cast<size_t>(DtypeBytes(args.activation_dtype));
  const size_t scale_rows = static_cast<size_t>(
      format::MaxScaleRows(static_cast<int64_t>(slots), args.num_local_experts));
  const size_t hidden_scale_cols =
      static_cast<size_t>(format::RoundUp(args.hidden_size / kBlock, format::kSwizzleCols));
  const size_t inter_scale_cols =
      static_cast<size_t>(format::RoundUp(args.intermediate_size / kBlock, format::kSwizzleCols));
  MXMOE_RETURN_IF_ERROR(carver->Carve(
      "router_probabilities", t * static_cast<size_t>(args.num_global_experts),
      &ws->router_probabilities));
  MXMOE_RETURN_IF_ERROR(carver->Carve("topk_ids", slots, &ws->topk_ids));
  MXMOE_RETURN_IF_ERROR(carver->Carve("topk_weights", slots, &ws->topk_weights));
  MXMOE_RETURN_IF_ERROR(carver->Carve("row_of_slot", slots, &ws->row_of_slot));
  MXMOE_RETURN_IF_ERROR(carver->Carve("token_of_row", slots, &ws->token_of_row));
  MXMOE_RETURN_IF_ERROR(carver->Carve("expert_offsets", e_local + 1, &ws->expert_offsets));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("blockscale_offsets", e_local + 1, &ws->blockscale_offsets));
  MXMOE_RETURN_IF_ERROR(carver->Carve("sort_cursor", e_local, &ws->sort_cursor));
  MXMOE_RETURN_IF_ERROR(carver->Carve("activations", slots * h * act, &ws->activations));
  MXMOE_RETURN_IF_ERROR(carver->Carve("hidden_packed", slots * h / 2, &ws->hidden_packed));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("hidden_scales", scale_rows * hidden_scale_cols, &ws->hidden_scales));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("gemm1_output", slots * 2 * inter * act, &ws->gemm1_output));
  MXMOE_RETURN_IF_ERROR(
      carver->Carve("intermediate_packed", slots * inter / 2, &ws->intermediate_packed));
  MXMOE_RETURN_IF_ERROR(carver->Carve("intermediate_scales", scale_rows * inter_scale_cols,
                                      &ws->intermediate_scales));
  return MXMOE_STATUS_OK;
}

// Stage 1 for tokens [begin, end): softmax, top-k, optional renormalisation.
void RouteTokens(const mxmoe_moe_forward_args& args, const MoeWorkspace& ws, int64_t begin,
                 int64_t end) {
  const int64_t num_experts = args.num_global_experts;
  const int64_t top_k = args.top_k;
  std::vector<int32_t> order(static_cast<size_t>(num_experts));
  for (int64_t t = begin; t < end; ++t) {
    float* p = ws.router_probabilities + t * num_experts;
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < num_experts; ++e) {
      p[e] = LoadAsFloat(args.router_logits, args.router_logits_dtype, t * num_experts + e);
      if (p[e] > max_logit) max_logit = p[e];
    }
    float sum = 0.0f;
    for (int64_t e = 0; e < num_experts; ++e) {
      p[e] = format::ExpF32(MXMOE_ADD(p[e], -max_logit));
      sum = MXMOE_ADD(sum, p[e]);
    }
    for (int64_t e = 0; e < num_experts; ++e) p[e] = p[e] / sum;

    for (int64_t e = 0; e < num_experts; ++e) order[e] = static_cast<int32_t>(e);
    auto ranks_before = [p](int32_t a, int32_t b) {
      const bool a_nan = format::IsNaN(p[a]);
      const bool b_nan = format::IsNaN(p[b]);
      if (a_nan != b_nan) return b_nan;
      if (!a_nan && p[a] != p[b]) return p[a] > p[b];
      return a < b;
    };
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), ranks_before);

    float selected_sum = 0.0f;
    for (int64_t s = 0; s < top_k; ++s) selected_sum = MXMOE_ADD(selected_sum, p[order[s]]);
    for (int64_t s = 0; s < top_k; ++s) {
      ws.topk_ids[t * top_k + s] = order[s];
      ws.topk_weights[t * top_k + s] = args.renormalize ? p[order[s]] / selected_sum : p[order[s]];
    }
  }
}

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
  const int64_t hidden = args.hidden_size;
  const int64_t inter = args.intermediate_size;
  const int32_t num_local = args.num_local_experts;
  const int32_t dtype = args.activation_dtype;
  const int64_t act_bytes = DtypeBytes(dtype);
  const int64_t slots = num_tokens * top_k;

  // 1. Routing.
  if (args.router_logits != nullptr) {
    ParallelFor(num_tokens, std::max<int64_t>(1, 4096 / args.num_global_experts),
                [&](int64_t begin, int64_t end) { RouteTokens(args, ws, begin, end); });
  } else {
    for (int64_t i = 0; i < slots; ++i) {
      ws.topk_ids[i] = LoadI32(args.topk_ids, i);
      ws.topk_weights[i] = LoadF32(args.topk_weights, i);
    }
  }

  // 2-3. Local expert of every slot, counting sort by (local expert, token, slot).
  auto local_expert = [&](int64_t slot) {
    const int32_t global = ws.topk_ids[slot];
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
    ws.token_of_row[row] = static_cast<int32_t>(i / top_k);
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

  // 6. silu(gate) * up, quantized per expert.
  mxmoe_silu_mul_experts_quantize_args silu = {};
  silu.rows = rows;
  silu.n = inter;
  silu.num_experts = num_local;
  silu.input = ws.gemm1_output;
  silu.input_dtype = dtype;
  silu.expert_offsets = ws.expert_offsets;
  silu.blockscale_offsets = ws.blockscale_offsets;
  silu.packed = ws.intermediate_packed;
  silu.scales = ws.intermediate_scales;
  silu.scale_rows = scale_rows;
  silu.device = args.device;
  MXMOE_RETURN_IF_ERROR(SiluMulExpertsQuantize(silu));

  // 7. GEMM2: [R, I] x w2[e]^T -> [R, H], into the (now free) gathered-activation slice.
  mxmoe_grouped_gemm_args gemm2 = gemm1;
  gemm2.n = hidden;
  gemm2.k = inter;
  gemm2.a = ws.intermediate_packed;
  gemm2.a_scales = ws.intermediate_scales;
  gemm2.b = args.w2;
  gemm2.c = ws.activations;
  MXMOE_RETURN_IF_ERROR(GroupedGemm(gemm2));

  // 8. Weighted sum of each token's expert outputs.
  ParallelFor(num_tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(hidden, 1)),
              [&](int64_t begin, int64_t end) {
                std::vector<float> acc(static_cast<size_t>(hidden));
                for (int64_t t = begin; t < end; ++t) {
                  std::fill(acc.begin(), acc.end(), 0.0f);
                  for (int64_t s = 0; s < top_k; ++s) {
                    const int32_t row = ws.row_of_slot[t * top_k + s];
                    if (row < 0) continue;
                    const float w = ws.topk_weights[t * top_k + s];
                    for (int64_t h = 0; h < hidden; ++h) {
                      const float y = LoadAsFloat(ws.activations, dtype, row * hidden + h);
                      acc[h] = MXMOE_ADD(acc[h], MXMOE_MUL(w, y));
                    }
                  }
                  for (int64_t h = 0; h < hidden; ++h) {
                    StoreFromFloat(args.output, dtype, t * hidden + h, acc[h]);
                  }
                }
              });
  return MXMOE_STATUS_OK;
}

}  // namespace cpu
}  // namespace mxmoe
