// The extension's thread pool (threads.h).
#include "threads.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MISTRAL7B_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define MISTRAL7B_PAUSE() asm volatile("yield")
#else
#define MISTRAL7B_PAUSE() ((void)0)
#endif

namespace mistral7b {
namespace detail {
namespace {

constexpr auto kSpin = std::chrono::microseconds(200);  // how long an idle helper watches for the next job
// A helper preempted while it holds a task (another process wants its core) makes the caller wait for that
// task: when the wait for the helpers' tasks outlasts the caller's own share by kStall, the next kAlone jobs
// run on the caller alone, then helpers are tried again. Quiet, helpers finish with the caller and this never
// triggers.
constexpr auto kStall = std::chrono::microseconds(20);
constexpr int kAlone = 256;

struct Job {  // fn(i) for i in [0, n) by `width` threads at most (the caller and helpers 1 .. width - 1)
  std::atomic<void (*)(void*, int64_t)> call{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<int64_t> n{0};
  std::atomic<int> width{1};
};

struct Pool {
  // The job id and the next task's index in one word, taken by compare-and-swap: a ticket always belongs to the
  // job it was read with (a thread late from one job cannot take a task of the next under the old job's count).
  // Job id's descriptor is jobs[id % 2]: it is rewritten for id + 2 only after job id + 1, so after job id, is done.
  std::atomic<uint64_t> state{0};
  Job jobs[2];
  std::atomic<int64_t> done{0};
  std::atomic<int> sleepers{0};
  std::mutex busy;  // one job at a time
  int alone = 0;    // jobs left to run on the caller alone after a stall (under `busy`)
  std::atomic<int> threads{0};  // set_threads; 0: torch's (at::get_num_threads)
  std::mutex wake_mutex;
  std::condition_variable wake;
  std::vector<std::thread> helpers;

  static uint32_t job_id(uint64_t s) { return static_cast<uint32_t>(s >> 32); }

  void work(int index) {
    uint64_t s = state.load(std::memory_order_acquire);
    for (;;) {
      const Job& job = jobs[job_id(s) % 2];
      const uint32_t i = static_cast<uint32_t>(s);
      if (index >= job.width.load(std::memory_order_relaxed) || i >= job.n.load(std::memory_order_relaxed)) return;
      if (!state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      job.call.load(std::memory_order_relaxed)(job.ctx.load(std::memory_order_relaxed), i);
      done.fetch_add(1, std::memory_order_acq_rel);
      s = state.load(std::memory_order_acquire);
    }
  }

  void helper(int index) {
    uint32_t seen = job_id(state.load(std::memory_order_acquire));
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      int polls = 0;
      while (job_id(state.load(std::memory_order_acquire)) == seen) {
        MISTRAL7B_PAUSE();
        if (++polls % 64 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(wake_mutex);
          sleepers.fetch_add(1, std::memory_order_seq_cst);
          wake.wait(lock, [&] { return job_id(state.load(std::memory_order_seq_cst)) != seen; });
          sleepers.fetch_sub(1, std::memory_order_acq_rel);
        }
      }
      seen = job_id(state.load(std::memory_order_acquire));
      work(index);
    }
  }

  void ensure_helpers(int count) {  // made once and kept (never torn down: they sleep when idle)
    while (static_cast<int>(helpers.size()) < count) {
      const int index = static_cast<int>(helpers.size()) + 1;
      helpers.emplace_back([this, index] { helper(index); });
      helpers.back().detach();
    }
  }

  void run(int64_t tasks, void (*fn)(void*, int64_t), void* context) {
    const int set = threads.load(std::memory_order_relaxed);
    const int threads = std::max(1, set > 0 ? set : at::get_num_threads());
    std::unique_lock<std::mutex> lock(busy, std::try_to_lock);
    if (threads == 1 || tasks == 1 || !lock.owns_lock() || tasks >= (int64_t(1) << 32) || alone > 0) {
      if (lock.owns_lock() && alone > 0) --alone;
      for (int64_t i = 0; i < tasks; ++i) fn(context, i);  // nested, concurrent, single-threaded or stalled
      return;
    }
    const bool fresh = static_cast<int>(helpers.size()) < threads - 1;  // new helpers are still starting
    ensure_helpers(threads - 1);
    const uint32_t id = job_id(state.load(std::memory_order_acquire)) + 1;
    Job& job = jobs[id % 2];
    job.call.store(fn, std::memory_order_relaxed);
    job.ctx.store(context, std::memory_order_relaxed);
    job.n.store(tasks, std::memory_order_relaxed);
    job.width.store(threads, std::memory_order_relaxed);
    done.store(0, std::memory_order_relaxed);
    // publishes the job; seq_cst, so that it is not ordered after the load of `sleepers` (a helper going to
    // sleep counts itself, then checks the state under the lock)
    state.store(static_cast<uint64_t>(id) << 32, std::memory_order_seq_cst);
    if (sleepers.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> guard(wake_mutex);
      wake.notify_all();
    }
    const auto start = std::chrono::steady_clock::now();
    work(0);
    const auto own = std::chrono::steady_clock::now();
    while (done.load(std::memory_order_acquire) < tasks) MISTRAL7B_PAUSE();  // the tasks helpers took
    if (!fresh && std::chrono::steady_clock::now() - own > (own - start) + kStall) alone = kAlone;
  }
};

// The pool in use. Never destroyed: detached helpers may still be sleeping at exit. A forked child has none of
// the parent's helpers, and a lock or condition variable one of them held at the fork stays held there for
// good: the child starts a pool of its own (fork_child), keeping only the thread setting, and leaks the
// parent's copy.
std::atomic<Pool*> current{nullptr};

void fork_child() {
  Pool* inherited = current.load(std::memory_order_relaxed);
  Pool* fresh = new Pool();
  if (inherited != nullptr) fresh->threads.store(inherited->threads.load(std::memory_order_relaxed));
  current.store(fresh, std::memory_order_release);
}

Pool& pool() {
  static std::once_flag made;
  std::call_once(made, [] {
    current.store(new Pool(), std::memory_order_release);
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, fork_child);
#endif
  });
  return *current.load(std::memory_order_acquire);
}

}  // namespace

void run_tasks(int64_t n, void (*call)(void*, int64_t), void* ctx) { pool().run(n, call, ctx); }

}  // namespace detail

void set_threads(int n) { detail::pool().threads.store(n < 0 ? 0 : n, std::memory_order_relaxed); }
}  // namespace mistral7b
