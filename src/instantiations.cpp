// spex's instantiation unit: every class template of include/spex/instantiations.hpp for float
// and / or double (SPEX_EXTERN_FLOAT, SPEX_EXTERN_DOUBLE; SPEX_EXTERN_TEMPLATES or none of them:
// both), compiled once with the program's flags (spex_instantiate() in CMake adds it).
#define SPEX_INSTANTIATION_UNIT
#if !defined(SPEX_EXTERN_FLOAT) && !defined(SPEX_EXTERN_DOUBLE) && !defined(SPEX_EXTERN_TEMPLATES)
#define SPEX_EXTERN_TEMPLATES 1
#endif
#include <spex/instantiations.hpp>

SPEX_INSTANTIATIONS()
