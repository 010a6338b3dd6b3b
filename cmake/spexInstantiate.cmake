# spex_instantiate(<target>): compiles spex's instantiation unit (instantiations.cpp: the layers,
# experts, routers and optimizers for float and double) into <target>, with <target>'s own flags,
# and defines SPEX_EXTERN_TEMPLATES for it, so that its other sources that include spex/spex.hpp
# only declare those classes instead of compiling them again (docs/install.md, "Compile time").
set_property(GLOBAL PROPERTY SPEX_INSTANTIATION_UNIT "${SPEX_INSTANTIATION_UNIT_PATH}")
function(spex_instantiate target)
  get_property(unit GLOBAL PROPERTY SPEX_INSTANTIATION_UNIT)
  target_sources(${target} PRIVATE "${unit}")
  target_compile_definitions(${target} PRIVATE SPEX_EXTERN_TEMPLATES=1)
endfunction()
