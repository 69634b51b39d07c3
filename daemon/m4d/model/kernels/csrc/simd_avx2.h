// SIMD primitives for the avx2 and avxvnni variants: 16 lanes as two ymm (lanes 0-7, 8-15),
// and the GEMM tiles 8 channels at a time (Avx2Half). avx2 is compiled with -mavx2 -mfma
// -mf16c; avxvnni adds -mavxvnni, which swaps the byte dot product (maddubs + madd) for
// vpdpbusd. Both give the same integer sums.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "variant.h"

namespace m4 {
namespace {  // internal linkage: see variant.h

// The GEMM tiles' backend: 8 channels (one ymm) at a time. With only 16 ymm registers, the
// accumulators of several rows over all 16 channels of a tile spill to the stack; the tile is
// run instead as two passes over its channels 0-7 and 8-15 (kernels_impl.h: HalfTiles), which
// changes no number: every channel's sums and scales are its own lanes.
struct Avx2Half {
#if defined(__AVXVNNI__)
  static constexpr const char* kName = "avxvnni";
  static constexpr bool kOffsetSigned = true;  // dot_s sums (q + 128) * x: callers correct
#else
  static constexpr const char* kName = "avx2";
  static constexpr bool kOffsetSigned = false;  // dot_s sums q * x (sign trick below)
#endif
  // rows per pass over a weight tile (measured on a Xeon with both: 2-6 rows; more rows
  // spill their accumulators, fewer unpack the weights for too few)
  static constexpr int kRows = 3;
#if !defined(__AVXVNNI__)
  static constexpr int kRowsQ4 = 4;  // nibbles: int16 sums, two registers per row
#endif

  using F = __m256;
  using I = __m256i;
  using W = __m256i;  // 32 weight bytes: 8 channels x 4

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static __m256i round_bf16(__m256 v) {  // nearest even, NaN stays NaN; bits in the low half
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded),
                                                   _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
    return _mm256_srli_epi32(rounded, 16);
  }
  static void store_bf16(uint16_t* p, F v) {
    const __m256i r = round_bf16(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }

  static I izero() { return _mm256_setzero_si256(); }
  static I iset1(int32_t v) { return _mm256_set1_epi32(v); }
  static F cvt_f(I a) { return _mm256_cvtepi32_ps(a); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I imul254(I a) { return _mm256_mullo_epi32(a, _mm256_set1_epi32(254)); }

  static W wload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static W nib_lo(W w) { return _mm256_and_si256(w, _mm256_set1_epi8(0x0F)); }
  static W nib_hi(W w) { return _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(0x0F)); }
  // w | 16 where group g's bit is set in this half's Q5 plane (variant.h: Q5_F16): bit g to bit 4
  static W add_bit4(W w, const uint8_t* plane, int g) {
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane));
    const __m256i at4 = g <= 4 ? _mm256_slli_epi16(p, 4 - g) : _mm256_srli_epi16(p, g - 4);
    return _mm256_or_si256(w, _mm256_and_si256(at4, _mm256_set1_epi8(0x10)));
  }
#if defined(__AVXVNNI__)
  // acc[j] += sum_t w[j][t] * x[t]: w unsigned bytes, x four int8 in one int32
  static I dot_u(I acc, W w, int32_t x) { return _mm256_dpbusd_avx_epi32(acc, w, _mm256_set1_epi32(x)); }
  static I dot_s(I acc, W w, int32_t x) { return dot_u(acc, w, x); }  // (q + 128) * x
#else
  // u8 * s8 pairs summed in int16 (no saturation: weights <= 127, |x| <= 127), then pairs
  static I dot_u(I acc, W w, int32_t x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(x)), _mm256_set1_epi16(1)));
  }
  // bytes q + 128 -> q, then |q| * (x with q's sign): the products stay within int16 pairs
  static I dot_s(I acc, W w, int32_t x) {
    const __m256i q = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(_mm256_set1_epi32(x), q)),
                                                   _mm256_set1_epi16(1)));
  }
  // Signed bytes times QuantView::wide (254*hi + lo, int16): both digits in one vpmaddwd.
  // WideW holds a group's 32 bytes (8 channels x 4 values) as int16: channels 0-3, then 4-7;
  // Wide the int32 pair sums per channel: [c0 t01, c0 t23, c1 t01, c1 t23 | c2 .. c3 ..].
  struct WideW { __m256i c03, c47; };
  struct Wide { __m256i c03, c47; };
  static Wide wide_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static WideW widen_signed(W w) {  // bytes q + 128 -> q
    const __m256i q = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
    return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1))};
  }
  static WideW widen_unsigned(W w) {
    return {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1))};
  }
  static Wide dot_wide(Wide acc, WideW w, const int16_t* x) {  // x: the group's 4 values
    int64_t four;
    std::memcpy(&four, x, sizeof four);
    const __m256i xb = _mm256_set1_epi64x(four);
    return {_mm256_add_epi32(acc.c03, _mm256_madd_epi16(w.c03, xb)), _mm256_add_epi32(acc.c47, _mm256_madd_epi16(w.c47, xb))};
  }
  static I wide_sums(Wide acc) {  // per channel 0..7, in order
    const __m256i pairs = _mm256_hadd_epi32(acc.c03, acc.c47);  // [c0 c1 c4 c5 | c2 c3 c6 c7]
    return _mm256_permute4x64_epi64(pairs, 0xD8);
  }
  // int16 partial sums (kernels_impl.h uses them for 4-bit weights, whose pairs stay small)
  using P = __m256i;
  static P pzero() { return _mm256_setzero_si256(); }
  static P dot_u16(P acc, W w, int32_t x) {  // acc (int16 pairs) += w[2i]*x + w[2i+1]*x'
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, _mm256_set1_epi32(x)));
  }
  // 254 * hi + lo from int16 pair sums, as int32 per 4 bytes (per channel): the weighting
  // rides on the widening multiply-add instead of a 32-bit multiply
  static I widen_digits(P hi, P lo) {
    return _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_set1_epi16(254)), _mm256_madd_epi16(lo, _mm256_set1_epi16(1)));
  }
#endif
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

struct Avx2 {
  static constexpr const char* kName = Avx2Half::kName;
  using Half = Avx2Half;                   // GEMM tiles run 8 channels at a time
  static constexpr int kAccumulators = 4;  // float vectors (8 ymm) attention keeps in registers

  struct F { __m256 lo, hi; };
  struct I { __m256i lo, hi; };

  static F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
  static F load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static F load_bf16(const uint16_t* p) { return {Avx2Half::load_bf16(p), Avx2Half::load_bf16(p + 8)}; }
  static F load_f16(const uint16_t* p) { return {Avx2Half::load_f16(p), Avx2Half::load_f16(p + 8)}; }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
  static void store_bf16(uint16_t* p, F v) {
    Avx2Half::store_bf16(p, v.lo);
    Avx2Half::store_bf16(p + 8, v.hi);
  }
  template <typename Op>
  static F map2(F a, F b, Op op) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
  static F add(F a, F b) { return map2(a, b, [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); }); }
  static F sub(F a, F b) { return map2(a, b, [](__m256 x, __m256 y) { return _mm256_sub_ps(x, y); }); }
  static F mul(F a, F b) { return map2(a, b, [](__m256 x, __m256 y) { return _mm256_mul_ps(x, y); }); }
  static F div(F a, F b) { return map2(a, b, [](__m256 x, __m256 y) { return _mm256_div_ps(x, y); }); }
  static F max(F a, F b) { return map2(a, b, [](__m256 x, __m256 y) { return _mm256_max_ps(x, y); }); }
  static F fmadd(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static F fnmadd(F a, F b, F c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
  static F abs(F a) {
    const __m256 s = _mm256_set1_ps(-0.0f);
    return {_mm256_andnot_ps(s, a.lo), _mm256_andnot_ps(s, a.hi)};
  }
  static F neg_abs(F a) {
    const __m256 s = _mm256_set1_ps(-0.0f);
    return {_mm256_or_ps(a.lo, s), _mm256_or_ps(a.hi, s)};
  }
  static F neg(F a) {
    const __m256 s = _mm256_set1_ps(-0.0f);
    return {_mm256_xor_ps(a.lo, s), _mm256_xor_ps(a.hi, s)};
  }
  static F round_even(F a) {
    return {_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
            _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  static F select_neg(F x, F if_neg, F otherwise) {
    const __m256 z = _mm256_setzero_ps();
    return {_mm256_blendv_ps(otherwise.lo, if_neg.lo, _mm256_cmp_ps(x.lo, z, _CMP_LT_OQ)),
            _mm256_blendv_ps(otherwise.hi, if_neg.hi, _mm256_cmp_ps(x.hi, z, _CMP_LT_OQ))};
  }
  static __m256 pow2i_half(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static F pow2i(F n) { return {pow2i_half(n.lo), pow2i_half(n.hi)}; }
  // Folds 128-bit lanes pairwise: [a.L0 + a.L1, a.L2 + a.L3] for a = {lo: L0 L1, hi: L2 L3}.
  static __m256 fold_lanes(F a) {
    return _mm256_add_ps(_mm256_permute2f128_ps(a.lo, a.hi, 0x20), _mm256_permute2f128_ps(a.lo, a.hi, 0x31));
  }
  // r[i] = sum of v[i]'s lanes in the canonical order (the avx512 variant's tree, per half)
  static F transpose_sum16(const F* v) {
    F s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
      s1[i] = map2(v[2 * i], v[2 * i + 1], [](__m256 a, __m256 b) {
        return _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
      });
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: the four vectors' group sums
      s2[i] = map2(s1[2 * i], s1[2 * i + 1], [](__m256 a, __m256 b) {
        __m256d x = _mm256_castps_pd(a), y = _mm256_castps_pd(b);
        return _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
      });
    for (int i = 0; i < 2; ++i) s3[i] = {fold_lanes(s2[2 * i]), fold_lanes(s2[2 * i + 1])};
    return {fold_lanes(s3[0]), fold_lanes(s3[1])};
  }

  static I izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static I iset1(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
  static I cvt_i(F a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
  static F cvt_f(I a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
  static I iadd(I a, I b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
  static int32_t ihsum(I a) {
    __m256i s = _mm256_add_epi32(a.lo, a.hi);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    return _mm_cvtsi128_si32(t);
  }
  static void store_i8(int32_t* p, I a) {  // 16 lanes in [-127, 127] -> 16 bytes
    __m128i w0 = _mm_packs_epi32(_mm256_castsi256_si128(a.lo), _mm256_extracti128_si256(a.lo, 1));
    __m128i w1 = _mm_packs_epi32(_mm256_castsi256_si128(a.hi), _mm256_extracti128_si256(a.hi, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w0, w1));
  }

  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

}  // namespace
}  // namespace m4
