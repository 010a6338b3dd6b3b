#pragma once
// The class templates the layer and io tests use, instantiated once (instantiations.cpp) and
// declared extern in every test file (CMake force-includes this header): without it each test
// file compiled its own copy of every layer, and the Eigen products inside them, which made up
// most of the suite's build time (test_peer.cpp under ASan/UBSan: 85 s alone, 25 s with it).
#include <spex/spex.hpp>

#define SPEX_TEST_INSTANTIATIONS_OF(kw, T)                                                                   \
  kw template class spex::Table<T>;                                                                          \
  kw template class spex::SparseRowGrad<T>;                                                                  \
  kw template class spex::Linear<T>;                                                                         \
  kw template class spex::Norm<T>;                                                                           \
  kw template class spex::ProductKeys<T>;                                                                    \
  kw template class spex::ExhaustiveTopK<T>;                                                                 \
  kw template class spex::KeyRetrieval<T>;                                                                   \
  kw template class spex::NeuronExperts<T>;                                                                  \
  kw template class spex::ValueExperts<T>;                                                                   \
  kw template class spex::FfnExperts<T>;                                                                     \
  kw template class spex::detail::ProductKeyLayer<T, spex::default_arch, spex::Peer<T>, spex::NeuronExperts<T>, spex::Local>; \
  kw template class spex::detail::ProductKeyLayer<T, spex::default_arch, spex::Pkm<T>, spex::ValueExperts<T>, spex::Local>; \
  kw template class spex::Peer<T>;                                                                           \
  kw template class spex::Pkm<T>;                                                                            \
  kw template class spex::ReluRouter<T>;                                                                     \
  kw template class spex::TopKRouter<T>;                                                                     \
  kw template class spex::MoE<T, spex::ReluRouter<T>>;                                                       \
  kw template class spex::MoE<T, spex::TopKRouter<T>>;                                                       \
  kw template class spex::Adam<T>;                                                                           \
  kw template class spex::Sgd<T>;

#define SPEX_TEST_INSTANTIATIONS(kw)      \
  SPEX_TEST_INSTANTIATIONS_OF(kw, float)  \
  SPEX_TEST_INSTANTIATIONS_OF(kw, double)

#ifndef SPEX_TEST_INSTANTIATION_UNIT
SPEX_TEST_INSTANTIATIONS(extern)
#endif
