// The fp32 arithmetic of the MoE forward's model options, shared by the CPU backend and the CUDA
// kernels (every function is __host__ __device__), so the two give the same bits: the sigmoid,
// the GPT-OSS SwiGLU, the bias rounding and the rank order of routing. Built on format.h's ExpF32
// and its rules (no fast-math, no contraction: MXMOE_MUL / MXMOE_ADD for every operation).
// docs/format.md states the same operations in words; py/mxmoe/reference.py rebuilds them in
// torch independently.
#ifndef MXMOE_MOE_NUMERICS_H_
#define MXMOE_MOE_NUMERICS_H_

#include "mxmoe/format.h"

namespace mxmoe {
namespace format {

// sigmoid(x) = 1 / (1 + ExpF32(-x)), IEEE division. sigmoid(-Inf) = 0, sigmoid(+Inf) = 1,
// sigmoid(NaN) = NaN.
MXMOE_HD float SigmoidF32(float x) { return 1.0f / MXMOE_ADD(1.0f, ExpF32(-x)); }

// GPT-OSS's clamped SwiGLU on one (gate, up) pair:
//   g = min(gate, limit), u = clamp(up, -limit, limit)   (a NaN input stays NaN)
//   y = (g * sigmoid(alpha * g)) * (u + 1)
// each operation rounded to fp32 in that order.
MXMOE_HD float SwigluOaiF32(float gate, float up, float alpha, float limit) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  const float glu = MXMOE_MUL(g, SigmoidF32(MXMOE_MUL(alpha, g)));
  return MXMOE_MUL(glu, MXMOE_ADD(u, 1.0f));
}

// Routing rank order: a before b when a is a number and b is NaN, or both are numbers and
// a > b, or they are equal (or both NaN) and a's id is lower.
MXMOE_HD bool RanksBefore(float a, int32_t a_id, float b, int32_t b_id) {
  const bool a_nan = IsNaN(a);
  const bool b_nan = IsNaN(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

// The softmax denominator's summation order over E values: 32 partial sums, partial j adding
// v[j], v[j+32], v[j+64], ... in order starting from +0; then, for o = 16, 8, 4, 2, 1, every
// partial j becomes partial[j] + partial[j ^ o]; the sum is partial[0]. It is the order of a
// warp's strided loop and xor-shuffle reduction, written out for the host.
constexpr int kSoftmaxLanes = 32;

}  // namespace format
}  // namespace mxmoe

#endif  // MXMOE_MOE_NUMERICS_H_
