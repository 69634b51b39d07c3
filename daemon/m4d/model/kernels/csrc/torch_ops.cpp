// torch.ops.m4.*: the kernels as torch operators. Checks every argument (a bad call raises
// a RuntimeError with a message, never reads out of bounds), then calls the ISA-neutral
// drivers (ops.h) with the active variant (dispatch.cpp). The schemas are declared in Python
// (m4d/model/kernels/__init__.py). Compiled for the baseline ISA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops.h"
#include "variant.h"

namespace {

using m4::Kind;

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
}

// A packed weight of `kind` for an [n, k] linear: whole tiles and blocks, the byte and scale
// counts its layout has (variant.h), contiguous.
Kind check_weight(const char* what, const at::Tensor& w, const at::Tensor& sc, int64_t kind_code,
                  int64_t n, int64_t k) {
  TORCH_CHECK(m4::kind_valid(kind_code), what, ": unknown weight kind ", kind_code);
  const Kind kind = static_cast<Kind>(kind_code);
  TORCH_CHECK(n > 0 && k > 0 && n % m4::kTile == 0 && k % m4::kBlock == 0, what,
              " needs N % 16 == 0 and K % 32 == 0, got [", n, ", ", k, "]");
  const int64_t blocks = n / m4::kTile * (k / m4::kBlock);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() &&
                  w.numel() == blocks * m4::kind_tile_bytes(kind),
              what, ": the packed weight must be contiguous uint8 with ", blocks * m4::kind_tile_bytes(kind),
              " bytes, got ", w.numel(), " ", w.scalar_type());
  const auto sdt = m4::kind_f16_scales(kind) ? at::kHalf : at::kFloat;
  TORCH_CHECK(sc.scalar_type() == sdt && sc.is_contiguous() && sc.device().is_cpu() &&
                  sc.numel() == blocks * m4::kind_tile_scales(kind),
              what, ": the scales must be contiguous ", sdt, " with ", blocks * m4::kind_tile_scales(kind),
              " values, got ", sc.numel(), " ", sc.scalar_type());
  return kind;
}

at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& sc,
                        int64_t kind_code, int64_t n, int64_t k, at::ScalarType out_dtype) {
  const Kind kind = check_weight("block_linear", w, sc, kind_code, n, k);
  check_x(x_in, k);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "out dtype must be float32 or bfloat16");
  at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options().dtype(out_dtype));
  if (m > 0)
    m4::linear(m4::active(), kind, w.data_ptr<uint8_t>(), sc.data_ptr(), x.data_ptr(),
               x.scalar_type() == at::kBFloat16, m, k, n, y.data_ptr(), out_dtype == at::kBFloat16);
  return y;
}

// rows and pos as int64 [nb], every row a cache slot in [0, slots) and every position in
// [0, t_max): the attention reads and the KV write index the cache with them.
std::pair<at::Tensor, at::Tensor> checked_rows_pos(const at::Tensor& rows_in, const at::Tensor& pos_in,
                                                   int64_t nb, int64_t slots, int64_t t_max,
                                                   const char* per) {
  at::Tensor rows = rows_in.to(at::kLong).contiguous(), pos = pos_in.to(at::kLong).contiguous();
  TORCH_CHECK(rows.numel() == nb && pos.numel() == nb, "rows and pos need one entry per ", per);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < slots, "cache row ", rp[b], " out of range [0, ", slots, ")");
    TORCH_CHECK(pp[b] >= 0 && pp[b] < t_max, "position ", pp[b], " out of range [0, ", t_max, ")");
  }
  return {rows, pos};
}

void check_heads(int64_t h, int64_t hkv, int64_t dh) {
  TORCH_CHECK(dh == 32 || dh == 64 || dh == 128, "head dim must be 32, 64 or 128, got ", dh);
  TORCH_CHECK(hkv > 0 && h % hkv == 0 && h / hkv <= 128,
              "query heads must be a multiple of kv heads (at most 128 per kv head)");
}

bool check_caches(const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "k_cache and v_cache must both be [S, Hkv, T, Dh]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.device().is_cpu() && v.device().is_cpu(),
              "the caches must be contiguous CPU tensors");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "the caches must both be float32 or bfloat16");
  return k.scalar_type() == at::kBFloat16;
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& rows_in, const at::Tensor& pos_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.device().is_cpu(), "q must be [B, H, Dh] on the CPU, got ", q_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16");
  const bool kv_bf16 = check_caches(k_cache, v_cache);
  const int64_t nb = q_in.size(0), h = q_in.size(1), dh = q_in.size(2);
  const int64_t slots = k_cache.size(0), hkv = k_cache.size(1), t_max = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dh, "head dim must match the cache's");
  check_heads(h, hkv, dh);
  at::Tensor q = q_in.contiguous();
  const auto [rows, pos] = checked_rows_pos(rows_in, pos_in, nb, slots, t_max, "query");
  at::Tensor out = at::empty_like(q);
  m4::decode_attention(m4::active(), q.data_ptr(), q.scalar_type() == at::kBFloat16, h * dh,
                       k_cache.data_ptr(), v_cache.data_ptr(), kv_bf16, rows.data_ptr<int64_t>(),
                       pos.data_ptr<int64_t>(), nb, h, hkv, t_max, dh, static_cast<float>(scale),
                       out.data_ptr());
  return out;
}

constexpr int64_t kLayerTensors = 12;  // per layer, in this order:
// attention norm [D] f32, wqkv (w, sc), wo (w, sc), ffn norm [D] f32, w13 (w, sc), w2 (w, sc),
// k cache, v cache [S, Hkv, T, Dh] (f32 or bf16); `kinds` holds the four linears' kinds

constexpr int64_t kLoraTensors = 8;  // per (adapter, layer), adapter-major, in this order:
// qkv A^T, B^T, o A^T, B^T, w13 A^T, B^T, w2 A^T, B^T: A^T [k_in, r], B^T [r, n_out] (the
// scaling folded in), both contiguous, both float32 or both bfloat16; two empty tensors:
// linear untouched. Any pair may be followed by an int32 tensor, its B^T's row spans: [r, 2],
// row j zero outside columns [start, stop) (the kernels skip those zeros: the caller's
// promise, not checked), or empty: every row whole.

// The adapters' pairs in ops.h's order, every one checked against its linear's shape, and
// the rows' adapter indices (int64 [B], -1 or in [0, n_adapters)).
struct CheckedLora {
  std::vector<m4::LoraPair> pairs;
  int64_t n_adapters = 0;
  at::Tensor adapters;  // undefined: no row has an adapter

  m4::Lora lora() const {
    return {pairs.data(), n_adapters, adapters.defined() ? adapters.data_ptr<int64_t>() : nullptr};
  }
};

bool is_span(const at::Tensor& t) { return at::isIntegralType(t.scalar_type(), /*includeBool=*/true); }

CheckedLora checked_lora(at::TensorList lora, const std::optional<at::Tensor>& adapters_in, int64_t nb,
                         int64_t n_layers, const int64_t (&k_in)[4], const int64_t (&n_out)[4]) {
  static const char* const names[4] = {"qkv", "o", "w13", "w2"};
  CheckedLora out;
  // (A^T, B^T, row spans or null) in order: a pair takes the integer tensor after it
  std::vector<std::tuple<const at::Tensor*, const at::Tensor*, const at::Tensor*>> found;
  size_t i = 0;
  while (i + 1 < lora.size() && !is_span(lora[i])) {
    const bool spans = i + 2 < lora.size() && is_span(lora[i + 2]);
    found.emplace_back(&lora[i], &lora[i + 1], spans ? &lora[i + 2] : nullptr);
    i += spans ? 3 : 2;
  }
  const int64_t per_adapter = 4 * n_layers;  // pairs
  const int64_t n_pairs = static_cast<int64_t>(found.size());
  TORCH_CHECK(i == lora.size() && n_pairs % per_adapter == 0, "lora must hold ", kLoraTensors,
              " tensors per adapter and layer (A^T and B^T of qkv, o, w13, w2, each pair optionally "
              "followed by its int32 row spans): ", per_adapter, " pairs per adapter for ", n_layers,
              " layers, got ", lora.size(), " tensors",
              i == lora.size() ? " making " + std::to_string(n_pairs) + " pairs"
              : is_span(lora[i]) ? " (tensor " + std::to_string(i) + " is integer but follows no pair)"
                                 : " (the last one has no B^T)");
  const int64_t n_adapters = n_pairs / per_adapter;
  out.n_adapters = n_adapters;
  out.pairs.resize(n_pairs);
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t a = p / (4 * n_layers), l = p / 4 % n_layers, which = p % 4;
    const auto [at_p, bt_p, span_p] = found[p];
    const at::Tensor& at_t = *at_p;
    const at::Tensor& bt_t = *bt_p;
    const bool has_span = span_p != nullptr && span_p->numel() > 0;
    if (at_t.numel() == 0 && bt_t.numel() == 0) {  // r = 0: this linear untouched
      TORCH_CHECK(!has_span, "lora: adapter ", a, " layer ", l, " ", names[which],
                  ": row spans given for a linear the adapter leaves alone");
      continue;
    }
    const int64_t k = k_in[which], n = n_out[which];
    auto fits = [](const at::Tensor& t) {
      return (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) && t.is_contiguous() &&
             t.device().is_cpu() && t.dim() == 2;
    };
    TORCH_CHECK(fits(at_t) && fits(bt_t) && at_t.scalar_type() == bt_t.scalar_type(), "lora: adapter ", a,
                " layer ", l, " ", names[which], ": A^T and B^T must be contiguous CPU matrices, both float32 "
                "or both bfloat16, got ", at_t.scalar_type(), " ", at_t.sizes(), " and ", bt_t.scalar_type(), " ",
                bt_t.sizes());
    const int64_t r = at_t.size(1);
    TORCH_CHECK(at_t.size(0) == k && r >= 1 && r <= m4::kLoraMaxRank && bt_t.size(0) == r && bt_t.size(1) == n,
                "lora: adapter ", a, " layer ", l, " ", names[which], ": A^T must be [", k,
                ", r] and B^T [r, ", n, "] with 1 <= r <= ", m4::kLoraMaxRank, ", got ", at_t.sizes(),
                " and ", bt_t.sizes());
    const int32_t* span = nullptr;
    if (has_span) {
      const at::Tensor& st = *span_p;
      TORCH_CHECK(st.scalar_type() == at::kInt && st.is_contiguous() && st.device().is_cpu() &&
                      st.dim() == 2 && st.size(0) == r && st.size(1) == 2,
                  "lora: adapter ", a, " layer ", l, " ", names[which], ": B^T's row spans must be a "
                  "contiguous int32 [r, 2] = [", r, ", 2] CPU tensor (or empty), got ", st.scalar_type(), " ",
                  st.sizes());
      span = st.data_ptr<int32_t>();
      for (int64_t j = 0; j < r; ++j)
        TORCH_CHECK(0 <= span[2 * j] && span[2 * j] <= span[2 * j + 1] && span[2 * j + 1] <= n, "lora: adapter ",
                    a, " layer ", l, " ", names[which], ": row ", j, "'s span [", span[2 * j], ", ",
                    span[2 * j + 1], ") is not within [0, ", n, ")");
    }
    out.pairs[p] = {at_t.data_ptr(), bt_t.data_ptr(), r, at_t.scalar_type() == at::kBFloat16, span};
  }
  if (!adapters_in.has_value()) return out;
  const at::Tensor& ad = *adapters_in;
  TORCH_CHECK(!at::isFloatingType(ad.scalar_type()) && !at::isComplexType(ad.scalar_type()) &&
                  ad.scalar_type() != at::kBool && ad.device().is_cpu(),
              "adapters must be an integer CPU tensor, got ", ad.scalar_type());
  TORCH_CHECK(ad.numel() == nb, "adapters need one entry per row of x (", nb, "), got ", ad.numel());
  out.adapters = ad.to(at::kLong).contiguous();
  const int64_t* ap = out.adapters.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b)
    TORCH_CHECK(ap[b] >= -1 && ap[b] < n_adapters, "adapter ", ap[b], " of row ", b,
                " out of range: -1 (none) or [0, ", n_adapters, ")");
  return out;
}

// x [B, D] float32 through every layer for one decode step: row b is at position pos[b] of
// cache slot rows[b]; cos, sin [B, Dh] float32, its RoPE angles; row b adds adapter
// adapters[b]'s LoRA terms (lora: kLoraTensors per adapter and layer, and any pair's spans;
// none without adapters or where adapters[b] == -1). Returns the last layer's output [B, D].
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList layers, at::IntArrayRef kinds,
                         const at::Tensor& rows_in, const at::Tensor& pos_in, const at::Tensor& cos_t,
                         const at::Tensor& sin_t, int64_t n_heads, int64_t n_kv_heads, double eps,
                         double scale, at::TensorList lora, const std::optional<at::Tensor>& adapters) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be float32 [B, D] on the CPU, got ", x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(!layers.empty() && layers.size() % kLayerTensors == 0,
              "layers must hold ", kLayerTensors, " tensors per layer, got ", layers.size());
  const int64_t n_layers = static_cast<int64_t>(layers.size()) / kLayerTensors;
  TORCH_CHECK(static_cast<int64_t>(kinds.size()) == 4 * n_layers, "kinds must hold 4 per layer, got ",
              kinds.size());
  const int64_t nb = x_in.size(0), d = x_in.size(1);
  const at::Tensor& k0 = layers[10];
  TORCH_CHECK(k0.dim() == 4, "the k cache must be [S, Hkv, T, Dh]");
  const int64_t slots = k0.size(0), t_max = k0.size(2), dh = k0.size(3);
  TORCH_CHECK(n_kv_heads == k0.size(1), "head counts do not match the cache");
  check_heads(n_heads, n_kv_heads, dh);
  TORCH_CHECK(d % m4::kBlock == 0, "model dim must be a multiple of 32");
  const int64_t q_size = n_heads * dh, kv_size = n_kv_heads * dh, qkv = q_size + 2 * kv_size;
  TORCH_CHECK(q_size % m4::kBlock == 0 && qkv % m4::kTile == 0,
              "n_heads * head_dim must be a multiple of 32");
  TORCH_CHECK(m4::kind_valid(kinds[2]), "unknown weight kind ", kinds[2]);
  const int64_t w13_bytes = m4::kind_tile_bytes(static_cast<Kind>(kinds[2]));  // per 16x32 values
  const int64_t ffn = layers[6].numel() * m4::kTile * m4::kBlock / w13_bytes / d / 2;
  TORCH_CHECK(ffn > 0 && ffn % m4::kBlock == 0, "w13 must hold [2F, D] with F % 32 == 0");
  TORCH_CHECK(cos_t.scalar_type() == at::kFloat && sin_t.scalar_type() == at::kFloat &&
                  cos_t.is_contiguous() && sin_t.is_contiguous() && cos_t.dim() == 2 &&
                  cos_t.sizes() == sin_t.sizes() && cos_t.size(0) == nb && cos_t.size(1) == dh,
              "cos and sin must be contiguous float32 [B, Dh]");
  const auto [rows, pos] = checked_rows_pos(rows_in, pos_in, nb, slots, t_max, "row of x");
  bool kv_bf16 = false;
  std::vector<m4::Layer> plan(n_layers);
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* t = &layers[l * kLayerTensors];
    TORCH_CHECK(t[0].scalar_type() == at::kFloat && t[0].numel() == d && t[0].is_contiguous() &&
                    t[5].scalar_type() == at::kFloat && t[5].numel() == d && t[5].is_contiguous(),
                "layer ", l, ": the norms must be contiguous float32 [D]");
    kv_bf16 = check_caches(t[10], t[11]);
    TORCH_CHECK(t[10].sizes() == k0.sizes() && t[10].scalar_type() == k0.scalar_type(),
                "layer ", l, ": the caches must be alike in every layer");
    auto lin = [&](int i, int64_t n, int64_t k, int64_t which) {
      const Kind kind = check_weight("decode_layers", t[i], t[i + 1], kinds[4 * l + which], n, k);
      return m4::Linear{kind, t[i].data_ptr<uint8_t>(), t[i + 1].data_ptr()};
    };
    plan[l] = {t[0].data_ptr<float>(), lin(1, qkv, d, 0),   lin(3, d, q_size, 1), t[5].data_ptr<float>(),
               lin(6, 2 * ffn, d, 2),  lin(8, d, ffn, 3),   t[10].data_ptr(),      t[11].data_ptr()};
  }
  const int64_t k_in[4] = {d, q_size, d, ffn}, n_out[4] = {qkv, d, 2 * ffn, d};
  const CheckedLora lo = checked_lora(lora, adapters, nb, n_layers, k_in, n_out);
  at::Tensor x = x_in.contiguous().clone();
  const m4::DecodeShape shape{nb, d, ffn, n_heads, n_kv_heads, dh, t_max, kv_bf16,
                              static_cast<float>(eps), static_cast<float>(scale)};
  if (nb > 0)
    m4::decode_layers(m4::active(), x.data_ptr<float>(), plan.data(), n_layers, shape,
                      rows.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), cos_t.data_ptr<float>(),
                      sin_t.data_ptr<float>(), lo.lora());
  return x;
}

void set_threads(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= 256, "kernel threads must be in [1, 256], got ", n);
  m4::set_threads(n);
}

int64_t get_threads() { return m4::threads(); }

// every variant compiled in, best first, and whether this CPU runs it
std::vector<std::string> compiled_variants() {
  std::vector<std::string> out;
  for (const auto& v : m4::variants()) out.emplace_back(v.name);
  return out;
}

std::vector<std::string> runnable_variants() {
  std::vector<std::string> out;
  for (const auto& v : m4::variants())
    if (v.table != nullptr) out.emplace_back(v.name);
  return out;
}

bool set_variant(c10::string_view name) { return m4::set_active(std::string(name).c_str()); }

std::string get_variant() { return m4::active().name; }

std::vector<std::string> cpu_features() {
  std::vector<std::string> out;
  for (const char* f : m4::cpu_features()) out.emplace_back(f);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(m4, CPU, m) {
  m.impl("block_linear", &block_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layers", &decode_layers);
}

TORCH_LIBRARY_IMPL(m4, CompositeExplicitAutograd, m) {
  m.impl("set_threads", &set_threads);
  m.impl("get_threads", &get_threads);
  m.impl("compiled_variants", &compiled_variants);
  m.impl("runnable_variants", &runnable_variants);
  m.impl("set_variant", &set_variant);
  m.impl("get_variant", &get_variant);
  m.impl("cpu_features", &cpu_features);
}
