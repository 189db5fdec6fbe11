// The persistent thread pool behind cc/cpu/parallel.h: jobs in an intrusive list (no allocation
// per call), pool threads joining the oldest unfilled job, callers draining their own job.
#include "cc/cpu/parallel.h"

#include <pthread.h>
#include <stdlib.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace mxmoe {
namespace cpu {
namespace {

constexpr int kMaxThreadsSetting = 1024;

int ReadThreadCount() {
  if (const char* env = getenv("MXMOE_CPU_THREADS")) {
    char* end = nullptr;
    const long requested = strtol(env, &end, 10);
    if (end != env && *end == '\0' && requested >= 1 && requested <= kMaxThreadsSetting) {
      return static_cast<int>(requested);
    }
  }
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  return hardware > 0 ? hardware : 1;
}

struct Job {
  internal::ChunkFn fn;
  const void* context;
  int64_t count;
  int64_t chunk;
  int max_slots;
  std::atomic<int64_t> next{0};
  // Guarded by the pool mutex.
  int joined = 0;  // pool threads that took a slot (slots 1..joined; the caller has slot 0)
  int active = 0;  // pool threads still inside the job
  bool queued = false;
  Job* next_job = nullptr;
  std::mutex error_mutex;
  std::exception_ptr error;

  void Drain(int slot) {
    try {
      for (;;) {
        const int64_t begin = next.fetch_add(chunk);
        if (begin >= count) break;
        fn(context, slot, begin, std::min(count, begin + chunk));
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(count);  // the other participants stop at their next chunk
    }
  }
};

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 0; i + 1 < threads; ++i) {
      try {
        std::thread(&Pool::WorkerLoop, this).detach();
      } catch (const std::system_error&) {
        break;  // fewer threads: the callers still drain their own jobs
      }
    }
  }

  int threads() const { return threads_; }

  void Run(Job* job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Append(job);
    }
    work_cv_.notify_all();
    job->Drain(0);
    std::unique_lock<std::mutex> lock(mutex_);
    if (job->queued) Remove(job);  // no pool thread joins from now on
    done_cv_.wait(lock, [job] { return job->active == 0; });
  }

  // fork(): the child keeps the memory of the pool but none of its threads. The handlers hold
  // the mutex across fork so that the child never inherits it locked by a vanished thread.
  void BeforeFork() { mutex_.lock(); }
  void AfterForkParent() { mutex_.unlock(); }
  void AfterForkChild() {
    head_ = nullptr;  // no job of the parent continues here
    forked_child_ = true;
    mutex_.unlock();
  }

 private:
  void Append(Job* job) {
    job->queued = true;
    if (forked_child_) {  // nobody would join: the caller runs the job alone
      job->queued = false;
      return;
    }
    Job** tail = &head_;
    while (*tail != nullptr) tail = &(*tail)->next_job;
    *tail = job;
  }

  void Remove(Job* job) {
    for (Job** p = &head_; *p != nullptr; p = &(*p)->next_job) {
      if (*p == job) {
        *p = job->next_job;
        break;
      }
    }
    job->next_job = nullptr;
    job->queued = false;
  }

  void WorkerLoop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_cv_.wait(lock, [this] { return head_ != nullptr; });
      Job* job = head_;
      const int slot = ++job->joined;
      ++job->active;
      if (job->joined + 1 >= job->max_slots) Remove(job);  // every slot is taken
      lock.unlock();
      job->Drain(slot);
      lock.lock();
      if (--job->active == 0) done_cv_.notify_all();  // under the lock: the job is still alive
    }
  }

  const int threads_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  Job* head_ = nullptr;  // jobs that still have free slots, oldest first
  bool forked_child_ = false;
};

std::atomic<Pool*> g_pool{nullptr};

void BeforeFork() {
  if (Pool* pool = g_pool.load()) pool->BeforeFork();
}
void AfterForkParent() {
  if (Pool* pool = g_pool.load()) pool->AfterForkParent();
}
void AfterForkChild() {
  if (Pool* pool = g_pool.load()) pool->AfterForkChild();
}

Pool& GetPool() {
  // A function-local static: thread-safe initialisation, never destroyed (threads are detached).
  static Pool* const pool = [] {
    Pool* created = new Pool(ReadThreadCount());
    g_pool.store(created);
    pthread_atfork(BeforeFork, AfterForkParent, AfterForkChild);
    return created;
  }();
  return *pool;
}

}  // namespace

int MaxThreads() { return GetPool().threads(); }

namespace internal {

void RunParallel(int64_t count, int64_t chunk, int max_slots, ChunkFn fn, const void* context) {
  Job job;
  job.fn = fn;
  job.context = context;
  job.count = count;
  job.chunk = chunk;
  job.max_slots = max_slots;
  GetPool().Run(&job);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace internal
}  // namespace cpu
}  // namespace mxmoe
