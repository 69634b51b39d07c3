// SIMD primitives for the avx512vnni variant: one zmm per 16 lanes.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace m4 {
namespace {  // internal linkage: see variant.h

struct Avx512Vnni {
  static constexpr const char* kName = "avx512vnni";
  static constexpr int kRows = 8;           // rows sharing one unpacked weight tile
  static constexpr bool kOffsetSigned = true;  // dot_s sums (q + 128) * x: callers correct
  static constexpr int kAccumulators = 16;     // float vectors attention may keep in registers

  using F = __m512;   // 16 float lanes
  using I = __m512i;  // 16 int32 lanes
  using W = __m512i;  // 64 weight bytes: 16 channels x 4

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load_bf16(const uint16_t* p) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_bf16(uint16_t* p, F v) {
    // round to nearest even, as torch's float -> bfloat16 cast (NaN stays NaN)
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a*b + c
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F abs(F a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
  static F neg_abs(F a) { return _mm512_or_ps(a, _mm512_set1_ps(-0.0f)); }
  static F neg(F a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
  static F round_even(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F select_neg(F x, F if_neg, F otherwise) {  // x < 0 ? if_neg : otherwise
    return _mm512_mask_mov_ps(otherwise, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), if_neg);
  }
  static F pow2i(F n) {  // 2^n for integral n in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  // r[i] = the sum of v[i]'s lanes by the canonical tree (kernels_impl.h: hsum_order)
  static F transpose_sum16(const F* v) {
    __m512 s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
      s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four vectors' group sums
      __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
      s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)  // [U.l0+U.l1, U.l2+U.l3, V.l0+V.l1, V.l2+V.l3]
      s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                            _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88), _mm512_shuffle_f32x4(s3[0], s3[1], 0xDD));
  }

  static I izero() { return _mm512_setzero_si512(); }
  static I iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static I cvt_i(F a) { return _mm512_cvtps_epi32(a); }  // a already integral
  static F cvt_f(I a) { return _mm512_cvtepi32_ps(a); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I imul254(I a) { return _mm512_mullo_epi32(a, _mm512_set1_epi32(254)); }
  static int32_t ihsum(I a) { return _mm512_reduce_add_epi32(a); }
  static void store_i8(int32_t* p, I a) {  // 16 lanes in [-127, 127] -> 16 bytes
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(a));
  }

  static W wload(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static W nib_lo(W w) { return _mm512_and_si512(w, _mm512_set1_epi8(0x0F)); }
  static W nib_hi(W w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0F)); }
  // w | 16 where group g's bit is set in a Q5 plane (variant.h: Q5_F16): bit g to bit 4
  static W add_bit4(W w, const uint8_t* plane, int g) {
    const __m512i p = _mm512_loadu_si512(plane);
    const __m512i at4 = g <= 4 ? _mm512_slli_epi16(p, static_cast<unsigned>(4 - g)) : _mm512_srli_epi16(p, static_cast<unsigned>(g - 4));
    return _mm512_ternarylogic_epi32(w, at4, _mm512_set1_epi8(0x10), 0xF8);  // w | (at4 & 0x10)
  }
  // acc[j] += sum_t w[j][t] * x[t]: w unsigned bytes, x four int8 in one int32
  static I dot_u(I acc, W w, int32_t x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x)); }
  // the same for q8 bytes stored as q + 128: sums (q + 128) * x here (kOffsetSigned)
  static I dot_s(I acc, W w, int32_t x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x)); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

}  // namespace
}  // namespace m4
