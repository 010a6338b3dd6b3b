#pragma once
// Memory advice for the big tables. Expert rows are read in random order, one 2 KiB row at a
// time; with 4 KiB pages nearly every row costs a TLB miss. Asking Linux for transparent huge
// pages before the table is first touched made random-row gathers 10-20% faster here (THP in
// "madvise" mode, the Debian default). Elsewhere this is a no-op.
#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace spex {

/// Advises the kernel to back [p, p + bytes) with huge pages (the whole 2 MiB pages inside
/// it). Call before first touching the memory. Returns whether advice was given.
inline bool advise_huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

/// Drops this process's mapping of the whole pages inside [p, p + bytes) of a shared file
/// mapping (the page cache keeps the data; a later read maps it again): RSS falls once a loader
/// has copied a tensor out. Never call it on anonymous memory (it would zero it).
inline bool release_file_pages(const void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_DONTNEED)
  const std::uintptr_t page = std::uintptr_t(sysconf(_SC_PAGESIZE));
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(p) + page - 1) & ~(page - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(p) + bytes) & ~(page - 1);
  if (end <= begin) return false;
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

}  // namespace spex
