# The GEMM engines behind core/gemm.hpp, for spex's own build and for the installed package
# (spexConfig.cmake finds the same engines again). Defines the imported target
# spex::gemm_engine: include directories, libraries and the SPEX_GEMM_* definitions.
#
#   spex_find_gemm_engine(<engine> <xsmm> [OPTIONAL])
#     engine: auto (OpenBLAS, else BLIS, else Eigen), eigen, openblas, blis
#     xsmm:   AUTO (libxsmm for small products when found), ON, OFF
#   Sets SPEX_GEMM_ENGINE (eigen, openblas, blis) and SPEX_GEMM_WITH_XSMM (ON/OFF) in the caller.
#   An engine asked for by name (or xsmm ON) that is missing stops the configuration, unless
#   OPTIONAL (the installed package's `engines` component): then the caller compares.
#
# Only the OpenMP builds of OpenBLAS and BLIS are used (Debian's libopenblas-openmp-dev,
# libblis-openmp-dev): inside spex's OpenMP loops they run on the calling thread, where the
# pthread builds would start a second pool of threads.

function(spex_find_gemm_engine engine xsmm)
  set(optional OFF)
  if(ARGV2 STREQUAL "OPTIONAL")
    set(optional ON)
  endif()
  set(arch_dir "${CMAKE_LIBRARY_ARCHITECTURE}")
  set(defs "")
  set(incs "")
  set(libs "")
  set(found_engine eigen)

  foreach(candidate openblas blis)
    if(found_engine STREQUAL "eigen" AND (engine STREQUAL candidate OR engine STREQUAL "auto"))
      find_path(SPEX_${candidate}_INCLUDE_DIR cblas.h
        PATHS /usr/include/${arch_dir}/${candidate}-openmp NO_DEFAULT_PATH)
      find_library(SPEX_${candidate}_LIBRARY ${candidate}
        PATHS /usr/lib/${arch_dir}/${candidate}-openmp NO_DEFAULT_PATH)
      if(SPEX_${candidate}_INCLUDE_DIR AND SPEX_${candidate}_LIBRARY)
        set(found_engine ${candidate})
        list(APPEND incs "${SPEX_${candidate}_INCLUDE_DIR}")
        list(APPEND libs "${SPEX_${candidate}_LIBRARY}")
        string(TOUPPER ${candidate} upper)
        list(APPEND defs SPEX_GEMM_CBLAS SPEX_GEMM_${upper} "SPEX_GEMM_CBLAS_NAME=\"${candidate}\"")
      elseif(engine STREQUAL candidate AND NOT optional)
        message(FATAL_ERROR "spex: SPEX_GEMM=${candidate} but the OpenMP build of ${candidate} was not found "
                            "(install lib${candidate}-openmp-dev)")
      endif()
    endif()
  endforeach()
  if(NOT engine MATCHES "^(auto|eigen|openblas|blis)$")
    message(FATAL_ERROR "spex: SPEX_GEMM=${engine}: expected auto, eigen, openblas or blis")
  endif()

  set(with_xsmm OFF)
  if(NOT xsmm STREQUAL "OFF")
    find_path(SPEX_XSMM_INCLUDE_DIR libxsmm.h)
    find_library(SPEX_XSMM_LIBRARY xsmm)
    find_library(SPEX_XSMM_NOBLAS_LIBRARY xsmmnoblas)
    if(SPEX_XSMM_INCLUDE_DIR AND SPEX_XSMM_LIBRARY AND SPEX_XSMM_NOBLAS_LIBRARY)
      set(with_xsmm ON)
      list(APPEND incs "${SPEX_XSMM_INCLUDE_DIR}")
      # libxsmm's own BLAS fallback resolves against the CBLAS library; without one, against
      # its stub library (spex never asks libxsmm for a product it has no kernel for).
      list(PREPEND libs "${SPEX_XSMM_LIBRARY}")
      if(found_engine STREQUAL "eigen")
        list(APPEND libs "${SPEX_XSMM_NOBLAS_LIBRARY}")
      endif()
      list(APPEND libs Threads::Threads ${CMAKE_DL_LIBS} rt m)
      list(APPEND defs SPEX_GEMM_XSMM)
    elseif(xsmm STREQUAL "ON" AND NOT optional)
      message(FATAL_ERROR "spex: SPEX_GEMM_XSMM=ON but libxsmm was not found (install libxsmm-dev)")
    endif()
  endif()
  if(with_xsmm)
    find_package(Threads REQUIRED)
  endif()

  if(NOT TARGET spex::gemm_engine)
    add_library(spex::gemm_engine INTERFACE IMPORTED GLOBAL)
  endif()
  set_target_properties(spex::gemm_engine PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${incs}"
    INTERFACE_LINK_LIBRARIES "${libs}"
    INTERFACE_COMPILE_DEFINITIONS "${defs}")
  set(SPEX_GEMM_ENGINE ${found_engine} PARENT_SCOPE)
  set(SPEX_GEMM_WITH_XSMM ${with_xsmm} PARENT_SCOPE)
endfunction()
