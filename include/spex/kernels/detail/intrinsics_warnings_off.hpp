// No include guard: opens a region, closed by intrinsics_warnings_on.hpp, around the first
// include of a header that brings in the x86 intrinsics (Eigen, xsimd).
// GCC 12's AVX-512 intrinsics self-initialize ("__Y = __Y") in their _undefined helpers, which
// -Wall reports as (maybe-)uninitialized in every function they are inlined into, hundreds of
// times per translation unit with -march=native. The report is located in the intrinsics
// header, so it is silenced where that header is first parsed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
