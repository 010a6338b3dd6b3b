#pragma once
// The tests use the library's instantiation unit (include/spex/instantiations.hpp): it is compiled
// once (spex_test_instantiations) and every test file declares the classes extern (CMake
// force-includes this header and defines SPEX_EXTERN_TEMPLATES). Without it each test file
// compiled its own copy of every layer and the Eigen products inside them, which made up most of
// the suite's build time (test_peer.cpp under ASan/UBSan: 85 s alone, 25 s with it).
#include <spex/instantiations.hpp>
