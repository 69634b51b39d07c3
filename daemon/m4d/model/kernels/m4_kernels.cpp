// M4's CPU kernels for batched decode (x86-64, AVX-512 with VNNI).
//
// The ops' schemas are declared in Python (m4d/model/kernels/__init__.py); this file gives
// their CPU implementations. Python loads it only on a CPU that has every instruction set it
// is compiled for.
//
// * q4_1_linear: y = x @ W^T with W in GGUF's Q4_1 (per 32 weights: w = d*q + m, q in 0..15)
//   and x quantized at run time per row and per 32 values to two int8 digits:
//   xd = absmax/127, hi = round(x/xd), lo = round((x/xd - hi) * 254), x ~ xd*(hi + lo/254)
//   (one digit, llama.cpp's Q8_1, cost SmolLM2 25x the KL against float32). A block's dot
//   product is then
//     d*xd/254 * (254*sum(q*hi) + sum(q*lo)) + m * sum(x)
//   where the bracket is exact in int32 (VNNI: u8 weights x s8 digits) and sum(x) is the
//   block's float sum. Each unpacked weight tile is reused by up to kRows rows, so a decode
//   batch of 16 costs little more than one row in weight traffic.
// * q8_0_linear: the same with GGUF's Q8_0 weights (w = d*q, q int8), stored as u8 q + 128 so
//   the activations stay the broadcast s8 operand; 128 * (254*sum(hi) + sum(lo)) is taken
//   off the int32 sum.
// * decode_attention: one query per row against a slot-addressed KV cache, read in place.
// * decode_layers: a whole decode step through every Llama layer of a w4a8 model (RMSNorm,
//   q/k/v, RoPE, the KV write, attention, o, residual, RMSNorm, gate/up, SiLU, down,
//   residual) in one call: the ~45 small torch ops per layer that glue the GEMMs together
//   cost a fifth of a 16-row step when TorchScript dispatches them one by one.
//
// Batch invariance: every output element is computed by the same sequence of operations
// whatever the batch holds (rows never share a reduction, blocks are summed in order), so a
// sequence's numbers do not depend on who it is batched with. No -ffast-math anywhere.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // values per quant block (Q4_1, Q8_0, activations)
constexpr int64_t kTile = 16;   // output channels per weight tile (one zmm of int32/float)
constexpr float kLoRadix = 254.0f;  // the second activation digit's weight
constexpr int kRows = 8;       // rows sharing one unpacked weight tile
constexpr int64_t kRowChunk = 64;  // rows quantized and multiplied per pass


// ---------------------------------------------------------------- the kernels' thread pool

// Runs a loop's chunks on the calling thread and on helper threads that join when they are
// free. Unlike an OpenMP team, the caller never waits for a helper to arrive: indices are
// claimed from a counter tagged with the job's generation, and at the end the caller waits
// only for chunks a helper has already claimed. So a helper that the OS has not scheduled
// (the second core is busy with the daemon's event loop) costs nothing; one that runs takes
// half the work. Helpers run at a lower priority (nice +10) than the process, spin briefly
// between jobs (the linears of one decode step come tens of microseconds apart) and then
// sleep until the next job.
class Pool {
 public:
  static Pool& get() {  // never destroyed: helpers may still be parked at process exit
    static Pool* pool = [] {
      auto* p = new Pool;
      pthread_atfork(nullptr, nullptr, [] { Pool::get().after_fork_in_child(); });
      return p;
    }();
    return *pool;
  }

  // Total threads the loops use, the caller included (1 = no helpers).
  void set_threads(int64_t n) {
    std::lock_guard<std::mutex> guard(run_mutex_);
    stop_helpers();
    for (int64_t i = 1; i < n; ++i) helpers_.emplace_back([this] { helper_loop(); });
  }

  int64_t threads() const { return static_cast<int64_t>(helpers_.size()) + 1; }

  // fn(begin, end) over [0, n) in chunks; returns when all of it has run.
  template <typename F>
  void run(int64_t n, int64_t chunk, const F& fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (n <= chunk || !busy.owns_lock() || helpers_.empty()) {  // nested or concurrent: inline
      fn(0, n);
      return;
    }
    std::function<void(int64_t, int64_t)> job = fn;
    job_ = &job;
    n_ = n;
    chunk_ = chunk;
    const uint64_t gen = ++generation_;
    state_.store(gen << 32, std::memory_order_seq_cst);  // publishes job_, n_, chunk_
    announced_.store(static_cast<uint32_t>(gen), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work(gen);
    state_.store((gen << 32) | kClosed, std::memory_order_seq_cst);
    while (in_flight_.load(std::memory_order_seq_cst) != 0) _mm_pause();
    job_ = nullptr;
  }

 private:
  static constexpr uint64_t kClosed = 0xFFFFFFFFu;

  // A forked child has none of the helper threads: forget them (their std::thread objects
  // are parked on the heap, as destroying a joinable one would terminate) and run alone.
  void after_fork_in_child() {
    for (auto& t : helpers_) new std::thread(std::move(t));
    helpers_.clear();
    new (&run_mutex_) std::mutex;
    new (&sleep_mutex_) std::mutex;
    new (&wake_) std::condition_variable;
    in_flight_.store(0);
    sleepers_.store(0);
  }

  // Claims chunks of job `gen` until none are left.
  void work(uint64_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_seq_cst);
      const uint64_t idx = s & 0xFFFFFFFFu;
      if ((s >> 32) != gen || idx == kClosed || static_cast<int64_t>(idx) >= n_) return;
      if (!state_.compare_exchange_weak(s, s + chunk_, std::memory_order_seq_cst)) continue;
      (*job_)(static_cast<int64_t>(idx), std::min<int64_t>(n_, static_cast<int64_t>(idx) + chunk_));
    }
  }

  void helper_loop() {
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
    uint32_t seen = announced_.load();
    while (!stop_.load()) {
      uint32_t now = announced_.load(std::memory_order_seq_cst);
      if (now == seen) {  // spin a while, then sleep until the next job
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
        while (announced_.load() == seen && !stop_.load() && std::chrono::steady_clock::now() < until)
          for (int i = 0; i < 64; ++i) _mm_pause();
        if (announced_.load() == seen && !stop_.load()) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return announced_.load(std::memory_order_seq_cst) != seen || stop_.load(); });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
        continue;
      }
      seen = now;
      in_flight_.fetch_add(1, std::memory_order_seq_cst);
      const uint64_t gen = state_.load(std::memory_order_seq_cst) >> 32;
      if (static_cast<uint32_t>(gen) == now) work(gen);
      in_flight_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  void stop_helpers() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true);
      wake_.notify_all();
    }
    for (auto& t : helpers_) t.join();
    helpers_.clear();
    stop_.store(false);
  }

  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> helpers_;
  std::atomic<uint64_t> state_{0};  // generation << 32 | next unclaimed index (kClosed: done)
  std::atomic<uint32_t> announced_{0};  // the latest generation, for waking helpers
  std::atomic<int> in_flight_{0}, sleepers_{0};
  std::atomic<bool> stop_{false};
  uint64_t generation_ = 0;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
};

template <typename F>
void parallel(int64_t n, int64_t chunk, const F& fn) {
  Pool::get().run(n, chunk, fn);
}

void set_threads(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= 256, "kernel threads must be in [1, 256], got ", n);
  Pool::get().set_threads(n);
}

int64_t get_threads() { return Pool::get().threads(); }

// ---------------------------------------------------------------- loads and stores

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

inline void store16(c10::BFloat16* p, __m512 v) {
  // round to nearest even, as torch's float -> bfloat16 cast (NaN stays NaN)
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  __m256i hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), hi);
}

// ---------------------------------------------------------------- activation quantization

// One row of K values -> per block of 32: two int8 digits per value, x ~ xd * (hi + lo/254)
// with hi = round(x / xd), lo = round((x / xd - hi) * 254), both in [-127, 127] (stored as 8
// int32 of hi then 8 of lo); the scale xd; the float sum of the block's x; and
// 128 * (254 * sum(hi) + sum(lo)), the offset a u8 = q + 128 operand adds to the dot product.
template <typename T>
void quantize_row(const T* x, int64_t k, int32_t* q, float* xd, float* xs, int32_t* qs128) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m512 v0 = load16(x + b * kBlock), v1 = load16(x + b * kBlock + 16);
    __m512 amax = _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1));
    float m = _mm512_reduce_max_ps(amax);
    float d = m / 127.0f;
    float id = d > 0.0f ? 1.0f / d : 0.0f;
    __m512 vid = _mm512_set1_ps(id);
    // _mm512_cvtps_epi32 rounds to nearest even (the default MXCSR mode), as torch.round
    __m512 s0 = _mm512_mul_ps(v0, vid), s1 = _mm512_mul_ps(v1, vid);
    __m512 h0 = _mm512_roundscale_ps(s0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 h1 = _mm512_roundscale_ps(s1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 radix = _mm512_set1_ps(kLoRadix);
    __m512i hi0 = _mm512_cvtps_epi32(h0), hi1 = _mm512_cvtps_epi32(h1);  // |x / xd| <= 127
    __m512i lo0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(s0, h0), radix));
    __m512i lo1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(s1, h1), radix));
    int32_t* qb = q + b * 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(hi0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 4), _mm512_cvtsepi32_epi8(hi1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 8), _mm512_cvtsepi32_epi8(lo0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 12), _mm512_cvtsepi32_epi8(lo1));
    const int32_t sum_hi = _mm512_reduce_add_epi32(_mm512_add_epi32(hi0, hi1));
    const int32_t sum_lo = _mm512_reduce_add_epi32(_mm512_add_epi32(lo0, lo1));
    qs128[b] = 128 * (static_cast<int32_t>(kLoRadix) * sum_hi + sum_lo);
    xd[b] = d;
    xs[b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
  }
}

struct QuantRows {  // a chunk of rows, quantized
  std::vector<int32_t> q;  // [rows, K/32, 16]: 4 int8 per int32 as VNNI takes them; hi, lo
  std::vector<float> d, s;  // [rows, K/32]
  std::vector<int32_t> qs128;  // [rows, K/32]
};

template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t k, QuantRows& out) {
  const int64_t kb = k / kBlock;
  out.q.resize(rows * k / 2);
  out.d.resize(rows * kb);
  out.s.resize(rows * kb);
  out.qs128.resize(rows * kb);
  for (int64_t r = 0; r < rows; ++r)
    quantize_row(x + r * k, k, out.q.data() + r * k / 2, out.d.data() + r * kb,
                 out.s.data() + r * kb, out.qs128.data() + r * kb);
}

// ---------------------------------------------------------------- GEMM micro-kernels

// s[r] = 254 * (wv . hi_r) + (wv . lo_r) over one block: wv is 16 channels x 32 u8, row r's
// digits are 2 x 8 x 4 int8 at x + r * ldx. Exact in int32 (|s| < 2^29). Rows are interleaved
// so R independent VNNI chains are in flight.
template <int R>
inline void dot_rows(const __m512i* wv, const int32_t* x, int64_t ldx, __m512i* s) {
  for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_si512();
  for (int g = 0; g < 8; ++g)
    for (int r = 0; r < R; ++r) s[r] = _mm512_dpbusd_epi32(s[r], wv[g], _mm512_set1_epi32(x[r * ldx + g]));
  const __m512i radix = _mm512_set1_epi32(static_cast<int32_t>(kLoRadix));
  for (int r = 0; r < R; ++r) s[r] = _mm512_mullo_epi32(s[r], radix);
  for (int g = 0; g < 8; ++g)
    for (int r = 0; r < R; ++r)
      s[r] = _mm512_dpbusd_epi32(s[r], wv[g], _mm512_set1_epi32(x[r * ldx + 8 + g]));
}

// Q4_1 tile: 16 output channels x R rows over all K. Weight layout per (tile, block): 4
// chunks of 64 bytes; in chunk c, lane j (channel), byte t: low nibble = q[j][8c + t], high
// nibble = q[j][8c + 4 + t] (k within the block). dm: per (tile, block) 16 fp16 d, 16 fp16 m.
// xq, xd, xs: the first row's quantized values, scales and sums (rows kb blocks apart).
template <int R, typename TOut>
void q4_1_tile(const uint8_t* w, const uint16_t* dm, const int32_t* xq, const float* xd,
               const float* xs, int64_t kb, TOut* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* wb = w + b * (kTile * kBlock / 2);
    // the same block of the next tile (tiles are contiguous): streams the weights from memory
    // one tile ahead, however many row groups read this one
    for (int i = 0; i < 4; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(wb + kb * (kTile * kBlock / 2) + 64 * i), _MM_HINT_T0);
    __m512i wv[8];
    for (int c = 0; c < 4; ++c) {
      __m512i v = _mm512_loadu_si512(wb + 64 * c);
      wv[2 * c] = _mm512_and_si512(v, low);
      wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    const uint16_t* dmb = dm + b * 2 * kTile;
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dmb)));
    __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dmb + kTile)));
    __m512i s[R];
    dot_rows<R>(wv, xq + b * 16, kb * 16, s);
    for (int r = 0; r < R; ++r) {
      __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[r * kb + b] * (1.0f / kLoRadix)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r * kb + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) store16(y + r * ldy, acc[r]);
}

// Q8_0 tile: weight layout per (tile, block): 8 chunks of 64 bytes; chunk g, lane j, byte t =
// q[j][4g + t] + 128 (u8). d: 16 fp16 per (tile, block).
template <int R, typename TOut>
void q8_0_tile(const uint8_t* w, const uint16_t* dsc, const int32_t* xq, const float* xd,
               const int32_t* qs128, int64_t kb, TOut* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* wb = w + b * kTile * kBlock;
    for (int i = 0; i < 8; ++i)  // the next tile's block, as in q4_1_tile
      _mm_prefetch(reinterpret_cast<const char*>(wb + kb * kTile * kBlock + 64 * i), _MM_HINT_T0);
    __m512i wv[8];
    for (int g = 0; g < 8; ++g) wv[g] = _mm512_loadu_si512(wb + 64 * g);
    __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dsc + b * kTile)));
    __m512i s[R];
    dot_rows<R>(wv, xq + b * 16, kb * 16, s);
    for (int r = 0; r < R; ++r) {
      __m512i sr = _mm512_sub_epi32(s[r], _mm512_set1_epi32(qs128[r * kb + b]));
      __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xd[r * kb + b] * (1.0f / kLoRadix)));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sr), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) store16(y + r * ldy, acc[r]);
}

// Runs `tile<R>` over rows [row0, row0 + n) in groups of kRows (the remainder by its own R).
template <typename TileFn>
void for_row_groups(int64_t row0, int64_t n, TileFn&& tile) {
  int64_t r = row0;
  for (; r + kRows <= row0 + n; r += kRows) tile(std::integral_constant<int, kRows>{}, r);
  switch (row0 + n - r) {
    case 15: tile(std::integral_constant<int, 15>{}, r); break;
    case 14: tile(std::integral_constant<int, 14>{}, r); break;
    case 13: tile(std::integral_constant<int, 13>{}, r); break;
    case 12: tile(std::integral_constant<int, 12>{}, r); break;
    case 11: tile(std::integral_constant<int, 11>{}, r); break;
    case 10: tile(std::integral_constant<int, 10>{}, r); break;
    case 9: tile(std::integral_constant<int, 9>{}, r); break;
    case 8: tile(std::integral_constant<int, 8>{}, r); break;
    case 7: tile(std::integral_constant<int, 7>{}, r); break;
    case 6: tile(std::integral_constant<int, 6>{}, r); break;
    case 5: tile(std::integral_constant<int, 5>{}, r); break;
    case 4: tile(std::integral_constant<int, 4>{}, r); break;
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// ---------------------------------------------------------------- op entry points

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
}

// What both linears require of their call: x [M, K] float32/bf16 on the CPU, whole weight
// tiles and blocks, a float32 or bf16 output.
void check_linear(const char* op, const at::Tensor& x, int64_t n, int64_t k, at::ScalarType out_dtype) {
  check_x(x, k);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16,
              "out dtype must be float32 or bfloat16");
  TORCH_CHECK(n % kTile == 0 && k % kBlock == 0, op, " needs N % 16 == 0 and K % 32 == 0");
}

// Shared driver: quantize rows chunk by chunk, then every tile over the chunk's rows.
template <typename GemmFn>
at::Tensor quantized_linear(const at::Tensor& x_in, int64_t n, int64_t k, at::ScalarType out_dtype,
                            GemmFn&& gemm) {
  at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options().dtype(out_dtype));
  QuantRows xq;
  for (int64_t c0 = 0; c0 < m; c0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, m - c0);
    if (x.scalar_type() == at::kFloat)
      quantize_rows(x.data_ptr<float>() + c0 * k, rows, k, xq);
    else
      quantize_rows(x.data_ptr<c10::BFloat16>() + c0 * k, rows, k, xq);
    const int64_t tiles = n / kTile;
    parallel(tiles, std::max<int64_t>(1, tiles / 64), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (out_dtype == at::kFloat)
          gemm(t, xq, rows, y.data_ptr<float>() + c0 * n + t * kTile, n);
        else
          gemm(t, xq, rows, y.data_ptr<c10::BFloat16>() + c0 * n + t * kTile, n);
      }
    });
  }
  return y;
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dm,
                       int64_t n, int64_t k, at::ScalarType out_dtype) {
  check_linear("q4_1_linear", x, n, k, out_dtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == n * k / 2,
              "packed weight must be contiguous uint8 with N*K/2 bytes");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.numel() == 2 * n * k / kBlock,
              "scales/mins must be contiguous float16 with 2*N*K/32 values");
  const int64_t kb = k / kBlock;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dmp = reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  return quantized_linear(x, n, k, out_dtype,
      [&](int64_t t, const QuantRows& xq, int64_t rows, auto* y, int64_t ldy) {
        const uint8_t* wt = wp + t * kb * (kTile * kBlock / 2);
        const uint16_t* dmt = dmp + t * kb * 2 * kTile;
        for_row_groups(0, rows, [&](auto r_const, int64_t r) {
          q4_1_tile<decltype(r_const)::value>(wt, dmt, xq.q.data() + r * kb * 16, xq.d.data() + r * kb,
                                              xq.s.data() + r * kb, kb, y + r * ldy, ldy);
        });
      });
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                       int64_t n, int64_t k, at::ScalarType out_dtype) {
  check_linear("q8_0_linear", x, n, k, out_dtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == n * k,
              "packed weight must be contiguous uint8 (q + 128) with N*K values");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == n * k / kBlock,
              "scales must be contiguous float16 with N*K/32 values");
  const int64_t kb = k / kBlock;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  return quantized_linear(x, n, k, out_dtype,
      [&](int64_t t, const QuantRows& xq, int64_t rows, auto* y, int64_t ldy) {
        const int64_t off = t * kb * kTile;
        for_row_groups(0, rows, [&](auto r_const, int64_t r) {
          q8_0_tile<decltype(r_const)::value>(wp + off * kBlock, dp + off, xq.q.data() + r * kb * 16,
                                              xq.d.data() + r * kb, xq.qs128.data() + r * kb, kb,
                                              y + r * ldy, ldy);
        });
      });
}

// ---------------------------------------------------------------- decode attention

// e^x for x <= 0 (softmax after the max is taken off): x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for e^r (Cephes' coefficients, ~1 ulp) and 2^n by scalef, which goes smoothly
// to 0 for very negative x.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// r[i] = sum of the lanes of v[i], i = 0..15, by a fixed tree of shuffles and adds.
inline __m512 hsum16(const __m512* v) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d] partial sums
    __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [U.l0+U.l1, U.l2+U.l3, V.l0+V.l1, V.l2+V.l3]
    s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88),
                       _mm512_shuffle_f32x4(s3[0], s3[1], 0xDD));
}

// acc[j] += p[j][t] * v[t] for GC query heads sharing one kv head, accumulators in registers.
template <int NV, int GC, typename TKV>
void attend_values(const float* p, int64_t ldp, const TKV* vb, int64_t len, float* out) {
  __m512 acc[GC][NV];
  for (int j = 0; j < GC; ++j)
    for (int c = 0; c < NV; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    __m512 v[NV];
    for (int c = 0; c < NV; ++c) v[c] = load16(vb + t * NV * 16 + c * 16);
    for (int j = 0; j < GC; ++j) {
      __m512 w = _mm512_set1_ps(p[j * ldp + t]);
      for (int c = 0; c < NV; ++c) acc[j][c] = _mm512_fmadd_ps(w, v[c], acc[j][c]);
    }
  }
  for (int j = 0; j < GC; ++j)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + (j * NV + c) * 16, acc[j][c]);
}

// One (row, kv head): the G query heads that share it attend over positions [0, len).
// q: G x Dh (already scaled); kb, vb: the slot's [T, Dh] for this kv head; out: G x Dh.
template <int NV, typename TKV>
void attend_one(const float* q, const TKV* kb, const TKV* vb, int64_t len, int64_t g,
                float* p, int64_t ldp, float* kf, float* inv, float* out) {
  constexpr int64_t dh = NV * 16;
  for (int64_t t0 = 0; t0 < len; t0 += 16) {  // scores, 16 positions at a time
    const int64_t nt = std::min<int64_t>(16, len - t0);
    // the cache is cold here (the layer's GEMMs ran since it was written): fetch the next
    // block of keys, and this block of values for the pass below
    for (int64_t i = 0; i < 16 * dh * static_cast<int64_t>(sizeof(TKV)); i += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(kb + (t0 + 16) * dh) + i, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(vb + t0 * dh) + i, _MM_HINT_T1);
    }
    for (int64_t t = 0; t < 16; ++t)
      for (int c = 0; c < NV; ++c)
        _mm512_storeu_ps(kf + t * dh + c * 16,
                         t < nt ? load16(kb + (t0 + t) * dh + c * 16) : _mm512_setzero_ps());
    for (int64_t j = 0; j < g; ++j) {
      __m512 qv[NV], part[16];
      for (int c = 0; c < NV; ++c) qv[c] = _mm512_loadu_ps(q + j * dh + c * 16);
      for (int t = 0; t < 16; ++t) {
        __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kf + t * dh));
        for (int c = 1; c < NV; ++c) s = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kf + t * dh + c * 16), s);
        part[t] = s;
      }
      _mm512_storeu_ps(p + j * ldp + t0, hsum16(part));
    }
  }
  for (int64_t j = 0; j < g; ++j) {  // softmax numerators and 1 / denominator
    float* pj = p + j * ldp;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(16, len - t0)) - 1u);
      mx = _mm512_mask_max_ps(mx, live, mx, _mm512_loadu_ps(pj + t0));
    }
    __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      __mmask16 live = static_cast<__mmask16>((1u << std::min<int64_t>(16, len - t0)) - 1u);
      __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(pj + t0), m)));
      _mm512_storeu_ps(pj + t0, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[j] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  constexpr int cap = NV >= 8 ? 2 : NV >= 4 ? 4 : 8;  // GC * NV accumulators stay <= 16
  for (int64_t j0 = 0; j0 < g; j0 += cap) {
    float* o = out + j0 * dh;
    const float* pj = p + j0 * ldp;
    switch (std::min<int64_t>(cap, g - j0)) {
      case 1: attend_values<NV, 1>(pj, ldp, vb, len, o); break;
      case 2: attend_values<NV, 2>(pj, ldp, vb, len, o); break;
      case 3: attend_values<NV, (cap >= 3 ? 3 : 1)>(pj, ldp, vb, len, o); break;
      case 4: attend_values<NV, (cap >= 4 ? 4 : 1)>(pj, ldp, vb, len, o); break;
      default:
        for (int64_t j = 0; j < std::min<int64_t>(cap, g - j0); ++j)
          attend_values<NV, 1>(pj + j * ldp, ldp, vb, len, o + j * dh);
    }
  }
  for (int64_t j = 0; j < g; ++j)
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(out + j * dh + c * 16,
                       _mm512_mul_ps(_mm512_loadu_ps(out + j * dh + c * 16), _mm512_set1_ps(inv[j])));
}

// q: B rows of H x Dh, ldq values apart; k_cache, v_cache [S, Hkv, T, Dh]; rows, pos [B]
// int64. Row b attends over cache positions 0..pos[b] of slot rows[b], in order, in float32;
// out [B, H, Dh].
template <int NV, typename TQ, typename TKV>
void decode_attention_impl(const TQ* q, int64_t ldq, const TKV* kc, const TKV* vc,
                           const int64_t* rows, const int64_t* pos, int64_t nb, int64_t h,
                           int64_t hkv, int64_t t_max, double scale, TQ* out) {
  constexpr int64_t dh = NV * 16;
  const int64_t g = h / hkv, ldp = (t_max + 15) / 16 * 16;
  parallel(nb * hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(g * dh), of(g * dh), p(g * ldp), kf(16 * dh), inv(g);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / hkv, kvh = i % hkv;
      const int64_t base = (rows[b] * hkv + kvh) * t_max * dh;
      const TQ* qb = q + b * ldq + kvh * g * dh;
      for (int64_t e = 0; e < g * dh; e += 16)
        _mm512_storeu_ps(qf.data() + e, _mm512_mul_ps(load16(qb + e), _mm512_set1_ps(static_cast<float>(scale))));
      attend_one<NV>(qf.data(), kc + base, vc + base, pos[b] + 1, g, p.data(), ldp, kf.data(), inv.data(), of.data());
      for (int64_t e = 0; e < g * dh; e += 16)
        store16(out + (b * h + kvh * g) * dh + e, _mm512_loadu_ps(of.data() + e));
    }
  });
}

// decode_attention_impl for a head dim of 32, 64 or 128 (checked by the callers).
template <typename TQ, typename TKV>
void attend_rows(int64_t dh, const TQ* q, int64_t ldq, const TKV* kc, const TKV* vc,
                 const int64_t* rows, const int64_t* pos, int64_t nb, int64_t h, int64_t hkv,
                 int64_t t_max, double scale, TQ* out) {
  if (dh == 32) decode_attention_impl<2>(q, ldq, kc, vc, rows, pos, nb, h, hkv, t_max, scale, out);
  else if (dh == 64) decode_attention_impl<4>(q, ldq, kc, vc, rows, pos, nb, h, hkv, t_max, scale, out);
  else decode_attention_impl<8>(q, ldq, kc, vc, rows, pos, nb, h, hkv, t_max, scale, out);
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

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& rows_in, const at::Tensor& pos_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3, "q must be [B, H, Dh], got ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be [S, Hkv, T, Dh]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "the caches must both be float32 or bfloat16");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16,
              "q must be float32 or bfloat16");
  const int64_t nb = q_in.size(0), h = q_in.size(1), dh = q_in.size(2);
  const int64_t slots = k_cache.size(0), hkv = k_cache.size(1), t_max = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dh && (dh == 32 || dh == 64 || dh == 128),
              "head dim must match the cache's and be 32, 64 or 128, got ", dh);
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "query heads must be a multiple of kv heads");
  at::Tensor q = q_in.contiguous();
  const auto [rows, pos] = checked_rows_pos(rows_in, pos_in, nb, slots, t_max, "query");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  at::Tensor out = at::empty_like(q);
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    attend_rows(dh, qp, h * dh, kp, vp, rp, pp, nb, h, hkv, t_max, scale, op);
  };
  const bool q32 = q.scalar_type() == at::kFloat, kv32 = k_cache.scalar_type() == at::kFloat;
  if (q32 && kv32)
    run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>());
  else if (q32)
    run(q.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),
        out.data_ptr<float>());
  else if (kv32)
    run(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
        out.data_ptr<c10::BFloat16>());
  else
    run(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
        v_cache.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>());
  return out;
}


// ---------------------------------------------------------------- the decode step's layers

// y = w * (x / sqrt(mean(x^2) + eps)) per row of D values, in float32 (HF's order: normalise,
// then scale).
void rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) ss = _mm512_fmadd_ps(load16(xr + i), load16(xr + i), ss);
    const float mean = _mm512_reduce_add_ps(ss) / static_cast<float>(d);
    const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(mean + eps));
    for (int64_t i = 0; i < d; i += 16)
      _mm512_storeu_ps(yr + i, _mm512_mul_ps(load16(w + i), _mm512_mul_ps(load16(xr + i), inv)));
  }
}

// RoPE in place on `heads` heads of Dh values (HF's rotate_half): x*cos + rotate_half(x)*sin.
void rope_heads(float* x, int64_t heads, int64_t dh, const float* cos, const float* sin) {
  const int64_t half = dh / 2;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t hd = 0; hd < heads; ++hd) {
    float* xh = x + hd * dh;
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 a = load16(xh + i), b = load16(xh + half + i);
      // the first half rotates in -b, the second a: out = x*cos + rotated*sin
      const __m512 lo = _mm512_add_ps(_mm512_mul_ps(a, load16(cos + i)),
                                      _mm512_mul_ps(_mm512_xor_ps(b, sign), load16(sin + i)));
      const __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, load16(cos + half + i)),
                                      _mm512_mul_ps(a, load16(sin + half + i)));
      _mm512_storeu_ps(xh + i, lo);
      _mm512_storeu_ps(xh + half + i, hi);
    }
  }
}

// silu(g) * u over n values: silu(g) = g * sigmoid(g), the sigmoid from e^-|g| either side.
void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  const __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = load16(g + i);
    const __m512 e = exp_nonpositive(_mm512_or_ps(x, sign));  // e^-|x|
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mov_ps(one, neg, e);  // sigmoid = 1/(1+e) or e/(1+e)
    const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), load16(u + i)));
  }
}

// x += y over n values (n a multiple of 16).
void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(x + i, _mm512_add_ps(load16(x + i), load16(y + i)));
}

template <typename TKV>
void write_kv(const float* src, TKV* cache, int64_t hkv, int64_t t_max, int64_t dh, int64_t row,
              int64_t pos) {
  for (int64_t h = 0; h < hkv; ++h)
    for (int64_t i = 0; i < dh; i += 16)
      store16(cache + ((row * hkv + h) * t_max + pos) * dh + i, load16(src + h * dh + i));
}

constexpr int64_t kLayerTensors = 12;  // per layer, in this order:
// attention norm [D] f32, wqkv (w, dm), wo (w, dm), ffn norm [D] f32, w13 (w, dm), w2 (w, dm),
// k cache, v cache [S, Hkv, T, Dh] (f32 or bf16); the linears as Q4_1Linear holds them

// x [B, D] float32 through every layer for one decode step: row b is at position pos[b] of
// cache slot rows[b]; cos, sin [B, Dh] float32, its RoPE angles. Returns the last layer's output [B, D].
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList layers, const at::Tensor& rows_in,
                         const at::Tensor& pos_in, const at::Tensor& cos_t, const at::Tensor& sin_t,
                         int64_t n_heads, int64_t n_kv_heads, double eps, double scale) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x must be float32 [B, D] on the CPU, got ", x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(!layers.empty() && layers.size() % kLayerTensors == 0,
              "layers must hold ", kLayerTensors, " tensors per layer, got ", layers.size());
  const int64_t nb = x_in.size(0), d = x_in.size(1);
  const at::Tensor& k0 = layers[10];
  TORCH_CHECK(k0.dim() == 4, "the k cache must be [S, Hkv, T, Dh]");
  const int64_t slots = k0.size(0), t_max = k0.size(2), dh = k0.size(3);
  TORCH_CHECK(n_kv_heads == k0.size(1) && n_heads % n_kv_heads == 0, "head counts do not match the cache");
  TORCH_CHECK(dh == 32 || dh == 64 || dh == 128, "head dim must be 32, 64 or 128, got ", dh);
  TORCH_CHECK(d % kBlock == 0, "model dim must be a multiple of 32");
  const int64_t q_size = n_heads * dh, kv_size = n_kv_heads * dh, qkv = q_size + 2 * kv_size;
  TORCH_CHECK(q_size % kBlock == 0, "n_heads * head_dim must be a multiple of 32");
  const int64_t ffn = layers[6].numel() / d;  // w13: 2*F x D / 2 bytes
  TORCH_CHECK(ffn % kBlock == 0 && layers[6].numel() == ffn * d, "w13 must be [2F, D] packed");
  TORCH_CHECK(cos_t.scalar_type() == at::kFloat && sin_t.scalar_type() == at::kFloat &&
                  cos_t.is_contiguous() && sin_t.is_contiguous() && cos_t.dim() == 2 &&
                  cos_t.sizes() == sin_t.sizes() && cos_t.size(0) == nb && cos_t.size(1) == dh,
              "cos and sin must be contiguous float32 [B, Dh]");
  const auto [rows, pos] = checked_rows_pos(rows_in, pos_in, nb, slots, t_max, "row of x");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t n_layers = static_cast<int64_t>(layers.size()) / kLayerTensors;
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* t = &layers[l * kLayerTensors];
    TORCH_CHECK(t[0].scalar_type() == at::kFloat && t[0].numel() == d && t[0].is_contiguous() &&
                    t[5].scalar_type() == at::kFloat && t[5].numel() == d && t[5].is_contiguous(),
                "layer ", l, ": the norms must be contiguous float32 [D]");
    TORCH_CHECK(t[10].sizes() == k0.sizes() && t[11].sizes() == k0.sizes() &&
                    t[10].scalar_type() == k0.scalar_type() && t[11].scalar_type() == k0.scalar_type() &&
                    t[10].is_contiguous() && t[11].is_contiguous() &&
                    (k0.scalar_type() == at::kFloat || k0.scalar_type() == at::kBFloat16),
                "layer ", l, ": the caches must be contiguous, alike, float32 or bfloat16");
  }
  at::Tensor x = x_in.contiguous().clone();
  at::Tensor h = at::empty({nb, d}, x.options());
  at::Tensor attn = at::empty({nb, q_size}, x.options());
  at::Tensor act = at::empty({nb, ffn}, x.options());
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const float* cp = cos_t.data_ptr<float>();
  const float* sp = sin_t.data_ptr<float>();
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* t = &layers[l * kLayerTensors];
    // attention
    rms_norm_rows(xp, t[0].data_ptr<float>(), nb, d, static_cast<float>(eps), hp);
    at::Tensor y = q4_1_linear(h, t[1], t[2], qkv, d, at::kFloat);  // [B, q | k | v]
    float* yp = y.data_ptr<float>();
    // RoPE on q and k, k and v into the cache, then every row's heads attend (q read in
    // place from y, rows qkv values apart)
    auto attention = [&](auto* kc, auto* vc) {
      for (int64_t b = 0; b < nb; ++b) {
        float* yb = yp + b * qkv;
        rope_heads(yb, n_heads + n_kv_heads, dh, cp + b * dh, sp + b * dh);
        write_kv(yb + q_size, kc, n_kv_heads, t_max, dh, rp[b], pp[b]);
        write_kv(yb + q_size + kv_size, vc, n_kv_heads, t_max, dh, rp[b], pp[b]);
      }
      attend_rows(dh, yp, qkv, kc, vc, rp, pp, nb, n_heads, n_kv_heads,
                  t_max, scale, attn.data_ptr<float>());
    };
    if (k0.scalar_type() == at::kFloat) attention(t[10].data_ptr<float>(), t[11].data_ptr<float>());
    else attention(t[10].data_ptr<c10::BFloat16>(), t[11].data_ptr<c10::BFloat16>());
    add_into(xp, q4_1_linear(attn, t[3], t[4], d, q_size, at::kFloat).data_ptr<float>(), nb * d);
    // feed-forward
    rms_norm_rows(xp, t[5].data_ptr<float>(), nb, d, static_cast<float>(eps), hp);
    at::Tensor gu = q4_1_linear(h, t[6], t[7], 2 * ffn, d, at::kFloat);  // [B, gate | up]
    const float* gp = gu.data_ptr<float>();
    float* ap = act.data_ptr<float>();
    for (int64_t b = 0; b < nb; ++b) silu_mul(gp + b * 2 * ffn, gp + b * 2 * ffn + ffn, ffn, ap + b * ffn);
    add_into(xp, q4_1_linear(act, t[8], t[9], d, ffn, at::kFloat).data_ptr<float>(), nb * d);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(m4, CPU, m) {
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layers", &decode_layers);
}

TORCH_LIBRARY_IMPL(m4, CompositeExplicitAutograd, m) {
  m.impl("set_threads", &set_threads);
  m.impl("get_threads", &get_threads);
}
