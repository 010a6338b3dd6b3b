#pragma once
// The one vocabulary every layer speaks (Peer, Pkm, MoE), as a compile-time check:
// spex::is_layer_v<L>. A user's own block can be checked the same way before it is mixed with
// spex's in generic training code.
//
//   L::Scalar, L::Config, L::Cache, L::Grads
//   L(const Config&, std::uint64_t seed)
//   config(), d_in(), d_out(), n_experts(), make_grads()                   const
//   forward(x, y, cache)                     training (may update layer state)
//   infer(x, y, cache), infer(x, y)          const, thread-safe with one cache per thread
//   backward(dy, dx, cache, grads)           const; grads accumulate, dx is assigned
//   backward(dy, cache, grads)               const; without the input gradient
//   parameters(grads, prefix) -> ParameterList<T>        values + gradients, for optimizers
//   parameters(prefix)        -> ParameterList<T>        values, for loading
//   parameters(prefix) const  -> ParameterList<const T>  values, for saving
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "../core/parameter.hpp"
#include "../core/types.hpp"

namespace spex {

namespace detail {
template <class L, class T = typename L::Scalar>
using layer_api = std::void_t<
    typename L::Config, typename L::Cache, typename L::Grads,
    decltype(L(std::declval<const typename L::Config&>(), std::uint64_t(0))),
    std::enable_if_t<std::is_same<decltype(std::declval<const L&>().config()), const typename L::Config&>::value>,
    std::enable_if_t<std::is_same<decltype(std::declval<const L&>().d_in()), Index>::value>,
    std::enable_if_t<std::is_same<decltype(std::declval<const L&>().d_out()), Index>::value>,
    std::enable_if_t<std::is_same<decltype(std::declval<const L&>().n_experts()), Index>::value>,
    std::enable_if_t<std::is_same<decltype(std::declval<const L&>().make_grads()), typename L::Grads>::value>,
    decltype(std::declval<L&>().forward(std::declval<CMatRef<T>>(), std::declval<MatRef<T>>(),
                                        std::declval<typename L::Cache&>())),
    decltype(std::declval<const L&>().infer(std::declval<CMatRef<T>>(), std::declval<MatRef<T>>(),
                                            std::declval<typename L::Cache&>())),
    decltype(std::declval<const L&>().infer(std::declval<CMatRef<T>>(), std::declval<MatRef<T>>())),
    decltype(std::declval<const L&>().backward(std::declval<CMatRef<T>>(), std::declval<MatRef<T>>(),
                                               std::declval<typename L::Cache&>(), std::declval<typename L::Grads&>())),
    decltype(std::declval<const L&>().backward(std::declval<CMatRef<T>>(), std::declval<typename L::Cache&>(),
                                               std::declval<typename L::Grads&>())),
    std::enable_if_t<std::is_same<decltype(std::declval<L&>().parameters(std::declval<typename L::Grads&>(), std::string())),
                                  ParameterList<T>>::value>,
    std::enable_if_t<std::is_same<decltype(std::declval<L&>().parameters(std::string())), ParameterList<T>>::value>,
    std::enable_if_t<std::is_same<decltype(std::declval<const L&>().parameters(std::string())),
                                  ParameterList<const T>>::value>>;
}  // namespace detail

template <class L, class = void>
struct is_layer : std::false_type {};
template <class L>
struct is_layer<L, detail::layer_api<L>> : std::true_type {};

/// Whether L has the layer vocabulary above.
template <class L>
constexpr bool is_layer_v = is_layer<L>::value;

}  // namespace spex
