// The parameters of the MoE layer's weighted reduce (out[t] = sum over t's slots of w * y), as a
// plain struct that host code can fill: the reduce kernel (cc/cuda/moe_forward_cuda.cu) and the
// CUDA-core GEMM's fused epilogue (cc/cuda/grouped_gemm_sm90_gemv.cu) both take it. The arithmetic
// is cc/cuda/weighted_reduce.cuh's.
#ifndef MXMOE_CUDA_WEIGHTED_REDUCE_H_
#define MXMOE_CUDA_WEIGHTED_REDUCE_H_

#include <stdint.h>

namespace mxmoe {
namespace cuda {

struct ReduceParams {
  const uint16_t* expert_outputs;  // [rows, H] y, in the expert-sorted row order
  const int32_t* slot_row;         // [T * P] sorted row of each slot, or -1 (contributes nothing)
  const int32_t* local_expert;     // [T * P] local expert of each slot (selects the bias row)
  const float* topk_weights;       // [T, top_k]; the P - top_k shared slots weigh 1
  const void* bias;                // [E, H] w2 bias or NULL
  int32_t bias_dtype;
  uint16_t* output;  // [T, H]
  int64_t num_tokens;
  int32_t top_k;
  int32_t slots_per_token;  // P = top_k + shared experts
  int32_t hidden_size;
};

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_WEIGHTED_REDUCE_H_
