// mxmoe public C API: MXFP4 (E2M1 values, E8M0 scale per 32 elements) W4A4 MoE kernels.
//
// One header, extern "C", no C++ types across the boundary. Every entry point:
//   - takes one args struct (dims, pointers, dtypes, layouts, device) and the stream last
//     (`void*`, a cudaStream_t for CUDA pointers, ignored for CPU pointers);
//   - validates everything before touching memory and returns a status; on failure
//     mxmoe_last_error() (thread-local) names the offending argument and value, and no output
//     byte has been written. Every buffer's extents (a zero extent counted as one) times its
//     element size must fit int64; an operation whose outputs are all 0 bytes returns OK after
//     validation without doing any work; a workspace must not overlap any argument's buffer;
//   - never allocates device memory: operations that need scratch space have a
//     *_workspace_size query, the caller allocates, the library carves it.
// The data contract (E2M1 codes, E8M0 rule, scale layouts, grouped layout) is in
// docs/format.md (in the repository) and in mxmoe/format.h, shared by every backend.
//
// Device-side metadata (expert_offsets, blockscale_offsets, problem_sizes, topk ids, expert_map)
// is fully validated on the CPU backend. On CUDA backends it cannot be read without a host
// synchronisation; each CUDA entry point documents what it checks on the device.
#ifndef MXMOE_MXMOE_H_
#define MXMOE_MXMOE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// libmxmoe is compiled with -fvisibility=hidden: the declarations below are its exports (its
// version script, cc/libmxmoe.map, lets nothing else out either).
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

#define MXMOE_VERSION_MAJOR 0
#define MXMOE_VERSION_MINOR 1
#define MXMOE_VERSION_PATCH 0

// ---------------------------------------------------------------------------------------------
// Status, errors, version
// ---------------------------------------------------------------------------------------------

typedef enum mxmoe_status {
  MXMOE_STATUS_OK = 0,
  MXMOE_STATUS_INVALID_ARGUMENT = 1,     // null pointer, bad shape, bad offsets, bad dtype
  MXMOE_STATUS_UNSUPPORTED = 2,          // valid request this build/backend cannot serve
  MXMOE_STATUS_MISALIGNED = 3,           // pointer alignment a kernel needs is not met
  MXMOE_STATUS_WORKSPACE_TOO_SMALL = 4,  // workspace_bytes < *_workspace_size()
  MXMOE_STATUS_CUDA_ERROR = 5,           // a CUDA runtime call failed
  MXMOE_STATUS_INTERNAL = 6,             // a bug in mxmoe; please report
} mxmoe_status;

// Message of the last failed call on this thread ("" after success). Valid until the next call.
const char* mxmoe_last_error(void);
const char* mxmoe_status_string(mxmoe_status status);
// "MAJOR.MINOR.PATCH".
const char* mxmoe_version(void);

// ---------------------------------------------------------------------------------------------
// Devices, dtypes, layouts, backends
// ---------------------------------------------------------------------------------------------

// DLPack device type codes, so a DLTensor's device converts directly.
typedef enum mxmoe_device_type {
  MXMOE_DEVICE_CPU = 1,
  MXMOE_DEVICE_CUDA = 2,
} mxmoe_device_type;

typedef struct mxmoe_device {
  int32_t type;  // mxmoe_device_type
  int32_t id;    // CUDA ordinal; 0 for CPU
} mxmoe_device;

typedef enum mxmoe_dtype {
  MXMOE_DTYPE_BF16 = 0,
  MXMOE_DTYPE_FP16 = 1,
  MXMOE_DTYPE_FP32 = 2,  // dequantize output and router logits only
} mxmoe_dtype;

typedef enum mxmoe_scale_layout {
  // [rows, K/32] row-major.
  MXMOE_SCALE_LAYOUT_LINEAR = 0,
  // Blackwell tensor-core layout: rows padded to 128, scale columns to 4; byte offset of
  // (m, k) = (m/128 * ceil(K/128) + k/4) * 512 + (m%32)*16 + ((m/32)%4)*4 + k%4. Padding = 0.
  MXMOE_SCALE_LAYOUT_SWIZZLED_128X4 = 1,
} mxmoe_scale_layout;

typedef enum mxmoe_backend {
  MXMOE_BACKEND_AUTO = 0,   // choose from the pointers' device (and MXMOE_BACKEND env var)
  MXMOE_BACKEND_CPU = 1,    // reference implementation of every entry point
  MXMOE_BACKEND_SM90 = 2,   // Hopper (H100/H200)
  MXMOE_BACKEND_SM100 = 3,  // Blackwell (B200/GB200), sm_100a
} mxmoe_backend;

const char* mxmoe_backend_name(mxmoe_backend backend);  // "auto", "cpu", "sm90", "sm100"

// The backend that serves pointers on `device`: CPU for CPU; for CUDA the device's compute
// capability (9.x -> sm90, 10.x -> sm100), unless the MXMOE_BACKEND environment variable
// (cpu|sm90|sm100) overrides it. MXMOE_BACKEND is read once per process, at the first call that
// picks a backend (getenv is not safe against another thread's setenv): set it before that. Fails with UNSUPPORTED (and says why) when no backend can
// serve the device, e.g. a CUDA device of another architecture or MXMOE_BACKEND=cpu for CUDA
// pointers.
mxmoe_status mxmoe_backend_for_device(mxmoe_device device, mxmoe_backend* backend);

// Number of CUDA devices visible to the library (0 on a machine without a GPU or driver).
int32_t mxmoe_cuda_device_count(void);

// ---------------------------------------------------------------------------------------------
// Quantize / dequantize rows
// ---------------------------------------------------------------------------------------------

// input:  [rows, k] bf16/fp16, row-major, contiguous
// packed: [rows, k/2] uint8, element 2i in the low nibble
// scales: LINEAR [rows, k/32] or SWIZZLED_128X4 [round_up(rows,128), round_up(k/32,4)] uint8
// k % 32 == 0. Non-finite inputs (format.h): a block holding a NaN gets scale 0xFF and all codes
// 0; otherwise the bit rule applies literally, so a block holding +-Inf gets scale 253, the Inf
// saturates to +-6 and the block's finite values quantize against 2^126 (almost always to +-0).
typedef struct mxmoe_quantize_args {
  int64_t rows;
  int64_t k;
  const void* input;
  int32_t input_dtype;  // mxmoe_dtype: BF16 or FP16
  uint8_t* packed;
  uint8_t* scales;
  int32_t scale_layout;  // mxmoe_scale_layout
  mxmoe_device device;
} mxmoe_quantize_args;

mxmoe_status mxmoe_quantize(const mxmoe_quantize_args* args, void* stream);

// packed + scales -> output [rows, k] bf16/fp16/fp32: code value * 2^(scale-127), computed in
// fp32 and rounded to the output dtype (scale 0xFF -> NaN; overflow -> Inf).
typedef struct mxmoe_dequantize_args {
  int64_t rows;
  int64_t k;
  const uint8_t* packed;
  const uint8_t* scales;
  int32_t scale_layout;  // mxmoe_scale_layout
  void* output;
  int32_t output_dtype;  // mxmoe_dtype
  mxmoe_device device;
} mxmoe_dequantize_args;

mxmoe_status mxmoe_dequantize(const mxmoe_dequantize_args* args, void* stream);

// ---------------------------------------------------------------------------------------------
// Per-expert activation quantization (vLLM mxfp4_experts_quant semantics)
// ---------------------------------------------------------------------------------------------

// Rows are stacked by expert. Expert e owns input rows [expert_offsets[e], expert_offsets[e+1])
// and scale rows [blockscale_offsets[e], blockscale_offsets[e] + round_up(m_e, 128)), where its
// scales are laid out SWIZZLED_128X4 as an independent [m_e, k/32] matrix (padding bytes 0).
//
// input:              [rows, k] bf16/fp16        (rows >= expert_offsets[E])
// expert_offsets:     [E+1] int32, 0, monotone    (m_e = expert_offsets[e+1] - expert_offsets[e])
// blockscale_offsets: [E+1] int32, cumulative round_up(m_e, 128)
// packed:             [rows, k/2] uint8           (rows past expert_offsets[E] are not written)
// scales:             [scale_rows, round_up(k/32, 4)] uint8 (scale_rows >= blockscale_offsets[E];
//                     rows past blockscale_offsets[E] are not written)
typedef struct mxmoe_experts_quantize_args {
  int64_t rows;
  int64_t k;
  int32_t num_experts;
  const void* input;
  int32_t input_dtype;  // BF16 or FP16
  const int32_t* expert_offsets;
  const int32_t* blockscale_offsets;
  uint8_t* packed;
  uint8_t* scales;
  int64_t scale_rows;
  mxmoe_device device;
} mxmoe_experts_quantize_args;

mxmoe_status mxmoe_experts_quantize(const mxmoe_experts_quantize_args* args, void* stream);

// Fused SiLU-and-mul + per-expert quantization (vLLM silu_and_mul_mxfp4_experts_quant).
// input: [rows, 2*n] bf16/fp16, gate = columns [0, n), up = [n, 2n).
// y = silu(gate) * up in fp32, rounded to the input dtype, then quantized as above to
// packed [rows, n/2] and scales [scale_rows, round_up(n/32, 4)]. n % 32 == 0.
typedef struct mxmoe_silu_mul_experts_quantize_args {
  int64_t rows;
  int64_t n;  // output width; the input has 2*n columns
  int32_t num_experts;
  const void* input;
  int32_t input_dtype;  // BF16 or FP16
  const int32_t* expert_offsets;
  const int32_t* blockscale_offsets;
  uint8_t* packed;
  uint8_t* scales;
  int64_t scale_rows;
  mxmoe_device device;
} mxmoe_silu_mul_experts_quantize_args;

mxmoe_status mxmoe_silu_mul_experts_quantize(const mxmoe_silu_mul_experts_quantize_args* args,
                                             void* stream);

// ---------------------------------------------------------------------------------------------
// Scale layout conversion
// ---------------------------------------------------------------------------------------------

// A batch of independent [rows, cols] scale matrices (cols = K/32).
// linear:   [batch, rows, cols] uint8
// swizzled: [batch, round_up(rows,128), round_up(cols,4)] uint8 (swizzle writes padding as 0;
//           unswizzle ignores padding)
typedef struct mxmoe_swizzle_scales_args {
  int64_t batch;
  int64_t rows;
  int64_t cols;
  const uint8_t* input;
  uint8_t* output;
  mxmoe_device device;
} mxmoe_swizzle_scales_args;

mxmoe_status mxmoe_swizzle_scales(const mxmoe_swizzle_scales_args* args, void* stream);
mxmoe_status mxmoe_unswizzle_scales(const mxmoe_swizzle_scales_args* args, void* stream);

// ---------------------------------------------------------------------------------------------
// Expert weights
// ---------------------------------------------------------------------------------------------

// bf16/fp16 expert weights [E, n, k] -> packed [E, n, k/2] and scales, LINEAR [E, n, k/32] or
// SWIZZLED_128X4 per expert [E, round_up(n,128), round_up(k/32,4)]. Same rule as quantize.
typedef struct mxmoe_quantize_weights_args {
  int32_t num_experts;
  int64_t n;
  int64_t k;
  const void* weights;
  int32_t weights_dtype;  // BF16 or FP16
  uint8_t* packed;
  uint8_t* scales;
  int32_t scale_layout;
  mxmoe_device device;
} mxmoe_quantize_weights_args;

mxmoe_status mxmoe_quantize_weights(const mxmoe_quantize_weights_args* args, void* stream);

// How a grouped GEMM / MoE forward finds its expert weights.
typedef enum mxmoe_weight_format {
  // packed [E, n, k/2] + scales [E, n, k/32] (public interchange format).
  MXMOE_WEIGHT_FORMAT_LINEAR = 0,
  // packed [E, n, k/2] + scales [E, round_up(n,128), round_up(k/32,4)] swizzled per expert.
  MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4 = 1,
  // One opaque buffer written by mxmoe_prepare_weights for `backend` (packed = the buffer,
  // scales = NULL, prepared_bytes = its length). Only that backend reads it.
  MXMOE_WEIGHT_FORMAT_PREPARED = 2,
} mxmoe_weight_format;

typedef struct mxmoe_expert_weights {
  int32_t num_experts;
  int64_t n;
  int64_t k;
  int32_t format;   // mxmoe_weight_format
  int32_t backend;  // PREPARED only: the backend that prepared it (mxmoe_backend)
  const uint8_t* packed;
  const uint8_t* scales;
  // PREPARED only: the length of the buffer at `packed`. A value below
  // mxmoe_prepare_weights_size() for (num_experts, n, k, backend) is INVALID_ARGUMENT, so 0 (what
  // an initializer that omits it gives) is always rejected. Ignored for LINEAR / SWIZZLED_128X4,
  // whose sizes follow from the dims.
  size_t prepared_bytes;
} mxmoe_expert_weights;

// Converts LINEAR weights into the layout `backend` reads fastest, once, at load time.
// `weights.format` must be LINEAR; `prepared` receives mxmoe_prepare_weights_size() bytes.
typedef struct mxmoe_prepare_weights_args {
  mxmoe_expert_weights weights;
  int32_t backend;  // mxmoe_backend (AUTO = the backend serving `device`)
  uint8_t* prepared;
  size_t prepared_bytes;
  mxmoe_device device;
} mxmoe_prepare_weights_args;

mxmoe_status mxmoe_prepare_weights_size(const mxmoe_prepare_weights_args* args, size_t* bytes);
mxmoe_status mxmoe_prepare_weights(const mxmoe_prepare_weights_args* args, void* stream);

// ---------------------------------------------------------------------------------------------
// Grouped GEMM (vLLM cutlass_mxfp4_moe_mm semantics)
// ---------------------------------------------------------------------------------------------

// c[rows of e] = A[rows of e] x B[e]^T for each expert e (NT: both operands K-major).
// a:                  [rows, k/2] e2m1 packed (rows >= expert_offsets[E])
// a_scales:           swizzled 128x4, expert e's at row blockscale_offsets[e]
//                     ([a_scale_rows, round_up(k/32,4)] uint8)
// b:                  mxmoe_expert_weights with n, k, num_experts == E
// expert_offsets:     [E+1] int32; blockscale_offsets: [E+1] int32 (as in experts_quantize)
// problem_sizes:      [E, 3] int32 (m_e, n, k), or NULL (then derived from expert_offsets)
// c:                  [rows, n] bf16/fp16; rows past expert_offsets[E] are not written
// Accumulation is at least fp32; the result is rounded once to the output dtype.
typedef struct mxmoe_grouped_gemm_args {
  int64_t rows;
  int64_t n;
  int64_t k;
  int32_t num_experts;
  const uint8_t* a;
  const uint8_t* a_scales;
  int64_t a_scale_rows;
  mxmoe_expert_weights b;
  const int32_t* expert_offsets;
  const int32_t* blockscale_offsets;
  const int32_t* problem_sizes;
  void* c;
  int32_t c_dtype;  // BF16 or FP16
  mxmoe_device device;
} mxmoe_grouped_gemm_args;

mxmoe_status mxmoe_grouped_gemm_workspace_size(const mxmoe_grouped_gemm_args* args,
                                               size_t* bytes);
mxmoe_status mxmoe_grouped_gemm(const mxmoe_grouped_gemm_args* args, void* workspace,
                                size_t workspace_bytes, void* stream);

// ---------------------------------------------------------------------------------------------
// MoE forward
// ---------------------------------------------------------------------------------------------

// The activation between the two GEMMs of an expert. Its input is the GEMM1 row [gate | up]
// (columns [0, I) gate, [I, 2I) up), each value rounded to the activation dtype and, with
// w13_bias, rounded again after adding the bias: g = rnd(rnd(gemm) + bias). The activation is
// computed in fp32 (separately rounded operations, the exp of mxmoe/format.h) and its result
// rounded once to the activation dtype before it is quantized. Zero = SILU_AND_MUL.
typedef enum mxmoe_activation {
  // y = silu(g) * u, silu(g) = g / (1 + exp(-g)).
  MXMOE_ACTIVATION_SILU_AND_MUL = 0,
  // GPT-OSS: g' = min(g, limit), u' = clamp(u, -limit, limit) (NaN stays NaN),
  // y = (g' * sigmoid(alpha * g')) * (u' + 1), sigmoid(x) = 1 / (1 + exp(-x)).
  MXMOE_ACTIVATION_SWIGLU_OAI = 1,
} mxmoe_activation;

// How router_logits [T, E_global] become top-k ids and fp32 weights. Every mode ranks with ties
// to the lower id and NaN below every number (a NaN is chosen only when nothing else is left).
// After the mode's weights, every mode multiplies them by routed_scaling_factor (0 means 1).
// Zero = SOFTMAX_TOPK. docs/format.md states each mode's exact fp32 operation order.
typedef enum mxmoe_routing {
  // Qwen3-MoE, DeepSeek-V2: p = softmax(logits), top-k by p, renormalize optional.
  MXMOE_ROUTING_SOFTMAX_TOPK = 0,
  // GPT-OSS, Mixtral: top-k of the logits, then softmax over the k chosen.
  MXMOE_ROUTING_TOPK_SOFTMAX = 1,
  // DeepSeek-V3: s = sigmoid(logits), choice = s + e_score_correction_bias, group score = sum
  // of the group's two largest choices, keep topk_groups of num_expert_groups groups, top-k of
  // the kept experts by choice; weights = the chosen s (renormalized if asked).
  MXMOE_ROUTING_SIGMOID_GROUPED_TOPK = 2,
} mxmoe_routing;

// hidden [T, H] -> output [T, H]. Routing: either router_logits [T, E_global] (see
// mxmoe_routing), or precomputed topk_ids [T, top_k] int32 + topk_weights [T, top_k] fp32
// (router_logits NULL; the routing fields must then keep their zero values).
// expert_map [E_global] int32 maps a global expert id to a local one (-1 = not on this device;
// such slots contribute nothing); NULL means identity and E_global == E_local - num_shared.
// A token whose top-k names the same expert twice gets both contributions (each slot is
// independent).
// Non-finite router_logits or topk_weights are data, not errors (a CUDA backend could not check
// them without a synchronisation): routing stays in range (NaN sorts last) and only that
// token's output can become non-finite.
// Shared experts: the last num_shared_experts of the E_local weight experts; every token uses
// each of them with weight 1 (never scaled), after its top_k routed slots.
// Per (token, slot): x -> MXFP4 -> GEMM1 with w13 [E_local, 2I, H] (rows [0,I) gate, [I,2I) up),
// rounded to the activation dtype [-> + w13_bias, rounded] -> activation (fp32, rounded) ->
// MXFP4 -> GEMM2 with w2 [E_local, H, I] rounded to the activation dtype [-> + w2_bias,
// rounded] = y_s. output[t] = (((+0 + w_0 * y_0) + w_1 * y_1) + ...) over the routed slots in
// slot order, then the shared experts in order (weight 1), every product and sum rounded to
// fp32 (no FMA), rounded once to the activation dtype at the end.
// A zero-initialised tail (activation .. num_shared_experts) keeps the behaviour of mxmoe 0.1:
// SiLU-and-mul, no biases, softmax top-k, no shared experts.
typedef struct mxmoe_moe_forward_args {
  int64_t num_tokens;          // T
  int64_t hidden_size;         // H, % 32 == 0
  int64_t intermediate_size;   // I, % 32 == 0
  int32_t num_global_experts;  // E_global (router width / topk id range; routed experts only)
  int32_t num_local_experts;   // E_local (weights' first dimension, shared experts included)
  int32_t top_k;               // routed experts per token
  int32_t renormalize;  // 0 or 1 (router_logits path; TOPK_SOFTMAX weights already sum to 1)
  const void* hidden_states;
  int32_t activation_dtype;  // BF16 or FP16: hidden_states and output
  const void* router_logits;
  int32_t router_logits_dtype;  // FP32, BF16 or FP16
  const int32_t* topk_ids;
  const float* topk_weights;
  const int32_t* expert_map;
  mxmoe_expert_weights w13;
  mxmoe_expert_weights w2;
  void* output;
  mxmoe_device device;
  // ---- model options (appended in 0.2; zero = the 0.1 behaviour) ----
  int32_t activation;    // mxmoe_activation
  float swiglu_alpha;    // SWIGLU_OAI: finite (GPT-OSS 1.702); ignored otherwise
  float swiglu_limit;    // SWIGLU_OAI: > 0, may be +Inf (GPT-OSS 7.0); ignored otherwise
  const void* w13_bias;  // [E_local, 2I] (gate | up, like w13's rows) or NULL
  int32_t w13_bias_dtype;  // BF16, FP16 or FP32
  const void* w2_bias;     // [E_local, H] or NULL
  int32_t w2_bias_dtype;   // BF16, FP16 or FP32
  int32_t routing;            // mxmoe_routing
  int32_t num_expert_groups;  // SIGMOID_GROUPED_TOPK: groups of E_global (0 = 1); else 0 or 1
  int32_t topk_groups;        // groups kept (0 = all), <= num_expert_groups
  float routed_scaling_factor;           // > 0 and finite, or 0 (= 1)
  const void* e_score_correction_bias;   // SIGMOID_GROUPED_TOPK: [E_global] or NULL
  int32_t e_score_correction_bias_dtype;  // BF16, FP16 or FP32
  int32_t num_shared_experts;            // in [0, E_local - 1]
} mxmoe_moe_forward_args;

mxmoe_status mxmoe_moe_forward_workspace_size(const mxmoe_moe_forward_args* args, size_t* bytes);
mxmoe_status mxmoe_moe_forward(const mxmoe_moe_forward_args* args, void* workspace,
                               size_t workspace_bytes, void* stream);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // MXMOE_MXMOE_H_
