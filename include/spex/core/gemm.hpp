#pragma once
// The one GEMM entry point of spex: every matrix product of the layers (Linear, sub-key scores,
// exhaustive search, FFN experts, their backward) goes through gemm(). Called inside spex's
// parallel loops its tiles run on the calling thread (parallel_for does not nest).
//
// Engines: Eigen's own GEMM always works (header-only use, nothing to link). A build may add a
// CBLAS (OpenBLAS or BLIS, their OpenMP builds) and libxsmm; CMake's SPEX_GEMM option picks
// them and defines SPEX_GEMM_CBLAS / SPEX_GEMM_XSMM for spex and its consumers
// (cmake/spexGemm.cmake). Which engine serves which shape is `gemm_engine_for`, chosen by
// measurement (docs/api.md, "GEMM engines").
//
// Determinism: gemm() splits C into fixed tiles that run in parallel_for, each tile one
// single-threaded engine call. Eigen's and the BLAS libraries' own threading choose their
// blocking from the thread count, which changes results in the last bits; fixed tiles make
// every product independent of OMP_NUM_THREADS (training runs are bit-identical with 1, 2
// or 3 threads). Inside a parallel region the OpenMP builds of OpenBLAS and BLIS run on the
// calling thread, so spex's pool is the only one (DESIGN.md, Threading).
#include <algorithm>
#include <climits>
#include <cstddef>
#include <string>

#include <Eigen/Core>

#include "check.hpp"
#include "parallel.hpp"
#include "types.hpp"

#if defined(SPEX_GEMM_CBLAS)
#include <cblas.h>  // OpenBLAS's or BLIS's (cmake/spexGemm.cmake sets the include path)
#endif
#if defined(SPEX_GEMM_XSMM)
#include <libxsmm.h>
#endif

namespace spex {

/// The GEMM implementations spex can call.
enum class GemmEngine { eigen, cblas, xsmm };

/// "eigen", or the CBLAS this build links ("openblas", "blis"), or "libxsmm".
inline const char* gemm_engine_name(GemmEngine e) {
  switch (e) {
    case GemmEngine::cblas:
#if defined(SPEX_GEMM_CBLAS_NAME)
      return SPEX_GEMM_CBLAS_NAME;
#else
      return "cblas";
#endif
    case GemmEngine::xsmm: return "libxsmm";
    case GemmEngine::eigen: break;
  }
  return "eigen";
}

/// Whether this build can call engine `e`.
constexpr bool gemm_engine_available(GemmEngine e) {
#if defined(SPEX_GEMM_CBLAS)
  if (e == GemmEngine::cblas) return true;
#endif
#if defined(SPEX_GEMM_XSMM)
  if (e == GemmEngine::xsmm) return true;
#endif
  return e == GemmEngine::eigen;
}

/// What a CBLAS engine call would run on this CPU: "SkylakeX", "Haswell", ... for OpenBLAS
/// (its kernel family, picked at load time from the CPU or OPENBLAS_CORETYPE), "" otherwise.
inline const char* gemm_cblas_kernel() {
#if defined(SPEX_GEMM_OPENBLAS)
  return openblas_get_corename();
#else
  return "";
#endif
}

/// Whether the CBLAS serves the large products. Eigen is compiled into the caller with its ISA:
/// where that has AVX-512 and OpenBLAS picked a family without AVX-512 kernels (a CPU newer
/// than the OpenBLAS release: Debian's 0.3.21 picks Haswell's AVX2 kernels on Zen 5 and
/// Prescott's SSE3 ones on an Intel Xeon of model 207), Eigen is faster (docs/api.md, "GEMM
/// engines") and serves them; set OPENBLAS_CORETYPE=SkylakeX there to get OpenBLAS's
/// AVX-512 kernels, faster than both. Decided once per process from the CPU and environment,
/// never from timings, so a process's results are reproducible.
inline bool gemm_cblas_serves_large() {
#if defined(SPEX_GEMM_OPENBLAS) && defined(__AVX512F__)
  static const bool avx512_kernels = [] {
    const std::string core = gemm_cblas_kernel();
    return core == "SkylakeX" || core == "Cooperlake" || core == "SapphireRapids";
  }();
  return avx512_kernels;
#else
  return gemm_engine_available(GemmEngine::cblas);
#endif
}

/// The engine for the products neither thin nor libxsmm's: the CBLAS when it serves large
/// products, Eigen otherwise.
inline GemmEngine gemm_engine_for_large() {
  return gemm_cblas_serves_large() ? GemmEngine::cblas : GemmEngine::eigen;
}

/// The most memory B's rows may span (k rows of its row stride, in bytes) for libxsmm to serve
/// the product. Its kernels do not block k, so B is read from the core's caches on every pass
/// over A's rows: one thread measured 170 GFLOP/s at k x n = 2048 x 128 (1 MiB of floats) and
/// 77-100 at 2048 x 256 or 1024 x 512, where OpenBLAS kept 144-148; and 128 columns of a B with
/// rows of 512 (the column tiles of a wider product) ran at half OpenBLAS's rate (docs/api.md,
/// "GEMM engines").
constexpr std::size_t kXsmmMaxBBytes = std::size_t(1) << 20;

/// The engine for one product of C (m x n) = op(A) (m x k) op(B), A and B used transposed or
/// not, of elements of `element_bytes` bytes, B's rows `b_stride` elements apart (0: n): the
/// shape classes of the table measured in docs/api.md, "GEMM engines".
///  - thin (a token or two, or up to 8 rows against a transposed B): Eigen's GEMV-like path;
///  - B not transposed, up to 512 columns, its rows spanning at most kXsmmMaxBBytes (backward
///    products, the experts' weight gradients), unless A is transposed over a long k (a Linear's
///    weight gradient over a whole batch): libxsmm's JIT kernels;
///  - everything else: gemm_engine_for_large().
inline GemmEngine gemm_engine_for(Index m, Index n, Index k, bool a_transposed, bool b_transposed,
                                  std::size_t element_bytes = sizeof(float), Index b_stride = 0) {
  if (m <= 2 || (m <= 8 && b_transposed)) return GemmEngine::eigen;
  const double b_span = double(k) * double(std::max(n, b_stride)) * double(element_bytes);
  const bool b_fits = b_span <= double(kXsmmMaxBBytes);
  if (gemm_engine_available(GemmEngine::xsmm) && !b_transposed && n <= 512 && b_fits && !(a_transposed && k > 256))
    return GemmEngine::xsmm;
  return gemm_engine_for_large();
}

namespace detail {

/// A GEMM operand as the engines see it: a row-major `rows x cols` matrix at `data` with
/// `stride` elements between rows, used as is or `transposed`.
template <class T>
struct GemmOperand {
  const T* data;
  Index rows, cols, stride;
  bool transposed;

  Index op_rows() const { return transposed ? cols : rows; }
  Index op_cols() const { return transposed ? rows : cols; }
  /// Rows r0 .. r0 + count of the operand (as used, after the transpose).
  GemmOperand middle_rows(Index r0, Index count) const {
    if (transposed) return {data + r0, rows, count, stride, true};
    return {data + r0 * stride, count, cols, stride, false};
  }
  /// Columns c0 .. c0 + count of the operand (as used).
  GemmOperand middle_cols(Index c0, Index count) const {
    if (transposed) return {data + c0 * stride, count, cols, stride, true};
    return {data + c0, rows, count, stride, false};
  }
};

/// The operand view of an Eigen expression with direct access: a row-major matrix, a block or
/// map of one, or the transpose of any of these (a column-major view is the transpose of a
/// row-major one).
template <class E>
GemmOperand<typename E::Scalar> gemm_operand(const Eigen::MatrixBase<E>& expr) {
  static_assert(bool(Eigen::internal::traits<E>::Flags & Eigen::DirectAccessBit),
                "gemm operands must be matrices, maps, blocks or their transposes");
  const E& m = expr.derived();
  SPEX_CHECK(m.innerStride() == 1 || (E::IsRowMajor ? m.cols() : m.rows()) <= 1,
             "gemm: an operand's rows (or columns, transposed) must be contiguous");
  if (E::IsRowMajor) return {m.data(), m.rows(), m.cols(), std::max<Index>(m.outerStride(), m.cols()), false};
  return {m.data(), m.cols(), m.rows(), std::max<Index>(m.outerStride(), m.rows()), true};
}

template <class T>
void eigen_gemm(const GemmOperand<T>& a, const GemmOperand<T>& b, T* c, Index ldc, Index m, Index n, bool accumulate) {
  using Stride = Eigen::OuterStride<>;
  using CMap = Eigen::Map<const RowMat<T>, 0, Stride>;
  const CMap am(a.data, a.rows, a.cols, Stride(a.stride)), bm(b.data, b.rows, b.cols, Stride(b.stride));
  Eigen::Map<RowMat<T>, 0, Stride> cm(c, m, n, Stride(ldc));
  auto run = [&](const auto& lhs, const auto& rhs) {
    if (accumulate)
      cm.noalias() += lhs * rhs;
    else
      cm.noalias() = lhs * rhs;
  };
  if (a.transposed && b.transposed)
    run(am.transpose(), bm.transpose());
  else if (a.transposed)
    run(am.transpose(), bm);
  else if (b.transposed)
    run(am, bm.transpose());
  else
    run(am, bm);
}

/// Makes an engine call on this thread run on this thread only. Outside a parallel region the
/// OpenMP build of OpenBLAS threads every call over omp_get_max_threads(), and so does Eigen's
/// GEMM (unless Eigen::setNbThreads was called); their splits change the last bits with the
/// thread count. The calling thread's OpenMP setting is lowered to 1 for the call and restored
/// after. (Inside spex's parallel regions they run serially anyway.)
class SerialEngineCall {
 public:
  SerialEngineCall() {
#if defined(_OPENMP)
    if (!omp_in_parallel() && saved_ > 1) omp_set_num_threads(1);
#endif
  }
  ~SerialEngineCall() {
#if defined(_OPENMP)
    if (!omp_in_parallel() && saved_ > 1) omp_set_num_threads(saved_);
#endif
  }
  SerialEngineCall(const SerialEngineCall&) = delete;
  SerialEngineCall& operator=(const SerialEngineCall&) = delete;

 private:
  int saved_ = max_threads();
};

#if defined(SPEX_GEMM_CBLAS)
inline void cblas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const float* a, int lda,
                       const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, 1.f, a, lda, b, ldb, beta, c, ldc);
}
inline void cblas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const double* a, int lda,
                       const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}
#endif

#if defined(SPEX_GEMM_XSMM)
inline libxsmm_smmfunction xsmm_dispatch(const float*, libxsmm_blasint m, libxsmm_blasint n, libxsmm_blasint k,
                                         const libxsmm_blasint* ld, const float* alpha, const float* beta,
                                         const int* flags) {
  return libxsmm_smmdispatch(m, n, k, ld, ld + 1, ld + 2, alpha, beta, flags, nullptr);
}
inline libxsmm_dmmfunction xsmm_dispatch(const double*, libxsmm_blasint m, libxsmm_blasint n, libxsmm_blasint k,
                                         const libxsmm_blasint* ld, const double* alpha, const double* beta,
                                         const int* flags) {
  return libxsmm_dmmdispatch(m, n, k, ld, ld + 1, ld + 2, alpha, beta, flags, nullptr);
}

/// libxsmm is column-major: the row-major C = A B is the column-major Cᵀ = Bᵀ Aᵀ, which reads
/// the same memory with the operands swapped. Returns false when libxsmm has no kernel.
template <class T>
bool xsmm_gemm(const GemmOperand<T>& a, const GemmOperand<T>& b, T* c, libxsmm_blasint ldc, libxsmm_blasint m,
               libxsmm_blasint n, libxsmm_blasint k, bool accumulate) {
  const int flags = (b.transposed ? LIBXSMM_GEMM_FLAG_TRANS_A : 0) | (a.transposed ? LIBXSMM_GEMM_FLAG_TRANS_B : 0);
  const T alpha = T(1), beta = accumulate ? T(1) : T(0);
  // The callers checked that every size and stride fits libxsmm_blasint.
  const libxsmm_blasint ld[3] = {static_cast<libxsmm_blasint>(b.stride), static_cast<libxsmm_blasint>(a.stride), ldc};
  const auto kernel = xsmm_dispatch(c, n, m, k, ld, &alpha, &beta, &flags);
  if (!kernel) return false;
  kernel(b.data, a.data, c);
  return true;
}
#endif

/// C (m x n, row stride ldc) = or += A B on the calling thread, on engine `engine` when this
/// build has it and the sizes fit its integer type, on Eigen otherwise.
template <class T>
void gemm_block(GemmEngine engine, const GemmOperand<T>& a, const GemmOperand<T>& b, T* c, Index ldc, Index m,
                Index n, bool accumulate) {
  const Index k = a.op_cols();
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (Index r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, T(0));
    return;
  }
  const bool fits_int = std::max({m, n, k, a.stride, b.stride, ldc}) <= Index(INT_MAX);
  const SerialEngineCall serial;
  (void)fits_int;
#if defined(SPEX_GEMM_XSMM)
  if (engine == GemmEngine::xsmm && fits_int && xsmm_gemm(a, b, c, ldc, m, n, k, accumulate)) return;
  if (engine == GemmEngine::xsmm) engine = gemm_engine_for_large();  // no kernel: the rule for the rest
#endif
#if defined(SPEX_GEMM_CBLAS)
  if (engine == GemmEngine::cblas && fits_int) {
    cblas_gemm(a.transposed ? CblasTrans : CblasNoTrans, b.transposed ? CblasTrans : CblasNoTrans, int(m), int(n),
               int(k), a.data, int(a.stride), b.data, int(b.stride), accumulate ? T(1) : T(0), c, int(ldc));
    return;
  }
#endif
  (void)engine;
  eigen_gemm(a, b, c, ldc, m, n, accumulate);
}

/// Whether two operands' memory ranges (first to last element, strides included) intersect.
template <class T>
bool operands_overlap(const GemmOperand<T>& x, const GemmOperand<T>& y) {
  if (x.rows == 0 || x.cols == 0 || y.rows == 0 || y.cols == 0) return false;
  const T* x_end = x.data + (x.rows - 1) * x.stride + x.cols;
  const T* y_end = y.data + (y.rows - 1) * y.stride + y.cols;
  return x.data < y_end && y.data < x_end;
}

template <class MC, class MA, class MB>
void check_gemm_shapes(const MC& c, const MA& a, const MB& b) {
  SPEX_CHECK(a.cols() == b.rows() && c.rows() == a.rows() && c.cols() == b.cols(),
             "gemm: C (" << c.rows() << " x " << c.cols() << ") = A (" << a.rows() << " x " << a.cols() << ") B ("
                         << b.rows() << " x " << b.cols() << "): shapes do not match");
}

}  // namespace detail

/// gemm() splits C into tiles of at most this many rows and columns, one task each. Fixed
/// sizes (never the thread count) keep results independent of the threads; 256 x 512 tiles
/// keep a CBLAS near its single-core peak (64-row blocks lost 20%: docs/api.md, "GEMM engines").
constexpr Index kGemmTileRows = 256;
constexpr Index kGemmTileCols = 512;
/// A product of at least kGemmSplitWork multiply-adds that would make fewer than kGemmMinTiles
/// tiles gets narrower ones (gemm_tiles), so that its work spreads over the threads: a batch's
/// input gradient dy W (256 x 512 over k = 2048) was one tile, one thread's work.
constexpr Index kGemmMinTiles = 4;
constexpr double kGemmSplitWork = double(Index(1) << 27);

/// Rows and columns of gemm()'s tiles.
struct GemmTiles {
  Index rows, cols;
};

/// The tiles gemm() splits an m x n C over k into: kGemmTileRows x kGemmTileCols, or for a
/// large product with fewer than kGemmMinTiles of those, columns halved down to 128, then rows
/// down to 64 (one thread measured 256 x 256 tiles at 96% of a 256 x 512 tile's rate, 256 x 128
/// at 92%, 128 x 512 at 88%). The shape alone decides, so results stay independent of threads.
inline GemmTiles gemm_tiles(Index m, Index n, Index k) {
  GemmTiles t{kGemmTileRows, kGemmTileCols};
  if (double(m) * double(n) * double(k) < kGemmSplitWork) return t;
  const auto count = [&] { return ((m + t.rows - 1) / t.rows) * ((n + t.cols - 1) / t.cols); };
  while (count() < kGemmMinTiles && t.cols > 128 && n > t.cols / 2) t.cols /= 2;
  while (count() < kGemmMinTiles && t.rows > 64 && m > t.rows / 2) t.rows /= 2;
  return t;
}

/// C = A * B (accumulate: C += A * B), tiles of C over spex's threads, each tile one
/// single-threaded engine call. A is m x k, B is k x n, C is m x n; each a row-major matrix,
/// map or block, or a transpose of one. C must not share memory with A or B (a spex::Error:
/// the tiles would read what others wrote). Thread safety: spex calls it
/// from its OpenMP threads (each with its own C), as the OpenMP builds of OpenBLAS and BLIS
/// support; calls from threads of your own rely on the engine library's own thread safety.
template <class MC, class MA, class MB>
void gemm(MC&& c, const MA& a, const MB& b, bool accumulate) {
  detail::check_gemm_shapes(c, a, b);
  static_assert(std::decay_t<MC>::IsRowMajor, "gemm writes a row-major C");
  const auto ao = detail::gemm_operand(a);
  const auto bo = detail::gemm_operand(b);
  const Index m = c.rows(), n = c.cols(), k = ao.op_cols(), ldc = std::max<Index>(c.outerStride(), n);
  auto* cd = c.data();
  const detail::GemmOperand<std::remove_const_t<std::remove_reference_t<decltype(*cd)>>> co{cd, m, n, ldc, false};
  SPEX_CHECK(!detail::operands_overlap(co, ao) && !detail::operands_overlap(co, bo),
             "gemm: C shares memory with " << (detail::operands_overlap(co, ao) ? "A" : "B")
                                           << "; C must not alias A or B (write into another matrix)");
  const GemmTiles tiles = gemm_tiles(m, n, k);
  const Index row_tiles = (m + tiles.rows - 1) / tiles.rows;
  const Index col_tiles = (n + tiles.cols - 1) / tiles.cols;
  parallel_for(row_tiles * col_tiles, [&](Index tile, int) {
    const Index r0 = (tile / col_tiles) * tiles.rows, c0 = (tile % col_tiles) * tiles.cols;
    const Index rows = std::min(tiles.rows, m - r0), cols = std::min(tiles.cols, n - c0);
    detail::gemm_block(gemm_engine_for(rows, cols, k, ao.transposed, bo.transposed, sizeof(*cd), bo.stride),
                       ao.middle_rows(r0, rows), bo.middle_cols(c0, cols), cd + r0 * ldc + c0, ldc, rows, cols,
                       accumulate);
  });
}

}  // namespace spex
