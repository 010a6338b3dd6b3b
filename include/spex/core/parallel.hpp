#pragma once
// One thread pool for all of spex: OpenMP when the build has it, serial otherwise.
// Parallelize at one level only (DESIGN.md, Threading): inside parallel_for, Eigen's GEMMs see
// an active parallel region and run single-threaded, so the two pools never nest.
#include <algorithm>
#include <exception>
#include <mutex>
#include <utility>

#include "check.hpp"
#include "types.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace spex {

/// Threads a parallel_for may use (OMP_NUM_THREADS / omp_set_num_threads), 1 without OpenMP.
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Sets the threads spex's parallel loops use from now on (omp_set_num_threads; n >= 1).
/// Results never depend on it: every reduction in spex has a fixed order.
/// Waiting threads: with OpenMP's default policy idle threads spin for a while, fastest when
/// spex has its cores, far slower when other work shares them; set OMP_WAIT_POLICY=PASSIVE in
/// the environment there, or use fewer threads (docs/api.md, "Threads", has the measurements).
inline void set_num_threads(int n) {
  SPEX_CHECK(n >= 1, "set_num_threads(" << n << "): the thread count must be >= 1");
#if defined(_OPENMP)
  omp_set_num_threads(n);
#endif
}

/// Chunks per thread of parallel_for_balanced: a thread that finishes last is at most one chunk,
/// 1/32 of its share, behind; a loop of cheap iterations hands out only 64 chunks on 2 threads.
inline constexpr Index kChunksPerThread = 32;

namespace detail {
enum class Schedule { fixed, one_at_a_time, chunks };

template <Schedule kSchedule, class F>
void parallel_for_impl(Index n, F&& f) {
  if (n <= 0) return;
#if defined(_OPENMP)
  if (n > 1 && max_threads() > 1 && !omp_in_parallel()) {
    std::exception_ptr error;
    std::mutex error_mutex;
    auto guarded = [&](Index i) {
      try {
        f(i, omp_get_thread_num());
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    };
    if (kSchedule == Schedule::one_at_a_time) {
#pragma omp parallel for schedule(dynamic, 1)
      for (Index i = 0; i < n; ++i) guarded(i);
    } else if (kSchedule == Schedule::chunks) {
      const Index chunk = std::max<Index>(1, n / (kChunksPerThread * max_threads()));
#pragma omp parallel for schedule(dynamic, chunk)
      for (Index i = 0; i < n; ++i) guarded(i);
    } else {
#pragma omp parallel for schedule(static)
      for (Index i = 0; i < n; ++i) guarded(i);
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (Index i = 0; i < n; ++i) f(i, 0);
}
}  // namespace detail

/// Runs f(i, thread) for i in [0, n), statically partitioned over at most max_threads()
/// threads; `thread` is in [0, max_threads()) and picks the caller's per-thread scratch.
/// The first exception thrown by any f is rethrown on the calling thread after all finish.
template <class F>
void parallel_for(Index n, F&& f) {
  detail::parallel_for_impl<detail::Schedule::fixed>(n, std::forward<F>(f));
}

/// As parallel_for, handing out one index at a time: for few tasks of uneven size (experts
/// with different token counts).
template <class F>
void parallel_for_dynamic(Index n, F&& f) {
  detail::parallel_for_impl<detail::Schedule::one_at_a_time>(n, std::forward<F>(f));
}

/// As parallel_for, the threads taking chunks of consecutive indices (a thread's share cut into
/// about kChunksPerThread) as they finish: for loops whose iterations read memory at random, so
/// that which thread runs an index does not matter to the caches. A core slowed by other work
/// (a busy neighbour of a VM's core, the slower cores of a hybrid CPU) then no longer holds the
/// others up at the loop's end (docs/performance.md, "PEER training"). Which thread runs an
/// index changes from call to call: f may use `thread` for scratch only.
template <class F>
void parallel_for_balanced(Index n, F&& f) {
  detail::parallel_for_impl<detail::Schedule::chunks>(n, std::forward<F>(f));
}

}  // namespace spex
