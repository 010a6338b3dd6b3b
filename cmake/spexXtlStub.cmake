# Debian's xsimd 8.1 exports its target with INTERFACE_LINK_LIBRARIES "xtl", but xtl is not
# installed and xsimdConfig.cmake does not look for it: linking xsimd then fails with
# "cannot find -lxtl". xsimd needs nothing from xtl, so an empty target stands in for it.
if(TARGET xsimd AND NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
