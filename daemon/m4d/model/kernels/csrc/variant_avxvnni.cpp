// The avxvnni variant: kernels_impl.h over simd_avx2.h, compiled with this variant's own flags
// (m4d/model/kernels/__init__.py: VARIANTS).
#if !defined(__AVXVNNI__) || !defined(__AVX2__) || !defined(__FMA__)
#error "variant_avxvnni.cpp needs its own compiler flags (see VARIANTS in __init__.py)"
#endif

#include "simd_avx2.h"
#include "kernels_impl.h"

namespace m4 {
const Variant& variant_avxvnni() { return make_variant<Avx2>(); }
}  // namespace m4
