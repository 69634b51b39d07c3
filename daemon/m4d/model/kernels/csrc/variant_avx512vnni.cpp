// The avx512vnni variant: kernels_impl.h over simd_avx512.h, compiled with this variant's own flags
// (m4d/model/kernels/__init__.py: VARIANTS).
#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__FMA__)
#error "variant_avx512vnni.cpp needs its own compiler flags (see VARIANTS in __init__.py)"
#endif

#include "simd_avx512.h"
#include "kernels_impl.h"

namespace m4 {
const Variant& variant_avx512vnni() { return make_variant<Avx512Vnni>(); }
}  // namespace m4
