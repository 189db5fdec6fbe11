// Runtime values to template arguments, in FlashInfer's DISPATCH_* style: one helper instead of a
// hand-written switch per launcher. Host code only.
//
//   return DispatchValue<16, 32, 64, 128>(block_n, "block_n", [&](auto n) {
//     return LaunchGemmKernelN<decltype(n)::value>(launch, stream);
//   });
//
// The body is instantiated once per listed value; a value outside the list is UNSUPPORTED with a
// message naming it (validation rejects bad values earlier, so this means a kernel instance is
// missing).
#ifndef MXMOE_CUDA_DISPATCH_H_
#define MXMOE_CUDA_DISPATCH_H_

#include <stdint.h>

#include <type_traits>

#include "cc/base/status.h"
#include "mxmoe/mxmoe.h"

namespace mxmoe {
namespace cuda {

template <auto... kValues, typename Value, typename Body>
mxmoe_status DispatchValue(Value value, const char* what, const Body& body) {
  mxmoe_status status = MXMOE_STATUS_OK;
  const bool found =
      ((value == kValues
            ? (status = body(std::integral_constant<decltype(kValues), kValues>{}), true)
            : false) ||
       ...);
  if (!found) {
    return Fail(MXMOE_STATUS_UNSUPPORTED, "no CUDA kernel instance for ", what, " = ",
                static_cast<long long>(value));
  }
  return status;
}

// The activation dtypes every kernel is instantiated for; the body receives
// std::integral_constant<mxmoe_dtype, MXMOE_DTYPE_BF16 or MXMOE_DTYPE_FP16>.
template <typename Body>
mxmoe_status DispatchActivationDtype(int32_t dtype, const char* what, const Body& body) {
  return DispatchValue<MXMOE_DTYPE_BF16, MXMOE_DTYPE_FP16>(dtype, what, body);
}

}  // namespace cuda
}  // namespace mxmoe

#endif  // MXMOE_CUDA_DISPATCH_H_
