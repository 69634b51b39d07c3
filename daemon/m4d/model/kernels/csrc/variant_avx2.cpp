// The avx2 variant: kernels_impl.h over simd_avx2.h, compiled with this variant's own flags
// (m4d/model/kernels/__init__.py: VARIANTS).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "variant_avx2.cpp needs its own compiler flags (see VARIANTS in __init__.py)"
#endif

#include "simd_avx2.h"
#include "kernels_impl.h"

namespace m4 {
const Variant& variant_avx2() { return make_variant<Avx2>(); }
}  // namespace m4
