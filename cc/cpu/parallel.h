// A minimal parallel-for for the CPU backend: std::thread workers pulling chunks of an index
// range from an atomic counter (dynamic scheduling, so uneven experts balance themselves).
//
// Limits: threads are started per call (no pool; calls are coarse: one per operation stage),
// capped at std::thread::hardware_concurrency() and, if set, at the MXMOE_CPU_THREADS environment
// variable. An exception thrown by `fn` in any worker is rethrown in the caller after all workers
// have joined, so the C API boundary can turn it into a status.
#ifndef MXMOE_CPU_PARALLEL_H_
#define MXMOE_CPU_PARALLEL_H_

#include <stdint.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace mxmoe {
namespace cpu {

inline int MaxThreads() {
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  if (const char* env = getenv("MXMOE_CPU_THREADS")) {
    const int requested = atoi(env);
    if (requested > 0) threads = std::min(threads, requested);
  }
  return threads;
}

// Calls fn(begin, end) over disjoint chunks covering [0, count). A chunk holds at least
// `min_chunk` items (callers choose it so that one chunk is worth a thread's start-up).
template <typename Fn>
void ParallelFor(int64_t count, int64_t min_chunk, const Fn& fn) {
  if (count <= 0) return;
  min_chunk = std::max<int64_t>(min_chunk, 1);
  const int64_t max_useful = (count + min_chunk - 1) / min_chunk;
  const int threads = static_cast<int>(std::min<int64_t>(MaxThreads(), max_useful));
  if (threads <= 1) {
    fn(int64_t{0}, count);
    return;
  }
  // About 4 chunks per thread: enough to balance, few enough to keep chunks long.
  const int64_t chunk = std::max(min_chunk, (count + 4 * threads - 1) / (4 * threads));
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&] {
    try {
      for (;;) {
        const int64_t begin = next.fetch_add(chunk);
        if (begin >= count) break;
        fn(begin, std::min(count, begin + chunk));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(count);  // stop the others early
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  try {
    for (int i = 0; i < threads - 1; ++i) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // Could not start more threads: the ones running (and this one) still drain the range.
  }
  worker();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_PARALLEL_H_
