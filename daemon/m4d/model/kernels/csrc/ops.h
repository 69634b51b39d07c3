// m4's ISA-neutral drivers: a quantized linear, decode attention and a whole decode step,
// over raw pointers (no torch), calling one kernel Variant's table. torch_ops.cpp checks the
// tensors and calls these; kernel_test.cpp calls them directly (also on ARM, under qemu).
#pragma once

#include <cstdint>

#include "variant.h"

namespace m4 {

void set_threads(int64_t n);  // total threads of the kernels' pool, the caller included
int64_t threads();

// y [m, n] = x [m, k] @ W^T; x float32 or bf16 bits, y float32 or bf16 bits; W packed as
// `kind` says (variant.h), n % 16 == 0, k % 32 == 0.
void linear(const Variant& v, Kind kind, const uint8_t* w, const void* sc, const void* x,
            bool x_bf16, int64_t m, int64_t k, int64_t n, void* y, bool y_bf16);

// Row b (of nb) attends its query heads q [h, dh] (ldq values between rows) over positions
// 0..pos[b] of cache slot rows[b]; caches [slots, hkv, t_max, dh]; out [nb, h, dh] in q's
// dtype. Float32 throughout; dh 32, 64 or 128; h / hkv <= 128.
void decode_attention(const Variant& v, const void* q, bool q_bf16, int64_t ldq, const void* kc,
                      const void* vc, bool kv_bf16, const int64_t* rows, const int64_t* pos,
                      int64_t nb, int64_t h, int64_t hkv, int64_t t_max, int64_t dh, float scale,
                      void* out);

struct Linear {
  Kind kind;
  const uint8_t* w;
  const void* sc;
};

struct Layer {  // one Llama layer of a decode step
  const float* attn_norm;  // [d]
  Linear qkv, o;           // [q | k | v] rows; o: [d, n_heads*dh]
  const float* ffn_norm;   // [d]
  Linear w13, w2;          // [gate | up] rows; down
  void* k_cache;           // [slots, hkv, t_max, dh], float32 or bf16 bits
  void* v_cache;
};

struct DecodeShape {
  int64_t nb, d, ffn, n_heads, n_kv_heads, dh, t_max;
  bool kv_bf16;
  float eps, scale;
};

constexpr int64_t kLoraMaxRank = 256;

// One adapter's low-rank term on one linear: y += (u @ a) @ b, a [k_in, r], b [r, n_out]
// contiguous, both float32 or both bfloat16 bits (widened exactly as they are read: a bf16
// pair gives the bits of the float32 pair holding the same values), the scaling already in
// b; r == 0: the adapter leaves the linear alone. `span` null, or [r][2]: b's row j is zero
// outside columns [span[2j], span[2j+1]) (a fused linear's parts: each part's rows reach only
// its slice of the output), and those zeros are not read.
struct LoraPair {
  const void* a;
  const void* b;
  int64_t r;  // 0 or [1, kLoraMaxRank]
  bool bf16 = false;
  const int32_t* span = nullptr;
};

// Per-row adapters (Punica's BGMV: the base GEMM shared by the batch, each row's own term).
struct Lora {
  const LoraPair* pairs;    // [n_adapters][n_layers][4]: qkv, o, w13, w2
  int64_t n_adapters;
  const int64_t* adapters;  // [nb]: -1 (no adapter) or in [0, n_adapters); null: none
};

// x [nb, d] float32 through every layer, in place: RMSNorm, q/k/v, RoPE (cos, sin [nb, dh]),
// the KV write at pos[b] of slot rows[b], attention, o, residual, RMSNorm, gate/up, SiLU, down,
// residual. A row with an adapter adds its term to each linear's output as soon as the base
// linear wrote it (before RoPE, before SiLU, before the residuals); rows without one compute
// exactly what they would with no adapters at all.
void decode_layers(const Variant& v, float* x, const Layer* layers, int64_t n_layers,
                   const DecodeShape& s, const int64_t* rows, const int64_t* pos, const float* cos,
                   const float* sin, const Lora& lora = {nullptr, 0, nullptr});

}  // namespace m4
