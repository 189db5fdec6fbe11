// Deterministic bf16 test data shared by the C++ tests that need no distribution, only fresh
// reproducible values: a 32-bit LCG, each value an integer in [-1000, 1000] divided by `divisor`,
// rounded to bf16 (format::FloatToBf16).
#ifndef MXMOE_TESTS_CC_RANDOM_BF16_H_
#define MXMOE_TESTS_CC_RANDOM_BF16_H_

#include <stddef.h>
#include <stdint.h>

#include <vector>

#include "mxmoe/format.h"

namespace mxmoe_test {

inline std::vector<uint16_t> LcgBf16(size_t n, uint32_t seed, float divisor) {
  std::vector<uint16_t> v(n);
  uint32_t x = seed * 2654435761u + 1;
  for (uint16_t& h : v) {
    x = x * 1664525u + 1013904223u;
    h = mxmoe::format::FloatToBf16((static_cast<int32_t>(x >> 8) % 2001 - 1000) / divisor);
  }
  return v;
}

}  // namespace mxmoe_test

#endif  // MXMOE_TESTS_CC_RANDOM_BF16_H_
