// The CPU backend's performance machinery against its own portable reference: the activations
// compiled with and without FMA instructions give the same bits; every panel kernel
// (portable loop, SSE2, AVX2 and AVX-512 VNNI where the CPU has them) on random decoded operands
// gives the portable loop's bits; whole grouped GEMMs give identical bits for every kernel and
// every weight format (LINEAR, SWIZZLED_128X4, PREPARED) at awkward shapes (K = 2880, n not a
// multiple of 8, an empty expert, one row, 130 rows, NaN scales), also from 4 threads calling at
// once; MXMOE_CPU_THREADS is honoured; ParallelFor covers every index once, survives nesting and
// passes exceptions on; and a GEMM that fails (injected out-of-memory in the scratch allocation
// or in a decoding worker) returns INTERNAL with c untouched. (grouped_gemm_test.cc checks the
// GEMM against an independent float64 loop.)
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cc/cpu/activation_simd.h"
#include "cc/cpu/cpu_backend.h"
#include "cc/cpu/element_io.h"
#include "cc/cpu/panel.h"
#include "cc/cpu/parallel.h"
#include "mxmoe/format.h"
#include "mxmoe/moe_numerics.h"
#include "mxmoe/mxmoe.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe::cpu::KernelIsa;
using mxmoe_test::failures;

constexpr mxmoe_device kCpu = {MXMOE_DEVICE_CPU, 0};
constexpr int kThreadsSetting = 3;

std::vector<KernelIsa> RunnableIsas() {
  std::vector<KernelIsa> isas;
  for (KernelIsa isa :
       {KernelIsa::kScalar, KernelIsa::kSse2, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
    if (mxmoe::cpu::PanelKernelFor(isa) != nullptr) isas.push_back(isa);
  }
  return isas;
}

// A scale byte: mostly ordinary, sometimes the extremes (0, 254) or NaN (255).
uint8_t RandomScale(std::mt19937& rng) {
  const uint32_t pick = rng() % 64;
  if (pick == 0) return 0xFF;
  if (pick == 1) return 0;
  if (pick == 2) return 254;
  return static_cast<uint8_t>(100 + rng() % 50);
}

// format.h's fp32 activations compiled plainly (fmaf, rintf: libm calls) and with
// MXMOE_CPU_FMA_TARGET (single FMA / ROUNDSS instructions), as the CPU backend's activation rows
// are (panel.h, ActivationUsesFma): the same bits on every 251st fp32 bit pattern (~17 M inputs:
// every exponent, both signs, NaN, infinities, subnormals).
float SiluPlain(float g) { return mxmoe::format::SiluF32(g); }
float SwigluPlain(float g, float u) { return mxmoe::format::SwigluOaiF32(g, u, 1.702f, 7.0f); }
float ExpPlain(float x) { return mxmoe::format::ExpF32(x); }
MXMOE_CPU_FMA_TARGET float SiluFma(float g) { return mxmoe::format::SiluF32(g); }
MXMOE_CPU_FMA_TARGET float SwigluFma(float g, float u) {
  return mxmoe::format::SwigluOaiF32(g, u, 1.702f, 7.0f);
}
MXMOE_CPU_FMA_TARGET float ExpFma(float x) { return mxmoe::format::ExpF32(x); }
#if defined(__x86_64__)
MXMOE_CPU_FMA_TARGET void SiluX8Into(const float* in, float* out) {
  _mm256_storeu_ps(out, mxmoe::cpu::SiluF32X8(_mm256_loadu_ps(in)));
}
#endif

bool IsNanBf16(uint16_t h) { return (h & 0x7FFF) > 0x7F80; }

uint32_t Bits(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
}

void TestActivationClonesAgree() {
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    printf("activation clones: no AVX2+FMA on this CPU; skipped\n");
    return;
  }
  int64_t checked = 0;
  int bad = 0;
  for (uint64_t b = 0; b <= 0xFFFFFFFFull; b += 251) {
    float x;
    const uint32_t bits = static_cast<uint32_t>(b);
    memcpy(&x, &bits, 4);
    const float u = static_cast<float>(static_cast<int32_t>(bits % 29) - 14) * 0.75f;
    if (Bits(SiluPlain(x)) != Bits(SiluFma(x)) || Bits(ExpPlain(x)) != Bits(ExpFma(x)) ||
        Bits(SwigluPlain(x, u)) != Bits(SwigluFma(x, u))) {
      if (++bad <= 3) fprintf(stderr, "activation clones differ at 0x%08x\n", bits);
    }
    ++checked;
  }
  EXPECT(bad == 0, "%d of %lld inputs: the FMA-target activations differ from the plain ones",
         bad, static_cast<long long>(checked));
  // The eight-lane SiLU (activation_simd.h) on the same inputs, eight at a time.
  int bad_x8 = 0;
  float lanes[8], got[8];
  for (uint64_t b = 0; b <= 0xFFFFFFFFull; b += 8 * 251) {
    for (int l = 0; l < 8; ++l) {
      const uint32_t bits = static_cast<uint32_t>(b + 251u * l);
      memcpy(&lanes[l], &bits, 4);
    }
    SiluX8Into(lanes, got);
    for (int l = 0; l < 8; ++l) {
      if (Bits(got[l]) != Bits(SiluPlain(lanes[l])) && ++bad_x8 <= 3) {
        fprintf(stderr, "SiluF32X8 differs at 0x%08x\n", Bits(lanes[l]));
      }
    }
  }
  EXPECT(bad_x8 == 0, "%d inputs: SiluF32X8 differs from SiluF32", bad_x8);
  // The bf16 rows (both output forms) on every bf16 gate value, with random and special ups, at
  // a length with an eight-lane part and a tail.
  std::mt19937 rng(7);
  const int64_t n = 65536 + 5;
  std::vector<uint16_t> gate(n), up(n), out16(n);
  std::vector<float> out(n);
  const uint16_t specials[] = {0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x7F7F};
  for (int64_t j = 0; j < n; ++j) {
    gate[j] = static_cast<uint16_t>(j);
    up[j] = rng() % 16 == 0 ? specials[rng() % 8] : static_cast<uint16_t>(rng());
  }
  mxmoe::cpu::SiluMulBf16Row(gate.data(), up.data(), n, out.data());
  mxmoe::cpu::SiluMulBf16RowToBf16(gate.data(), up.data(), n, out16.data());
  int bad_rows = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t want = mxmoe::format::FloatToBf16(
        SiluPlain(mxmoe::format::Bf16ToFloat(gate[j])) * mxmoe::format::Bf16ToFloat(up[j]));
    // NaN * NaN: IEEE leaves the payload open and the compiler may order the operands either
    // way, so two NaN inputs only need a NaN result.
    const bool both_nan = IsNanBf16(gate[j]) && IsNanBf16(up[j]);
    const bool same = both_nan ? IsNanBf16(out16[j]) && isnan(out[j])
                               : out16[j] == want &&
                                     Bits(out[j]) == (static_cast<uint32_t>(want) << 16);
    if (!same && ++bad_rows <= 3) {
      fprintf(stderr, "bf16 SiLU row differs at gate 0x%04x up 0x%04x\n", gate[j], up[j]);
    }
  }
  EXPECT(bad_rows == 0, "%d elements: the bf16 SiLU-and-mul rows differ from SiluF32", bad_rows);
#endif
}

// The vector bf16 epilogue of `isa` (AVX2, AVX-512) against StoreFromDouble on random doubles
// around every float exponent, exact floats, bf16 halfway cases, the float range's edges, NaN
// and infinities.
void TestBf16EpilogueAgrees(KernelIsa isa, std::mt19937& rng) {
  const mxmoe::cpu::StoreBf16PanelRowFn vector =
      mxmoe::cpu::internal::StoreBf16PanelRowForTesting(isa);
  if (vector == nullptr) {
    printf("bf16 epilogue: no %s form on this CPU; skipped\n", mxmoe::cpu::KernelIsaName(isa));
    return;
  }
  const double specials[] = {0.0,     -0.0,    1.0,      -1.5,    3.4028234663852886e38,
                             1e39,    -1e300,  1.4e-45,  1e-46,   -7e-46,
                             1.1754943508222875e-38, 1.0 + 1.0 / 256, 1.0 + 3.0 / 512,
                             NAN,     -NAN,    INFINITY, -INFINITY};
  std::uniform_real_distribution<double> mantissa(1.0, 2.0);
  int bad = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    double acc[8];
    for (double& v : acc) {
      const uint32_t pick = rng() % 8;
      if (pick == 0) {
        v = specials[rng() % (sizeof(specials) / sizeof(specials[0]))];
      } else if (pick == 1) {  // an exact float
        v = static_cast<float>(ldexp(mantissa(rng), static_cast<int>(rng() % 280) - 150));
      } else {
        v = ldexp(mantissa(rng), static_cast<int>(rng() % 300) - 160) * (rng() % 2 ? 1 : -1);
      }
    }
    uint16_t got[8], want[8];
    vector(acc, got);
    for (int c = 0; c < 8; ++c) mxmoe::cpu::StoreFromDouble(want, MXMOE_DTYPE_BF16, c, acc[c]);
    for (int c = 0; c < 8; ++c) {
      if (got[c] != want[c] && ++bad <= 3) {
        fprintf(stderr, "bf16 epilogue: %.17g -> 0x%04x, StoreFromDouble 0x%04x\n", acc[c],
                got[c], want[c]);
      }
    }
  }
  EXPECT(bad == 0, "%d values: the %s bf16 epilogue differs from StoreFromDouble", bad,
         mxmoe::cpu::KernelIsaName(isa));
  printf("bf16 epilogue (%s): checked\n", mxmoe::cpu::KernelIsaName(isa));
}

void TestKernelsAgree(std::mt19937& rng) {
  const std::vector<KernelIsa> isas = RunnableIsas();
  printf("panel kernels runnable here:");
  for (KernelIsa isa : isas) printf(" %s", mxmoe::cpu::KernelIsaName(isa));
  printf(" (selected: %s)\n", mxmoe::cpu::KernelIsaName(mxmoe::cpu::SelectedKernelIsa()));
#if defined(__x86_64__)
  EXPECT(isas.size() >= 2, "SSE2 must be runnable on x86-64");
#endif
  int pair_checks = 0;
  for (int64_t blocks : {1, 2, 64, 90}) {
    const int64_t k = blocks * 32;
    // Two adjacent panels (as an expert's panels lie in memory), for the pair kernels too.
    const int64_t panel_bytes = mxmoe::cpu::PanelBytes(blocks);
    std::vector<uint8_t> panels(2 * panel_bytes);
    for (int half = 0; half < 2; ++half) {
      std::vector<uint8_t> packed_b(mxmoe::cpu::kPanelCols * k / 2);
      for (auto& v : packed_b) v = static_cast<uint8_t>(rng());
      std::vector<uint8_t> b_scales(mxmoe::cpu::kPanelCols * blocks);
      for (auto& s : b_scales) s = RandomScale(rng);
      for (int c = 0; c < mxmoe::cpu::kPanelCols; ++c) {
        mxmoe::cpu::DecodePanelColumn(
            packed_b.data() + c * k / 2, blocks,
            [&](int64_t b) { return b_scales[c * blocks + b]; }, c,
            panels.data() + half * panel_bytes);
      }
    }
    const std::vector<uint8_t> panel(panels.begin(), panels.begin() + panel_bytes);
    const int rows = mxmoe::cpu::kMaxPanelRows;
    std::vector<uint8_t> packed_a(rows * k / 2);
    for (auto& v : packed_a) v = static_cast<uint8_t>(rng());
    std::vector<int8_t> codes(rows * k);
    std::vector<double> factors(rows * blocks);
    std::vector<int32_t> corrections(rows * blocks);
    for (int r = 0; r < rows; ++r) {
      std::vector<uint8_t> a_scales(blocks);
      for (auto& s : a_scales) s = RandomScale(rng);
      mxmoe::cpu::DecodeARow(packed_a.data() + r * k / 2, blocks,
                             [&](int64_t b) { return a_scales[b]; }, codes.data() + r * k,
                             factors.data() + r * blocks, corrections.data() + r * blocks);
    }
    for (int num_rows = 1; num_rows <= rows; ++num_rows) {
      double expected[32];
      mxmoe::cpu::PanelKernelFor(KernelIsa::kScalar)(panel.data(), blocks, codes.data(),
                                                     factors.data(), corrections.data(),
                                                     num_rows, expected);
      for (KernelIsa isa : isas) {
        double got[32];
        memset(got, 0x5A, sizeof(got));
        mxmoe::cpu::PanelKernelFor(isa)(panel.data(), blocks, codes.data(), factors.data(),
                                        corrections.data(), num_rows, got);
        EXPECT(memcmp(got, expected, sizeof(double) * num_rows * 8) == 0,
               "%s kernel differs from the portable loop (blocks %lld, rows %d)",
               mxmoe::cpu::KernelIsaName(isa), static_cast<long long>(blocks), num_rows);
      }
      // Pair kernels: [rows][16], each half the portable loop's bits for its panel.
      double expected2[32];
      mxmoe::cpu::PanelKernelFor(KernelIsa::kScalar)(panels.data() + panel_bytes, blocks,
                                                     codes.data(), factors.data(),
                                                     corrections.data(), num_rows, expected2);
      for (KernelIsa isa : isas) {
        const mxmoe::cpu::PanelPairKernel pair = mxmoe::cpu::PanelPairKernelFor(isa);
        if (pair == nullptr) continue;
        ++pair_checks;
        double got[64];
        memset(got, 0x5A, sizeof(got));
        pair(panels.data(), panels.data() + panel_bytes, blocks, codes.data(), factors.data(),
             corrections.data(), num_rows, got);
        for (int r = 0; r < num_rows; ++r) {
          EXPECT(memcmp(got + r * 16, expected + r * 8, sizeof(double) * 8) == 0 &&
                     memcmp(got + r * 16 + 8, expected2 + r * 8, sizeof(double) * 8) == 0,
                 "%s pair kernel differs from the portable loop (blocks %lld, rows %d, row %d)",
                 mxmoe::cpu::KernelIsaName(isa), static_cast<long long>(blocks), num_rows, r);
        }
      }
    }
  }
  printf("pair-kernel checks: %d\n", pair_checks);
#if defined(__x86_64__)
  if (mxmoe::cpu::PanelKernelFor(KernelIsa::kAvx512) != nullptr) {
    EXPECT(pair_checks > 0, "AVX-512 VNNI runs here, so its pair kernel must have been checked");
  }
#endif
}

// The vector block quantizer of `isa` (AVX2, AVX-512) against the portable one: random blocks
// over many binades with NaN, +-Inf, zeros of both signs, subnormals, and values on the E2M1
// rounding thresholds.
void TestQuantizeBlockAgrees(KernelIsa isa, std::mt19937& rng) {
  const mxmoe::cpu::QuantizeBlockFn vector = mxmoe::cpu::internal::QuantizeBlockForTesting(isa);
  if (vector == nullptr) {
    printf("no %s block quantizer on this CPU\n", mxmoe::cpu::KernelIsaName(isa));
    return;
  }
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, 1e-45f, -1e-40f, 0.25f, 0.75f,
                            1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f, -0.25f, -5.0f, 3e38f};
  std::uniform_real_distribution<float> binade(-140.0f, 128.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int wrong = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    float x[32];
    // Every 4th block: a power-of-two block scale and 6 * it first, so that the specials land
    // exactly on the E2M1 rounding ties after the quantizer's multiply.
    const bool ties = trial % 4 == 0;
    const float block_scale = exp2f(ties ? roundf(binade(rng)) : binade(rng));
    for (float& v : x) {
      const uint32_t pick = rng() % (ties ? 2 : 16);
      v = pick == 0 ? specials[rng() % (sizeof(specials) / sizeof(specials[0]))] * block_scale
                    : normal(rng) * block_scale;
    }
    if (ties) x[0] = 6.0f * block_scale;
    if (trial % 50 == 0) x[rng() % 32] = NAN;
    uint8_t want[16], got[16];
    memset(got, 0x5A, sizeof(got));
    const uint8_t want_scale = mxmoe::cpu::QuantizeBlockPortable(x, want);
    const uint8_t got_scale = vector(x, got);
    wrong += got_scale != want_scale || memcmp(got, want, sizeof(want)) != 0;
  }
  EXPECT(wrong == 0, "%d of 20000 blocks quantize differently with %s", wrong,
         mxmoe::cpu::KernelIsaName(isa));
  printf("block quantizer (%s): checked\n", mxmoe::cpu::KernelIsaName(isa));
}

struct Gemm {
  std::vector<int32_t> counts;
  int64_t n, k;
  int32_t c_dtype;
  std::vector<int32_t> expert_offsets, blockscale_offsets;
  std::vector<uint8_t> a, a_scales, b, b_scales, b_swizzled, b_prepared;
  int64_t rows() const { return expert_offsets.back(); }
};

Gemm MakeGemm(std::vector<int32_t> counts, int64_t n, int64_t k, int32_t c_dtype,
              std::mt19937& rng) {
  Gemm g{counts, n, k, c_dtype, {0}, {0}, {}, {}, {}, {}, {}, {}};
  for (int32_t m : counts) {
    g.expert_offsets.push_back(g.expert_offsets.back() + m);
    g.blockscale_offsets.push_back(g.blockscale_offsets.back() +
                                   static_cast<int32_t>(mxmoe::format::RoundUp(m, 128)));
  }
  const int64_t blocks = k / 32;
  const int32_t experts = static_cast<int32_t>(counts.size());
  g.a.resize(g.rows() * k / 2);
  for (auto& v : g.a) v = static_cast<uint8_t>(rng());
  const int64_t padded = mxmoe::format::RoundUp(blocks, 4);
  g.a_scales.assign(std::max<int64_t>(g.blockscale_offsets.back(), 1) * padded, 0);
  for (auto& s : g.a_scales) s = RandomScale(rng);
  g.b.resize(experts * n * k / 2);
  for (auto& v : g.b) v = static_cast<uint8_t>(rng());
  g.b_scales.resize(experts * n * blocks);
  for (auto& s : g.b_scales) s = RandomScale(rng);
  // The same scales swizzled per expert (through the library's own swizzle is not needed: the
  // layout function of format.h is the contract).
  const int64_t expert_swizzled = mxmoe::format::SwizzledBytes(n, blocks);
  g.b_swizzled.assign(experts * expert_swizzled, 0);
  for (int32_t e = 0; e < experts; ++e) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t b = 0; b < blocks; ++b) {
        g.b_swizzled[e * expert_swizzled + mxmoe::format::SwizzledOffset(j, b, blocks)] =
            g.b_scales[(e * n + j) * blocks + b];
      }
    }
  }
  mxmoe_prepare_weights_args prep = {};
  prep.weights = {experts, n, k, MXMOE_WEIGHT_FORMAT_LINEAR, 0, g.b.data(), g.b_scales.data()};
  prep.device = kCpu;
  size_t bytes = 0;
  EXPECT_OK(mxmoe_prepare_weights_size(&prep, &bytes));
  const size_t panels = experts * ((n + 7) / 8);
  EXPECT(bytes == panels * mxmoe::cpu::PanelBytes(blocks), "prepared size %zu", bytes);
  g.b_prepared.assign(bytes, 0);
  prep.prepared = g.b_prepared.data();
  prep.prepared_bytes = bytes;
  EXPECT_OK(mxmoe_prepare_weights(&prep, nullptr));
  return g;
}

mxmoe_grouped_gemm_args GemmArgs(const Gemm& g, int32_t format, void* c) {
  mxmoe_grouped_gemm_args args = {};
  args.rows = g.rows();
  args.n = g.n;
  args.k = g.k;
  args.num_experts = static_cast<int32_t>(g.counts.size());
  args.a = g.a.data();
  args.a_scales = g.a_scales.data();
  args.a_scale_rows = std::max<int64_t>(g.blockscale_offsets.back(), 1);
  args.b = {args.num_experts, g.n, g.k, format, 0, g.b.data(), nullptr};
  if (format == MXMOE_WEIGHT_FORMAT_LINEAR) args.b.scales = g.b_scales.data();
  if (format == MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4) args.b.scales = g.b_swizzled.data();
  if (format == MXMOE_WEIGHT_FORMAT_PREPARED) {
    args.b.packed = g.b_prepared.data();
    args.b.backend = MXMOE_BACKEND_CPU;
    args.b.prepared_bytes = g.b_prepared.size();
  }
  args.expert_offsets = g.expert_offsets.data();
  args.blockscale_offsets = g.blockscale_offsets.data();
  args.c = c;
  args.c_dtype = g.c_dtype;
  args.device = kCpu;
  return args;
}

size_t OutputBytes(const Gemm& g) {
  return g.rows() * g.n * 2;
}

std::vector<uint8_t> Run(const Gemm& g, int32_t format) {
  std::vector<uint8_t> c(OutputBytes(g), 0xA5);
  const mxmoe_grouped_gemm_args args = GemmArgs(g, format, c.data());
  EXPECT_OK(mxmoe_grouped_gemm(&args, nullptr, 0, nullptr));
  return c;
}

std::vector<Gemm> Problems(std::mt19937& rng) {
  std::vector<Gemm> problems;
  problems.push_back(MakeGemm({5, 0, 1, 37}, 100, 2880, MXMOE_DTYPE_BF16, rng));
  problems.push_back(MakeGemm({1}, 7, 64, MXMOE_DTYPE_FP16, rng));
  problems.push_back(MakeGemm({3, 130, 0}, 72, 256, MXMOE_DTYPE_BF16, rng));
  return problems;
}

void TestGemmsAgree(const std::vector<Gemm>& problems) {
  for (const Gemm& g : problems) {
    mxmoe::cpu::internal::SetKernelIsaForTesting(KernelIsa::kScalar);
    const std::vector<uint8_t> expected = Run(g, MXMOE_WEIGHT_FORMAT_LINEAR);
    for (KernelIsa isa : RunnableIsas()) {
      mxmoe::cpu::internal::SetKernelIsaForTesting(isa);
      for (int32_t format : {MXMOE_WEIGHT_FORMAT_LINEAR, MXMOE_WEIGHT_FORMAT_SWIZZLED_128X4,
                             MXMOE_WEIGHT_FORMAT_PREPARED}) {
        EXPECT(Run(g, format) == expected, "n=%lld k=%lld: kernel %s, format %d differ",
               static_cast<long long>(g.n), static_cast<long long>(g.k),
               mxmoe::cpu::KernelIsaName(isa), format);
      }
    }
    mxmoe::cpu::internal::ResetKernelIsaForTesting();
  }
}

// Four threads, each running every problem several times at once: the same bits as one caller.
void TestConcurrentCallers(const std::vector<Gemm>& problems) {
  std::vector<std::vector<uint8_t>> expected;
  for (const Gemm& g : problems) expected.push_back(Run(g, MXMOE_WEIGHT_FORMAT_PREPARED));
  std::atomic<int> mismatches{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      for (int repeat = 0; repeat < 3; ++repeat) {
        for (size_t i = 0; i < problems.size(); ++i) {
          const Gemm& g = problems[(i + t) % problems.size()];
          std::vector<uint8_t> c(OutputBytes(g), 0xA5);
          const int32_t format =
              repeat % 2 ? MXMOE_WEIGHT_FORMAT_LINEAR : MXMOE_WEIGHT_FORMAT_PREPARED;
          const mxmoe_grouped_gemm_args args = GemmArgs(g, format, c.data());
          if (mxmoe_grouped_gemm(&args, nullptr, 0, nullptr) != MXMOE_STATUS_OK ||
              c != expected[(i + t) % problems.size()]) {
            ++mismatches;
          }
        }
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT(mismatches.load() == 0, "%d concurrent GEMMs differ from the single-caller result",
         mismatches.load());
}

void TestParallelFor() {
  EXPECT(mxmoe::cpu::MaxThreads() == kThreadsSetting, "MaxThreads() = %d with "
         "MXMOE_CPU_THREADS=%d", mxmoe::cpu::MaxThreads(), kThreadsSetting);
  std::vector<std::atomic<int>> seen(10007);
  std::atomic<int> bad_slot{0};
  mxmoe::cpu::ParallelForWithSlot(10007, 1, [&](int slot, int64_t begin, int64_t end) {
    if (slot < 0 || slot >= mxmoe::cpu::MaxThreads()) ++bad_slot;
    for (int64_t i = begin; i < end; ++i) {
      // A nested parallel loop inside a worker must neither deadlock nor lose work.
      if (i % 1000 == 0) mxmoe::cpu::ParallelFor(64, 1, [](int64_t, int64_t) {});
      ++seen[i];
    }
  });
  int wrong = 0;
  for (auto& s : seen) wrong += s.load() != 1;
  EXPECT(wrong == 0 && bad_slot.load() == 0, "%d indices not visited exactly once, %d bad slots",
         wrong, bad_slot.load());
  bool caught = false;
  try {
    mxmoe::cpu::ParallelFor(1000, 1, [](int64_t begin, int64_t end) {
      if (begin <= 500 && 500 < end) throw std::runtime_error("worker failure");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  EXPECT(caught, "an exception in a worker must reach the caller");
}

void TestFailureLeavesOutputUntouched(const std::vector<Gemm>& problems) {
  using mxmoe::cpu::internal::GemmFailure;
  for (GemmFailure where : {GemmFailure::kScratch, GemmFailure::kDecodeWorker}) {
    for (const Gemm& g : problems) {
      for (int32_t format : {MXMOE_WEIGHT_FORMAT_LINEAR, MXMOE_WEIGHT_FORMAT_PREPARED}) {
        std::vector<uint8_t> c(OutputBytes(g), 0xA5);
        const mxmoe_grouped_gemm_args args = GemmArgs(g, format, c.data());
        mxmoe::cpu::internal::SetGemmFailureForTesting(where);
        const mxmoe_status status = mxmoe_grouped_gemm(&args, nullptr, 0, nullptr);
        mxmoe::cpu::internal::SetGemmFailureForTesting(GemmFailure::kNone);
        const std::string message = mxmoe_last_error();
        EXPECT(status == MXMOE_STATUS_INTERNAL &&
                   message.find("out of host memory") != std::string::npos,
               "injected failure %d: status %s, message '%s'", static_cast<int>(where),
               mxmoe_status_string(status), message.c_str());
        EXPECT(c == std::vector<uint8_t>(c.size(), 0xA5),
               "injected failure %d, format %d: c was written", static_cast<int>(where), format);
      }
    }
  }
  // And the next call works again.
  EXPECT(Run(problems[0], MXMOE_WEIGHT_FORMAT_PREPARED) ==
             Run(problems[0], MXMOE_WEIGHT_FORMAT_LINEAR),
         "GEMM after an injected failure");
}

}  // namespace

int main() {
  setenv("MXMOE_CPU_THREADS", "3", 1);  // before the first CPU call: read once
  std::mt19937 rng(20261201);
  TestActivationClonesAgree();
  for (KernelIsa isa : {KernelIsa::kAvx2, KernelIsa::kAvx512}) TestBf16EpilogueAgrees(isa, rng);
  TestKernelsAgree(rng);
  for (KernelIsa isa : {KernelIsa::kAvx2, KernelIsa::kAvx512}) TestQuantizeBlockAgrees(isa, rng);
  const std::vector<Gemm> problems = Problems(rng);
  TestParallelFor();
  TestGemmsAgree(problems);
  TestConcurrentCallers(problems);
  TestFailureLeavesOutputUntouched(problems);
  if (failures != 0) {
    fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  printf("ok\n");
  return 0;
}
