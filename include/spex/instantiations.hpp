#pragma once
// Explicit instantiations of spex's class templates for float and double (default Arch, Local
// dispatch), to cut the compile time of programs that include spex in many translation units.
//
// A program that uses them compiles spex's instantiation unit once (src/instantiations.cpp;
// with CMake: spex_instantiate(<target> [float] [double]), which adds it and defines
// SPEX_EXTERN_FLOAT and / or SPEX_EXTERN_DOUBLE; SPEX_EXTERN_TEMPLATES means both), and
// every other translation unit then only declares these classes (`extern template`), instead of
// compiling every layer and the Eigen products inside it again (docs/install.md, "Compile time"
// has the measurements). The unit is compiled with the program's own flags: its default_arch is
// the program's. Without those macros this header declares nothing.
#include "spex.hpp"

#define SPEX_INSTANTIATIONS_OF(kw, T)                                                                             \
  kw template class spex::Table<T>;                                                                               \
  kw template class spex::SparseRowGrad<T>;                                                                       \
  kw template class spex::Linear<T>;                                                                              \
  kw template class spex::Norm<T>;                                                                                \
  kw template class spex::ProductKeys<T>;                                                                         \
  kw template class spex::ExhaustiveTopK<T>;                                                                      \
  kw template class spex::KeyRetrieval<T>;                                                                        \
  kw template class spex::NeuronExperts<T>;                                                                       \
  kw template class spex::ValueExperts<T>;                                                                        \
  kw template class spex::FfnExperts<T>;                                                                          \
  kw template class spex::detail::ProductKeyLayer<T, spex::default_arch, spex::Peer<T>, spex::NeuronExperts<T>, spex::Local>; \
  kw template class spex::detail::ProductKeyLayer<T, spex::default_arch, spex::Pkm<T>, spex::ValueExperts<T>, spex::Local>;   \
  kw template class spex::Peer<T>;                                                                                \
  kw template class spex::Pkm<T>;                                                                                 \
  kw template class spex::ReluRouter<T>;                                                                          \
  kw template class spex::TopKRouter<T>;                                                                          \
  kw template class spex::MoE<T, spex::ReluRouter<T>>;                                                            \
  kw template class spex::MoE<T, spex::TopKRouter<T>>;                                                            \
  kw template class spex::Adam<T>;                                                                                \
  kw template class spex::Sgd<T>;

#if defined(SPEX_EXTERN_TEMPLATES)
#define SPEX_EXTERN_FLOAT 1
#define SPEX_EXTERN_DOUBLE 1
#endif

// The unit defines (kw empty) what every other translation unit declares (kw extern).
#if defined(SPEX_EXTERN_FLOAT)
#define SPEX_INSTANTIATIONS_FLOAT(kw) SPEX_INSTANTIATIONS_OF(kw, float)
#else
#define SPEX_INSTANTIATIONS_FLOAT(kw)
#endif
#if defined(SPEX_EXTERN_DOUBLE)
#define SPEX_INSTANTIATIONS_DOUBLE(kw) SPEX_INSTANTIATIONS_OF(kw, double)
#else
#define SPEX_INSTANTIATIONS_DOUBLE(kw)
#endif
#define SPEX_INSTANTIATIONS(kw) SPEX_INSTANTIATIONS_FLOAT(kw) SPEX_INSTANTIATIONS_DOUBLE(kw)

#if !defined(SPEX_INSTANTIATION_UNIT)
SPEX_INSTANTIATIONS(extern)
#endif
