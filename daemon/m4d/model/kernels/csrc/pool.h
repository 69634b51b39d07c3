// The kernels' own thread pool (ISA-neutral; compiled for the baseline ISA).
#pragma once

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace m4 {

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
}

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
    while (in_flight_.load(std::memory_order_seq_cst) != 0) cpu_relax();
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
          for (int i = 0; i < 64; ++i) cpu_relax();
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


// fn(begin, end) over [0, n) in chunks, on the pool
template <typename Fn>
void parallel(int64_t n, int64_t chunk, const Fn& fn) {
  Pool::get().run(n, chunk, fn);
}

}  // namespace m4
