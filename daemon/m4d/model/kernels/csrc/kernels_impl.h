// m4's kernels written once over a SIMD backend `S` (simd_scalar.h, simd_avx2.h,
// simd_avx512.h, simd_neon.h). Each variant_*.cpp includes its backend and this file and
// instantiates `make_variant<S>()`, compiled with that ISA's flags.
//
// Why the numbers agree across variants, bit for bit:
// * S::F is 16 float lanes on every ISA (one zmm, two ymm, four NEON q registers or an
//   array), and everything below is lane-wise except the sums written out here in the
//   canonical order (hsum_order in variant.h; S::transpose_sum16 implements it 16 at a time).
// * Integer block sums are exact in int32, whatever the instructions.
// * Multiply-adds are fused where written (S::fmadd: an FMA instruction or std::fma), and
//   nothing else is contracted (-ffp-contract=off); no -ffast-math.
// Batch invariance follows too: a row's numbers never depend on the other rows in a call.
//
// Everything is in an anonymous namespace: internal linkage, so no function compiled for one
// ISA can be picked by the linker for another variant's caller.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "variant.h"

namespace m4 {
namespace {

template <typename T>
constexpr T min_of(T a, T b) { return a < b ? a : b; }

// ------------------------------------------------------------------ float helpers

template <typename S>
typename S::F load_any(const void* p, bool bf16, int64_t i) {
  return bf16 ? S::load_bf16(static_cast<const uint16_t*>(p) + i) : S::load(static_cast<const float*>(p) + i);
}

template <typename S>
void store_any(void* p, bool bf16, int64_t i, typename S::F v) {
  if (bf16) S::store_bf16(static_cast<uint16_t*>(p) + i, v);
  else S::store(static_cast<float*>(p) + i, v);
}

template <typename S>
float hsum(typename S::F v) {
  float x[16];
  S::store(x, v);
  return hsum_order(x);
}

template <typename S>
float hmax(typename S::F v) {
  float x[16];
  S::store(x, v);
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// e^x for x <= 0 (softmax after the max is taken off, sigmoid of -|x|): x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes' coefficients, ~1 ulp), times 2^n built
// from the exponent bits. x is clamped at -80, so 2^n stays a normal float and the product is
// exact; e^-80 ~ 2e-35 is nothing next to the 1 a softmax always holds.
template <typename S>
typename S::F exp_nonpositive(typename S::F x) {
  using F = typename S::F;
  x = S::max(x, S::set1(-80.0f));
  F n = S::round_even(S::mul(x, S::set1(1.44269504088896341f)));
  F r = S::fnmadd(n, S::set1(0.693359375f), x);
  r = S::fnmadd(n, S::set1(-2.12194440e-4f), r);
  F p = S::set1(1.9875691500e-4f);
  p = S::fmadd(p, r, S::set1(1.3981999507e-3f));
  p = S::fmadd(p, r, S::set1(8.3334519073e-3f));
  p = S::fmadd(p, r, S::set1(4.1665795894e-2f));
  p = S::fmadd(p, r, S::set1(1.6666665459e-1f));
  p = S::fmadd(p, r, S::set1(5.0000001201e-1f));
  p = S::fmadd(p, S::mul(r, r), S::add(r, S::set1(1.0f)));
  return S::mul(p, S::pow2i(n));
}

// Whether backend S multiplies weights widened to int16 (Q8's signed bytes, Q5's q + 16) by
// 254*hi + lo in int16 (QuantView::wide), both digits in one product (avx2: vpmaddwd, where a
// signed byte product needs the sign trick per digit).
template <typename S>
concept WideSums = requires(typename S::W w, const int16_t* x) {
  S::wide_sums(S::dot_wide(S::wide_zero(), S::widen_signed(w), x));
};

// Whether backend S runs a tile as two passes of 8 channels through S::Half (AVX2: with 16
// registers, several rows' accumulators over 16 channels spill). Each channel's numbers are
// its own lanes, so the split changes no bit.
template <typename S>
concept HalfTiles = requires { typename S::Half; };

// Whether a backend's GEMM reads QuantView::wide (itself, or its tiles' backend): only then
// does quantize_rows fill it.
template <typename S>
constexpr bool reads_wide() {
  if constexpr (HalfTiles<S>) return WideSums<typename S::Half>;
  else return WideSums<S>;
}

// ------------------------------------------------------------------ activation quantization

template <typename S>
void quantize_rows(const void* x, bool bf16, int64_t rows, int64_t k, QuantView out) {
  using F = typename S::F;
  const int64_t kb = k / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < kb; ++b) {
      const int64_t i = r * k + b * kBlock, o = r * kb + b;
      const F v0 = load_any<S>(x, bf16, i), v1 = load_any<S>(x, bf16, i + 16);
      const float amax = hmax<S>(S::max(S::abs(v0), S::abs(v1)));
      const float d = amax / 127.0f;
      const F id = S::set1(d > 0.0f ? 1.0f / d : 0.0f);
      const F s0 = S::mul(v0, id), s1 = S::mul(v1, id);
      const F h0 = S::round_even(s0), h1 = S::round_even(s1);  // |x / xd| <= 127
      const F radix = S::set1(kLoRadix);
      const auto hi0 = S::cvt_i(h0), hi1 = S::cvt_i(h1);
      const auto lo0 = S::cvt_i(S::round_even(S::mul(S::sub(s0, h0), radix)));
      const auto lo1 = S::cvt_i(S::round_even(S::mul(S::sub(s1, h1), radix)));
      int32_t* q = out.q + o * 16;
      S::store_i8(q, hi0);
      S::store_i8(q + 4, hi1);
      S::store_i8(q + 8, lo0);
      S::store_i8(q + 12, lo1);
      out.half[2 * o] = static_cast<int32_t>(kLoRadix) * S::ihsum(hi0) + S::ihsum(lo0);
      out.half[2 * o + 1] = static_cast<int32_t>(kLoRadix) * S::ihsum(hi1) + S::ihsum(lo1);
      out.d[o] = d;
      out.s[o] = hsum<S>(S::add(v0, v1));
      out.s16[2 * o] = hsum<S>(v0);
      out.s16[2 * o + 1] = hsum<S>(v1);
      if constexpr (reads_wide<S>()) {
        const int8_t* digits = reinterpret_cast<const int8_t*>(q);  // 32 hi, then 32 lo
        int16_t* wide = out.wide + o * kBlock;
        for (int t = 0; t < kBlock; ++t)
          wide[t] = static_cast<int16_t>(static_cast<int32_t>(kLoRadix) * digits[t] + digits[kBlock + t]);
      }
    }
  }
}

// ------------------------------------------------------------------ GEMM tiles

// Whether backend S sums 4-bit products in int16 before widening (AVX2: its byte products
// land in int16 pairs anyway, and a pair of nibble x digit products is at most 2*15*127, so a
// block's eight groups fit in int16: at most 30480).
template <typename S>
concept ShortSums = requires(typename S::P p, typename S::W w) {
  S::widen_digits(S::dot_u16(p, w, 0), p);
};

// Whether backend S multiplies two rows at once (neon_i8mm: smmla).
template <typename S>
concept PairSums = requires(const uint8_t* w, const int32_t* x, typename S::I* s) {
  S::template pair_sums<true, false>(w, 0, 8, x, x, s, s);
};

// s[r] = 254 * (w . hi_r) + (w . lo_r) over groups [g0, g1) of one block (4 values each),
// exact in int32. xr(r) points at row r's 16 digit words of this block.
template <typename S, Kind K, int R, typename XR, typename XW>
void block_sums(const uint8_t* wb, int g0, int g1, XR xr, XW xw, typename S::I* s) {
  using W = typename S::W;
  typename S::I hs[R], ls[R];
  for (int r = 0; r < R; ++r) hs[r] = ls[r] = S::izero();
  // group g's weight bytes: groups 2c and 2c + 1 are chunk c's low and high nibbles (Q4, and
  // Q5 with its 5th bits), or bytes as stored
  const auto group = [wb](int g) {
    if constexpr (kind_is_q4(K) || kind_is_q5(K)) {
      const W v = S::wload(wb + 64 * (g / 2));
      const W nibbles = g % 2 == 0 ? S::nib_lo(v) : S::nib_hi(v);
      if constexpr (kind_is_q5(K)) return S::add_bit4(nibbles, wb + kQ5HighBits, g);
      else return nibbles;
    } else {
      return S::wload(wb + 64 * g);
    }
  };
  if constexpr ((kind_signed_bytes(K) || kind_is_q5(K)) && WideSums<S>) {  // both digits at once
    typename S::Wide acc[R];
    for (int r = 0; r < R; ++r) acc[r] = S::wide_zero();
    // unrolled whole, GCC loaded every group's widened weights up front and spilled them
    // (avx2: 16 of its 16 registers); two groups at a time ran 1.25x faster
#pragma GCC unroll 2
    for (int g = g0; g < g1; ++g) {
      typename S::WideW wg;
      if constexpr (kind_is_q5(K)) wg = S::widen_unsigned(group(g));
      else wg = S::widen_signed(group(g));
      for (int r = 0; r < R; ++r) acc[r] = S::dot_wide(acc[r], wg, xw(r) + 4 * g);
    }
    for (int r = 0; r < R; ++r) s[r] = S::wide_sums(acc[r]);
    return;
  } else if constexpr (R == 2 && PairSums<S> && !kind_is_q5(K)) {  // two rows per multiply (i8mm)
    S::template pair_sums<kind_is_q4(K), !kind_has_min(K)>(wb, g0, g1, xr(0), xr(1), hs, ls);
  } else if constexpr (kind_is_q4(K) && ShortSums<S>) {
    typename S::P hp[R], lp[R];
    for (int r = 0; r < R; ++r) hp[r] = lp[r] = S::pzero();
    for (int c = 0; c < 4; ++c) {  // chunk c: groups 2c (low nibbles) and 2c + 1 (high)
      const W v = S::wload(wb + 64 * c);
      const W w0 = S::nib_lo(v), w1 = S::nib_hi(v);
      for (int r = 0; r < R; ++r) {
        hp[r] = S::dot_u16(S::dot_u16(hp[r], w0, xr(r)[2 * c]), w1, xr(r)[2 * c + 1]);
        lp[r] = S::dot_u16(S::dot_u16(lp[r], w0, xr(r)[8 + 2 * c]), w1, xr(r)[8 + 2 * c + 1]);
      }
    }
    for (int r = 0; r < R; ++r) s[r] = S::widen_digits(hp[r], lp[r]);  // 254 * hi + lo
    return;
  } else {
    for (int g = g0; g < g1; ++g) {
      const W wg = group(g);
      for (int r = 0; r < R; ++r) {
        if constexpr (kind_signed_bytes(K)) {  // signed Q8 bytes, stored q + 128
          hs[r] = S::dot_s(hs[r], wg, xr(r)[g]);
          ls[r] = S::dot_s(ls[r], wg, xr(r)[8 + g]);
        } else {
          hs[r] = S::dot_u(hs[r], wg, xr(r)[g]);
          ls[r] = S::dot_u(ls[r], wg, xr(r)[8 + g]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) s[r] = S::iadd(S::imul254(hs[r]), ls[r]);
}

// R rows against one tile of 16 channels, over all kb blocks. Row r's digits are at
// x.q + r*kb*16 (hi for values 4g..4g+3 in int32 g, lo in 8 + g).
template <typename S, Kind K, int R>
void gemm_rows(const uint8_t* w, const void* sc, QuantView x, int64_t kb, void* y, bool bf16_out,
               int64_t ldy) {
  using F = typename S::F;
  using I = typename S::I;
  constexpr bool has_min = kind_has_min(K), f16 = kind_f16_scales(K);
  // what the block sums hold beyond sum(q * x): (q + 128) * x where the backend multiplies
  // Q8's stored bytes as they are, (q + 16) * x for Q5 on every backend; taken off exactly
  constexpr int32_t offset = kind_is_q5(K) ? 16 : kind_signed_bytes(K) && S::kOffsetSigned ? 128 : 0;
  constexpr int halves = kind_per16(K) ? 2 : 1;
  constexpr int64_t tile_bytes = kind_tile_bytes(K), tile_scales = kind_tile_scales(K);
  F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = S::zero();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* wb = w + b * tile_bytes;
    // the same block of the next tile (tiles are contiguous): streams the weights from memory
    // one tile ahead, however many row groups read this one
    for (int64_t i = 0; i < tile_bytes; i += 64) S::prefetch(wb + kb * tile_bytes + i);
    F d[2], m[2];  // per half of the block where scales are per 16
    if constexpr (f16) {
      const uint16_t* sb = static_cast<const uint16_t*>(sc) + b * tile_scales;
      d[0] = S::load_f16(sb);
      if constexpr (has_min) m[0] = S::load_f16(sb + kTile);
    } else {
      const float* sb = static_cast<const float*>(sc) + b * tile_scales;
      for (int h = 0; h < halves; ++h) {
        d[h] = S::load(sb + h * kTile);
        if constexpr (has_min) m[h] = S::load(sb + (halves + h) * kTile);
      }
    }
    const auto xr = [&](int r) { return x.q + (r * kb + b) * 16; };
    const auto xw = [&](int r) { return x.wide + (r * kb + b) * kBlock; };
    for (int h = 0; h < halves; ++h) {
      I sums[R];  // 254 * (w . hi) + (w . lo) per row, exact
      block_sums<S, K, R>(wb, 4 * h * (halves - 1), halves == 2 ? 4 * h + 4 : 8, xr, xw, sums);
      for (int r = 0; r < R; ++r) {
        const int64_t o = r * kb + b;
        I s = sums[r];
        if constexpr (offset != 0) {
          const int32_t xsum = halves == 2 ? x.half[2 * o + h] : x.half[2 * o] + x.half[2 * o + 1];
          s = S::iadd(s, S::iset1(-offset * xsum));
        }
        const F scale = S::mul(d[h], S::set1(x.d[o] * (1.0f / kLoRadix)));
        acc[r] = S::fmadd(S::cvt_f(s), scale, acc[r]);
        if constexpr (has_min) {
          const float xs = halves == 2 ? x.s16[2 * o + h] : x.s[o];
          acc[r] = S::fmadd(m[h], S::set1(xs), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) store_any<S>(y, bf16_out, r * ldy, acc[r]);
}

// rows [0, n) in groups of S::kRows, the remainder by its own R
template <typename S, Kind K, int R>
void gemm_remainder(int64_t n, const uint8_t* w, const void* sc, QuantView x, int64_t kb, void* y,
                    bool bf16_out, int64_t ldy) {
  if constexpr (R >= 1) {
    if (n == R) gemm_rows<S, K, R>(w, sc, x, kb, y, bf16_out, ldy);
    else gemm_remainder<S, K, R - 1>(n, w, sc, x, kb, y, bf16_out, ldy);
  }
}

// rows per pass over a weight tile: T::kRows, or T::kRowsQ4 for nibbles where T has one
template <typename T, Kind K>
constexpr int tile_rows() {
  if constexpr (kind_is_q4(K) && requires { T::kRowsQ4; }) return T::kRowsQ4;
  else return T::kRows;
}

// rows [0, rows) of x against one tile; T is S, or S::Half over channels [8h, 8h + 8)
template <typename T, Kind K>
void gemm_row_groups(const uint8_t* w, const void* sc, QuantView x, int64_t rows, int64_t kb, void* y,
                     bool bf16_out, int64_t ldy) {
  const int64_t esize = bf16_out ? 2 : 4;
  int64_t r = 0;
  auto at = [&](int64_t row) { return rows_from(x, row, kb); };
  constexpr int R = tile_rows<T, K>();
  for (; r + R <= rows; r += R)
    gemm_rows<T, K, R>(w, sc, at(r), kb, static_cast<char*>(y) + r * ldy * esize, bf16_out, ldy);
  if (r < rows)
    gemm_remainder<T, K, R - 1>(rows - r, w, sc, at(r), kb,
                                static_cast<char*>(y) + r * ldy * esize, bf16_out, ldy);
}

template <typename S, Kind K>
void gemm_kind(const uint8_t* w, const void* sc, QuantView x, int64_t rows, int64_t kb, void* y,
               bool bf16_out, int64_t ldy) {
  if constexpr (HalfTiles<S>) {
    constexpr int64_t half = kTile / 2;  // channels per pass; weight bytes 4 per channel and group
    const int64_t scale_size = kind_f16_scales(K) ? 2 : 4, esize = bf16_out ? 2 : 4;
    for (int64_t h = 0; h < 2; ++h)
      gemm_row_groups<typename S::Half, K>(w + 4 * half * h, static_cast<const char*>(sc) + half * h * scale_size,
                                           x, rows, kb, static_cast<char*>(y) + half * h * esize, bf16_out, ldy);
  } else {
    gemm_row_groups<S, K>(w, sc, x, rows, kb, y, bf16_out, ldy);
  }
}

template <typename S>
void gemm_tile(Kind kind, const uint8_t* w, const void* sc, QuantView x, int64_t rows, int64_t kb,
               void* y, bool bf16_out, int64_t ldy) {
  switch (kind) {
    case Kind::Q4_F16: gemm_kind<S, Kind::Q4_F16>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q4_F32: gemm_kind<S, Kind::Q4_F32>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q8_F16: gemm_kind<S, Kind::Q8_F16>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q8_F32: gemm_kind<S, Kind::Q8_F32>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q8_F32_G16: gemm_kind<S, Kind::Q8_F32_G16>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q8U_F32: gemm_kind<S, Kind::Q8U_F32>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q8U_F32_G16: gemm_kind<S, Kind::Q8U_F32_G16>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
    case Kind::Q5_F16: gemm_kind<S, Kind::Q5_F16>(w, sc, x, rows, kb, y, bf16_out, ldy); break;
  }
}

// ------------------------------------------------------------------ decode attention

// acc[j] += p[j][t] * v[t] for GC query heads sharing one kv head, accumulators in registers.
template <typename S, int NV, int GC>
void attend_values(const float* p, int64_t ldp, const void* vb, bool bf16, int64_t len, float* out) {
  using F = typename S::F;
  F acc[GC][NV];
  for (int j = 0; j < GC; ++j)
    for (int c = 0; c < NV; ++c) acc[j][c] = S::zero();
  for (int64_t t = 0; t < len; ++t) {
    F v[NV];
    for (int c = 0; c < NV; ++c) v[c] = load_any<S>(vb, bf16, t * NV * 16 + c * 16);
    for (int j = 0; j < GC; ++j) {
      const F w = S::set1(p[j * ldp + t]);
      for (int c = 0; c < NV; ++c) acc[j][c] = S::fmadd(w, v[c], acc[j][c]);
    }
  }
  for (int j = 0; j < GC; ++j)
    for (int c = 0; c < NV; ++c) S::store(out + (j * NV + c) * 16, acc[j][c]);
}

template <typename S, int NV>
void attend_dh(const float* q, const void* kb, const void* vb, bool bf16, int64_t len, int64_t g,
               float* scratch, float* out) {
  using F = typename S::F;
  constexpr int64_t dh = NV * 16;
  const int64_t ldp = (len + 15) / 16 * 16;
  const int64_t esize = bf16 ? 2 : 4;
  float* p = scratch;             // [g, ldp] scores, then softmax numerators
  float* kf = scratch + g * ldp;  // [16, dh] a block of keys, zero past len
  for (int64_t t0 = 0; t0 < len; t0 += 16) {  // scores, 16 positions at a time
    const int64_t nt = min_of<int64_t>(16, len - t0);
    // the cache is cold here (the layer's GEMMs ran since it was written): fetch the next
    // block of keys, and this block of values for the pass below
    for (int64_t i = 0; i < 16 * dh * esize; i += 64) {
      S::prefetch(static_cast<const char*>(kb) + (t0 + 16) * dh * esize + i);
      S::prefetch_l2(static_cast<const char*>(vb) + t0 * dh * esize + i);
    }
    for (int64_t t = 0; t < 16; ++t)
      for (int c = 0; c < NV; ++c)
        S::store(kf + t * dh + c * 16, t < nt ? load_any<S>(kb, bf16, (t0 + t) * dh + c * 16) : S::zero());
    for (int64_t j = 0; j < g; ++j) {
      F qv[NV], part[16];
      for (int c = 0; c < NV; ++c) qv[c] = S::load(q + j * dh + c * 16);
      for (int t = 0; t < 16; ++t) {
        F s = S::mul(qv[0], S::load(kf + t * dh));
        for (int c = 1; c < NV; ++c) s = S::fmadd(qv[c], S::load(kf + t * dh + c * 16), s);
        part[t] = s;
      }
      S::store(p + j * ldp + t0, S::transpose_sum16(part));
    }
  }
  float inv[16 * 8];  // g <= 128 query heads per kv head
  for (int64_t j = 0; j < g; ++j) {  // softmax numerators and 1 / denominator
    float* pj = p + j * ldp;
    for (int64_t t = len; t < ldp; ++t) pj[t] = -INFINITY;
    F mx = S::set1(-INFINITY);
    for (int64_t t0 = 0; t0 < ldp; t0 += 16) mx = S::max(mx, S::load(pj + t0));
    const F m = S::set1(hmax<S>(mx));
    for (int64_t t0 = 0; t0 < ldp; t0 += 16) S::store(pj + t0, exp_nonpositive<S>(S::sub(S::load(pj + t0), m)));
    for (int64_t t = len; t < ldp; ++t) pj[t] = 0.0f;
    F sum = S::zero();
    for (int64_t t0 = 0; t0 < ldp; t0 += 16) sum = S::add(sum, S::load(pj + t0));
    inv[j] = 1.0f / hsum<S>(sum);
  }
  // query heads per pass: their accumulators stay within the backend's register budget
  constexpr int per = S::kAccumulators / NV, cap = per >= 8 ? 8 : per >= 4 ? 4 : per >= 2 ? 2 : 1;
  for (int64_t j0 = 0; j0 < g; j0 += cap) {
    float* o = out + j0 * dh;
    const float* pj = p + j0 * ldp;
    const int64_t n = min_of<int64_t>(cap, g - j0);
    if (n == cap) attend_values<S, NV, cap>(pj, ldp, vb, bf16, len, o);
    else
      for (int64_t j = 0; j < n; ++j) attend_values<S, NV, 1>(pj + j * ldp, ldp, vb, bf16, len, o + j * dh);
  }
  for (int64_t j = 0; j < g; ++j)
    for (int c = 0; c < NV; ++c)
      S::store(out + j * dh + c * 16, S::mul(S::load(out + j * dh + c * 16), S::set1(inv[j])));
}

template <typename S>
void attend(const float* q, const void* kb, const void* vb, bool bf16, int64_t len, int64_t g,
            int64_t dh, float* scratch, float* out) {
  if (dh == 32) attend_dh<S, 2>(q, kb, vb, bf16, len, g, scratch, out);
  else if (dh == 64) attend_dh<S, 4>(q, kb, vb, bf16, len, g, scratch, out);
  else attend_dh<S, 8>(q, kb, vb, bf16, len, g, scratch, out);
}

// ------------------------------------------------------------------ element-wise

template <typename S>
void scale_to_f32(const void* src, bool bf16, int64_t n, float scale, float* dst) {
  for (int64_t i = 0; i < n; i += 16) S::store(dst + i, S::mul(load_any<S>(src, bf16, i), S::set1(scale)));
}

template <typename S>
void store_from_f32(const float* src, void* dst, bool bf16, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) store_any<S>(dst, bf16, i, S::load(src + i));
}

// HF's order: normalise, then scale
template <typename S>
void rms_norm(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    typename S::F ss = S::zero();
    for (int64_t i = 0; i < d; i += 16) ss = S::fmadd(S::load(xr + i), S::load(xr + i), ss);
    const float mean = hsum<S>(ss) / static_cast<float>(d);
    const auto inv = S::set1(1.0f / std::sqrt(mean + eps));
    for (int64_t i = 0; i < d; i += 16) S::store(yr + i, S::mul(S::load(w + i), S::mul(S::load(xr + i), inv)));
  }
}

// x*cos + rotate_half(x)*sin, HF's convention
template <typename S>
void rope(float* x, int64_t heads, int64_t dh, const float* cos, const float* sin) {
  const int64_t half = dh / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * dh;
    for (int64_t i = 0; i < half; i += 16) {
      const auto a = S::load(xh + i), b = S::load(xh + half + i);
      const auto lo = S::add(S::mul(a, S::load(cos + i)), S::mul(S::neg(b), S::load(sin + i)));
      const auto hi = S::add(S::mul(b, S::load(cos + half + i)), S::mul(a, S::load(sin + half + i)));
      S::store(xh + i, lo);
      S::store(xh + half + i, hi);
    }
  }
}

// silu(g) * u, silu(g) = g * sigmoid(g), the sigmoid from e^-|g| on either side
template <typename S>
void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  const auto one = S::set1(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const auto x = S::load(g + i);
    const auto e = exp_nonpositive<S>(S::neg_abs(x));
    const auto sig = S::div(S::select_neg(x, e, one), S::add(one, e));
    S::store(out + i, S::mul(S::mul(x, sig), S::load(u + i)));
  }
}

template <typename S>
void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) S::store(x + i, S::add(S::load(x + i), S::load(y + i)));
}

// ------------------------------------------------------------------ LoRA

// 16 values of a LoRA matrix from element i: float32, or bfloat16 widened (exact: a shift)
template <typename S, bool BF16>
typename S::F load_lora(const void* m, int64_t i) {
  if constexpr (BF16) return S::load_bf16(static_cast<const uint16_t*>(m) + i);
  else return S::load(static_cast<const float*>(m) + i);
}

// whether row j of a matrix with row spans (lora_rows: null = every row whole) may be nonzero
// in columns [n0, n1)
inline bool lora_span_meets(const int32_t* span, int64_t j, int64_t n0, int64_t n1) {
  return span == nullptr || (span[2 * j] < span[2 * j + 1] && span[2 * j] < n1 && span[2 * j + 1] > n0);
}

// out[r] (=, or += when `add`) the sums over j of in[r][j] * m[j] for R rows, over the
// columns [n0, n0 + 16 * (NC - 1) + nt), nt in [1, 16]: NC chunks of 16, the last one nt wide.
// The R x NC accumulators stay in registers for the whole j loop, each chunk of m is loaded
// once for the R rows; rows of m that are zero across these columns (by `span`) are skipped,
// unread. A short last chunk is loaded whole where m holds 16 values there (its lanes past
// the columns are the next row's values, computed and dropped), through a zero-padded copy
// at m's end: every column's sum is the same whichever way it was loaded.
template <typename S, bool BF16, int R, int NC>
void lora_block(const float* const* in, const void* m, const int32_t* span, int64_t k, int64_t n, int64_t n0,
                int64_t nt, float* const* out, bool add) {
  using F = typename S::F;
  using E = typename std::conditional<BF16, uint16_t, float>::type;  // m's element
  const E* me = static_cast<const E*>(m);
  const int64_t width = 16 * (NC - 1) + nt, room = k * n - n0 - 16 * NC;
  const int64_t whole = nt == 16 ? k : room < 0 ? 0 : min_of<int64_t>(k, room / n + 1);  // rows loaded whole
  F acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = S::zero();
  const auto term = [&](int64_t j, const E* last) {  // row j; its last chunk from `last`
    F x[R];
    for (int r = 0; r < R; ++r) x[r] = S::set1(in[r][j]);
    for (int c = 0; c < NC; ++c) {
      const F w = load_lora<S, BF16>(c == NC - 1 ? last : me + j * n + n0 + 16 * c, 0);
      for (int r = 0; r < R; ++r) acc[r][c] = S::fmadd(x[r], w, acc[r][c]);
    }
  };
  for (int64_t j = 0; j < whole; ++j)
    if (lora_span_meets(span, j, n0, n0 + width)) term(j, me + j * n + n0 + 16 * (NC - 1));
  for (int64_t j = whole; j < k; ++j) {
    if (!lora_span_meets(span, j, n0, n0 + width)) continue;
    E buf[16] = {};
    std::memcpy(buf, me + j * n + n0 + 16 * (NC - 1), nt * sizeof(E));
    term(j, buf);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) {
      float* o = out[r] + n0 + 16 * c;
      if (c < NC - 1 || nt == 16) {
        S::store(o, add ? S::add(S::load(o), acc[r][c]) : acc[r][c]);
      } else {
        float part[16] = {};
        std::memcpy(part, o, nt * sizeof(float));
        S::store(part, add ? S::add(S::load(part), acc[r][c]) : acc[r][c]);
        std::memcpy(o, part, nt * sizeof(float));
      }
    }
}

// the last `rest` < 16 * C columns from n0 in one pass of (rest + 15) / 16 chunks
template <typename S, bool BF16, int R, int C>
void lora_rest(const float* const* in, const void* m, const int32_t* span, int64_t k, int64_t n, int64_t n0,
               int64_t rest, float* const* out, bool add) {
  if constexpr (C > 1)
    if (rest <= 16 * (C - 1)) return lora_rest<S, BF16, R, C - 1>(in, m, span, k, n, n0, rest, out, add);
  lora_block<S, BF16, R, C>(in, m, span, k, n, n0, rest - 16 * (C - 1), out, add);
}

// R rows over all n columns: passes of NC chunks (R * NC accumulators within the backend's
// register budget), then what is left in one pass (so a matrix of fewer than 16 * NC
// columns, an A^T, is one pass over its k rows)
template <typename S, bool BF16, int R>
void lora_rows_r(const float* const* in, const void* m, const int32_t* span, int64_t k, int64_t n,
                 float* const* out, bool add) {
  constexpr int NC = S::kAccumulators / R >= 1 ? S::kAccumulators / R : 1;
  int64_t n0 = 0;
  for (; n0 + 16 * NC <= n; n0 += 16 * NC) lora_block<S, BF16, R, NC>(in, m, span, k, n, n0, 16, out, add);
  if (n0 < n) lora_rest<S, BF16, R, NC>(in, m, span, k, n, n0, n - n0, out, add);
}

template <typename S, bool BF16>
void lora_rows_of(const float* const* in, const void* m, const int32_t* span, int64_t rows, int64_t k,
                  int64_t n, float* const* out, bool add) {
  static_assert(kLoraRows == 4, "lora_rows dispatches 1 to 4 rows");
  switch (rows) {
    case 1: lora_rows_r<S, BF16, 1>(in, m, span, k, n, out, add); break;
    case 2: lora_rows_r<S, BF16, 2>(in, m, span, k, n, out, add); break;
    case 3: lora_rows_r<S, BF16, 3>(in, m, span, k, n, out, add); break;
    case 4: lora_rows_r<S, BF16, 4>(in, m, span, k, n, out, add); break;
    default: break;
  }
}

template <typename S>
void lora_rows(const float* const* in, const void* m, bool m_bf16, const int32_t* span, int64_t rows,
               int64_t k, int64_t n, float* const* out, bool add) {
  if (m_bf16) lora_rows_of<S, true>(in, m, span, rows, k, n, out, add);
  else lora_rows_of<S, false>(in, m, span, rows, k, n, out, add);
}

template <typename S>
const Variant& make_variant() {
  static const Variant v{S::kName,        &quantize_rows<S>, &gemm_tile<S>, &attend<S>,
                         &scale_to_f32<S>, &store_from_f32<S>, &rms_norm<S>, &rope<S>,
                         &silu_mul<S>,     &add_into<S>,       &lora_rows<S>};
  return v;
}

}  // namespace
}  // namespace m4
