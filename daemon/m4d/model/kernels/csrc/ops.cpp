// m4's ISA-neutral drivers (ops.h): they split the work over the pool and call the active
// variant's kernels. Compiled for the baseline ISA.
#include "ops.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "pool.h"

namespace m4 {

void set_threads(int64_t n) { Pool::get().set_threads(n); }
int64_t threads() { return Pool::get().threads(); }

void linear(const Variant& v, Kind kind, const uint8_t* w, const void* sc, const void* x,
            bool x_bf16, int64_t m, int64_t k, int64_t n, void* y, bool y_bf16) {
  const int64_t kb = k / kBlock, tiles = n / kTile, esize = y_bf16 ? 2 : 4, xsize = x_bf16 ? 2 : 4;
  const int64_t tile_bytes = kind_tile_bytes(kind) * kb, tile_scales = kind_tile_scales(kind) * kb;
  const int64_t scale_size = kind_f16_scales(kind) ? 2 : 4;
  QuantRows xq;
  for (int64_t c0 = 0; c0 < m; c0 += kRowChunk) {  // quantize a chunk of rows, then every tile
    const int64_t rows = std::min(kRowChunk, m - c0);
    const QuantView view = xq.resize(rows, k);
    parallel(rows, 4, [&](int64_t r0, int64_t r1) {  // rows are quantized independently
      v.quantize_rows(static_cast<const char*>(x) + (c0 + r0) * k * xsize, x_bf16, r1 - r0, k,
                      rows_from(view, r0, kb));
    });
    parallel(tiles, std::max<int64_t>(1, tiles / 64), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        v.gemm_tile(kind, w + t * tile_bytes, static_cast<const char*>(sc) + t * tile_scales * scale_size,
                    view, rows, kb, static_cast<char*>(y) + (c0 * n + t * kTile) * esize, y_bf16, n);
    });
  }
}

void decode_attention(const Variant& v, const void* q, bool q_bf16, int64_t ldq, const void* kc,
                      const void* vc, bool kv_bf16, const int64_t* rows, const int64_t* pos,
                      int64_t nb, int64_t h, int64_t hkv, int64_t t_max, int64_t dh, float scale,
                      void* out) {
  const int64_t g = h / hkv, ldp = (t_max + 15) / 16 * 16;
  const int64_t qsize = q_bf16 ? 2 : 4, kvsize = kv_bf16 ? 2 : 4;
  parallel(nb * hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(g * dh), of(g * dh), scratch(g * ldp + 16 * dh);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / hkv, kvh = i % hkv;
      const int64_t base = (rows[b] * hkv + kvh) * t_max * dh * kvsize;
      v.scale_to_f32(static_cast<const char*>(q) + (b * ldq + kvh * g * dh) * qsize, q_bf16, g * dh,
                     scale, qf.data());
      v.attend(qf.data(), static_cast<const char*>(kc) + base, static_cast<const char*>(vc) + base,
               kv_bf16, pos[b] + 1, g, dh, scratch.data(), of.data());
      v.store_from_f32(of.data(), static_cast<char*>(out) + (b * h + kvh * g) * dh * qsize, q_bf16, g * dh);
    }
  });
}

namespace {

void write_kv(const Variant& v, const float* src, void* cache, bool bf16, int64_t hkv,
              int64_t t_max, int64_t dh, int64_t row, int64_t pos) {
  const int64_t esize = bf16 ? 2 : 4;
  for (int64_t h = 0; h < hkv; ++h)
    v.store_from_f32(src + h * dh, static_cast<char*>(cache) + (((row * hkv + h) * t_max + pos) * dh) * esize,
                     bf16, dh);
}

// per row, so splitting the rows over the pool changes no bits
void rms_norm_rows(const Variant& v, const float* x, const float* w, int64_t rows, int64_t d,
                   float eps, float* y) {
  parallel(rows, 4, [&](int64_t r0, int64_t r1) { v.rms_norm(x + r0 * d, w, r1 - r0, d, eps, y + r0 * d); });
}

// rows with an adapter, by adapter, in groups of up to kLoraRows sharing one (a group reads
// its matrices once for all its rows)
struct LoraGroup {
  int64_t adapter, n;
  int64_t rows[kLoraRows];
};

std::vector<LoraGroup> lora_groups(const Lora& lora, int64_t nb) {
  std::vector<LoraGroup> groups;
  if (lora.adapters == nullptr || lora.n_adapters == 0) return groups;
  std::vector<int64_t> order;
  for (int64_t b = 0; b < nb; ++b)
    if (lora.adapters[b] >= 0) order.push_back(b);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lora.adapters[a] < lora.adapters[b]; });
  for (const int64_t b : order) {
    if (groups.empty() || groups.back().adapter != lora.adapters[b] || groups.back().n == kLoraRows)
      groups.push_back({lora.adapters[b], 0, {}});
    groups.back().rows[groups.back().n++] = b;
  }
  return groups;
}

// y[b] += (u[b] @ A) @ B for the rows of every group whose adapter touches linear `which` of
// layer l (u rows k_in values apart, y rows n_out apart); rows are independent
void add_lora(const Variant& v, const Lora& lora, const std::vector<LoraGroup>& groups, int64_t l,
              int64_t n_layers, int which, const float* u, int64_t k_in, float* y, int64_t n_out) {
  if (groups.empty()) return;
  parallel(static_cast<int64_t>(groups.size()), 1, [&](int64_t g0, int64_t g1) {
    float t[kLoraRows * kLoraMaxRank];  // u @ A per row
    for (int64_t g = g0; g < g1; ++g) {
      const LoraGroup& group = groups[g];
      const LoraPair& p = lora.pairs[(group.adapter * n_layers + l) * 4 + which];
      if (p.r == 0) continue;
      const float* in[kLoraRows];
      float* mid[kLoraRows];
      float* out[kLoraRows];
      for (int64_t i = 0; i < group.n; ++i) {
        in[i] = u + group.rows[i] * k_in;
        mid[i] = t + i * p.r;
        out[i] = y + group.rows[i] * n_out;
      }
      v.lora_rows(in, p.a, p.bf16, nullptr, group.n, k_in, p.r, mid, false);
      v.lora_rows(mid, p.b, p.bf16, p.span, group.n, p.r, n_out, out, true);
    }
  });
}

}  // namespace

void decode_layers(const Variant& v, float* x, const Layer* layers, int64_t n_layers,
                   const DecodeShape& s, const int64_t* rows, const int64_t* pos, const float* cos,
                   const float* sin, const Lora& lora) {
  const int64_t nb = s.nb, d = s.d, ffn = s.ffn, dh = s.dh;
  const int64_t q_size = s.n_heads * dh, kv_size = s.n_kv_heads * dh, qkv = q_size + 2 * kv_size;
  std::vector<float> h(nb * d), y(nb * std::max({qkv, 2 * ffn, d})), attn(nb * q_size), act(nb * ffn);
  const std::vector<LoraGroup> groups = lora_groups(lora, nb);  // empty: no row has an adapter
  for (int64_t l = 0; l < n_layers; ++l) {
    const Layer& L = layers[l];
    // attention
    rms_norm_rows(v, x, L.attn_norm, nb, d, s.eps, h.data());
    linear(v, L.qkv.kind, L.qkv.w, L.qkv.sc, h.data(), false, nb, d, qkv, y.data(), false);  // [B, q | k | v]
    add_lora(v, lora, groups, l, n_layers, 0, h.data(), d, y.data(), qkv);
    parallel(nb, 2, [&](int64_t b0, int64_t b1) {  // RoPE on q and k; k and v into the cache
      for (int64_t b = b0; b < b1; ++b) {
        float* yb = y.data() + b * qkv;
        v.rope(yb, s.n_heads + s.n_kv_heads, dh, cos + b * dh, sin + b * dh);
        write_kv(v, yb + q_size, L.k_cache, s.kv_bf16, s.n_kv_heads, s.t_max, dh, rows[b], pos[b]);
        write_kv(v, yb + q_size + kv_size, L.v_cache, s.kv_bf16, s.n_kv_heads, s.t_max, dh, rows[b], pos[b]);
      }
    });
    // every row's heads attend, q read in place from y (rows qkv values apart)
    decode_attention(v, y.data(), false, qkv, L.k_cache, L.v_cache, s.kv_bf16, rows, pos, nb,
                     s.n_heads, s.n_kv_heads, s.t_max, dh, s.scale, attn.data());
    linear(v, L.o.kind, L.o.w, L.o.sc, attn.data(), false, nb, q_size, d, y.data(), false);
    add_lora(v, lora, groups, l, n_layers, 1, attn.data(), q_size, y.data(), d);
    v.add_into(x, y.data(), nb * d);
    // feed-forward
    rms_norm_rows(v, x, L.ffn_norm, nb, d, s.eps, h.data());
    linear(v, L.w13.kind, L.w13.w, L.w13.sc, h.data(), false, nb, d, 2 * ffn, y.data(), false);  // [B, gate | up]
    add_lora(v, lora, groups, l, n_layers, 2, h.data(), d, y.data(), 2 * ffn);
    parallel(nb, 2, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        v.silu_mul(y.data() + b * 2 * ffn, y.data() + b * 2 * ffn + ffn, ffn, act.data() + b * ffn);
    });
    linear(v, L.w2.kind, L.w2.w, L.w2.sc, act.data(), false, nb, ffn, d, y.data(), false);
    add_lora(v, lora, groups, l, n_layers, 3, act.data(), ffn, y.data(), d);
    v.add_into(x, y.data(), nb * d);
  }
}

}  // namespace m4
