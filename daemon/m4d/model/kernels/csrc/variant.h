// The contract between m4's ISA-neutral code and its per-instruction-set kernels.
//
// Each variant (scalar, avx2, avxvnni, avx512vnni, neon_dotprod) is one translation unit
// compiled with its own flags (kernels_impl.h instantiated over that ISA's simd_*.h) that
// fills one `Variant` table of function pointers. The neutral code (ops.cpp: the linear,
// attention and decode-step drivers; pool.cpp; torch_ops.cpp) calls only through a table,
// so it is compiled for the baseline ISA and loads on any CPU of the architecture.
//
// Every variant computes the same numbers, bit for bit: integer block sums are exact, every
// float operation is lane-wise over 16 lanes in the same order (fused multiply-adds where the
// scalar reference uses std::fma, -ffp-contract=off elsewhere), and the few horizontal sums
// follow one fixed tree (see kernels_impl.h). kernel_test.cpp and the Python tests hold every
// variant to the scalar reference.
//
// Nothing here includes torch: the ARM variants are tested by a standalone program under
// qemu-user.

#pragma once

#include <cstdint>
#include <vector>

namespace m4 {

constexpr int64_t kBlock = 32;        // values per quant block (weights and activations)
constexpr int64_t kTile = 16;         // output channels per packed weight tile
constexpr float kLoRadix = 254.0f;    // the second activation digit's weight
constexpr int64_t kRowChunk = 64;     // activation rows quantized and multiplied per pass
constexpr int64_t kLoraRows = 4;      // rows sharing an adapter per lora_rows call, at most

// How a packed weight stores its blocks (m4d/model/quant.py packs them). Per tile of 16
// channels and block of 32 values:
//   Q4_*   256 bytes: 4 chunks of 64, chunk c lane j byte t = q[j][8c+t] | q[j][8c+4+t] << 4
//          (q 0..15); scales: 16 d then 16 m (w = d*q + m), fp16 or fp32
//   Q8_*   512 bytes: 8 chunks of 64, chunk g lane j byte t = q[j][4g+t] + 128 (q int8 in
//          [-127, 127]); scales: 16 d (per 32), or 16 d for values 0..15 then 16 for 16..31
//   Q8U_*  512 bytes as Q8_* but the byte is q itself (0..127, unsigned); 16 d then 16 m, or
//          per 16 values: 16 d (values 0..15), 16 d (16..31), 16 m (0..15), 16 m (16..31)
//   Q5_F16 320 bytes: the low 4 bits of u = q + 16 (q in [-16, 15]) as Q4_*'s 256, then their
//          5th bits, 64 bytes: byte 4j+t's bit g is value 4g+t of channel j (so a group's
//          bits sit where Q8_*'s chunk g has its bytes); scales 16 d fp16.
//          Sums are taken over u and corrected by 16 * sum(x) exactly: the numbers of Q8_F16.
enum class Kind : int64_t {
  Q4_F16 = 0,      // GGUF Q4_1 and Q4_0
  Q4_F32 = 1,      // GGUF Q4_K
  Q8_F16 = 2,      // GGUF Q8_0 (and Q5_0 held in bytes)
  Q8_F32 = 3,      // int8 per 32 with float32 scales
  Q8_F32_G16 = 4,  // GGUF Q6_K: a scale per 16 values
  Q8U_F32 = 5,     // GGUF Q5_K: unsigned values with a scale and a min per 32
  Q8U_F32_G16 = 6, // unsigned values with a scale and a min per 16: any of Q4_K, Q5_K, Q6_K
                   // (w = d*(q - 32) = d*q - 32d), so linears stored in a mix of them are one
  Q5_F16 = 7,      // GGUF Q5_0 in 5 bits (Q8_F16's numbers from 5/8 of its bytes)
};
constexpr int64_t kKinds = 8;

// (static: internal linkage in every translation unit, so the linker never hands a variant's
// ISA-specific copy of a shared inline function to code compiled for another ISA)
static constexpr bool kind_valid(int64_t k) { return k >= 0 && k < kKinds; }
static constexpr bool kind_is_q4(Kind k) { return k == Kind::Q4_F16 || k == Kind::Q4_F32; }
static constexpr bool kind_is_q5(Kind k) { return k == Kind::Q5_F16; }
static constexpr int64_t kQ5HighBits = 256;  // offset of Q5_F16's 5th-bit plane in a tile block
static constexpr bool kind_has_min(Kind k) {
  return kind_is_q4(k) || k == Kind::Q8U_F32 || k == Kind::Q8U_F32_G16;
}
static constexpr bool kind_per16(Kind k) { return k == Kind::Q8_F32_G16 || k == Kind::Q8U_F32_G16; }
static constexpr bool kind_f16_scales(Kind k) {
  return k == Kind::Q4_F16 || k == Kind::Q8_F16 || k == Kind::Q5_F16;
}
// signed weights stored as bytes q + 128
static constexpr bool kind_signed_bytes(Kind k) { return !kind_has_min(k) && !kind_is_q5(k); }
// weight bytes and scale values per (tile, block)
static constexpr int64_t kind_tile_bytes(Kind k) {
  return kind_is_q4(k) ? kTile * kBlock / 2 : kind_is_q5(k) ? kTile * kBlock * 5 / 8 : kTile * kBlock;
}
static constexpr int64_t kind_tile_scales(Kind k) {
  return kTile * (kind_has_min(k) ? 2 : 1) * (kind_per16(k) ? 2 : 1);
}

// A chunk of activation rows quantized per block of 32: two int8 digits per value,
// x ~ xd * (hi + lo/254), hi = round(x/xd), lo = round((x/xd - hi) * 254), rounding half to
// even, both in [-127, 127].
// The variants see it as raw pointers (QuantView): no std:: code is instantiated in a variant's
// translation unit (see kind_valid above for why).
struct QuantView {
  int32_t* q;     // [rows, K/32, 16]: 8 int32 of hi then 8 of lo, 4 int8 each
  float* d;       // [rows, K/32] xd
  float* s;       // [rows, K/32] the block's float sum of x
  int32_t* half;  // [rows, K/32, 2] 254*sum(hi) + sum(lo) over values 0..15, then 16..31
  float* s16;     // [rows, K/32, 2] the float sums of x over values 0..15, then 16..31
  int16_t* wide;  // [rows, K] 254*hi + lo per value, exact (|.| <= 32385): both digits in one
                  // int16, for ISAs whose widest integer product is 16-bit (avx2: vpmaddwd);
                  // filled only by variants whose GEMM reads it
};
// the view of rows [row, ...) of a view whose rows have kb blocks
static inline QuantView rows_from(const QuantView& v, int64_t row, int64_t kb) {
  return {v.q + row * kb * 16, v.d + row * kb, v.s + row * kb, v.half + row * kb * 2,
          v.s16 + row * kb * 2, v.wide + row * kb * kBlock};
}
struct QuantRows {
  std::vector<int32_t> q, half;
  std::vector<float> d, s, s16;
  std::vector<int16_t> wide;
  QuantView resize(int64_t rows, int64_t k) {
    q.resize(rows * k / 2);
    d.resize(rows * k / kBlock);
    s.resize(rows * k / kBlock);
    half.resize(rows * k / kBlock * 2);
    s16.resize(rows * k / kBlock * 2);
    wide.resize(rows * k);
    return {q.data(), d.data(), s.data(), half.data(), s16.data(), wide.data()};
  }
};

// The canonical horizontal sum of 16 lanes: per group of four lanes (x0 + x2) + (x1 + x3),
// then the groups as (g0 + g1) + (g2 + g3). Every variant sums 16 lanes in this order.
static inline float hsum_order(const float* x) {
  float g[4];
  for (int k = 0; k < 4; ++k) g[k] = (x[4 * k] + x[4 * k + 2]) + (x[4 * k + 1] + x[4 * k + 3]);
  return (g[0] + g[1]) + (g[2] + g[3]);
}

struct Variant {
  const char* name;
  // x: `rows` rows of k values (float32, or bfloat16 bits when `bf16`) -> out (sized for them)
  void (*quantize_rows)(const void* x, bool bf16, int64_t rows, int64_t k, QuantView out);
  // y[r][0..16) for rows [0, rows) of `x` against one packed tile: w and sc point at the
  // tile's first block; y float32 (or bfloat16 bits when `bf16_out`), ldy apart
  void (*gemm_tile)(Kind kind, const uint8_t* w, const void* sc, QuantView x,
                    int64_t rows, int64_t kb, void* y, bool bf16_out, int64_t ldy);
  // One (row, kv head) of decode attention: g query heads of dh values (float32, already
  // scaled) attend over positions [0, len) of kb/vb ([T, dh], float32 or bfloat16 bits);
  // scratch: at least g*(len+15)/16*16 + 16*dh floats; out: g x dh float32.
  void (*attend)(const float* q, const void* kb, const void* vb, bool kv_bf16, int64_t len,
                 int64_t g, int64_t dh, float* scratch, float* out);
  // dst[i] = src[i] * scale (src float32 or bf16 bits), n % 16 == 0
  void (*scale_to_f32)(const void* src, bool bf16, int64_t n, float scale, float* dst);
  // dst (float32 or bf16 bits, rounded to nearest even) = src, n % 16 == 0
  void (*store_from_f32)(const float* src, void* dst, bool bf16, int64_t n);
  // y = w * (x / sqrt(mean(x^2) + eps)) per row of d values
  void (*rms_norm)(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* y);
  // RoPE (rotate_half) in place on `heads` heads of dh values
  void (*rope)(float* x, int64_t heads, int64_t dh, const float* cos, const float* sin);
  // out = silu(g) * u over n values
  void (*silu_mul)(const float* g, const float* u, int64_t n, float* out);
  // x += y over n values
  void (*add_into)(float* x, const float* y, int64_t n);
  // A LoRA term's product for `rows` rows (at most kLoraRows) sharing one matrix m [k, n]
  // (contiguous, any n; float32, or bfloat16 bits when `m_bf16`, widened exactly): per row r,
  // acc[0..n) = sum over j in [0, k) of in[r][j] * m[j][0..n), accumulated in order of j by
  // fused multiply-adds from 0; then out[r][0..n) = acc, or out[r][0..n) + acc (one add) when
  // `add`. Every column is its own lane. `span` null, or [k][2]: m's row j is zero outside
  // columns [span[2j], span[2j+1]) (the caller's promise), and may be skipped there: a term
  // whose weight is an exact zero adds nothing, so the sums keep their bits (but for the sign
  // of a zero sum, or an infinite input times the zero).
  void (*lora_rows)(const float* const* in, const void* m, bool m_bf16, const int32_t* span,
                    int64_t rows, int64_t k, int64_t n, float* const* out, bool add);
};

// Variants compiled into this library, best first (x86: avx512vnni, avxvnni, avx2, scalar;
// aarch64: neon_i8mm, neon_dotprod, scalar). Each entry is null where the CPU cannot run it.
struct VariantInfo {
  const char* name;
  const Variant* table;  // null: compiled in but not runnable here
};
std::vector<VariantInfo> variants();
const Variant* find_variant(const char* name);  // runnable variant by name, or null
const Variant& active();                        // the one in use (best, unless set)
bool set_active(const char* name);              // false: unknown or not runnable here
std::vector<const char*> cpu_features();        // what the dispatcher saw, for the logs

// Per-variant factories (defined in variant_*.cpp; only those compiled in are referenced).
const Variant& variant_scalar();
#if defined(__x86_64__)
const Variant& variant_avx2();
const Variant& variant_avxvnni();
const Variant& variant_avx512vnni();
#endif
#if defined(__aarch64__)
const Variant& variant_neon_i8mm();
const Variant& variant_neon_dotprod();
#endif

}  // namespace m4
