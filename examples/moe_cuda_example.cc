// A serving stack's quick start on a GPU: plain C++ with the CUDA runtime, including only
// <mxmoe/mxmoe.h> and linking only the library. It
//   1. quantizes bf16 expert weights on the device (mxmoe_quantize_weights) and prepares them
//      once for the device's backend (mxmoe_prepare_weights, an opaque buffer);
//   2. queries the MoE forward's workspace size and allocates it with cudaMalloc, once;
//   3. runs mxmoe_moe_forward on a stream, then captures the same call in a CUDA graph and
//      replays it on new inputs written into the same buffers (no allocation, no host sync
//      inside the call, so capture works);
//   4. checks the device weights bit for bit against the CPU backend's quantization, the replay
//      bit for bit against the eager run on the same input, and every output against the CPU
//      backend's forward (relative L2 <= 5e-3: both round to bf16 at the same points, the GPU
//      accumulates the GEMMs in fp32).
// Without a CUDA device (or on one no mxmoe backend serves) it prints "skipped: ..." and exits 0;
// any failure exits 1 with the mxmoe or CUDA error.
//
// Shapes: hidden 576 and intermediate 320 are multiples of 32 but not of 128 (like GPT-OSS's
// 2880), 37 tokens, 8 experts, top-4.
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <vector>

#include "mxmoe/mxmoe.h"

namespace {

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr int64_t kTokens = 37, kHidden = 576, kInter = 320;
constexpr int32_t kExperts = 8, kTopK = 4;

bool Ok(mxmoe_status status, const char* what) {
  if (status == MXMOE_STATUS_OK) return true;
  fprintf(stderr, "%s failed: %s: %s\n", what, mxmoe_status_string(status), mxmoe_last_error());
  return false;
}

bool CudaOk(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return true;
  fprintf(stderr, "%s failed: %s\n", what, cudaGetErrorString(error));
  return false;
}

#define RETURN_IF_FALSE(x)  \
  do {                      \
    if (!(x)) return false; \
  } while (0)

uint16_t ToBf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // finite inputs only
}

float FromBf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

double RelativeL2(const std::vector<uint16_t>& got, const std::vector<uint16_t>& want) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(FromBf16(got[i])) - FromBf16(want[i]);
    err += d * d;
    ref += static_cast<double>(FromBf16(want[i])) * FromBf16(want[i]);
  }
  return sqrt(err / std::max(ref, 1e-300));
}

// Device memory freed on scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  bool Allocate(size_t n, const char* name) {
    bytes = n;
    return CudaOk(cudaMalloc(&ptr, std::max<size_t>(n, 1)), name);
  }
  template <typename T>
  bool Upload(const std::vector<T>& host, const char* name) {
    RETURN_IF_FALSE(Allocate(host.size() * sizeof(T), name));
    return CudaOk(cudaMemcpy(ptr, host.data(), bytes, cudaMemcpyHostToDevice), name);
  }
  uint8_t* bytes_ptr() const { return static_cast<uint8_t*>(ptr); }
};

// One expert weight tensor [E, n, k]: LINEAR MXFP4 on the host (for the CPU backend) and the
// device's PREPARED buffer.
struct Weights {
  int64_t n = 0, k = 0;
  std::vector<uint8_t> packed, scales;  // LINEAR, host
  DeviceBuffer prepared;
  mxmoe_expert_weights Linear() const {
    return {kExperts,     n, k, MXMOE_WEIGHT_FORMAT_LINEAR, MXMOE_BACKEND_AUTO, packed.data(),
            scales.data(), 0};
  }
  mxmoe_expert_weights Prepared(mxmoe_backend backend) const {
    // prepared_bytes: the buffer's length (the C API checks it against the size query).
    return {kExperts, n, k, MXMOE_WEIGHT_FORMAT_PREPARED, backend, prepared.bytes_ptr(), nullptr,
            prepared.bytes};
  }
};

// Load time: bf16 weights -> device -> MXFP4 on the device -> prepared for `backend`. Also
// quantizes on the CPU and requires identical bytes (the data contract is bit-exact).
bool LoadWeights(int64_t n, int64_t k, std::mt19937& rng, mxmoe_device gpu, mxmoe_backend backend,
                 cudaStream_t stream, Weights* w) {
  w->n = n;
  w->k = k;
  std::normal_distribution<float> normal(0.0f, 1.0f / sqrtf(static_cast<float>(k)));
  std::vector<uint16_t> bf16(kExperts * n * k);
  for (auto& v : bf16) v = ToBf16(normal(rng));

  DeviceBuffer d_bf16, d_packed, d_scales;
  RETURN_IF_FALSE(d_bf16.Upload(bf16, "cudaMemcpy(weights)"));
  RETURN_IF_FALSE(d_packed.Allocate(kExperts * n * k / 2, "cudaMalloc(packed)"));
  RETURN_IF_FALSE(d_scales.Allocate(kExperts * n * k / 32, "cudaMalloc(scales)"));
  mxmoe_quantize_weights_args q = {kExperts,
                                   n,
                                   k,
                                   d_bf16.ptr,
                                   MXMOE_DTYPE_BF16,
                                   d_packed.bytes_ptr(),
                                   d_scales.bytes_ptr(),
                                   MXMOE_SCALE_LAYOUT_LINEAR,
                                   gpu};
  RETURN_IF_FALSE(Ok(mxmoe_quantize_weights(&q, stream), "mxmoe_quantize_weights(cuda)"));

  mxmoe_prepare_weights_args p = {};
  p.weights = {kExperts,
               n,
               k,
               MXMOE_WEIGHT_FORMAT_LINEAR,
               MXMOE_BACKEND_AUTO,
               d_packed.bytes_ptr(),
               d_scales.bytes_ptr()};
  p.backend = backend;
  p.device = gpu;
  size_t prepared_bytes = 0;
  RETURN_IF_FALSE(Ok(mxmoe_prepare_weights_size(&p, &prepared_bytes), "prepare_weights_size"));
  RETURN_IF_FALSE(w->prepared.Allocate(prepared_bytes, "cudaMalloc(prepared)"));
  p.prepared = w->prepared.bytes_ptr();
  p.prepared_bytes = prepared_bytes;
  RETURN_IF_FALSE(Ok(mxmoe_prepare_weights(&p, stream), "mxmoe_prepare_weights"));

  w->packed.resize(d_packed.bytes);
  w->scales.resize(d_scales.bytes);
  RETURN_IF_FALSE(CudaOk(cudaStreamSynchronize(stream), "quantize + prepare weights"));
  RETURN_IF_FALSE(
      CudaOk(cudaMemcpy(w->packed.data(), d_packed.ptr, d_packed.bytes, cudaMemcpyDeviceToHost),
             "cudaMemcpy(packed)"));
  RETURN_IF_FALSE(
      CudaOk(cudaMemcpy(w->scales.data(), d_scales.ptr, d_scales.bytes, cudaMemcpyDeviceToHost),
             "cudaMemcpy(scales)"));

  std::vector<uint8_t> cpu_packed(w->packed.size()), cpu_scales(w->scales.size());
  mxmoe_quantize_weights_args c = {kExperts,
                                   n,
                                   k,
                                   bf16.data(),
                                   MXMOE_DTYPE_BF16,
                                   cpu_packed.data(),
                                   cpu_scales.data(),
                                   MXMOE_SCALE_LAYOUT_LINEAR,
                                   kCpu};
  RETURN_IF_FALSE(Ok(mxmoe_quantize_weights(&c, nullptr), "mxmoe_quantize_weights(cpu)"));
  if (cpu_packed != w->packed || cpu_scales != w->scales) {
    fprintf(stderr, "weights [%d, %lld, %lld]: device quantization differs from the CPU's\n",
            kExperts, (long long)n, (long long)k);
    return false;
  }
  return true;
}

// The CPU backend's forward of the same layer (LINEAR weights, host buffers).
bool CpuForward(const Weights& w13, const Weights& w2, const std::vector<uint16_t>& hidden,
                const std::vector<float>& logits, std::vector<uint16_t>* out) {
  mxmoe_moe_forward_args a = {};
  a.num_tokens = kTokens;
  a.hidden_size = kHidden;
  a.intermediate_size = kInter;
  a.num_global_experts = kExperts;
  a.num_local_experts = kExperts;
  a.top_k = kTopK;
  a.renormalize = 1;
  a.hidden_states = hidden.data();
  a.activation_dtype = MXMOE_DTYPE_BF16;
  a.router_logits = logits.data();
  a.router_logits_dtype = MXMOE_DTYPE_FP32;
  a.w13 = w13.Linear();
  a.w2 = w2.Linear();
  out->assign(kTokens * kHidden, 0);
  a.output = out->data();
  a.device = kCpu;
  size_t bytes = 0;
  RETURN_IF_FALSE(Ok(mxmoe_moe_forward_workspace_size(&a, &bytes), "cpu workspace size"));
  std::vector<uint8_t> workspace(bytes);
  return Ok(mxmoe_moe_forward(&a, workspace.data(), bytes, nullptr), "mxmoe_moe_forward(cpu)");
}

void RandomInputs(std::mt19937& rng, std::vector<uint16_t>* hidden, std::vector<float>* logits) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  hidden->resize(kTokens * kHidden);
  for (auto& v : *hidden) v = ToBf16(normal(rng));
  logits->resize(kTokens * kExperts);
  for (auto& v : *logits) v = 2.0f * normal(rng);
}

bool Run(int device) {
  const mxmoe_device gpu = {MXMOE_DEVICE_CUDA, device};
  mxmoe_backend backend;
  if (mxmoe_backend_for_device(gpu, &backend) != MXMOE_STATUS_OK) {
    printf("moe_cuda_example: skipped: no mxmoe backend serves CUDA device %d (%s)\n", device,
           mxmoe_last_error());
    return true;
  }
  cudaDeviceProp prop;
  RETURN_IF_FALSE(CudaOk(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  printf("mxmoe %s on %s (sm_%d%d), backend %s\n", mxmoe_version(), prop.name, prop.major,
         prop.minor, mxmoe_backend_name(backend));
  RETURN_IF_FALSE(CudaOk(cudaSetDevice(device), "cudaSetDevice"));
  cudaStream_t stream;
  RETURN_IF_FALSE(
      CudaOk(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { cudaStreamDestroy(s); }
  } stream_guard{stream};

  // 1. Load time.
  std::mt19937 rng(7);
  Weights w13, w2;
  RETURN_IF_FALSE(LoadWeights(2 * kInter, kHidden, rng, gpu, backend, stream, &w13));
  RETURN_IF_FALSE(LoadWeights(kHidden, kInter, rng, gpu, backend, stream, &w2));
  printf(
      "weights       w13 [%d, %lld, %lld], w2 [%d, %lld, %lld]: quantized on the device "
      "(bit-identical to the CPU's), prepared for %s (%zu + %zu bytes)\n",
      kExperts, (long long)(2 * kInter), (long long)kHidden, kExperts, (long long)kHidden,
      (long long)kInter, mxmoe_backend_name(backend), w13.prepared.bytes, w2.prepared.bytes);

  // 2. Buffers and the workspace, allocated once for the largest batch served.
  std::vector<uint16_t> hidden;
  std::vector<float> logits;
  RandomInputs(rng, &hidden, &logits);
  DeviceBuffer d_hidden, d_logits, d_out, workspace;
  RETURN_IF_FALSE(d_hidden.Upload(hidden, "cudaMemcpy(hidden)"));
  RETURN_IF_FALSE(d_logits.Upload(logits, "cudaMemcpy(logits)"));
  RETURN_IF_FALSE(d_out.Allocate(kTokens * kHidden * sizeof(uint16_t), "cudaMalloc(output)"));
  mxmoe_moe_forward_args args = {};
  args.num_tokens = kTokens;
  args.hidden_size = kHidden;
  args.intermediate_size = kInter;
  args.num_global_experts = kExperts;
  args.num_local_experts = kExperts;
  args.top_k = kTopK;
  args.renormalize = 1;
  args.hidden_states = d_hidden.ptr;
  args.activation_dtype = MXMOE_DTYPE_BF16;
  args.router_logits = d_logits.ptr;
  args.router_logits_dtype = MXMOE_DTYPE_FP32;
  args.w13 = w13.Prepared(backend);
  args.w2 = w2.Prepared(backend);
  args.output = d_out.ptr;
  args.device = gpu;
  size_t workspace_bytes = 0;
  RETURN_IF_FALSE(Ok(mxmoe_moe_forward_workspace_size(&args, &workspace_bytes), "workspace size"));
  RETURN_IF_FALSE(workspace.Allocate(workspace_bytes, "cudaMalloc(workspace)"));

  // 3a. One eager call on the stream.
  RETURN_IF_FALSE(Ok(mxmoe_moe_forward(&args, workspace.ptr, workspace_bytes, stream),
                     "mxmoe_moe_forward(cuda)"));
  std::vector<uint16_t> eager(kTokens * kHidden), replay(kTokens * kHidden), want;
  RETURN_IF_FALSE(
      CudaOk(cudaMemcpyAsync(eager.data(), d_out.ptr, d_out.bytes, cudaMemcpyDeviceToHost, stream),
             "copy output"));
  RETURN_IF_FALSE(CudaOk(cudaStreamSynchronize(stream), "eager forward"));
  RETURN_IF_FALSE(CpuForward(w13, w2, hidden, logits, &want));
  const double eager_err = RelativeL2(eager, want);
  printf("eager         T=%lld H=%lld I=%lld E=%d top-%d: rel L2 vs CPU backend %.2e\n",
         (long long)kTokens, (long long)kHidden, (long long)kInter, kExperts, kTopK, eager_err);
  if (!(eager_err <= 5e-3)) {
    fprintf(stderr, "eager forward differs from the CPU backend: %.3e > 5e-3\n", eager_err);
    return false;
  }

  // 3b. The same call captured once, replayed on the inputs the buffers hold at launch time.
  cudaGraph_t graph;
  RETURN_IF_FALSE(CudaOk(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                         "cudaStreamBeginCapture"));
  const mxmoe_status captured = mxmoe_moe_forward(&args, workspace.ptr, workspace_bytes, stream);
  RETURN_IF_FALSE(CudaOk(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture"));
  struct GraphGuard {
    cudaGraph_t g;
    ~GraphGuard() { cudaGraphDestroy(g); }
  } graph_guard{graph};
  RETURN_IF_FALSE(Ok(captured, "mxmoe_moe_forward(capture)"));
  cudaGraphExec_t exec;
  RETURN_IF_FALSE(CudaOk(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate"));
  struct ExecGuard {
    cudaGraphExec_t e;
    ~ExecGuard() { cudaGraphExecDestroy(e); }
  } exec_guard{exec};

  RETURN_IF_FALSE(CudaOk(cudaMemsetAsync(d_out.ptr, 0xFF, d_out.bytes, stream), "poison"));
  RETURN_IF_FALSE(CudaOk(cudaGraphLaunch(exec, stream), "cudaGraphLaunch"));
  RETURN_IF_FALSE(
      CudaOk(cudaMemcpyAsync(replay.data(), d_out.ptr, d_out.bytes, cudaMemcpyDeviceToHost, stream),
             "copy output"));
  RETURN_IF_FALSE(CudaOk(cudaStreamSynchronize(stream), "graph replay"));
  if (replay != eager) {
    fprintf(stderr, "graph replay on the same input differs from the eager call\n");
    return false;
  }
  constexpr int kReplays = 3;
  for (int i = 0; i < kReplays; ++i) {
    RandomInputs(rng, &hidden, &logits);
    RETURN_IF_FALSE(CudaOk(cudaMemcpyAsync(d_hidden.ptr, hidden.data(), d_hidden.bytes,
                                           cudaMemcpyHostToDevice, stream),
                           "new hidden"));
    RETURN_IF_FALSE(CudaOk(cudaMemcpyAsync(d_logits.ptr, logits.data(), d_logits.bytes,
                                           cudaMemcpyHostToDevice, stream),
                           "new logits"));
    RETURN_IF_FALSE(CudaOk(cudaGraphLaunch(exec, stream), "cudaGraphLaunch"));
    RETURN_IF_FALSE(CudaOk(
        cudaMemcpyAsync(replay.data(), d_out.ptr, d_out.bytes, cudaMemcpyDeviceToHost, stream),
        "copy output"));
    RETURN_IF_FALSE(CudaOk(cudaStreamSynchronize(stream), "graph replay"));
    RETURN_IF_FALSE(CpuForward(w13, w2, hidden, logits, &want));
    const double err = RelativeL2(replay, want);
    printf("graph replay  %d/%d on new inputs: rel L2 vs CPU backend %.2e\n", i + 1, kReplays, err);
    if (!(err <= 5e-3)) {
      fprintf(stderr, "graph replay %d differs from the CPU backend: %.3e > 5e-3\n", i + 1, err);
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0 ||
      mxmoe_cuda_device_count() == 0) {
    printf("moe_cuda_example: skipped: no CUDA device\n");
    return 0;
  }
  if (!Run(0)) return 1;
  printf("OK\n");
  return 0;
}
