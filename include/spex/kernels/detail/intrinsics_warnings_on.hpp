// No include guard: closes the region intrinsics_warnings_off.hpp opened.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
