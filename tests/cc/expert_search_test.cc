// cuda::ExpertOfRow (cc/cuda/expert_search.h, the search every grouped CUDA kernel runs on the
// device) against a linear scan, on random offsets with empty experts (runs of equal offsets) at
// the start, in the middle and at the end, one expert, and every row up to and past the end.
#include <stdint.h>
#include <stdio.h>

#include <random>
#include <vector>

#include "cc/cuda/expert_search.h"
#include "tests/cc/expect.h"

namespace {

using mxmoe_test::failures;

// The largest e in [0, E) with offsets[e] <= row, or 0 when there is none.
int LinearSearch(const std::vector<int32_t>& offsets, int num_experts, int64_t row) {
  int found = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (offsets[e] <= row) found = e;
  }
  return found;
}

void CheckAllRows(const std::vector<int32_t>& offsets, const char* what) {
  const int num_experts = static_cast<int>(offsets.size()) - 1;
  for (int64_t row = -2; row <= offsets.back() + 2; ++row) {
    const int got = mxmoe::cuda::ExpertOfRow(offsets.data(), num_experts, row);
    const int want = LinearSearch(offsets, num_experts, row);
    EXPECT(got == want, "%s: E=%d row=%lld: ExpertOfRow = %d, linear scan = %d", what,
           num_experts, static_cast<long long>(row), got, want);
    // Inside the rows, the answer owns the row (empty experts are skipped).
    if (row >= 0 && row < offsets.back()) {
      EXPECT(offsets[got] <= row && row < offsets[got + 1],
             "%s: E=%d row=%lld: expert %d owns [%d, %d)", what, num_experts,
             static_cast<long long>(row), got, offsets[got], offsets[got + 1]);
    }
  }
}

}  // namespace

int main() {
  CheckAllRows({0, 0}, "one empty expert");
  CheckAllRows({0, 5}, "one expert");
  CheckAllRows({0, 0, 0, 3, 3, 3, 9, 9}, "empty experts first, middle and last");
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    const int num_experts = 1 + static_cast<int>(rng() % 70);
    std::vector<int32_t> offsets(num_experts + 1, 0);
    for (int e = 0; e < num_experts; ++e) {
      // A third of the experts empty, the others 1..20 rows.
      offsets[e + 1] = offsets[e] + (rng() % 3 == 0 ? 0 : 1 + static_cast<int32_t>(rng() % 20));
    }
    CheckAllRows(offsets, "random");
  }
  // Int32 offsets searched with an int32 value (the quantizer) and an int value (the scheduler).
  const std::vector<int32_t> offsets = {0, 4, 4, 10};
  EXPECT(mxmoe::cuda::ExpertOfRow(offsets.data(), 3, int32_t{4}) == 2, "int32 value");
  EXPECT(mxmoe::cuda::ExpertOfRow(offsets.data(), 3, 9) == 2, "int value");
  if (failures != 0) {
    fprintf(stderr, "expert_search_test: %d failure(s)\n", failures);
    return 1;
  }
  printf("expert_search_test: all passed\n");
  return 0;
}
