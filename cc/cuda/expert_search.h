// "Which expert owns this row": the binary search over per-expert offsets that every grouped
// kernel runs on the device (quantize, the sm90 activation conversion and tile scheduler). Host
// and device code (MXMOE_HD), so tests/cc/expert_search_test.cc checks the very function the
// kernels run against a linear scan.
#ifndef MXMOE_CUDA_EXPERT_SEARCH_H_
#define MXMOE_CUDA_EXPERT_SEARCH_H_

#include <stdint.h>

#include "mxmoe/format.h"

namespace mxmoe {
namespace cuda {

// The largest e in [0, num_experts) with offsets[e] <= value, for offsets[0..num_experts) read
// in O(log E) steps (offsets[num_experts] is never read). With non-decreasing offsets this is
// the expert whose rows [offsets[e], offsets[e+1]) hold `value`, skipping empty experts that
// start at the same row; a value below offsets[0] gives 0 and one at or past the last start
// gives the last expert. Offsets from the device are not trusted: callers check
// offsets[e] <= value < offsets[e+1] before using the answer.
template <typename Offset, typename Value>
MXMOE_HD int ExpertOfRow(const Offset* offsets, int num_experts, Value value) {
  int lo = 0;
  int hi = num_experts;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid] <= value) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_EXPERT_SEARCH_H_
