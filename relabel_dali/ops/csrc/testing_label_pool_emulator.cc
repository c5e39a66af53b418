// Test infrastructure: the C ABI's CUDA entry (relabel_pool_cuda) with the kernel run by the host
// emulation of testing_cuda_emulation.h instead of a GPU. The kernel is label_pool_kernel.cuh itself,
// compiled by g++; relabel_dali/ops/testing.py calls it through ctypes, on host memory.
#define RELABEL_KERNEL_EMULATION 1

#include <cstdio>
#include <cstring>

#include "label_pool_capi.h"
#include "label_pool_kernel.cuh"

// As relabel_pool_cuda, on host pointers, plus the seed of the thread interleaving. check_launch = 0
// skips the entry's own launch checks, to show what the (emulated) launch does without them.
extern "C" int relabel_pool_emulated(const void *scores, int score_type, const uint16_t *class_ids,
                                     const float *boxes, const float *scale, const float *offset, int64_t n, int k,
                                     int h, int w, int num_classes, int mode, int output_size,
                                     const uint8_t *mirror, uint64_t seed, int check_launch, float *out, char *err,
                                     int err_len) {
  if (check_launch) {
    const int code = relabel_dali::check_batch_launch(n, k, h, w, num_classes, mode, output_size, err, err_len);
    if (code != RELABEL_OK) return code;
  }
  if (n == 0) return RELABEL_OK;
  const long long tokens = static_cast<long long>(output_size) * output_size;
  // Outputs start as NaN bits, as uninitialised device memory might: an element the kernel does not
  // write shows.
  std::memset(out, 0xFF, static_cast<size_t>(n * tokens) * num_classes * sizeof(float));
  const int score_bytes = relabel_dali::score_bytes(score_type);
  const relabel_dali::BatchArgs args{static_cast<const char *>(scores), class_ids, boxes, scale, offset, mirror,
                                     out, score_bytes, k, h, w, output_size};
  relabel_emulation::LaunchConfig config;
  config.grid = static_cast<unsigned>(n * tokens);
  config.block = relabel_dali::kPoolBlock;
  config.static_shared = sizeof(relabel_dali::PoolShared);
  config.dynamic_shared = relabel_dali::pool_dynamic_shared_bytes(h, w);
  config.seed = seed;
  relabel_emulation::Emulator emulator;
  const std::string failure = emulator.launch(config, [&] {
    relabel_dali::pool_batch_sample(args, blockIdx.x, score_type, num_classes, mode);
  });
  if (!failure.empty()) {
    snprintf(err, err_len, "emulated kernel launch failed: %s", failure.c_str());
    return RELABEL_CUDA_ERROR;
  }
  return RELABEL_OK;
}

// The kernel's shared-memory figures as both launch sites use them (tests of the launch checks).
extern "C" void relabel_emulated_limits(long long *static_shared_bytes, long long *max_axes) {
  *static_shared_bytes = static_cast<long long>(relabel_dali::kPoolStaticSharedBytes);
  *max_axes = relabel_dali::kPoolMaxAxes;
}

// exp_rn, the exponential the host and the kernel share, on n floats.
extern "C" void relabel_emulated_exp(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = relabel_dali::exp_rn(x[i]);
}

// A deliberately order-dependent block, to show that the emulation's interleavings differ by seed:
// 256 threads add into one float by atomicAdd, thread 0 adding 1 and the others 2^-26 each. Added
// after the 1, a 2^-26 is lost to rounding; added before it, it counts. The sum tells how many threads
// came before thread 0.
extern "C" float relabel_emulated_order_probe(uint64_t seed) {
  float sum = 0.0f;
  relabel_emulation::LaunchConfig config;
  config.block = 256;
  config.seed = seed;
  relabel_emulation::Emulator emulator;
  emulator.launch(config, [&] { atomicAdd(&sum, threadIdx.x == 0 ? 1.0f : 1.0f / 67108864.0f); });
  return sum;
}
