// Which kernel variant runs: the CPU's features read once (x86: CPUID and XGETBV, so a
// feature the OS does not save the registers of counts as absent; AArch64: the auxiliary
// vector), the variants compiled into this library ranked best first, and the one place that
// decides: the best runnable variant unless the caller picks another runnable one.
// Compiled for the baseline ISA.
#include <atomic>
#include <cstring>
#include <vector>

#include "variant.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace m4 {
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false, avxvnni = false;
  bool avx512 = false, avx512vnni = false, avx512bf16 = false;
  bool dotprod = false, i8mm = false;
};

Features detect() {
  Features f;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool ymm_saved = (xcr0 & 0x6) == 0x6, zmm_saved = (xcr0 & 0xE6) == 0xE6;
  if (!avx || !ymm_saved) return Features{};
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.avx512 = zmm_saved && (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  f.avx512vnni = f.avx512 && (c & (1u << 11));
  __cpuid_count(7, 1, a, b, c, d);
  f.avxvnni = a & (1u << 4);
  f.avx512bf16 = f.avx512 && (a & (1u << 5));
#endif
#if defined(__aarch64__)
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  f.dotprod = hw & HWCAP_ASIMDDP;
#ifdef HWCAP2_I8MM
  f.i8mm = hw2 & HWCAP2_I8MM;
#endif
  (void)hw2;
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

struct Entry {
  const char* name;
  const Variant& (*make)();
  bool (*runnable)(const Features&);
};

// best first
const std::vector<Entry>& entries() {
  static const std::vector<Entry> list = {
#if defined(__x86_64__)
      {"avx512vnni", &variant_avx512vnni, [](const Features& f) { return f.avx512vnni && f.fma && f.f16c; }},
      {"avxvnni", &variant_avxvnni, [](const Features& f) { return f.avxvnni && f.avx2 && f.fma && f.f16c; }},
      {"avx2", &variant_avx2, [](const Features& f) { return f.avx2 && f.fma && f.f16c; }},
#endif
#if defined(__aarch64__)
      {"neon_i8mm", &variant_neon_i8mm, [](const Features& f) { return f.dotprod && f.i8mm; }},
      {"neon_dotprod", &variant_neon_dotprod, [](const Features& f) { return f.dotprod; }},
#endif
      {"scalar", &variant_scalar, [](const Features&) { return true; }},
  };
  return list;
}

std::atomic<const Variant*> chosen{nullptr};

}  // namespace

std::vector<VariantInfo> variants() {
  std::vector<VariantInfo> out;
  for (const Entry& e : entries()) out.push_back({e.name, e.runnable(features()) ? &e.make() : nullptr});
  return out;
}

const Variant* find_variant(const char* name) {
  for (const Entry& e : entries())
    if (std::strcmp(e.name, name) == 0) return e.runnable(features()) ? &e.make() : nullptr;
  return nullptr;
}

const Variant& active() {
  const Variant* v = chosen.load(std::memory_order_acquire);
  if (v != nullptr) return *v;
  for (const Entry& e : entries())  // the best the CPU runs; scalar always does
    if (e.runnable(features())) {
      chosen.store(&e.make(), std::memory_order_release);
      return e.make();
    }
  return variant_scalar();
}

bool set_active(const char* name) {
  const Variant* v = find_variant(name);
  if (v == nullptr) return false;
  chosen.store(v, std::memory_order_release);
  return true;
}

std::vector<const char*> cpu_features() {
  const Features& f = features();
  std::vector<const char*> out;
  if (f.avx2) out.push_back("avx2");
  if (f.fma) out.push_back("fma");
  if (f.f16c) out.push_back("f16c");
  if (f.avxvnni) out.push_back("avxvnni");
  if (f.avx512) out.push_back("avx512");
  if (f.avx512vnni) out.push_back("avx512vnni");
  if (f.avx512bf16) out.push_back("avx512bf16");
  if (f.dotprod) out.push_back("dotprod");
  if (f.i8mm) out.push_back("i8mm");
  return out;
}

}  // namespace m4
