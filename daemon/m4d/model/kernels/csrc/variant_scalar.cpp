// The scalar variant: kernels_impl.h over simd_scalar.h, compiled with this variant's own flags
// (m4d/model/kernels/__init__.py: VARIANTS).
#include "simd_scalar.h"
#include "kernels_impl.h"

namespace m4 {
const Variant& variant_scalar() { return make_variant<Scalar>(); }
}  // namespace m4
