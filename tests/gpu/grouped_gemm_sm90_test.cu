// GPU test and benchmark of the SM90 W4A4 grouped GEMM (mxmoe::cuda::PrepareWeightsSm90 +
// GroupedGemmSm90), a standalone program for an H100/H200 host (no Bazel there).
//
//   grouped_gemm_sm90_test [--bench] [--no-bench] [--bench-only] [--quick] [--block-n N]
//                          [--bench-filter model:gemm:T] [--routing PATH] [--json PATH]
//
// With no arguments (as tools/gpu/run.sh runs it): correctness only; MXMOE_GPU_TEST_QUICK=1
// (the sanitizer stages) also keeps to small problems. Any argument other than --bench-only or
// --no-bench keeps the old default of correctness + benchmark; --bench forces the benchmark.
//
// Correctness: random MXFP4 operands built on the host with format.h's rules, the kernel's
// output compared with a float64 matmul of the dequantized operands (relative L2 <= 2e-3 for
// bf16, 1e-3 for fp16) and with the CPU backend (cc/cpu/grouped_gemm.cc); outputs poisoned
// before every run (rows past expert_offsets[E] must stay poisoned, every other element must be
// written); every token tile the heuristic can pick; m = 0, 1, 7, 64, 65, 4096; one expert; 256
// experts; K = 2880 and K, N not multiples of 128; LINEAR, SWIZZLED_128X4 and PREPARED weights;
// adversarial scales (blocks of one 128-chunk up to 40 binades apart), checked against an
// emulation of the documented folding numerics and against the documented error bound; NaN
// scales. Exit code != 0 on any failure.
// Benchmark: GPT-OSS-120B, Qwen3-30B-A3B and DeepSeek-V3 GEMM shapes at T in {1 .. 16384}, each
// call captured in a CUDA graph, median of CUDA-event timings, rotating weight copies so that
// the active experts' bytes exceed L2; prints the MXFP4 weight-bytes floor (measured copy
// bandwidth) and the FP8 dense-peak floor (1979 TFLOP/s).
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cc/base/status.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cuda/grouped_gemm.h"
#include "cc/cuda/grouped_gemm_sm90_heuristics.h"
#include "cc/cuda/grouped_gemm_sm90_layout.h"
#include "mxmoe/format.h"

namespace {

// E2M1 values per docs/format.md (codes 0..7: 0 0.5 1 1.5 2 3 4 6), written out here so that
// the reference does not depend on the code under test's helpers.
double E2M1ToFloat(int code) {
  static const double kMag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (code & 8) ? -kMag[code & 7] : kMag[code & 7];
}

// format.h's E2M1 decode (used by the CPU backend) must agree with the contract before the CPU
// comparison means anything.
bool FormatHeaderE2m1Ok() {
  for (int c = 0; c < 16; ++c) {
    if (mxmoe::format::E2M1ToFloat(static_cast<uint8_t>(c)) != E2M1ToFloat(c)) return false;
    if (mxmoe::format::E2M1TwiceValue(static_cast<uint8_t>(c)) != 2 * E2M1ToFloat(c)) return false;
  }
  return true;
}
bool g_quick = false;
int g_only_block_n = 0;  // --block-n N: test only this token tile
const char* g_bench_filter = nullptr;
// --routing PATH: lines "model T m_0 ... m_{E-1}" (rows per expert), written by
// bench/bench_gemm.py so that mxmoe and the torch peers time the same routing.
const char* g_routing_path = nullptr;

bool LoadRouting(const char* model, int tokens, int experts, std::vector<int>* m) {
  if (g_routing_path == nullptr) return false;
  FILE* f = fopen(g_routing_path, "r");
  if (f == nullptr) return false;
  char name[128];
  int t = 0;
  bool found = false;
  while (fscanf(f, "%127s %d", name, &t) == 2) {
    std::vector<int> v(experts);
    for (int e = 0; e < experts; ++e)
      if (fscanf(f, "%d", &v[e]) != 1) v[e] = 0;
    if (!strcmp(name, model) && t == tokens) {
      *m = v;
      found = true;
      break;
    }
  }
  fclose(f);
  return found;
}  // --bench-filter model:gemm:T (e.g. deepseek-v3:w13:16384)

#define CHECK_CUDA(expr)                                                                \
  do {                                                                                  \
    cudaError_t e_ = (expr);                                                            \
    if (e_ != cudaSuccess) {                                                            \
      fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, \
              __LINE__, #expr);                                                         \
      exit(2);                                                                          \
    }                                                                                   \
  } while (0)

#define CHECK_OK(expr)                                                                   \
  do {                                                                                   \
    mxmoe_status s_ = (expr);                                                            \
    if (s_ != MXMOE_STATUS_OK) {                                                         \
      fprintf(stderr, "mxmoe status %d at %s:%d: %s: %s\n", s_, __FILE__, __LINE__, #expr, \
              mxmoe::LastError());                                                       \
      exit(2);                                                                           \
    }                                                                                    \
  } while (0)

int g_failures = 0;

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n = 0) { Resize(n); }
  void Resize(size_t n) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
    ptr = nullptr;
    count = n;
    if (n) CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void Upload(const std::vector<T>& v) {
    if (v.size() != count) Resize(v.size());  // keep the address: args structs hold it
    if (!v.empty()) {
      CHECK_CUDA(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
  }
  std::vector<T> Download() const {
    std::vector<T> v(count);
    if (count) CHECK_CUDA(cudaMemcpy(v.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// ---- problem generation ----------------------------------------------------------------------

enum class ScaleMode { kNormal, kAdversarial, kNaN };

struct Problem {
  std::string name;
  int64_t n, k;
  int num_experts;
  std::vector<int> m;  // per expert
  int64_t extra_rows = 5;  // rows past expert_offsets[E] (must stay untouched)
  int c_dtype = MXMOE_DTYPE_BF16;
  int weight_format = MXMOE_WEIGHT_FORMAT_PREPARED;
  ScaleMode scales = ScaleMode::kNormal;
  bool compare_cpu = true;
};

struct HostData {
  int64_t rows;
  std::vector<int32_t> expert_offsets, blockscale_offsets;
  std::vector<uint8_t> a, a_scales;        // [rows, k/2], swizzled per expert
  std::vector<uint8_t> b, b_scales_linear; // [E, n, k/2], [E, n, k/32]
  std::vector<uint8_t> b_scales_swizzled;  // [E, round_up(n,128), round_up(k/32,4)]
  std::vector<uint8_t> a_scales_linear;    // [rows, k/32] (for the reference)
};

uint8_t DrawScale(std::mt19937_64& rng, ScaleMode mode, int block) {
  switch (mode) {
    case ScaleMode::kNormal:
      return static_cast<uint8_t>(118 + rng() % 12);
    case ScaleMode::kAdversarial: {
      // Within a 128-chunk: one block near 127, the others anywhere from 40 binades below to 2
      // above; sometimes all tiny, sometimes 0 (the smallest scale).
      const int r = static_cast<int>(rng() % 10);
      if (r == 0) return 0;
      if (r == 1) return static_cast<uint8_t>(1 + rng() % 8);
      if (block % 4 == 0) return static_cast<uint8_t>(125 + rng() % 4);
      return static_cast<uint8_t>(87 + rng() % 43);
    }
    case ScaleMode::kNaN:
      return rng() % 97 == 0 ? 0xFF : static_cast<uint8_t>(118 + rng() % 12);
  }
  return 127;
}

HostData Generate(const Problem& p, uint64_t seed) {
  std::mt19937_64 rng(seed);
  HostData d;
  const int E = p.num_experts;
  const int64_t sc = p.k / 32;
  const int64_t sc_pad = mxmoe::format::RoundUp(sc, 4);
  d.expert_offsets.assign(E + 1, 0);
  d.blockscale_offsets.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) {
    d.expert_offsets[e + 1] = d.expert_offsets[e] + p.m[e];
    d.blockscale_offsets[e + 1] =
        d.blockscale_offsets[e] + static_cast<int32_t>(mxmoe::format::RoundUp(p.m[e], 128));
  }
  d.rows = d.expert_offsets[E] + p.extra_rows;
  d.a.resize(d.rows * p.k / 2);
  for (auto& x : d.a) x = static_cast<uint8_t>(rng());
  d.a_scales_linear.assign(d.rows * sc, 0);
  for (int64_t r = 0; r < d.rows; ++r)
    for (int64_t b = 0; b < sc; ++b) d.a_scales_linear[r * sc + b] = DrawScale(rng, p.scales, b);
  const int64_t scale_rows = std::max<int64_t>(d.blockscale_offsets[E], 1);
  d.a_scales.assign(scale_rows * sc_pad, 0);
  for (int e = 0; e < E; ++e)
    for (int i = 0; i < p.m[e]; ++i) {
      const int64_t row = d.expert_offsets[e] + i;
      const int64_t srow = d.blockscale_offsets[e] + i;
      for (int64_t b = 0; b < sc; ++b)
        d.a_scales[mxmoe::format::SwizzledOffset(srow, b, sc)] = d.a_scales_linear[row * sc + b];
    }
  d.b.resize(static_cast<size_t>(E) * p.n * p.k / 2);
  for (auto& x : d.b) x = static_cast<uint8_t>(rng());
  d.b_scales_linear.resize(static_cast<size_t>(E) * p.n * sc);
  for (int64_t i = 0; i < static_cast<int64_t>(d.b_scales_linear.size()); ++i)
    d.b_scales_linear[i] = DrawScale(rng, p.scales, static_cast<int>(i % sc));
  const int64_t per_expert = mxmoe::format::SwizzledBytes(p.n, sc);
  d.b_scales_swizzled.assign(E * per_expert, 0);
  for (int e = 0; e < E; ++e)
    for (int64_t r = 0; r < p.n; ++r)
      for (int64_t b = 0; b < sc; ++b)
        d.b_scales_swizzled[e * per_expert + mxmoe::format::SwizzledOffset(r, b, sc)] =
            d.b_scales_linear[(e * p.n + r) * sc + b];
  return d;
}

// ---- references ----------------------------------------------------------------------------

template <typename F>
void ParallelFor(int64_t n, F f) {
  const int threads = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int64_t i = t; i < n; i += threads) f(i);
    });
  for (auto& th : pool) th.join();
}

double DequantScale(uint8_t s) {
  return s == 0xFF ? NAN : std::ldexp(1.0, static_cast<int>(s) - 127);
}

// Exact: float64 matmul of the dequantized operands.
// Emulated: the documented folding (grouped_gemm_sm90_layout.h) in float64: each block's codes
// rounded through its E4M3 table, times the chunk factor.
std::vector<double> Reference(const Problem& p, const HostData& d, bool emulate) {
  const int E = p.num_experts;
  const int64_t sc = p.k / 32;
  const int64_t kp = mxmoe::cuda::sm90::NumChunks(p.k) * 128;
  // Decoded rows: value of element k of a row (exact or emulated), as double.
  auto decode_row = [&](const uint8_t* codes, const uint8_t* scales, std::vector<double>* out) {
    out->assign(kp, 0.0);
    for (int64_t c = 0; c < kp / 128; ++c) {
      int mx = 0;
      for (int b = 0; b < 4; ++b)
        if (c * 4 + b < sc) mx = std::max<int>(mx, scales[c * 4 + b]);
      for (int b = 0; b < 4; ++b) {
        const int64_t kb = c * 4 + b;
        if (kb >= sc) continue;
        const uint8_t s = scales[kb];
        uint32_t lo = 0, hi = 0;
        if (emulate) {
          mxmoe::cuda::sm90::E4m3Table(
              mxmoe::cuda::sm90::TableIndex(s, mx) - mxmoe::cuda::sm90::kTableOffset, &lo, &hi);
        }
        for (int i = 0; i < 32; ++i) {
          const int64_t kk = kb * 32 + i;
          const uint8_t code = (codes[kk / 2] >> (4 * (kk & 1))) & 0xF;
          double v;
          if (!emulate) {
            v = E2M1ToFloat(code) * DequantScale(s);
          } else {
            const uint32_t byte = (((code & 7) < 4 ? lo : hi) >> (8 * (code & 3))) & 0xFF;
            // E4M3 byte -> value (no NaN bytes in the tables).
            const int ex = byte >> 3, man = byte & 7;
            double mag = ex == 0 ? std::ldexp(man, -9) : std::ldexp(8 + man, ex - 10);
            v = (code & 8 ? -mag : mag) * (mx == 0xFF ? NAN : std::ldexp(1.0, mx - 6 - 127));
          }
          (*out)[kk] = v;
        }
      }
    }
  };
  const int64_t rows_valid = d.expert_offsets[E];
  std::vector<double> ref(rows_valid * p.n, 0.0);
  // Decode B once per expert row.
  std::vector<std::vector<double>> bdec(static_cast<size_t>(E) * p.n);
  std::vector<int> expert_of(rows_valid);
  for (int e = 0; e < E; ++e)
    for (int r = d.expert_offsets[e]; r < d.expert_offsets[e + 1]; ++r) expert_of[r] = e;
  ParallelFor(static_cast<int64_t>(E) * p.n, [&](int64_t i) {
    const int e = static_cast<int>(i / p.n);
    if (p.m[e] == 0) return;
    decode_row(&d.b[i * (p.k / 2)], &d.b_scales_linear[i * sc], &bdec[i]);
  });
  ParallelFor(rows_valid, [&](int64_t r) {
    std::vector<double> arow;
    decode_row(&d.a[r * (p.k / 2)], &d.a_scales_linear[r * sc], &arow);
    const int e = expert_of[r];
    for (int64_t n = 0; n < p.n; ++n) {
      const std::vector<double>& brow = bdec[static_cast<size_t>(e) * p.n + n];
      double acc = 0.0;
      if (!emulate) {
        for (int64_t kk = 0; kk < kp; ++kk) acc += arow[kk] * brow[kk];
      } else {
        // The kernel rounds nothing inside a chunk product (exact in its accumulator for these
        // magnitudes); emulate per-chunk sums anyway.
        for (int64_t c = 0; c < kp / 128; ++c) {
          double part = 0.0;
          for (int64_t kk = c * 128; kk < c * 128 + 128; ++kk) part += arow[kk] * brow[kk];
          acc += part;
        }
      }
      ref[r * p.n + n] = acc;
    }
  });
  return ref;
}

double OutputToDouble(uint16_t bits, int dtype) {
  return dtype == MXMOE_DTYPE_BF16 ? mxmoe::format::Bf16ToFloat(bits)
                                   : mxmoe::format::Fp16ToFloat(bits);
}

struct Compare {
  double rel_l2 = 0;
  int64_t nan_mismatch = 0;
  int64_t unwritten = 0;
  int64_t clobbered = 0;
};

constexpr uint16_t kPoison = 0x7FBF;  // a NaN pattern in bf16 and fp16 alike (fp16: 0x7FBF is NaN)

Compare CompareOutput(const Problem& p, const HostData& d, const std::vector<uint16_t>& c,
                      const std::vector<double>& ref) {
  Compare r;
  const int64_t rows_valid = d.expert_offsets[p.num_experts];
  double num = 0, den = 0;
  for (int64_t i = 0; i < rows_valid * p.n; ++i) {
    const bool ref_nan = std::isnan(ref[i]);
    if (c[i] == kPoison && !ref_nan) {
      ++r.unwritten;
      continue;
    }
    const double v = OutputToDouble(c[i], p.c_dtype);
    if (ref_nan || std::isnan(v)) {
      if (ref_nan != std::isnan(v)) ++r.nan_mismatch;
      continue;
    }
    num += (v - ref[i]) * (v - ref[i]);
    den += ref[i] * ref[i];
  }
  for (int64_t i = rows_valid * p.n; i < d.rows * p.n; ++i)
    if (c[i] != kPoison) ++r.clobbered;
  r.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return r;
}

double RelL2(const std::vector<double>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isnan(x[i]) || std::isnan(ref[i])) continue;
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// ---- running the GPU GEMM ------------------------------------------------------------------

struct DeviceProblem {
  DeviceBuffer<uint8_t> a, a_scales, b, b_scales, prepared;
  DeviceBuffer<int32_t> expert_offsets, blockscale_offsets;
  DeviceBuffer<uint16_t> c;
  DeviceBuffer<uint8_t> workspace;
  mxmoe_grouped_gemm_args args;
};

void Setup(const Problem& p, const HostData& d, DeviceProblem* dp) {
  dp->a.Upload(d.a);
  dp->a_scales.Upload(d.a_scales);
  dp->b.Upload(d.b);
  dp->expert_offsets.Upload(d.expert_offsets);
  dp->blockscale_offsets.Upload(d.blockscale_offsets);
  dp->c.Resize(d.rows * p.n);
  mxmoe_expert_weights w{};
  w.num_experts = p.num_experts;
  w.n = p.n;
  w.k = p.k;
  w.backend = MXMOE_BACKEND_SM90;
  if (p.weight_format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4) {
    dp->b_scales.Upload(d.b_scales_swizzled);
    w.format = MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4;
    w.packed = dp->b.ptr;
    w.scales = dp->b_scales.ptr;
  } else {
    dp->b_scales.Upload(d.b_scales_linear);
    w.format = MXMOE_WEIGHT_FORMAT_LINEAR;
    w.packed = dp->b.ptr;
    w.scales = dp->b_scales.ptr;
  }
  if (p.weight_format == MXMOE_WEIGHT_FORMAT_PREPARED) {
    mxmoe_prepare_weights_args pa{};
    pa.weights = w;
    pa.backend = MXMOE_BACKEND_SM90;
    size_t bytes = 0;
    CHECK_OK(mxmoe::cuda::PrepareWeightsSm90Size(pa, &bytes));
    dp->prepared.Resize(bytes);
    pa.prepared = dp->prepared.ptr;
    pa.prepared_bytes = bytes;
    CHECK_OK(mxmoe::cuda::PrepareWeightsSm90(pa, nullptr));
    w.format = MXMOE_WEIGHT_FORMAT_PREPARED;
    w.packed = dp->prepared.ptr;
    w.scales = nullptr;
    w.prepared_bytes = bytes;
  }
  mxmoe_grouped_gemm_args& args = dp->args;
  memset(&args, 0, sizeof(args));
  args.rows = d.rows;
  args.n = p.n;
  args.k = p.k;
  args.num_experts = p.num_experts;
  args.a = dp->a.ptr;
  args.a_scales = dp->a_scales.ptr;
  args.a_scale_rows = std::max<int64_t>(d.blockscale_offsets[p.num_experts], 1);
  args.b = w;
  args.expert_offsets = dp->expert_offsets.ptr;
  args.blockscale_offsets = dp->blockscale_offsets.ptr;
  args.problem_sizes = nullptr;
  args.c = dp->c.ptr;
  args.c_dtype = p.c_dtype;
  args.device = mxmoe_device{MXMOE_DEVICE_CUDA, 0};
  size_t ws = 0;
  CHECK_OK(mxmoe::cuda::GroupedGemmSm90WorkspaceSize(args, &ws));
  dp->workspace.Resize(ws);
}

std::vector<uint16_t> RunOnce(DeviceProblem* dp) {
  std::vector<uint16_t> poison(dp->c.count, kPoison);
  dp->c.Upload(poison);
  // Poison the workspace too: the kernel must not read anything it did not write.
  CHECK_CUDA(cudaMemset(dp->workspace.ptr, 0xFF, dp->workspace.count));
  CHECK_OK(mxmoe::cuda::GroupedGemmSm90(dp->args, dp->workspace.ptr, dp->workspace.count, nullptr));
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  return dp->c.Download();
}

std::string Describe(const Problem& p) {
  std::string s = p.name + " E=" + std::to_string(p.num_experts) + " n=" + std::to_string(p.n) +
                  " k=" + std::to_string(p.k) + " m=[";
  for (size_t i = 0; i < p.m.size() && i < 8; ++i) s += (i ? "," : "") + std::to_string(p.m[i]);
  if (p.m.size() > 8) s += ",...";
  s += "]";
  return s;
}

void RunCorrectness(const Problem& p, uint64_t seed) {
  const HostData d = Generate(p, seed);
  const std::vector<double> exact = Reference(p, d, false);
  const bool adversarial = p.scales == ScaleMode::kAdversarial;
  std::vector<double> emulated;
  if (adversarial) emulated = Reference(p, d, true);
  DeviceProblem dp;
  Setup(p, d, &dp);
  const double tol = p.c_dtype == MXMOE_DTYPE_BF16 ? 2e-3 : 1e-3;
  // Every token tile of the WGMMA kernel (MXMOE_SM90_GEMV=0), then the CUDA-core path
  // (block_n 0 here: MXMOE_SM90_GEMV=1, taken at any row count) on the same operands.
  const int block_ns[] = {16, 32, 64, 128, 0};
  bool first = true;
  for (int bn : block_ns) {
    if (g_only_block_n != 0 && bn != g_only_block_n) continue;
    if (bn != 0) setenv("MXMOE_SM90_BLOCK_N", std::to_string(bn).c_str(), 1);
    setenv("MXMOE_SM90_GEMV", bn == 0 ? "1" : "0", 1);
    const std::vector<uint16_t> c = RunOnce(&dp);
    const Compare cmp = CompareOutput(p, d, c, adversarial ? emulated : exact);
    bool ok = cmp.rel_l2 <= tol && cmp.nan_mismatch == 0 && cmp.unwritten == 0 &&
              cmp.clobbered == 0;
    printf("%s %s %s: rel_l2=%.3e (vs %s) nan_mismatch=%lld unwritten=%lld "
           "clobbered=%lld\n",
           ok ? "PASS" : "FAIL", Describe(p).c_str(),
           bn == 0 ? "gemv" : ("block_n=" + std::to_string(bn)).c_str(), cmp.rel_l2,
           adversarial ? "emulated folding" : "float64 dequantized", (long long)cmp.nan_mismatch,
           (long long)cmp.unwritten, (long long)cmp.clobbered);
    if (adversarial && first) {
      const Compare cx = CompareOutput(p, d, c, exact);
      const double fold_err = RelL2(emulated, exact);
      // Documented bound: per element, error <= 2^-10 * 2^(ref-127) per lossy block value; as a
      // relative L2 over outputs dominated by the chunks' top blocks this is far below 1e-4.
      const bool fold_ok = fold_err <= 1e-4;
      printf("%s %s folding error (emulated vs exact) rel_l2=%.3e (bound 1e-4); kernel vs exact "
             "rel_l2=%.3e\n",
             fold_ok ? "PASS" : "FAIL", Describe(p).c_str(), fold_err, cx.rel_l2);
      if (!fold_ok) ++g_failures;
    }
    if (!ok) ++g_failures;
    first = false;
  }
  unsetenv("MXMOE_SM90_BLOCK_N");
  unsetenv("MXMOE_SM90_GEMV");
  if (p.compare_cpu && !FormatHeaderE2m1Ok()) {
    printf("SKIP %s vs CPU backend: format.h E2M1ToFloat/E2M1TwiceValue disagree with the "
           "contract (code 7 must be 6)\n", Describe(p).c_str());
  } else if (p.compare_cpu) {
    // CPU backend on the same inputs (LINEAR weights, swizzled activation scales).
    std::vector<uint16_t> c_cpu(d.rows * p.n, kPoison);
    mxmoe_grouped_gemm_args cargs = dp.args;
    cargs.a = d.a.data();
    cargs.a_scales = d.a_scales.data();
    cargs.b.format = MXMOE_WEIGHT_FORMAT_LINEAR;
    cargs.b.backend = MXMOE_BACKEND_CPU;
    cargs.b.packed = d.b.data();
    cargs.b.scales = d.b_scales_linear.data();
    cargs.expert_offsets = d.expert_offsets.data();
    cargs.blockscale_offsets = d.blockscale_offsets.data();
    cargs.c = c_cpu.data();
    cargs.device = mxmoe_device{MXMOE_DEVICE_CPU, 0};
    CHECK_OK(mxmoe::cpu::GroupedGemm(cargs));
    const std::vector<uint16_t> c = RunOnce(&dp);
    const int64_t valid = d.expert_offsets[p.num_experts] * p.n;
    std::vector<double> x(valid), y(valid);
    int64_t nan_mismatch = 0;
    for (int64_t i = 0; i < valid; ++i) {
      x[i] = OutputToDouble(c[i], p.c_dtype);
      y[i] = OutputToDouble(c_cpu[i], p.c_dtype);
      if (std::isnan(x[i]) != std::isnan(y[i])) ++nan_mismatch;
    }
    const double e = RelL2(x, y);
    const bool ok = (adversarial ? e <= 3e-3 : e <= 2.5e-3) && nan_mismatch == 0;
    printf("%s %s vs CPU backend: rel_l2=%.3e nan_mismatch=%lld\n", ok ? "PASS" : "FAIL",
           Describe(p).c_str(), e, (long long)nan_mismatch);
    if (!ok) ++g_failures;
  }
}

// Host check of the prepared scale word (grouped_gemm_sm90_layout.h) and the chunk factor: the
// table offsets and the chunk max decoded from the word agree with the raw scales' for random and
// edge-case scales (0, 0xFF, equal), and ChunkFactor(mx) == 2^(mx - 133) (NaN for 0xFF).
void CheckPreparedScaleWord() {
  namespace sm90 = mxmoe::cuda::sm90;
  std::mt19937_64 rng(99);
  int64_t bad = 0;
  for (int i = 0; i < 200000; ++i) {
    uint8_t sb[4];
    for (int b = 0; b < 4; ++b) {
      const int r = static_cast<int>(rng() % 8);
      sb[b] = r == 0 ? 0 : r == 1 ? 0xFF : r == 2 ? sb[0] : static_cast<uint8_t>(rng());
    }
    const uint32_t w = sm90::PreparedScaleWord(sb);
    const int mx = std::max(std::max(sb[0], sb[1]), std::max(sb[2], sb[3]));
    if (sm90::PreparedMaxScale(w) != mx) ++bad;
    for (int b = 0; b < 4; ++b)
      if (sm90::PreparedTableOffset(w, b) != static_cast<uint32_t>(sm90::TableIndex(sb[b], mx) * 8))
        ++bad;
  }
  for (int mx = 0; mx < 256; ++mx) {
    const float f = sm90::ChunkFactor(mx);
    if (mx == 0xFF ? !std::isnan(f) : static_cast<double>(f) != std::ldexp(1.0, mx - 133)) ++bad;
  }
  printf("%s prepared scale word and chunk factor (host): %lld mismatches\n", bad ? "FAIL" : "PASS",
         (long long)bad);
  if (bad) ++g_failures;
}

void RunCorrectnessSuite() {
  CheckPreparedScaleWord();
  std::vector<Problem> problems;
  {
    Problem p;
    p.name = "awkward-m";
    p.n = 2880;
    p.k = 2880;
    p.num_experts = 6;
    p.m = {64, 0, 1, 4096, 7, 65};
    p.compare_cpu = true;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "one-expert-fp16-linear";
    p.n = 768;
    p.k = 2048;
    p.num_experts = 1;
    p.m = {300};
    p.c_dtype = MXMOE_DTYPE_FP16;
    p.weight_format = MXMOE_WEIGHT_FORMAT_LINEAR;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "256-experts-swizzled-k160-n96";
    p.n = 96;
    p.k = 160;
    p.num_experts = 256;
    std::mt19937 rng(7);
    for (int e = 0; e < 256; ++e) p.m.push_back(rng() % 4 == 0 ? 0 : static_cast<int>(rng() % 40));
    p.weight_format = MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "shapes-5760x2880";
    p.n = 5760;
    p.k = 2880;
    p.num_experts = 3;
    p.m = {129, 33, 250};
    p.compare_cpu = false;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "shapes-7168x2048";
    p.n = 7168;
    p.k = 2048;
    p.num_experts = 2;
    p.m = {17, 200};
    p.compare_cpu = false;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "adversarial-scales";
    p.n = 224;
    p.k = 672;
    p.num_experts = 3;
    p.m = {33, 0, 190};
    p.scales = ScaleMode::kAdversarial;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "nan-scales";
    p.n = 160;
    p.k = 416;
    p.num_experts = 2;
    p.m = {20, 70};
    p.scales = ScaleMode::kNaN;
    problems.push_back(p);
  }
  {
    Problem p;
    p.name = "all-empty";
    p.n = 64;
    p.k = 64;
    p.num_experts = 4;
    p.m = {0, 0, 0, 0};
    p.extra_rows = 9;
    problems.push_back(p);
  }
  uint64_t seed = 1234;
  for (const Problem& p : problems) {
    // --quick (for compute-sanitizer): only the small problems.
    if (g_quick && (p.n * p.k > 1000000)) continue;
    RunCorrectness(p, seed++);
  }
}

// ---- benchmark -----------------------------------------------------------------------------

__global__ void FillRandom(uint8_t* p, size_t n, uint64_t seed, int scale_mode) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    p[i] = scale_mode ? static_cast<uint8_t>(118 + (x % 10)) : static_cast<uint8_t>(x);
  }
}

void Fill(uint8_t* p, size_t n, uint64_t seed, int scale_mode) {
  FillRandom<<<1024, 256>>>(p, n, seed, scale_mode);
  CHECK_CUDA(cudaGetLastError());
}

struct Shape {
  const char* model;
  int64_t hidden, inter;
  int experts, top_k;
};

double MedianMs(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double CopyBandwidthGBps() {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer<uint8_t> src(bytes), dst(bytes);
  CHECK_CUDA(cudaMemset(src.ptr, 1, bytes));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> t;
  for (int i = 0; i < 8; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 2) t.push_back(ms);
  }
  return 2.0 * bytes / (MedianMs(t) * 1e-3) / 1e9;
}

void RunBenchmark(const char* json_path) {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbps = CopyBandwidthGBps();
  printf("\nGPU: %s, SMs=%d, L2=%d MB, measured D2D copy %.0f GB/s (read+write)\n", prop.name,
         prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbps);
  FILE* json = json_path ? fopen(json_path, "w") : nullptr;
  if (json) {
    fprintf(json, "{\"gpu\": \"%s\", \"copy_GBps\": %.1f, \"rows\": [\n", prop.name,
            copy_gbps);
  }
  bool first_row = true;
  const Shape shapes[] = {{"gpt-oss-120b", 2880, 2880, 128, 4},
                          {"qwen3-30b-a3b", 2048, 768, 128, 8},
                          {"deepseek-v3", 7168, 2048, 256, 8}};
  const int tokens[] = {1, 16, 64, 256, 1024, 4096, 16384};
  printf("%-14s %-5s %6s %7s %5s %10s %10s %10s %8s %8s %7s\n", "model", "gemm", "T", "rows",
         "bn", "mxmoe_ms", "bytes_ms", "fp8_ms", "x_bytes", "x_fp8", "TFLOPs");
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  for (const Shape& s : shapes) {
    for (int gemm = 0; gemm < 2; ++gemm) {
      const std::string prefix = std::string(s.model) + (gemm == 0 ? ":w13:" : ":w2:");
      if (g_bench_filter != nullptr && std::string(g_bench_filter).rfind(prefix, 0) != 0) {
        continue;
      }
      const int64_t n = gemm == 0 ? 2 * s.inter : s.hidden;
      const int64_t k = gemm == 0 ? s.hidden : s.inter;
      const int E = s.experts;
      // Weights: one random LINEAR set, prepared once, copied to rotating slots.
      const size_t prepared_bytes = mxmoe::cuda::sm90::PreparedBytes(E, n, k);
      {
        DeviceBuffer<uint8_t> b(static_cast<size_t>(E) * n * k / 2);
        DeviceBuffer<uint8_t> bs(static_cast<size_t>(E) * n * k / 32);
        Fill(b.ptr, b.count, 11, 0);
        Fill(bs.ptr, bs.count, 12, 1);
        (void)bs;
        DeviceBuffer<uint8_t> prepared(prepared_bytes);
        mxmoe_prepare_weights_args pa{};
        pa.weights = mxmoe_expert_weights{E, n, k, MXMOE_WEIGHT_FORMAT_LINEAR, MXMOE_BACKEND_SM90,
                                          b.ptr, bs.ptr};
        pa.backend = MXMOE_BACKEND_SM90;
        pa.prepared = prepared.ptr;
        pa.prepared_bytes = prepared_bytes;
        CHECK_OK(mxmoe::cuda::PrepareWeightsSm90(pa, nullptr));
        CHECK_CUDA(cudaDeviceSynchronize());
        for (int T : tokens) {
          if (g_bench_filter != nullptr) {
            const std::string key = std::string(s.model) + (gemm == 0 ? ":w13:" : ":w2:") +
                                    std::to_string(T);
            if (key != g_bench_filter) continue;
          }
          // Random routing: each token picks top_k distinct experts.
          std::mt19937_64 rng(1000 + T);
          std::vector<int> m(E, 0);
          std::vector<int> perm(E);
          for (int t = 0; t < T; ++t) {
            for (int e = 0; e < E; ++e) perm[e] = e;
            for (int j = 0; j < s.top_k; ++j) {
              const int pick = j + static_cast<int>(rng() % (E - j));
              std::swap(perm[j], perm[pick]);
              ++m[perm[j]];
            }
          }
          // The routing file's rows per expert, when given, replace the uniform draw above
          // (so that mxmoe and the torch peers time the same problem).
          LoadRouting(s.model, T, E, &m);
          std::vector<int32_t> eo(E + 1, 0), bso(E + 1, 0);
          int active = 0;
          for (int e = 0; e < E; ++e) {
            eo[e + 1] = eo[e] + m[e];
            bso[e + 1] = bso[e] + static_cast<int32_t>(mxmoe::format::RoundUp(m[e], 128));
            active += m[e] > 0;
          }
          const int64_t rows = eo[E];
          const double active_bytes = static_cast<double>(active) * n * (k / 2 + k / 32);
          // Rotating weight copies so that the active bytes over all copies exceed ~3x L2.
          const double l2 = prop.l2CacheSize;
          int copies = static_cast<int>(std::ceil(3.0 * l2 / active_bytes));
          const int most = static_cast<int>((16.0 * (1 << 30)) / prepared_bytes);
          copies = std::max(1, std::min(copies, most));
          copies = std::min(copies, 16);
          DeviceBuffer<uint8_t> rot(prepared_bytes * copies);
          for (int c = 0; c < copies; ++c)
            CHECK_CUDA(cudaMemcpy(rot.ptr + c * prepared_bytes, prepared.ptr, prepared_bytes,
                                  cudaMemcpyDeviceToDevice));
          DeviceBuffer<uint8_t> a(rows * k / 2);
          DeviceBuffer<uint8_t> as(std::max<int64_t>(bso[E], 1) *
                                   mxmoe::format::RoundUp(k / 32, 4));
          Fill(a.ptr, a.count, 13 + T, 0);
          Fill(as.ptr, as.count, 14 + T, 1);
          DeviceBuffer<int32_t> deo, dbso;
          deo.Upload(eo);
          dbso.Upload(bso);
          DeviceBuffer<uint16_t> c(rows * n);
          mxmoe_grouped_gemm_args args{};
          args.rows = rows;
          args.n = n;
          args.k = k;
          args.num_experts = E;
          args.a = a.ptr;
          args.a_scales = as.ptr;
          args.a_scale_rows = std::max<int64_t>(bso[E], 1);
          args.b = mxmoe_expert_weights{E, n, k, MXMOE_WEIGHT_FORMAT_PREPARED, MXMOE_BACKEND_SM90,
                                        rot.ptr, nullptr, prepared_bytes};
          args.expert_offsets = deo.ptr;
          args.blockscale_offsets = dbso.ptr;
          args.c = c.ptr;
          args.c_dtype = MXMOE_DTYPE_BF16;
          args.device = mxmoe_device{MXMOE_DEVICE_CUDA, 0};
          size_t ws_bytes = 0;
          CHECK_OK(mxmoe::cuda::GroupedGemmSm90WorkspaceSize(args, &ws_bytes));
          DeviceBuffer<uint8_t> ws(ws_bytes);
          // One graph per weight copy (the call is graph-capturable: no sync, no allocation).
          std::vector<cudaGraphExec_t> graphs(copies);
          for (int cp = 0; cp < copies; ++cp) {
            args.b.packed = rot.ptr + cp * prepared_bytes;
            cudaGraph_t graph;
            CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            CHECK_OK(mxmoe::cuda::GroupedGemmSm90(args, ws.ptr, ws_bytes, stream));
            CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
            CHECK_CUDA(cudaGraphInstantiate(&graphs[cp], graph, 0));
            CHECK_CUDA(cudaGraphDestroy(graph));
          }
          for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaGraphLaunch(graphs[i % copies], stream));
          CHECK_CUDA(cudaStreamSynchronize(stream));
          const double flops = 2.0 * rows * n * k;
          const int iters = flops > 2e12 ? 10 : 30;
          std::vector<float> times;
          for (int i = 0; i < iters; ++i) {
            CHECK_CUDA(cudaEventRecord(e0, stream));
            CHECK_CUDA(cudaGraphLaunch(graphs[i % copies], stream));
            CHECK_CUDA(cudaEventRecord(e1, stream));
            CHECK_CUDA(cudaEventSynchronize(e1));
            float ms;
            CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
            times.push_back(ms);
          }
          for (auto& g : graphs) CHECK_CUDA(cudaGraphExecDestroy(g));
          const double ms = MedianMs(times);
          // copy_gbps counts bytes read + written: the rate at which bytes move through DRAM.
          const double floor_bytes_ms = active_bytes / (copy_gbps * 1e9) * 1e3;
          const double floor_fp8_ms = flops / 1979e12 * 1e3;
          // The tile the run used (0: the CUDA-core path), overrides included.
          const mxmoe::cuda::sm90::GemmConfig cfg =
              mxmoe::cuda::sm90::ChooseGemmConfigWithOverride(
                  {rows, n, k, E, prop.multiProcessorCount});
          const int bn = cfg.gemv ? 0 : cfg.block_n;
          printf("%-14s %-5s %6d %7lld %5d %10.4f %10.4f %10.4f %8.2f %8.2f %7.1f\n", s.model,
                 gemm == 0 ? "w13" : "w2", T, (long long)rows, bn, ms, floor_bytes_ms,
                 floor_fp8_ms, ms / floor_bytes_ms, ms / floor_fp8_ms, flops / (ms * 1e-3) / 1e12);
          fflush(stdout);
          if (json) {
            fprintf(json,
                    "%s{\"shape\": \"%s-%s\", \"tokens\": %d, \"rows\": %lld, \"n\": %lld,"
                    " \"k\": %lld,"
                    " \"experts\": %d, \"active_experts\": %d, \"path\": \"%s\","
                    " \"mxmoe_ms\": %.5f, \"floor_bytes_ms\": %.5f, \"floor_fp8_ms\": %.5f}",
                    first_row ? "" : ",\n", s.model, gemm == 0 ? "w13" : "w2", T, (long long)rows,
                    (long long)n, (long long)k, E, active,
                    cfg.gemv ? "gemv" : ("wgmma-n" + std::to_string(cfg.block_n)).c_str(), ms,
                    floor_bytes_ms, floor_fp8_ms);
            first_row = false;
          }
        }
      }
    }
  }
  if (json) {
    fprintf(json, "\n]}\n");
    fclose(json);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool bench = true, correctness = true;
  const char* json = nullptr;
  // tools/gpu/run.sh runs every test program with no arguments; under compute-sanitizer it sets
  // MXMOE_GPU_TEST_QUICK=1: small problems only, no timing. The plain cctest stage checks every
  // problem and skips the timing too (bench/bench_gemm.py is the benchmark).
  const char* quick_env = getenv("MXMOE_GPU_TEST_QUICK");
  if (quick_env != nullptr && strcmp(quick_env, "") != 0 && strcmp(quick_env, "0") != 0) {
    g_quick = true;
  }
  if (argc == 1) bench = false;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--bench")) bench = true;
    if (!strcmp(argv[i], "--no-bench")) bench = false;
    if (!strcmp(argv[i], "--bench-only")) correctness = false;
    if (!strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    if (!strcmp(argv[i], "--quick")) g_quick = true;
    if (!strcmp(argv[i], "--block-n") && i + 1 < argc) g_only_block_n = atoi(argv[++i]);
    if (!strcmp(argv[i], "--bench-filter") && i + 1 < argc) g_bench_filter = argv[++i];
    if (!strcmp(argv[i], "--routing") && i + 1 < argc) g_routing_path = argv[++i];
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    printf("SKIP: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (prop.major != 9) {
    printf("SKIP: needs an SM90 GPU, found %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    return 0;
  }
  if (correctness) RunCorrectnessSuite();
  if (correctness) printf("correctness: %d failure(s)\n", g_failures);
  if (bench) RunBenchmark(json);
  return g_failures == 0 ? 0 : 1;
}
