#include "cc/base/status.h"

namespace mxmoe {
namespace {
thread_local std::string last_error;
}  // namespace

mxmoe_status FailWithMessage(mxmoe_status status, const std::string& message) {
  last_error = message;
  return status;
}

void ClearLastError() { last_error.clear(); }

const char* LastError() { return last_error.c_str(); }

}  // namespace mxmoe
