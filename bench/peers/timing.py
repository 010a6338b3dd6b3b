"""The timing both peer scripts use: median seconds per call over repetitions."""
import statistics
import time


def timed(fn, repetitions, min_seconds=0.5):
    """Median seconds per call over `repetitions` runs of enough calls for min_seconds each,
    after a warm-up of the same length."""
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    times = []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)
