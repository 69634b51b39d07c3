// The neon_i8mm variant: kernels_impl.h over simd_neon.h's NeonI8mm (two rows per smmla),
// compiled with this variant's own flags (m4d/model/kernels/__init__.py: VARIANTS).
#if !defined(__ARM_FEATURE_MATMUL_INT8) || !defined(__ARM_FEATURE_DOTPROD)
#error "variant_neon_i8mm.cpp needs its own compiler flags (see VARIANTS in __init__.py)"
#endif

#include "simd_neon.h"
#include "kernels_impl.h"

namespace m4 {
const Variant& variant_neon_i8mm() { return make_variant<NeonI8mm>(); }
}  // namespace m4
