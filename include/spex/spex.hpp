#pragma once
// Umbrella header: everything public in spex.
#include "core/check.hpp"
#include "core/parallel.hpp"
#include "core/random.hpp"
#include "core/types.hpp"
#include "kernels/activation.hpp"
#include "kernels/gather.hpp"
#include "kernels/product_topk.hpp"
#include "kernels/topk.hpp"
#include "kernels/vector.hpp"
#include "select/exhaustive.hpp"
#include "select/product_keys.hpp"
