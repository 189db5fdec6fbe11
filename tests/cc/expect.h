// Check macros shared by the C++ tests (plain main(), no test framework): EXPECT(cond, fmt, ...)
// counts and prints a failure with file, line and the condition, then the printf-style message;
// EXPECT_OK(call) expects MXMOE_STATUS_OK and prints the status and mxmoe_last_error(). A test's
// main() returns nonzero when mxmoe_test::failures != 0. Only the first 50 failures are printed.
#ifndef MXMOE_TESTS_CC_EXPECT_H_
#define MXMOE_TESTS_CC_EXPECT_H_

#include <stdio.h>

#include "mxmoe/mxmoe.h"

namespace mxmoe_test {
inline int failures = 0;
constexpr int kMaxPrintedFailures = 50;
}  // namespace mxmoe_test

#define EXPECT(cond, ...)                                                     \
  do {                                                                        \
    if (!(cond)) {                                                            \
      ++::mxmoe_test::failures;                                               \
      if (::mxmoe_test::failures <= ::mxmoe_test::kMaxPrintedFailures) {      \
        fprintf(stderr, "%s:%d: FAILED (%s): ", __FILE__, __LINE__, #cond);   \
        fprintf(stderr, __VA_ARGS__);                                         \
        fprintf(stderr, "\n");                                                \
      }                                                                       \
    }                                                                         \
  } while (0)

#define EXPECT_OK(call)                                                                    \
  do {                                                                                     \
    const mxmoe_status status_ = (call);                                                   \
    EXPECT(status_ == MXMOE_STATUS_OK, "%s -> %s: %s", #call, mxmoe_status_string(status_), \
           mxmoe_last_error());                                                            \
  } while (0)

#endif  // MXMOE_TESTS_CC_EXPECT_H_
