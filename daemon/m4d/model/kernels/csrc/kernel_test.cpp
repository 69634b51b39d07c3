// A standalone test of m4's kernel variants (no torch, no Python): every variant this CPU
// runs against the scalar reference on fixed pseudo-random inputs, through the same drivers
// the daemon uses (ops.h). Every result must be bit-identical. Built natively by the test
// suite, and cross-compiled for AArch64 and run under qemu-user to prove the NEON variant.
// Prints one line per check and "N passed, M failed"; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ops.h"
#include "variant.h"

namespace {

struct Rng {  // xorshift64*: the same numbers on every machine
  uint64_t s;
  uint64_t next() { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; return s * 2685821657736338717ull; }
  float uniform() { return static_cast<float>(next() >> 40) / static_cast<float>(1u << 24); }  // [0, 1)
  float normal() { return (uniform() + uniform() + uniform() + uniform() - 2.0f) * 1.7f; }
};

uint16_t to_half(float f) {  // exact for the values used (small normals, scaled powers)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const int32_t exp = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
  const uint32_t man = (u >> 13) & 0x3FF;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exp) << 10) | man);
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

int passed = 0, failed = 0;

template <typename T>
void check(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  const bool same = got.size() == want.size() && std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0;
  std::printf("%s %s\n", same ? "ok  " : "FAIL", what.c_str());
  (same ? passed : failed)++;
}

// A packed weight of `kind` for [n, k]: random bytes within the kind's value range, scales.
struct Weight {
  std::vector<uint8_t> w;
  std::vector<uint8_t> sc;  // fp16 or fp32 values, raw
};

Weight make_weight(m4::Kind kind, int64_t n, int64_t k, Rng& rng) {
  const int64_t blocks = n / m4::kTile * (k / m4::kBlock);
  Weight out;
  out.w.resize(blocks * m4::kind_tile_bytes(kind));
  for (auto& b : out.w) {
    const uint64_t r = rng.next() >> 33;
    if (m4::kind_is_q4(kind) || m4::kind_is_q5(kind)) b = static_cast<uint8_t>(r);
    else if (kind == m4::Kind::Q8U_F32 || kind == m4::Kind::Q8U_F32_G16) b = static_cast<uint8_t>(r % 128);
    else b = static_cast<uint8_t>(1 + r % 255);  // q + 128 with q in [-127, 127]
  }
  const int64_t ns = blocks * m4::kind_tile_scales(kind);
  const bool f16 = m4::kind_f16_scales(kind);
  out.sc.resize(ns * (f16 ? 2 : 4));
  for (int64_t i = 0; i < ns; ++i) {
    const int64_t per_block = m4::kind_tile_scales(kind) / m4::kTile;  // rows of 16: d.. then m..
    const bool is_min = m4::kind_has_min(kind) && (i / m4::kTile) % per_block >= per_block / 2;
    const float v = is_min ? -0.1f * rng.uniform() : 0.002f + 0.01f * rng.uniform();
    if (f16) {
      const uint16_t h = to_half(v);
      std::memcpy(out.sc.data() + 2 * i, &h, 2);
    } else {
      std::memcpy(out.sc.data() + 4 * i, &v, 4);
    }
  }
  return out;
}

std::vector<float> randn(int64_t n, Rng& rng, float scale = 1.0f) {
  std::vector<float> v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

void run_linears(const m4::Variant& ref, const m4::Variant& v) {
  const m4::Kind kinds[] = {m4::Kind::Q4_F16, m4::Kind::Q4_F32, m4::Kind::Q8_F16,
                            m4::Kind::Q8_F32, m4::Kind::Q8_F32_G16, m4::Kind::Q8U_F32,
                            m4::Kind::Q8U_F32_G16, m4::Kind::Q5_F16};
  for (const m4::Kind kind : kinds) {
    for (const int64_t m : {1, 3, 9, 70}) {
      Rng rng{0x9E3779B97F4A7C15ull + static_cast<uint64_t>(kind) * 131 + m};
      const int64_t n = 48, k = 160;
      const Weight w = make_weight(kind, n, k, rng);
      std::vector<float> x = randn(m * k, rng);
      if (m > 2) std::fill(x.begin() + k, x.begin() + 2 * k, 0.0f);  // an all-zero row
      for (const bool bf16 : {false, true}) {
        std::vector<uint16_t> xb(x.size());
        for (size_t i = 0; i < x.size(); ++i) xb[i] = to_bf16(x[i]);
        const void* xp = bf16 ? static_cast<const void*>(xb.data()) : x.data();
        std::vector<float> want(m * n), got(m * n);
        m4::linear(ref, kind, w.w.data(), w.sc.data(), xp, bf16, m, k, n, want.data(), false);
        m4::linear(v, kind, w.w.data(), w.sc.data(), xp, bf16, m, k, n, got.data(), false);
        check(std::string(v.name) + " linear kind " + std::to_string(static_cast<int>(kind)) + " m " +
                  std::to_string(m) + (bf16 ? " bf16 in" : " f32 in"), got, want);
        std::vector<uint16_t> want16(m * n), got16(m * n);
        m4::linear(ref, kind, w.w.data(), w.sc.data(), xp, bf16, m, k, n, want16.data(), true);
        m4::linear(v, kind, w.w.data(), w.sc.data(), xp, bf16, m, k, n, got16.data(), true);
        check(std::string(v.name) + " linear kind " + std::to_string(static_cast<int>(kind)) + " m " +
                  std::to_string(m) + " bf16 out", got16, want16);
      }
    }
  }
}

void run_attention(const m4::Variant& ref, const m4::Variant& v) {
  for (const int64_t dh : {32, 64, 128}) {
    for (const bool kv_bf16 : {false, true}) {
      Rng rng{77u + static_cast<uint64_t>(dh) + kv_bf16};
      const int64_t slots = 3, hkv = 2, h = 6, t_max = 50, nb = 4;
      const std::vector<float> kf = randn(slots * hkv * t_max * dh, rng), vf = randn(slots * hkv * t_max * dh, rng);
      std::vector<uint16_t> kb(kf.size()), vb(vf.size());
      for (size_t i = 0; i < kf.size(); ++i) { kb[i] = to_bf16(kf[i]); vb[i] = to_bf16(vf[i]); }
      const void* kc = kv_bf16 ? static_cast<const void*>(kb.data()) : kf.data();
      const void* vc = kv_bf16 ? static_cast<const void*>(vb.data()) : vf.data();
      const std::vector<float> q = randn(nb * h * dh, rng, 2.0f);
      const int64_t rows[] = {2, 0, 1, 2}, pos[] = {0, 15, 16, 49};
      std::vector<float> want(nb * h * dh), got(nb * h * dh);
      m4::decode_attention(ref, q.data(), false, h * dh, kc, vc, kv_bf16, rows, pos, nb, h, hkv, t_max, dh,
                           0.125f, want.data());
      m4::decode_attention(v, q.data(), false, h * dh, kc, vc, kv_bf16, rows, pos, nb, h, hkv, t_max, dh,
                           0.125f, got.data());
      check(std::string(v.name) + " attention dh " + std::to_string(dh) + (kv_bf16 ? " bf16 kv" : " f32 kv"),
            got, want);
    }
  }
}

// Two random layers of a small Llama, their caches' initial bytes and a step's inputs.
struct DecodeFixture {
  static constexpr int64_t d = 64, h = 4, hkv = 2, dh = 32, ffn = 96, t_max = 40, layers = 2;
  static constexpr int64_t q = h * dh, kv = hkv * dh, qkv = q + 2 * kv;
  int64_t nb, slots;
  std::vector<int64_t> rows, pos;
  std::vector<Weight> weights;
  std::vector<std::vector<float>> norms;
  std::vector<float> x0, cos, sin;

  DecodeFixture(std::vector<int64_t> rows_in, std::vector<int64_t> pos_in, int64_t n_slots)
      : nb(static_cast<int64_t>(rows_in.size())), slots(n_slots), rows(std::move(rows_in)), pos(std::move(pos_in)) {
    Rng rng{4242};
    for (int64_t l = 0; l < layers; ++l) {
      weights.push_back(make_weight(m4::Kind::Q4_F16, qkv, d, rng));
      weights.push_back(make_weight(m4::Kind::Q8_F32_G16, d, h * dh, rng));
      weights.push_back(make_weight(m4::Kind::Q4_F32, 2 * ffn, d, rng));
      weights.push_back(make_weight(l == 0 ? m4::Kind::Q8U_F32 : m4::Kind::Q8U_F32_G16, d, ffn, rng));
      std::vector<float> nrm(2 * d);
      for (auto& x : nrm) x = 0.5f + rng.uniform();
      norms.push_back(nrm);
    }
    x0 = randn(nb * d, rng);
    cos = randn(nb * dh, rng, 0.5f);
    sin = randn(nb * dh, rng, 0.5f);
  }

  // the step on `var` from the same initial caches: x after the layers, and the caches
  void run(const m4::Variant& var, bool kv_bf16, const m4::Lora& lora, std::vector<float>& out,
           std::vector<uint8_t>& caches) const {
    const int64_t cache_bytes = slots * hkv * t_max * dh * (kv_bf16 ? 2 : 4);
    std::vector<uint8_t> cache(2 * layers * cache_bytes);
    Rng crng{99};
    for (size_t i = 0; i < cache.size(); i += 2) {  // finite values of either dtype
      const uint16_t bits = to_bf16(crng.normal());
      std::memcpy(cache.data() + i, &bits, 2);
    }
    if (!kv_bf16)
      for (size_t i = 0; i < cache.size(); i += 4) {
        const float f = crng.normal();
        std::memcpy(cache.data() + i, &f, 4);
      }
    std::vector<m4::Layer> plan;
    for (int64_t l = 0; l < layers; ++l) {
      const Weight* w = &weights[4 * l];
      plan.push_back({norms[l].data(), {m4::Kind::Q4_F16, w[0].w.data(), w[0].sc.data()},
                      {m4::Kind::Q8_F32_G16, w[1].w.data(), w[1].sc.data()}, norms[l].data() + d,
                      {m4::Kind::Q4_F32, w[2].w.data(), w[2].sc.data()},
                      {l == 0 ? m4::Kind::Q8U_F32 : m4::Kind::Q8U_F32_G16, w[3].w.data(), w[3].sc.data()},
                      cache.data() + 2 * l * cache_bytes, cache.data() + (2 * l + 1) * cache_bytes});
    }
    out = x0;
    const m4::DecodeShape shape{nb, d, ffn, h, hkv, dh, t_max, kv_bf16, 1e-5f, 0.17677669f};
    m4::decode_layers(var, out.data(), plan.data(), layers, shape, rows.data(), pos.data(), cos.data(),
                      sin.data(), lora);
    caches = cache;
  }
};

void run_decode_step(const m4::Variant& ref, const m4::Variant& v) {
  const DecodeFixture f({1, 0, 2}, {5, 0, 39}, 3);
  for (const bool kv_bf16 : {false, true}) {
    std::vector<float> out[2];
    std::vector<uint8_t> caches[2];
    for (int which = 0; which < 2; ++which) f.run(which == 0 ? ref : v, kv_bf16, {}, out[which], caches[which]);
    check(std::string(v.name) + " decode step" + (kv_bf16 ? " bf16 kv" : " f32 kv"), out[1], out[0]);
    check(std::string(v.name) + " decode step's KV writes" + (kv_bf16 ? " bf16 kv" : " f32 kv"), caches[1], caches[0]);
  }
}

// Per-row LoRA adapters in the decode step: adapter 0 on five rows (a group of kLoraRows and
// one more) with ranks 16, 8, 24, 5 (a tail of 5 and 8 columns); adapter 1, ranks 7 and 40 on
// q/k/v and down only; two rows without. Every variant gives the scalar bits, and rows without
// an adapter (or a call whose rows all have none) give the bits of the step without LoRA.
void run_lora_step(const m4::Variant& ref, const m4::Variant& v) {
  using F = DecodeFixture;
  const DecodeFixture f({1, 0, 2, 6, 3, 5, 4, 7}, {5, 0, 39, 17, 1, 38, 20, 9}, 8);
  const int64_t k_in[4] = {F::d, F::h * F::dh, F::d, F::ffn}, n_out[4] = {F::qkv, F::d, 2 * F::ffn, F::d};
  const int64_t ranks[2][4] = {{16, 8, 24, 5}, {7, 0, 0, 40}};
  Rng rng{515};
  std::vector<std::vector<float>> mats;
  std::vector<m4::LoraPair> pairs;
  for (int a = 0; a < 2; ++a)
    for (int64_t l = 0; l < F::layers; ++l)
      for (int which = 0; which < 4; ++which) {
        const int64_t r = ranks[a][which];
        if (r == 0) {
          pairs.push_back({nullptr, nullptr, 0});
          continue;
        }
        mats.push_back(randn(k_in[which] * r, rng, 1.0f / std::sqrt(static_cast<float>(k_in[which]))));
        mats.push_back(randn(r * n_out[which], rng, 0.5f / std::sqrt(static_cast<float>(r))));
        pairs.push_back({mats[mats.size() - 2].data(), mats.back().data(), r});
      }
  const std::vector<int64_t> adapters = {0, -1, 1, 0, 0, -1, 0, 0}, none(adapters.size(), -1);
  const m4::Lora lora{pairs.data(), 2, adapters.data()}, unused{pairs.data(), 2, none.data()};
  for (const bool kv_bf16 : {false, true}) {
    const std::string tag = kv_bf16 ? " bf16 kv" : " f32 kv";
    std::vector<float> want, got, plain, all_none;
    std::vector<uint8_t> want_kv, got_kv, plain_kv, all_none_kv;
    f.run(ref, kv_bf16, lora, want, want_kv);
    f.run(v, kv_bf16, lora, got, got_kv);
    check(std::string(v.name) + " decode step with LoRA" + tag, got, want);
    check(std::string(v.name) + " decode step's KV writes with LoRA" + tag, got_kv, want_kv);
    f.run(v, kv_bf16, {}, plain, plain_kv);
    f.run(v, kv_bf16, unused, all_none, all_none_kv);
    check(std::string(v.name) + " decode step, LoRA on no row" + tag, all_none, plain);
    check(std::string(v.name) + " decode step's KV writes, LoRA on no row" + tag, all_none_kv, plain_kv);
    std::vector<float> got_plain_rows, want_plain_rows;  // the rows without an adapter
    bool moved = true;  // and every row with one differs from its plain self
    for (int64_t b = 0; b < f.nb; ++b) {
      const auto row = [&](const std::vector<float>& x) { return std::vector<float>(x.begin() + b * F::d, x.begin() + (b + 1) * F::d); };
      if (adapters[b] < 0) {
        const auto g = row(got), w = row(plain);
        got_plain_rows.insert(got_plain_rows.end(), g.begin(), g.end());
        want_plain_rows.insert(want_plain_rows.end(), w.begin(), w.end());
      } else {
        moved = moved && row(got) != row(plain);
      }
    }
    check(std::string(v.name) + " decode step with LoRA, rows without an adapter" + tag, got_plain_rows, want_plain_rows);
    check(std::string(v.name) + " decode step with LoRA moves the adapters' rows" + tag,
          std::vector<int>{moved ? 1 : 0}, std::vector<int>{1});
  }
}

// The adapters' storage forms: bfloat16 pairs (every variant gives the scalar bits, and a
// bf16 pair gives the bits of the float32 pair holding its values widened, also beside float32
// pairs of another adapter in the same call), and B's row spans (a fused linear's parts: each
// part's rows zero outside its slice of the output, skipped there) giving the bits of the same
// matrices without spans.
void run_lora_forms(const m4::Variant& ref, const m4::Variant& v) {
  using F = DecodeFixture;
  const DecodeFixture f({1, 0, 2, 6, 3, 5, 4, 7}, {5, 0, 39, 17, 1, 38, 20, 9}, 8);
  const int64_t k_in[4] = {F::d, F::h * F::dh, F::d, F::ffn}, n_out[4] = {F::qkv, F::d, 2 * F::ffn, F::d};
  // per linear, its parts' (rank, first column, end column): q | k | v, o whole, gate | up,
  // down with a row reaching columns [19, 45) only (not a multiple of 16) and a zero row
  struct Part { int64_t r, c0, c1; };
  const std::vector<Part> parts[4] = {
      {{6, 0, F::q}, {5, F::q, F::q + F::kv}, {5, F::q + F::kv, F::qkv}},
      {{8, 0, F::d}},
      {{12, 0, F::ffn}, {12, F::ffn, 2 * F::ffn}},
      {{3, 0, F::d}, {1, 19, 45}, {1, 7, 7}}};
  Rng rng{616};
  const int64_t n_adapters = 2;
  std::vector<std::vector<float>> mats;  // float32 values, bf16-exact for adapter 0
  std::vector<std::vector<uint16_t>> bits;  // adapter 0's as bf16
  std::vector<std::vector<int32_t>> spans;
  std::vector<m4::LoraPair> as_f32, as_bf16, with_spans;  // adapter 0 bf16 in the last two
  for (int64_t a = 0; a < n_adapters; ++a)
    for (int64_t l = 0; l < F::layers; ++l)
      for (int which = 0; which < 4; ++which) {
        int64_t r = 0;
        for (const Part& p : parts[which]) r += p.r;
        const float a_scale = 1.0f / std::sqrt(static_cast<float>(k_in[which]));
        std::vector<float> am = randn(k_in[which] * r, rng, a_scale);
        std::vector<float> bm(r * n_out[which], 0.0f);
        std::vector<int32_t> sp;
        int64_t j = 0;
        for (const Part& p : parts[which])
          for (int64_t t = 0; t < p.r; ++t, ++j) {
            for (int64_t c = p.c0; c < p.c1; ++c)
              bm[j * n_out[which] + c] = rng.normal() * 0.5f / std::sqrt(static_cast<float>(r));
            sp.push_back(static_cast<int32_t>(p.c0));
            sp.push_back(static_cast<int32_t>(p.c1));
          }
        std::vector<uint16_t> ab(am.size()), bb(bm.size());
        if (a == 0) {  // adapter 0's float32 values are its bf16 ones widened
          const auto round = [](std::vector<float>& f, std::vector<uint16_t>& b) {
            for (size_t i = 0; i < f.size(); ++i) {
              b[i] = to_bf16(f[i]);
              const uint32_t u = static_cast<uint32_t>(b[i]) << 16;
              std::memcpy(&f[i], &u, 4);
            }
          };
          round(am, ab);
          round(bm, bb);
        }
        mats.push_back(std::move(am));
        mats.push_back(std::move(bm));
        bits.push_back(std::move(ab));
        bits.push_back(std::move(bb));
        spans.push_back(std::move(sp));
        const float* fa = mats[mats.size() - 2].data();
        const float* fb = mats.back().data();
        const bool bf16 = a == 0;
        const void* pa = bf16 ? static_cast<const void*>(bits[bits.size() - 2].data()) : fa;
        const void* pb = bf16 ? static_cast<const void*>(bits.back().data()) : fb;
        as_f32.push_back({fa, fb, r});
        as_bf16.push_back({pa, pb, r, bf16});
        with_spans.push_back({pa, pb, r, bf16, spans.back().data()});
      }
  const std::vector<int64_t> adapters = {0, -1, 1, 0, 0, -1, 0, 1};
  const m4::Lora f32{as_f32.data(), n_adapters, adapters.data()}, bf16{as_bf16.data(), n_adapters, adapters.data()},
      spanned{with_spans.data(), n_adapters, adapters.data()};
  for (const bool kv_bf16 : {false, true}) {
    const std::string tag = kv_bf16 ? " bf16 kv" : " f32 kv";
    std::vector<float> want, got, wide, spanned_ref, spanned_got;
    std::vector<uint8_t> want_kv, got_kv, wide_kv, spanned_ref_kv, spanned_got_kv;
    f.run(ref, kv_bf16, bf16, want, want_kv);
    f.run(v, kv_bf16, bf16, got, got_kv);
    check(std::string(v.name) + " decode step with bf16 LoRA" + tag, got, want);
    check(std::string(v.name) + " decode step's KV writes with bf16 LoRA" + tag, got_kv, want_kv);
    f.run(v, kv_bf16, f32, wide, wide_kv);
    check(std::string(v.name) + " decode step, bf16 LoRA = its values widened to f32" + tag, got, wide);
    check(std::string(v.name) + " decode step's KV writes, bf16 LoRA = widened f32" + tag, got_kv, wide_kv);
    f.run(ref, kv_bf16, spanned, spanned_ref, spanned_ref_kv);
    f.run(v, kv_bf16, spanned, spanned_got, spanned_got_kv);
    check(std::string(v.name) + " decode step with LoRA row spans" + tag, spanned_got, spanned_ref);
    check(std::string(v.name) + " decode step, LoRA row spans skip only zeros" + tag, spanned_got, got);
    check(std::string(v.name) + " decode step's KV writes, LoRA row spans skip only zeros" + tag, spanned_got_kv,
          got_kv);
  }
}

}  // namespace

int main() {
  const m4::Variant* ref = m4::find_variant("scalar");
  if (ref == nullptr) {
    std::printf("FAIL no scalar variant\n0 passed, 1 failed\n");
    return 1;
  }
  std::printf("cpu features:");
  for (const char* f : m4::cpu_features()) std::printf(" %s", f);
  std::printf("\n");
  m4::set_threads(2);
  for (const m4::VariantInfo& info : m4::variants()) {
    if (info.table == nullptr) {
      std::printf("not runnable here: %s\n", info.name);
      continue;
    }
    std::printf("variant: %s\n", info.name);
    run_linears(*ref, *info.table);
    run_attention(*ref, *info.table);
    run_decode_step(*ref, *info.table);
    run_lora_step(*ref, *info.table);
    run_lora_forms(*ref, *info.table);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
