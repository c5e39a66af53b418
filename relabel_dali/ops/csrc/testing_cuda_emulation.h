// Test infrastructure: a host emulation of the CUDA features the LabelPool kernel uses, so that the
// kernel's own source (label_pool_kernel.cuh) runs, unchanged, on a machine without a GPU.
//
// A launch runs its blocks one after another, in a seeded random order. A block's threads are fibers
// (ucontext) on the calling thread; at every scheduling point the running thread hands over to one
// picked at random (seeded) among those that can run: at __syncthreads (a block barrier), each warp
// shuffle (a warp barrier between the writes and the reads) and each atomic operation. Different seeds give
// different interleavings, so a result that depends on the order of the threads changes with the seed.
// Shared memory is one arena per block, filled with 0xFF bytes before the block starts (CUDA leaves it
// uninitialised): a kernel that reads shared memory it did not write sees NaNs and -1s.
//
// What this cannot show: real launch limits beyond the ones checked here (registers, occupancy), memory
// ordering between blocks, the device intrinsics' own arithmetic (the shared RL_HD code takes its host
// branch here), and speed.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
// __shared__ is left undefined on purpose: the kernel reaches shared memory through its helpers, which
// the emulation backs with the per-block arena (a plain static would be shared by every block).

namespace relabel_emulation {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The limits a launch is checked against, as on the GPUs the library targets (sm_80, sm_90) without
// the opt-in for more than 48 KiB of shared memory per block.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytesPerBlock = 48 * 1024;
constexpr int kWarpSize = 32;

struct LaunchConfig {
  unsigned grid = 1;
  unsigned block = 32;
  size_t static_shared = 0;   // the kernel's own shared variables
  size_t dynamic_shared = 0;  // the launch's third <<<>>> argument
  uint64_t seed = 0;          // picks the block order and every block's thread interleaving
};

class Emulator {
 public:
  // Runs body() on every thread of every block. Returns "" or why the launch or a block failed.
  std::string launch(const LaunchConfig &config, const std::function<void()> &body) {
    if (config.block == 0 || config.block > kMaxThreadsPerBlock || config.block % kWarpSize != 0)
      return "invalid configuration argument: " + std::to_string(config.block) +
             " threads per block (the emulation needs whole warps, at most 1024)";
    const size_t shared = align(config.static_shared) + config.dynamic_shared;
    if (shared > kMaxSharedBytesPerBlock)
      return "too many resources requested for launch: " + std::to_string(shared) + " bytes of shared memory (" +
             std::to_string(config.static_shared) + " static + " + std::to_string(config.dynamic_shared) +
             " dynamic) > " + std::to_string(kMaxSharedBytesPerBlock);
    config_ = config;
    error_.clear();
    arena_.assign(std::max<size_t>(shared, 1), 0);
    if (!allocate_stacks(config.block)) return "cannot allocate fiber stacks";
    std::vector<unsigned> order(config.grid);
    std::iota(order.begin(), order.end(), 0u);
    std::mt19937_64 block_rng(config.seed);
    std::shuffle(order.begin(), order.end(), block_rng);
    body_ = &body;
    Emulator *const previous = current_;
    current_ = this;
    for (const unsigned b : order) {
      run_block(b);
      if (!error_.empty()) break;
    }
    current_ = previous;
    return error_.empty() ? "" : "block " + std::to_string(block_) + ": " + error_;
  }

  ~Emulator() {
    if (stacks_) munmap(stacks_, stacks_bytes_);
  }

  static Emulator &current() { return *current_; }

  Dim3 thread_index() const { return Dim3{static_cast<unsigned>(running_), 0, 0}; }
  Dim3 block_index() const { return Dim3{block_, 0, 0}; }
  Dim3 block_dim() const { return Dim3{config_.block, 1, 1}; }
  Dim3 grid_dim() const { return Dim3{config_.grid, 1, 1}; }
  void *static_shared() { return arena_.data(); }
  void *dynamic_shared() { return arena_.data() + align(config_.static_shared); }

  // A scheduling point: another thread of the block may run before this one continues.
  void yield() { reschedule(kRunnable); }

  void sync_block() { reschedule(kAtBlockBarrier); }

  // Each lane writes its value, waits for the whole warp, reads its source lane's. Two buffers take
  // turns: a lane can only write the next shuffle's buffer after every lane has passed this
  // shuffle's barrier, and cannot come back to this buffer before every lane has read it.
  template <typename T>
  T shuffle_down(unsigned mask, T value, unsigned delta, int width) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffles move up to 8 bytes");
    if (mask != 0xffffffffu || width != kWarpSize)
      fail("only full-warp shuffles (mask 0xffffffff, width 32) are emulated");
    const int lane = running_ % kWarpSize, warp_base = running_ - lane;
    uint64_t *buffer = &exchange_[(shuffles_[running_]++ & 1) * config_.block];
    std::memcpy(&buffer[running_], &value, sizeof(T));
    reschedule(kAtWarpBarrier);
    T result = value;
    if (lane + delta < static_cast<unsigned>(kWarpSize))
      std::memcpy(&result, &buffer[warp_base + lane + delta], sizeof(T));
    return result;
  }

  // Stops the block: its fibers are abandoned and the launch reports the message.
  void fail(const std::string &message) {
    if (error_.empty()) error_ = message;
    states_[running_] = kFailed;
    swapcontext(&fibers_[running_], &scheduler_);
  }

 private:
  enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone, kFailed };
  static constexpr size_t kStackBytes = 128 * 1024;

  static size_t align(size_t bytes) { return (bytes + 15) / 16 * 16; }

  bool allocate_stacks(unsigned threads) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t per_fiber = kStackBytes + page;  // a guard page below each stack
    if (stacks_ && stacks_bytes_ >= per_fiber * threads) return true;
    if (stacks_) munmap(stacks_, stacks_bytes_);
    stacks_bytes_ = per_fiber * threads;
    void *memory = mmap(nullptr, stacks_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
      stacks_ = nullptr;
      return false;
    }
    stacks_ = static_cast<char *>(memory);
    for (unsigned t = 0; t < threads; ++t) mprotect(stacks_ + t * per_fiber, page, PROT_NONE);
    return true;
  }

  static void fiber_main() {
    Emulator &self = *current_;
    (*self.body_)();
    self.reschedule(kDone);
  }

  void make_runnable(int t) {
    states_[t] = kRunnable;
    runnable_.push_back(t);
  }

  // The running thread leaves the running state for `state`; the next thread, picked at random among
  // the runnable ones, runs (the same one again, possibly). Barriers open when their last thread comes.
  // Back to the launch when the block has finished or is stuck.
  void reschedule(State state) {
    const int me = running_, threads = static_cast<int>(config_.block);
    if (state != kRunnable) {
      runnable_.erase(std::find(runnable_.begin(), runnable_.end(), me));
      states_[me] = state;
      if (state == kDone) ++done_;
      if (state == kAtWarpBarrier && ++at_warp_[me / kWarpSize] == kWarpSize) {
        at_warp_[me / kWarpSize] = 0;
        for (int lane = 0; lane < kWarpSize; ++lane) make_runnable(me - me % kWarpSize + lane);
      }
      if (state == kAtBlockBarrier) ++at_block_;
      if (at_block_ > 0 && at_block_ + done_ == threads) {
        if (done_ > 0) return fail("__syncthreads reached after some threads of the block had exited");
        at_block_ = 0;
        for (int t = 0; t < threads; ++t) make_runnable(t);
      }
    }
    if (runnable_.empty()) {
      if (done_ < threads)
        return fail("threads of the block wait at different barriers (divergent __syncthreads or shuffle)");
      swapcontext(&fibers_[me], &scheduler_);  // the block is finished; never resumed
      return;
    }
    running_ = runnable_[std::uniform_int_distribution<size_t>(0, runnable_.size() - 1)(rng_)];
    if (running_ != me) swapcontext(&fibers_[me], &fibers_[running_]);
  }

  void run_block(unsigned b) {
    block_ = b;
    const int threads = static_cast<int>(config_.block);
    std::fill(arena_.begin(), arena_.end(), 0xFF);
    exchange_.assign(2 * threads, 0);
    shuffles_.assign(threads, 0);
    fibers_.assign(threads, ucontext_t{});
    states_.assign(threads, kRunnable);
    at_warp_.assign(threads / kWarpSize, 0);
    at_block_ = done_ = 0;
    runnable_.clear();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (int t = 0; t < threads; ++t) {
      getcontext(&fibers_[t]);
      fibers_[t].uc_stack.ss_sp = stacks_ + t * (kStackBytes + page) + page;
      fibers_[t].uc_stack.ss_size = kStackBytes;
      fibers_[t].uc_link = nullptr;
      makecontext(&fibers_[t], &Emulator::fiber_main, 0);
      runnable_.push_back(t);
    }
    rng_.seed(config_.seed * 0x9E3779B97F4A7C15ull + b + 1);
    running_ = runnable_[std::uniform_int_distribution<size_t>(0, runnable_.size() - 1)(rng_)];
    swapcontext(&scheduler_, &fibers_[running_]);
  }

  static inline thread_local Emulator *current_ = nullptr;
  LaunchConfig config_;
  const std::function<void()> *body_ = nullptr;
  std::vector<unsigned char> arena_;
  std::vector<uint64_t> exchange_;  // two shuffle slots per thread
  std::vector<uint64_t> shuffles_;  // shuffles done per thread (picks the slot)
  std::vector<ucontext_t> fibers_;
  std::vector<State> states_;
  std::vector<int> runnable_;
  std::vector<int> at_warp_;  // threads waiting at their warp's barrier
  int at_block_ = 0, done_ = 0;
  std::mt19937_64 rng_;
  ucontext_t scheduler_{};
  char *stacks_ = nullptr;
  size_t stacks_bytes_ = 0;
  unsigned block_ = 0;
  int running_ = 0;
  std::string error_;
};

}  // namespace relabel_emulation

#define threadIdx (::relabel_emulation::Emulator::current().thread_index())
#define blockIdx (::relabel_emulation::Emulator::current().block_index())
#define blockDim (::relabel_emulation::Emulator::current().block_dim())
#define gridDim (::relabel_emulation::Emulator::current().grid_dim())

inline void __syncthreads() { ::relabel_emulation::Emulator::current().sync_block(); }

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::relabel_emulation::Emulator::current().shuffle_down(mask, value, delta, width);
}

// Atomics: a scheduling point, then the read-modify-write (blocks never run at the same time).
template <typename T>
inline T atomicAdd(T *address, T value) {
  ::relabel_emulation::Emulator::current().yield();
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
inline T atomicMax(T *address, T value) {
  ::relabel_emulation::Emulator::current().yield();
  const T old = *address;
  *address = std::max(old, value);
  return old;
}

template <typename T>
inline T atomicMin(T *address, T value) {
  ::relabel_emulation::Emulator::current().yield();
  const T old = *address;
  *address = std::min(old, value);
  return old;
}

template <typename T>
inline T atomicOr(T *address, T value) {
  ::relabel_emulation::Emulator::current().yield();
  const T old = *address;
  *address = old | value;
  return old;
}

// A load that bypasses L1 on the device: a plain load here (one memory).
template <typename T>
inline T __ldcg(const T *address) {
  return *address;
}
