// Internal status helpers: the thread-local last-error message behind mxmoe_last_error(), and
// the RETURN_IF_ERROR-style macros every layer uses. Nothing here crosses the C API.
#ifndef MXMOE_BASE_STATUS_H_
#define MXMOE_BASE_STATUS_H_

#include <string>
#include <type_traits>

#include "mxmoe/mxmoe.h"

namespace mxmoe {

// Records `message` as this thread's last error and returns `status` (so callers can write
// `return Fail(MXMOE_STATUS_INVALID_ARGUMENT, "k must be a multiple of 32, got ", k);`).
mxmoe_status FailWithMessage(mxmoe_status status, const std::string& message);

// Clears the last error (called by every entry point on entry).
void ClearLastError();
const char* LastError();

namespace internal {
inline void AppendAll(std::string*) {}
template <typename T, typename... Rest>
void AppendAll(std::string* out, const T& first, const Rest&... rest) {
  if constexpr (std::is_convertible_v<const T&, std::string>) {
    out->append(std::string(first));
  } else {
    out->append(std::to_string(first));
  }
  AppendAll(out, rest...);
}
}  // namespace internal

template <typename... Parts>
mxmoe_status Fail(mxmoe_status status, const Parts&... parts) {
  std::string message;
  internal::AppendAll(&message, parts...);
  return FailWithMessage(status, message);
}

}  // namespace mxmoe

#define MXMOE_RETURN_IF_ERROR(expr)                  \
  do {                                               \
    const mxmoe_status mxmoe_status_ = (expr);       \
    if (mxmoe_status_ != MXMOE_STATUS_OK) return mxmoe_status_; \
  } while (0)

#endif  // MXMOE_BASE_STATUS_H_
