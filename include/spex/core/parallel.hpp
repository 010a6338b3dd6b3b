#pragma once
// One thread pool for all of spex: OpenMP when the build has it, serial otherwise.
// Parallelize at one level only (DESIGN.md, Threading): inside parallel_for, Eigen's GEMMs see
// an active parallel region and run single-threaded, so the two pools never nest.
#include <algorithm>
#include <atomic>
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

namespace detail {
/// Chunks of a thread's own range in parallel_for: a thread that finishes last is at most one
/// chunk, 1/32 of its range, behind the others; a loop of cheap iterations claims only 64
/// chunks on 2 threads.
inline constexpr Index kChunksPerRange = 32;
/// Ranges parallel_for plans at most (teams of more threads share them).
inline constexpr int kMaxRanges = 128;

/// The next unclaimed index of one thread's range, alone on its cache line.
struct alignas(64) RangeCursor {
  std::atomic<Index> next;
};

enum class Schedule { own_ranges_then_steal, one_at_a_time };

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
    } else {
      // Range r is [n r / ranges, n (r + 1) / ranges); thread t claims chunks of range t front
      // to back, then of ranges t + 1, t + 2, ... (wrapping), so every index runs once whatever
      // the team's size.
      const int ranges = std::min(max_threads(), kMaxRanges);
      RangeCursor cursor[kMaxRanges];
      for (int r = 0; r < ranges; ++r) cursor[r].next.store(n * r / ranges, std::memory_order_relaxed);
      const Index chunk = std::max<Index>(1, n / (Index(ranges) * kChunksPerRange));
#pragma omp parallel
      {
        const int t = omp_get_thread_num();
        for (int v = 0; v < ranges; ++v) {
          const int r = (t + v) % ranges;
          const Index end = n * (r + 1) / ranges;
          for (Index i = cursor[r].next.fetch_add(chunk, std::memory_order_relaxed); i < end;
               i = cursor[r].next.fetch_add(chunk, std::memory_order_relaxed))
            for (Index j = i; j < std::min(i + chunk, end); ++j) guarded(j);
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (Index i = 0; i < n; ++i) f(i, 0);
}
}  // namespace detail

/// Runs f(i, thread) for i in [0, n) over at most max_threads() threads; `thread` is in
/// [0, max_threads()) and picks the caller's per-thread scratch. Each thread starts on its own
/// contiguous share of [0, n), as a static partition, so that consecutive indices (a half's
/// sub-keys, a block of rows) stay in one core's cache; a thread done with its share takes the
/// unclaimed chunks of the others', so a core slowed by other work (a busy neighbour of a VM's
/// core, the slower cores of a hybrid CPU) does not hold the rest up at the loop's end
/// (docs/performance.md, "PEER training"). Which thread runs an index may change from call to
/// call: f may use `thread` for scratch only.
/// The first exception thrown by any f is rethrown on the calling thread after all finish.
template <class F>
void parallel_for(Index n, F&& f) {
  detail::parallel_for_impl<detail::Schedule::own_ranges_then_steal>(n, std::forward<F>(f));
}

/// As parallel_for, handing out one index at a time in order: for few tasks of uneven size
/// (experts with different token counts, largest first).
template <class F>
void parallel_for_dynamic(Index n, F&& f) {
  detail::parallel_for_impl<detail::Schedule::one_at_a_time>(n, std::forward<F>(f));
}

}  // namespace spex
