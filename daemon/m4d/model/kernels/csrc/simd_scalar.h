// SIMD primitives for the scalar variant: 16 lanes as plain arrays, every operation written
// out. This is the reference the other variants are tested against, and the fallback on a
// CPU none of them fits. Compiled for the baseline ISA with -ffp-contract=off: a*b + c stays
// two roundings unless std::fma says otherwise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "variant.h"

namespace m4 {
namespace {  // internal linkage: see variant.h

struct Scalar {
  static constexpr const char* kName = "scalar";
  static constexpr int kRows = 1;
  static constexpr bool kOffsetSigned = false;  // dot_s sums q * x
  static constexpr int kAccumulators = 16;

  struct F { float v[16]; };
  struct I { int32_t v[16]; };
  struct W { uint8_t b[64]; };

  template <typename Op>
  static F map(Op op) { F r; for (int i = 0; i < 16; ++i) r.v[i] = op(i); return r; }

  static F zero() { return map([](int) { return 0.0f; }); }
  static F set1(float x) { return map([x](int) { return x; }); }
  static F load(const float* p) { F r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static F load_bf16(const uint16_t* p) {
    return map([p](int i) { uint32_t u = static_cast<uint32_t>(p[i]) << 16; float f; std::memcpy(&f, &u, 4); return f; });
  }
  static float half_to_float(uint16_t h) {  // exact
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float f;
    if (exp == 0) {
      f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
      if (sign) f = -f;
      return f;
    }
    uint32_t u = sign | (exp == 31 ? (0xFFu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
    std::memcpy(&f, &u, 4);
    return f;
  }
  static F load_f16(const uint16_t* p) { return map([p](int i) { return half_to_float(p[i]); }); }
  static void store(float* p, F a) { std::memcpy(p, a.v, sizeof a.v); }
  static void store_bf16(uint16_t* p, F a) {
    for (int i = 0; i < 16; ++i) {
      uint32_t u;
      std::memcpy(&u, &a.v[i], 4);
      if (std::isnan(a.v[i])) u = 0x7FC00000u;
      else u += 0x7FFFu + ((u >> 16) & 1u);
      p[i] = static_cast<uint16_t>(u >> 16);
    }
  }
  static F add(F a, F b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static F sub(F a, F b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static F mul(F a, F b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static F div(F a, F b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
  static F fmadd(F a, F b, F c) { return map([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); }); }
  static F fnmadd(F a, F b, F c) { return map([&](int i) { return std::fma(-a.v[i], b.v[i], c.v[i]); }); }
  static F max(F a, F b) {  // as x86's maxps: the second operand unless a > b
    return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; });
  }
  static F abs(F a) { return map([&](int i) { return std::fabs(a.v[i]); }); }
  static F neg_abs(F a) { return map([&](int i) { return -std::fabs(a.v[i]); }); }
  static F neg(F a) { return map([&](int i) { return -a.v[i]; }); }
  static F round_even(F a) { return map([&](int i) { return std::nearbyint(a.v[i]); }); }
  static F select_neg(F x, F if_neg, F otherwise) {
    return map([&](int i) { return x.v[i] < 0.0f ? if_neg.v[i] : otherwise.v[i]; });
  }
  static F pow2i(F n) {
    return map([&](int i) {
      uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
      float f; std::memcpy(&f, &u, 4); return f;
    });
  }
  static F transpose_sum16(const F* v) { return map([&](int i) { return hsum_order(v[i].v); }); }

  static I izero() { I r{}; return r; }
  static I iset1(int32_t x) { I r; for (auto& e : r.v) e = x; return r; }
  static I cvt_i(F a) { I r; for (int i = 0; i < 16; ++i) r.v[i] = static_cast<int32_t>(a.v[i]); return r; }
  static F cvt_f(I a) { return map([&](int i) { return static_cast<float>(a.v[i]); }); }
  static I iadd(I a, I b) { I r; for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
  static I imul254(I a) { I r; for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * 254; return r; }
  static int32_t ihsum(I a) { int32_t s = 0; for (int i = 0; i < 16; ++i) s += a.v[i]; return s; }
  static void store_i8(int32_t* p, I a) {
    int8_t b[16];
    for (int i = 0; i < 16; ++i) b[i] = static_cast<int8_t>(a.v[i]);
    std::memcpy(p, b, 16);
  }

  static W wload(const uint8_t* p) { W w; std::memcpy(w.b, p, 64); return w; }
  static W nib_lo(W w) { for (auto& b : w.b) b &= 0x0F; return w; }
  static W nib_hi(W w) { for (auto& b : w.b) b = static_cast<uint8_t>(b >> 4); return w; }
  // w | 16 where group g's bit is set in a Q5 plane (variant.h: Q5_F16)
  static W add_bit4(W w, const uint8_t* plane, int g) {
    for (int i = 0; i < 64; ++i) w.b[i] |= static_cast<uint8_t>(((plane[i] >> g) & 1) << 4);
    return w;
  }
  static I dot_u(I acc, const W& w, int32_t x) {
    int8_t xb[4];
    std::memcpy(xb, &x, 4);
    for (int j = 0; j < 16; ++j)
      for (int t = 0; t < 4; ++t) acc.v[j] += static_cast<int32_t>(w.b[4 * j + t]) * xb[t];
    return acc;
  }
  static I dot_s(I acc, const W& w, int32_t x) {  // bytes are q + 128: sums q * x
    int8_t xb[4];
    std::memcpy(xb, &x, 4);
    for (int j = 0; j < 16; ++j)
      for (int t = 0; t < 4; ++t) acc.v[j] += (static_cast<int32_t>(w.b[4 * j + t]) - 128) * xb[t];
    return acc;
  }
  static void prefetch(const void*) {}
  static void prefetch_l2(const void*) {}
};

}  // namespace
}  // namespace m4
