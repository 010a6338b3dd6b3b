#pragma once
// What every example does first: progress lines reach a pipe as they are printed (stdout is
// fully buffered otherwise), and a build without -march flags is pointed out once.
#include <cstdio>
#include <cstring>

#include <spex/kernels/simd.hpp>

inline void example_setup() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (std::strcmp(spex::simd_arch_name(), "sse2") == 0 || std::strcmp(spex::simd_arch_name(), "scalar") == 0)
    std::printf("note: built for %s only (no -march flags); -march=native is 1.6-1.8x faster on AVX2/AVX-512 CPUs\n",
                spex::simd_arch_name());
}
