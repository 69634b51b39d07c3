// SIMD primitives for the neon_dotprod variant (AArch64 with the dot product extension,
// -march=armv8.2-a+dotprod): 16 lanes as four q registers. sdot multiplies signed bytes, so
// Q8 weights (stored q + 128) are flipped back to q; 4-bit and unsigned weights are < 128.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "variant.h"

namespace m4 {
namespace {  // internal linkage: see variant.h

struct NeonDotprod {
  static constexpr const char* kName = "neon_dotprod";
  static constexpr int kRows = 2;
  static constexpr bool kOffsetSigned = false;  // dot_s sums q * x
  static constexpr int kAccumulators = 4;       // float vectors (16 q registers) for attention

  struct F { float32x4_t v[4]; };
  struct I { int32x4_t v[4]; };
  struct W { uint8x16_t v[4]; };

  template <typename Op>
  static F map1(F a, Op op) { return {{op(a.v[0]), op(a.v[1]), op(a.v[2]), op(a.v[3])}}; }
  template <typename Op>
  static F map2(F a, F b, Op op) {
    return {{op(a.v[0], b.v[0]), op(a.v[1], b.v[1]), op(a.v[2], b.v[2]), op(a.v[3], b.v[3])}};
  }

  static F zero() { return set1(0.0f); }
  static F set1(float x) { float32x4_t v = vdupq_n_f32(x); return {{v, v, v, v}}; }
  static F load(const float* p) { return {{vld1q_f32(p), vld1q_f32(p + 4), vld1q_f32(p + 8), vld1q_f32(p + 12)}}; }
  static F load_bf16(const uint16_t* p) {
    const uint16x8_t a = vld1q_u16(p), b = vld1q_u16(p + 8);
    return {{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(a), 16)), vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(a), 16)),
             vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16)), vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(b), 16))}};
  }
  static F load_f16(const uint16_t* p) {
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i)));
    return r;
  }
  static void store(float* p, F a) { for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.v[i]); }
  static uint16x4_t round_bf16(float32x4_t v) {  // nearest even, NaN stays NaN
    const uint32x4_t bits = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
    uint32x4_t rounded = vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7FFF)));
    rounded = vbslq_u32(vceqq_f32(v, v), rounded, vdupq_n_u32(0x7FC00000));
    return vshrn_n_u32(rounded, 16);
  }
  static void store_bf16(uint16_t* p, F a) { for (int i = 0; i < 4; ++i) vst1_u16(p + 4 * i, round_bf16(a.v[i])); }
  static F add(F a, F b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vaddq_f32(x, y); }); }
  static F sub(F a, F b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vsubq_f32(x, y); }); }
  static F mul(F a, F b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vmulq_f32(x, y); }); }
  static F div(F a, F b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vdivq_f32(x, y); }); }
  static F max(F a, F b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vmaxq_f32(x, y); }); }
  static F fmadd(F a, F b, F c) {  // a*b + c, fused
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = vfmaq_f32(c.v[i], a.v[i], b.v[i]);
    return r;
  }
  static F fnmadd(F a, F b, F c) {  // c - a*b, fused
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = vfmsq_f32(c.v[i], a.v[i], b.v[i]);
    return r;
  }
  static F abs(F a) { return map1(a, [](float32x4_t x) { return vabsq_f32(x); }); }
  static F neg_abs(F a) { return map1(a, [](float32x4_t x) { return vnegq_f32(vabsq_f32(x)); }); }
  static F neg(F a) { return map1(a, [](float32x4_t x) { return vnegq_f32(x); }); }
  static F round_even(F a) { return map1(a, [](float32x4_t x) { return vrndnq_f32(x); }); }
  static F select_neg(F x, F if_neg, F otherwise) {
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = vbslq_f32(vcltzq_f32(x.v[i]), if_neg.v[i], otherwise.v[i]);
    return r;
  }
  static F pow2i(F n) {
    return map1(n, [](float32x4_t x) {
      return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(x), vdupq_n_s32(127)), 23));
    });
  }
  // r[i] = sum of v[i]'s lanes in the canonical order (the avx512 variant's tree)
  static F transpose_sum16(const F* v) {
    F s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; ++i)  // per q register: [a0+a2, b0+b2, a1+a3, b1+b3]
      s1[i] = map2(v[2 * i], v[2 * i + 1], [](float32x4_t a, float32x4_t b) {
        return vaddq_f32(vzip1q_f32(a, b), vzip2q_f32(a, b));
      });
    for (int i = 0; i < 4; ++i)  // per q register: the four vectors' group sums
      s2[i] = map2(s1[2 * i], s1[2 * i + 1], [](float32x4_t a, float32x4_t b) {
        const float64x2_t x = vreinterpretq_f64_f32(a), y = vreinterpretq_f64_f32(b);
        return vaddq_f32(vreinterpretq_f32_f64(vzip1q_f64(x, y)), vreinterpretq_f32_f64(vzip2q_f64(x, y)));
      });
    for (int i = 0; i < 2; ++i) {
      const F& u = s2[2 * i];
      const F& w = s2[2 * i + 1];
      s3[i] = {{vaddq_f32(u.v[0], u.v[1]), vaddq_f32(u.v[2], u.v[3]), vaddq_f32(w.v[0], w.v[1]), vaddq_f32(w.v[2], w.v[3])}};
    }
    return {{vaddq_f32(s3[0].v[0], s3[0].v[1]), vaddq_f32(s3[0].v[2], s3[0].v[3]),
             vaddq_f32(s3[1].v[0], s3[1].v[1]), vaddq_f32(s3[1].v[2], s3[1].v[3])}};
  }

  static I izero() { return iset1(0); }
  static I iset1(int32_t x) { int32x4_t v = vdupq_n_s32(x); return {{v, v, v, v}}; }
  static I cvt_i(F a) {  // a already integral
    I r;
    for (int i = 0; i < 4; ++i) r.v[i] = vcvtnq_s32_f32(a.v[i]);
    return r;
  }
  static F cvt_f(I a) {
    F r;
    for (int i = 0; i < 4; ++i) r.v[i] = vcvtq_f32_s32(a.v[i]);
    return r;
  }
  static I iadd(I a, I b) {
    I r;
    for (int i = 0; i < 4; ++i) r.v[i] = vaddq_s32(a.v[i], b.v[i]);
    return r;
  }
  static I imul254(I a) {
    I r;
    for (int i = 0; i < 4; ++i) r.v[i] = vmulq_n_s32(a.v[i], 254);
    return r;
  }
  static int32_t ihsum(I a) { return vaddvq_s32(vaddq_s32(vaddq_s32(a.v[0], a.v[1]), vaddq_s32(a.v[2], a.v[3]))); }
  static void store_i8(int32_t* p, I a) {  // 16 lanes in [-127, 127] -> 16 bytes
    const int16x8_t lo = vcombine_s16(vmovn_s32(a.v[0]), vmovn_s32(a.v[1]));
    const int16x8_t hi = vcombine_s16(vmovn_s32(a.v[2]), vmovn_s32(a.v[3]));
    vst1q_s8(reinterpret_cast<int8_t*>(p), vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
  }

  static W wload(const uint8_t* p) { return {{vld1q_u8(p), vld1q_u8(p + 16), vld1q_u8(p + 32), vld1q_u8(p + 48)}}; }
  static W nib_lo(W w) {
    for (auto& v : w.v) v = vandq_u8(v, vdupq_n_u8(0x0F));
    return w;
  }
  static W nib_hi(W w) {
    for (auto& v : w.v) v = vshrq_n_u8(v, 4);
    return w;
  }
  // w | 16 where group g's bit is set in a Q5 plane (variant.h: Q5_F16): bit g to bit 4
  static W add_bit4(W w, const uint8_t* plane, int g) {
    const int8x16_t shift = vdupq_n_s8(static_cast<int8_t>(4 - g));  // negative: right
    for (int i = 0; i < 4; ++i)
      w.v[i] = vorrq_u8(w.v[i], vandq_u8(vshlq_u8(vld1q_u8(plane + 16 * i), shift), vdupq_n_u8(0x10)));
    return w;
  }
  // acc[j] += sum_t w[j][t] * x[t]: weights < 128 as signed bytes, x four int8 in one int32
  static I dot_u(I acc, W w, int32_t x) {
    const int8x16_t xb = vreinterpretq_s8_s32(vdupq_n_s32(x));
    for (int i = 0; i < 4; ++i) acc.v[i] = vdotq_s32(acc.v[i], vreinterpretq_s8_u8(w.v[i]), xb);
    return acc;
  }
  static I dot_s(I acc, W w, int32_t x) {  // bytes q + 128 -> q
    const int8x16_t xb = vreinterpretq_s8_s32(vdupq_n_s32(x));
    for (int i = 0; i < 4; ++i)
      acc.v[i] = vdotq_s32(acc.v[i], vreinterpretq_s8_u8(veorq_u8(w.v[i], vdupq_n_u8(0x80))), xb);
    return acc;
  }
  static void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
  static void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }
};

#if defined(__ARM_FEATURE_MATMUL_INT8)
// neon_i8mm (-march=armv8.2-a+dotprod+i8mm): as neon_dotprod, but two rows share each weight
// load through smmla, a 2x8 by 8x2 int8 matrix multiply: half the multiply instructions.
struct NeonI8mm : NeonDotprod {
  static constexpr const char* kName = "neon_i8mm";

  // hs[r], ls[r] for rows 0 and 1 over groups [g0, g1) (an even count) of one block, as
  // kernels_impl.h's block_sums computes them. Channels 4q..4q+3 live in register q of a
  // chunk; zipping chunks g and g+1 by 32-bit lanes gives smmla's 8x2 operand for channel
  // pairs (4q, 4q+1) and (4q+2, 4q+3); the rows' digits for groups g, g+1 are 8 adjacent bytes.
  template <bool kQ4, bool kSigned>
  static void pair_sums(const uint8_t* wb, int g0, int g1, const int32_t* x0, const int32_t* x1,
                        I* hs, I* ls) {
    int32x4_t acc[2][8];  // [digit][channel pair]: r0c, r0c', r1c, r1c'
    for (auto& a : acc)
      for (auto& v : a) v = vdupq_n_s32(0);
    for (int g = g0; g < g1; g += 2) {
      W wa, wb2;
      if constexpr (kQ4) {  // groups 2c, 2c + 1 are chunk c's low and high nibbles
        const W v = wload(wb + 64 * (g / 2));
        wa = nib_lo(v);
        wb2 = nib_hi(v);
      } else {
        wa = wload(wb + 64 * g);
        wb2 = wload(wb + 64 * (g + 1));
      }
      for (int q = 0; q < 4; ++q) {
        int8x16_t a = vreinterpretq_s8_u8(wa.v[q]), b = vreinterpretq_s8_u8(wb2.v[q]);
        if constexpr (kSigned) {  // bytes q + 128 -> q
          a = veorq_s8(a, vdupq_n_s8(static_cast<int8_t>(0x80)));
          b = veorq_s8(b, vdupq_n_s8(static_cast<int8_t>(0x80)));
        }
        const int8x16_t lo = vreinterpretq_s8_s32(vzip1q_s32(vreinterpretq_s32_s8(a), vreinterpretq_s32_s8(b)));
        const int8x16_t hi = vreinterpretq_s8_s32(vzip2q_s32(vreinterpretq_s32_s8(a), vreinterpretq_s32_s8(b)));
        for (int dgt = 0; dgt < 2; ++dgt) {
          const int off = 8 * dgt + g;
          const int8x16_t xs = vcombine_s8(vld1_s8(reinterpret_cast<const int8_t*>(x0 + off)),
                                           vld1_s8(reinterpret_cast<const int8_t*>(x1 + off)));
          acc[dgt][2 * q] = vmmlaq_s32(acc[dgt][2 * q], xs, lo);
          acc[dgt][2 * q + 1] = vmmlaq_s32(acc[dgt][2 * q + 1], xs, hi);
        }
      }
    }
    for (int q = 0; q < 4; ++q)  // rows' channels 4q..4q+3: the low (row 0) / high (row 1) halves
      for (int dgt = 0; dgt < 2; ++dgt) {
        const int64x2_t a = vreinterpretq_s64_s32(acc[dgt][2 * q]), b = vreinterpretq_s64_s32(acc[dgt][2 * q + 1]);
        I* out = dgt == 0 ? hs : ls;
        out[0].v[q] = vreinterpretq_s32_s64(vzip1q_s64(a, b));
        out[1].v[q] = vreinterpretq_s32_s64(vzip2q_s64(a, b));
      }
  }
};
#endif

}  // namespace
}  // namespace m4
