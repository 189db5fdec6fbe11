// The CPU backend's parallel-for over one persistent thread pool.
//
// Thread count: MXMOE_CPU_THREADS if it is an integer in [1, 1024], else
// std::thread::hardware_concurrency(); read once, at the first CPU call that runs in parallel
// (changing the variable later has no effect). The pool holds that many threads minus one: the
// calling thread always works on its own call too.
//
// Concurrency: any number of threads may call ParallelFor at once (C API calls from several
// threads, or a nested ParallelFor inside fn); each call is a job that idle pool threads join,
// and because the caller drains its own job, a call never waits for pool threads to become free.
// After fork() the child runs every call on the calling thread alone (the pool's threads do not
// exist there). The pool is never destroyed (no joins at process exit).
//
// Failure: an exception thrown by fn in any participant stops the job early and is rethrown in
// the caller once every participant has left, so the C API boundary turns it into a status.
// ParallelFor itself allocates nothing and throws nothing of its own.
#ifndef MXMOE_CPU_PARALLEL_H_
#define MXMOE_CPU_PARALLEL_H_

#include <stdint.h>

#include <algorithm>

namespace mxmoe {
namespace cpu {

// Participants a call can have at most (pool threads + the caller); ids passed to fn are below it.
int MaxThreads();

namespace internal {
using ChunkFn = void (*)(const void* context, int slot, int64_t begin, int64_t end);
// Runs fn(context, slot, begin, end) over chunks of `chunk` items covering [0, count), on at most
// `max_slots` participants; `slot` is unique among the participants of this call, in
// [0, max_slots).
void RunParallel(int64_t count, int64_t chunk, int max_slots, ChunkFn fn, const void* context);
}  // namespace internal

// Calls fn(slot, begin, end) over disjoint chunks covering [0, count), each of at least
// `min_chunk` items (callers choose it so that one chunk is worth waking a thread), with `slot`
// in [0, MaxThreads()) unique among the threads running this call at once: an index into
// per-thread scratch allocated before the call.
template <typename Fn>
void ParallelForWithSlot(int64_t count, int64_t min_chunk, const Fn& fn) {
  if (count <= 0) return;
  min_chunk = std::max<int64_t>(min_chunk, 1);
  const int64_t max_useful = (count + min_chunk - 1) / min_chunk;
  const int threads = static_cast<int>(std::min<int64_t>(MaxThreads(), max_useful));
  if (threads <= 1) {
    fn(0, int64_t{0}, count);
    return;
  }
  // About 4 chunks per thread: enough to balance, few enough to keep chunks long.
  const int64_t chunk = std::max(min_chunk, (count + 4 * threads - 1) / (4 * threads));
  internal::RunParallel(
      count, chunk, threads,
      [](const void* context, int slot, int64_t begin, int64_t end) {
        (*static_cast<const Fn*>(context))(slot, begin, end);
      },
      &fn);
}

// Calls fn(begin, end) over disjoint chunks covering [0, count) (see ParallelForWithSlot).
template <typename Fn>
void ParallelFor(int64_t count, int64_t min_chunk, const Fn& fn) {
  ParallelForWithSlot(count, min_chunk,
                      [&fn](int, int64_t begin, int64_t end) { fn(begin, end); });
}

}  // namespace cpu
}  // namespace mxmoe

#endif  // MXMOE_CPU_PARALLEL_H_
