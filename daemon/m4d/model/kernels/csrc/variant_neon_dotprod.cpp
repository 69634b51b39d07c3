// The neon_dotprod variant: kernels_impl.h over simd_neon.h, compiled with this variant's own flags
// (m4d/model/kernels/__init__.py: VARIANTS).
#if !defined(__ARM_FEATURE_DOTPROD)
#error "variant_neon_dotprod.cpp needs its own compiler flags (see VARIANTS in __init__.py)"
#endif

#include "simd_neon.h"
#include "kernels_impl.h"

namespace m4 {
const Variant& variant_neon_dotprod() { return make_variant<NeonDotprod>(); }
}  // namespace m4
