// The extension's own thread pool: parallel_for(n, fn) runs fn(i) for i in [0, n) on the calling thread and on
// helper threads, each taking the next task from an atomic counter. The caller takes tasks too and then waits
// only for the tasks already taken: a helper that is not running (its core busy with another process) costs
// nothing, where OpenMP's static split waits at its barrier for every thread's share (on a 2-core machine shared
// with another process, PyTorch's 2 threads ran a small op 5x slower than 1). A helper preempted while it holds
// a task still costs the caller a wait: after such a stall the caller runs the next jobs alone for a while
// (threads.cpp). Helpers spin for a short while
// after a job (decode steps call ~180 ops back to back; a wake-up from sleep costs more than a small op) and
// then sleep. The number of threads follows torch.set_num_threads (at::get_num_threads) unless set_threads
// says otherwise. Used only by the extension's own kernels; ATen's ops keep their OpenMP pool.
#pragma once

#include <cstdint>
#include <type_traits>

namespace mistral7b {

namespace detail {
void run_tasks(int64_t n, void (*call)(void*, int64_t), void* ctx);
}

// The pool's threads: n > 0, or 0 to follow torch.set_num_threads (the default).
void set_threads(int n);

// fn(i) for every i in [0, n), in any order, across threads; returns when all are done. A call made while the
// pool runs another job (from another thread, or nested) runs its tasks inline.
template <typename F>
void parallel_for(int64_t n, F&& fn) {
  using Fn = std::remove_reference_t<F>;
  if (n <= 0) return;
  auto call = [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); };
  detail::run_tasks(n, call, const_cast<void*>(static_cast<const void*>(&fn)));
}

// fn(begin, end) over [0, n) in pieces of `grain` (the last one shorter), across threads.
template <typename F>
void parallel_range(int64_t n, int64_t grain, F&& fn) {
  grain = grain < 1 ? 1 : grain;
  parallel_for((n + grain - 1) / grain, [&](int64_t task) {
    const int64_t begin = task * grain;
    fn(begin, begin + grain < n ? begin + grain : n);
  });
}

}  // namespace mistral7b
