// The CPU GEMM's decoded operands and its inner kernels (one per instruction set).
//
// Decoded A (per call, in scratch): per row, the twice-values of its E2M1 codes as int8 [k]
// (integers in [-12, 12]), per 32-block the factor 2^(s - 127) / 4 as double (NaN for scale
// 0xFF) and the block's correction kCodeBias * (sum of its twice-values) as int32.
//
// Decoded B panel (the CPU's PREPARED weight format, or per-call scratch for LINEAR/SWIZZLED
// weights): kPanelCols weight rows (output columns) of one expert over all of K. For each
// 32-block, kPanelBlockCodeBytes code bytes, then after all blocks kPanelCols scale bytes per
// block (panel bytes: blocks * (256 + 8)). A code byte is twice-value + kCodeBias (0..24, so an
// unsigned-by-signed byte multiply-add applies); within a block, element i of column c is byte
// (i / 4) * 32 + c * 4 + i % 4, so that one 4-byte group of an A row, broadcast, meets the same
// 4 elements of 8 columns in one 32-byte register. Columns past n are padding: value 0, scale
// 127.
//
// Every kernel computes, for each of up to kMaxPanelRows A rows and the panel's 8 columns,
//   acc = 0; for each block in order: acc += double(dot) * (fa * fb)
// with dot the exact integer block dot (sum of biased products minus the correction) and fb =
// 2^(sb - 127) (NaN for 0xFF): the same integers and the same double operations in the same order
// in every kernel, so all give identical bits (the products are exact; only the sums round).
#ifndef MXMOE_CPU_PANEL_H_
#define MXMOE_CPU_PANEL_H_

#include <stdint.h>
#include <string.h>

#include "cc/cpu/mxfp4_block.h"

namespace mxmoe {
namespace cpu {

constexpr int kPanelCols = 8;
constexpr int kCodeBias = 12;  // -(smallest twice-value)
constexpr int kPanelBlockCodeBytes = kPanelCols * kBlock;
constexpr int kMaxPanelRows = 4;
constexpr uint8_t kPaddingScale = 127;

inline int64_t PanelBytes(int64_t blocks) {
  return blocks * (kPanelBlockCodeBytes + kPanelCols);
}
inline int64_t PanelCodeIndex(int64_t block, int col, int element) {
  return block * kPanelBlockCodeBytes + (element / 4) * 32 + col * 4 + element % 4;
}
inline int64_t PanelScaleIndex(int64_t blocks, int64_t block, int col) {
  return blocks * kPanelBlockCodeBytes + block * kPanelCols + col;
}

// The biased twice-values of a byte's two codes (low nibble first) and their unbiased sum.
struct CodeByte {
  uint8_t biased[2];
  int8_t twice[2];
  int8_t twice_sum;
};
const CodeByte* CodeByteTable();  // [256]

// Writes column `col` of a panel from one LINEAR/SWIZZLED weight row: packed codes [k/2] and its
// scale bytes scale_of(block).
template <typename ScaleOf>
void DecodePanelColumn(const uint8_t* packed, int64_t blocks, const ScaleOf& scale_of, int col,
                       uint8_t* panel) {
  const CodeByte* table = CodeByteTable();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* src = packed + b * kPackedBlockBytes;
    uint8_t* dst = panel + PanelCodeIndex(b, col, 0);
    for (int q = 0; q < 8; ++q) {  // 4 elements = 2 packed bytes = 4 consecutive panel bytes
      memcpy(dst + 32 * q, table[src[2 * q]].biased, 2);
      memcpy(dst + 32 * q + 2, table[src[2 * q + 1]].biased, 2);
    }
    panel[PanelScaleIndex(blocks, b, col)] = scale_of(b);
  }
}

// Makes column `col` of a panel padding (value 0, scale 127).
void PadPanelColumn(int64_t blocks, int col, uint8_t* panel);

// Writes panel `panel` (columns 8 * panel ...) of expert `expert` of LINEAR or SWIZZLED_128X4
// weights `w` into out[PanelBytes(w.k / 32)] (grouped_gemm.cc).
void DecodePanel(const mxmoe_expert_weights& w, int64_t expert, int64_t panel, uint8_t* out);

// Decodes one A row (packed codes [k/2], scale bytes scale_of(block)) into codes [k],
// factors [k/32] and corrections [k/32].
template <typename ScaleOf>
void DecodeARow(const uint8_t* packed, int64_t blocks, const ScaleOf& scale_of, int8_t* codes,
                double* factors, int32_t* corrections) {
  const CodeByte* table = CodeByteTable();
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int i = 0; i < kPackedBlockBytes; ++i) {
      const CodeByte& entry = table[packed[b * kPackedBlockBytes + i]];
      memcpy(codes + b * kBlock + 2 * i, entry.twice, 2);
      sum += entry.twice_sum;
    }
    factors[b] = AFactor(scale_of(b));
    corrections[b] = kCodeBias * sum;
  }
}

// acc[r * kPanelCols + c] for rows r < num_rows (1..kMaxPanelRows) of decoded A starting at
// a_codes / a_factors / a_corrections (row stride k codes, k/32 factors and corrections) and
// the panel's columns c.
using PanelKernel = void (*)(const uint8_t* panel, int64_t blocks, const int8_t* a_codes,
                             const double* a_factors, const int32_t* a_corrections, int num_rows,
                             double* acc);

enum class KernelIsa : int { kScalar = 0, kSse2 = 1, kAvx2 = 2, kAvx512 = 3 };

// The kernel for `isa`, or nullptr when this build or this CPU cannot run it.
PanelKernel PanelKernelFor(KernelIsa isa);

// Two adjacent panels of one expert at once: acc is [num_rows][2 * kPanelCols], panel0's
// columns then panel1's, each the bits PanelKernel gives for its panel. Only where a wider
// register serves both panels (AVX-512 VNNI); nullptr for other instruction sets or when the CPU
// cannot run it (the GEMM then calls PanelKernel per panel).
using PanelPairKernel = void (*)(const uint8_t* panel0, const uint8_t* panel1, int64_t blocks,
                                 const int8_t* a_codes, const double* a_factors,
                                 const int32_t* a_corrections, int num_rows, double* acc);
PanelPairKernel PanelPairKernelFor(KernelIsa isa);

// The kernel the GEMM uses: MXMOE_CPU_KERNEL=scalar|sse2|avx2|avx512vnni if set and runnable
// (read once), else the best this CPU runs (AVX-512 VNNI, else AVX2, where
// __builtin_cpu_supports says so, else SSE2 on x86-64, else the portable loop). All give
// identical bits; the variable exists for testing and benchmarking.
KernelIsa SelectedKernelIsa();
const char* KernelIsaName(KernelIsa isa);

// The fp32 activation rows (format.h's SiluF32 / SwigluOaiF32: fmaf and rintf in the exp
// polynomial) are compiled twice: plainly (fmaf and rintf are libm calls) and, on x86-64, with
// MXMOE_CPU_FMA_TARGET, where they become single FMA / ROUNDSS instructions. Both are correctly
// rounded, so the two give the same bits (tests/cc/cpu_kernels_test.cc compares them); the
// second runs when the selected kernel is AVX2 or AVX-512 and the CPU has FMA.
bool ActivationUsesFma();

// The GEMM's bf16 epilogue for one full panel row (kPanelCols doubles -> kPanelCols bf16, as
// element_io.h's StoreFromDouble does one by one): a vector form when the AVX-512 kernel is
// selected, or the AVX2 kernel on a CPU with FMA, else nullptr (the scalar loop). Same bits
// (tests/cc/cpu_kernels_test.cc).
using StoreBf16PanelRowFn = void (*)(const double* acc, uint16_t* out);
StoreBf16PanelRowFn VectorStoreBf16PanelRow();
#if defined(__x86_64__)
#define MXMOE_CPU_FMA_TARGET __attribute__((target("avx2,fma")))
#else
#define MXMOE_CPU_FMA_TARGET
#endif

namespace internal {
// Tests only: makes the GEMM (and the activation rows) use `isa` (it must be runnable) from now
// on, or again the selected kernel with ResetKernelIsaForTesting().
void SetKernelIsaForTesting(KernelIsa isa);
void ResetKernelIsaForTesting();
// The bf16 epilogue / block quantizer of `isa` (AVX2 or AVX-512) where this CPU runs it, else
// nullptr (whatever is selected).
StoreBf16PanelRowFn StoreBf16PanelRowForTesting(KernelIsa isa);
QuantizeBlockFn QuantizeBlockForTesting(KernelIsa isa);
}  // namespace internal

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_PANEL_H_
