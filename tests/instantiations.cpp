// The one place the tests' class templates are instantiated (instantiations.hpp says why).
#define SPEX_TEST_INSTANTIATION_UNIT
#include "instantiations.hpp"

SPEX_TEST_INSTANTIATIONS()
