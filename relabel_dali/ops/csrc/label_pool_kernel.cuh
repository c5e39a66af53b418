// The LabelPool CUDA kernel body, shared by the DALI GPU operator and the C ABI: one block pools one
// token of one sample (a sample's S x S tokens are S^2 consecutive blocks; S = 1 is one block per
// sample). It computes what the host's pool_token_host (label_pool_math.h) computes, with the same
// shared arithmetic, so the two give the same bits:
//   1. the axis weights of the token's bins (one thread per row/column), cell weight = row weight x
//      column weight;
//   2. the largest finite |weight x score| over the entries (a block max), which fixes the sample's
//      fixed-point grid (fixed_point_for);
//   3. per-class exact sums: each entry adds its product, as an int64 on that grid, into a shared
//      accumulator of its class by atomicAdd (classes in windows of kClassWindow, one pass over the
//      entries per window); integer addition is associative, so the order the threads come in does
//      not change a bit;
//   4. the argmax over all classes (argmax_before, a strict total order: any reduction tree agrees);
//   5. softmax: e_c = exp_rn(v_c - max), their exact sum on a second grid, outputs e_c * float(1/sum).
// The device code runs on the host too, in tests (testing_cuda_emulation.h, relabel_dali/ops/testing.py).
#pragma once

#if defined(RELABEL_KERNEL_EMULATION)
#include "testing_cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <climits>
#include <cstdio>

#include "label_pool_capi.h"
#include "label_pool_math.h"

namespace relabel_dali {

constexpr int kPoolBlock = 256;
constexpr int kPoolWarps = kPoolBlock / 32;
// Classes whose sums one pass over the entries accumulates in shared memory (1000 classes: one pass,
// ImageNet-21k: 11).
constexpr int kClassWindow = 2048;
static_assert(kClassWindow % kPoolBlock == 0, "each class stays with one thread from pooling to output");

struct DeviceSample {
  const void *scores;         // [k, h, w]
  const uint16_t *class_ids;  // [k, h, w]
  float *out;                 // [output_size^2, num_classes]
  float box[4];
  float scale, offset;
  int k, h, w;
  int mirror;                 // the crop is flipped after pooling (token_col_bin)
};

struct ArgBest {
  float value;
  int index;
};

// The kernel's shared variables, in one place (their size counts against the launch limit).
struct PoolShared {
  unsigned long long sums[kClassWindow];  // the window's exact sums (two's complement int64)
  unsigned nonfinite[kClassWindow / 8];   // the window's NonFinite flags, 4 bits per class
  ArgBest best[kPoolWarps];               // per-warp results of the reductions
  unsigned long long total[kPoolWarps];
  unsigned word[kPoolWarps];
};

// The kernel reaches shared memory only through these two helpers, so the host emulation can give each
// block its own (testing_cuda_emulation.h).
__device__ inline PoolShared &pool_shared() {
#if defined(RELABEL_KERNEL_EMULATION)
  return *static_cast<PoolShared *>(relabel_emulation::Emulator::current().static_shared());
#else
  __shared__ PoolShared shared;
  return shared;
#endif
}

__device__ inline float *pool_dynamic_shared() {
#if defined(RELABEL_KERNEL_EMULATION)
  return static_cast<float *>(relabel_emulation::Emulator::current().dynamic_shared());
#else
  extern __shared__ float pool_dynamic_shared_memory[];
  return pool_dynamic_shared_memory;
#endif
}

template <typename T>
__device__ inline T shuffle_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

__device__ inline ArgBest shuffle_down(ArgBest v, int offset) {
  return ArgBest{shuffle_down(v.value, offset), shuffle_down(v.index, offset)};
}

// A fixed shuffle tree per warp, then the warps' results in warp order; every thread gets the result.
// Each use combines with an order-independent operation (max, or, integer sum, the argmax order), so
// the tree's shape does not matter to the result.
template <typename T, typename Combine>
__device__ inline T block_reduce(T v, T *warp_results, Combine combine) {
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, shuffle_down(v, offset));
  if ((threadIdx.x & 31) == 0) warp_results[threadIdx.x >> 5] = v;
  __syncthreads();
  T result = warp_results[0];
  for (int i = 1; i < kPoolWarps; ++i) result = combine(result, warp_results[i]);
  __syncthreads();  // the next reduction may reuse warp_results
  return result;
}

// Weight of the cell of entry e ([k, h, w] layout): row weight x column weight, as on the host.
__device__ inline float cell_weight(const DeviceSample &s, const float *row_w, const float *col_w, int e) {
  const int cell = e % (s.h * s.w);
  return mul_rn(row_w[cell / s.w], col_w[cell % s.w]);
}

// Pools token `token` of an output_size x output_size grid (pool_token_host's bins) into
// s.out + token * num_classes. Needs pool_dynamic_shared_bytes(s.h, s.w) of dynamic shared memory and
// blockDim.x == kPoolBlock. Class ids >= num_classes are skipped, as on the host (the rule is
// documented in docs/OPERATOR.md). The descriptor comes by value, so it lives in registers: the output
// stores cannot alias it.
__device__ inline void pool_sample_device(const DeviceSample s, int score_type, int num_classes, int mode,
                                          int output_size, int token) {
  PoolShared &shared = pool_shared();
  float *row_w = pool_dynamic_shared(), *col_w = row_w + s.h;
  float *const out = s.out + static_cast<size_t>(token) * num_classes;
  const int tid = threadIdx.x;

  if (is_global(mode)) {
    for (int y = tid; y < s.h; y += kPoolBlock) row_w[y] = 1.0f / static_cast<float>(s.h);
    for (int x = tid; x < s.w; x += kPoolBlock) col_w[x] = 1.0f / static_cast<float>(s.w);
  } else {
    const AxisGrid gy = make_axis_grid(s.box[1], s.box[3], s.h, output_size);
    const AxisGrid gx = make_axis_grid(s.box[0], s.box[2], s.w, output_size);
    const int row_bin = token_row_bin(token, output_size);
    const int col_bin = token_col_bin(token, output_size, s.mirror != 0);
    for (int y = tid; y < s.h; y += kPoolBlock) row_w[y] = axis_weight(gy, row_bin, y);
    for (int x = tid; x < s.w; x += kPoolBlock) col_w[x] = axis_weight(gx, col_bin, x);
  }
  __syncthreads();

  // The largest finite |weight x score| (a zero-weight cell takes no part, whatever its score).
  const int total = s.k * s.h * s.w;
  unsigned max_abs_bits = 0;
  for (int e = tid; e < total; e += kPoolBlock) {
    if (s.class_ids[e] >= num_classes) continue;
    const float weight = cell_weight(s, row_w, col_w, e);
    if (weight == 0.0f) continue;
    const float product = mul_rn(weight, load_score(s.scores, score_type, e, s.scale, s.offset));
    const unsigned abs_bits = float_bits(product) & 0x7FFFFFFFu;
    if (is_finite(product) && abs_bits > max_abs_bits) max_abs_bits = abs_bits;
  }
  max_abs_bits = block_reduce(max_abs_bits, shared.word, [](unsigned a, unsigned b) { return a > b ? a : b; });
  const FixedPoint grid = fixed_point_for(bits_float(max_abs_bits), total);

  // Exact per-class sums, kClassWindow classes per pass; out receives the pooled values.
  for (int first = 0; first < num_classes; first += kClassWindow) {
    const int count = num_classes - first < kClassWindow ? num_classes - first : kClassWindow;
    for (int i = tid; i < count; i += kPoolBlock) shared.sums[i] = 0;
    for (int i = tid; i < (count + 7) / 8; i += kPoolBlock) shared.nonfinite[i] = 0;
    __syncthreads();
    for (int e = tid; e < total; e += kPoolBlock) {
      const int slot = static_cast<int>(s.class_ids[e]) - first;
      if (slot < 0 || slot >= count) continue;
      const float weight = cell_weight(s, row_w, col_w, e);
      if (weight == 0.0f) continue;
      const float product = mul_rn(weight, load_score(s.scores, score_type, e, s.scale, s.offset));
      if (is_finite(product))
        atomicAdd(&shared.sums[slot], static_cast<unsigned long long>(to_fixed(product, grid)));
      else
        atomicOr(&shared.nonfinite[slot / 8], nonfinite_flag(product) << (4 * (slot % 8)));
    }
    __syncthreads();
    for (int i = tid; i < count; i += kPoolBlock)
      out[first + i] = pooled_value(static_cast<long long>(shared.sums[i]),
                                      (shared.nonfinite[i / 8] >> (4 * (i % 8))) & 0xFu, grid);
    __syncthreads();  // the next window resets the sums
  }

  // From here on, thread tid reads and writes only the classes it wrote above (tid + m * kPoolBlock).
  ArgBest mine{-INFINITY, INT_MAX};
  for (int c = tid; c < num_classes; c += kPoolBlock)
    if (argmax_before(out[c], c, mine.value, mine.index)) mine = ArgBest{out[c], c};
  const ArgBest best = block_reduce(mine, shared.best, [](ArgBest a, ArgBest b) {
    return argmax_before(b.value, b.index, a.value, a.index) ? b : a;
  });
  if (is_argmax(mode)) {
    for (int c = tid; c < num_classes; c += kPoolBlock) out[c] = c == best.index ? 1.0f : 0.0f;
    return;
  }

  // A NaN class is the argmax, so best.value is NaN and every term with it: the output is all NaN, as
  // torch.softmax gives for a vector holding a NaN.
  const FixedPoint unit = softmax_grid(num_classes);
  unsigned long long sum = 0;
  unsigned any_nan = 0;
  for (int c = tid; c < num_classes; c += kPoolBlock) {
    const float term = softmax_term(out[c], best.value);
    out[c] = term;
    if (term != term)
      any_nan = 1;
    else
      sum += static_cast<unsigned long long>(to_fixed(term, unit));
  }
  sum = block_reduce(sum, shared.total, [](unsigned long long a, unsigned long long b) { return a + b; });
  any_nan = block_reduce(any_nan, shared.word, [](unsigned a, unsigned b) { return a | b; });
  const float inv_sum = any_nan ? pooled_nan() : softmax_inverse(static_cast<long long>(sum), unit);
  for (int c = tid; c < num_classes; c += kPoolBlock) out[c] = any_nan ? pooled_nan() : mul_rn(out[c], inv_sum);
}

// A contiguous batch as the C ABI passes it (label_pool_capi.h): token t of sample i is block
// i * output_size^2 + t.
struct BatchArgs {
  const char *scores;
  const uint16_t *class_ids;
  const float *boxes, *scale, *offset;
  const uint8_t *mirror;  // [n] or null (no flips)
  float *out;
  int score_bytes, k, h, w, output_size;
};

__device__ inline void pool_batch_sample(const BatchArgs &args, long long block, int score_type, int num_classes,
                                         int mode) {
  const int tokens = args.output_size * args.output_size;
  const long long i = block / tokens;
  const int token = static_cast<int>(block % tokens);
  const size_t entries = static_cast<size_t>(args.k) * args.h * args.w;
  DeviceSample s;
  s.scores = args.scores + i * entries * args.score_bytes;
  s.class_ids = args.class_ids + i * entries;
  s.out = args.out + i * tokens * num_classes;
  for (int j = 0; j < 4; ++j) s.box[j] = args.boxes[4 * i + j];
  s.scale = args.scale ? args.scale[i] : 1.0f;
  s.offset = args.offset ? args.offset[i] : 0.0f;
  s.k = args.k;
  s.h = args.h;
  s.w = args.w;
  s.mirror = args.mirror ? args.mirror[i] : 0;
  pool_sample_device(s, score_type, num_classes, mode, args.output_size, token);
}

// ---- launch checks (host), shared by both launch sites (label_pool.cu, label_pool_capi.cu) and the
// host emulation ----

constexpr size_t kPoolSharedLimit = 48 * 1024;  // per block, without the opt-in for more
// The kernel's own shared variables, which count against the same limit as the dynamic part placed
// after them (rounded up to that part's alignment).
constexpr size_t kPoolStaticSharedBytes = (sizeof(PoolShared) + 15) / 16 * 16;
// The largest H + W one block can hold: the axis weights take (H + W) floats of dynamic shared memory.
constexpr int kPoolMaxAxes = static_cast<int>((kPoolSharedLimit - kPoolStaticSharedBytes) / sizeof(float));

inline size_t pool_dynamic_shared_bytes(int h, int w) { return (static_cast<size_t>(h) + w) * sizeof(float); }

inline int score_bytes(int score_type) {
  return score_type == kScoreFloat32 ? 4 : score_type == kScoreFloat16 ? 2 : 1;
}

// The C ABI's checks before a launch: RELABEL_OK, or a RELABEL_* code with the reason in err.
inline int check_batch_launch(long long n, int k, int h, int w, int num_classes, int mode, int output_size,
                              char *err, int err_len) {
  if (n < 0 || n > 0x7FFFFFFF || k < 1 || h < 1 || w < 1 || num_classes < 1) {
    snprintf(err, err_len, "bad batch shape [n, k, h, w] = [%lld, %d, %d, %d] or num_classes %d", n, k, h, w,
             num_classes);
    return RELABEL_BAD_ARGUMENT;
  }
  if (const char *problem = output_size_problem(mode, output_size)) {
    snprintf(err, err_len, "output_size %d %s", output_size, problem);
    return RELABEL_BAD_ARGUMENT;
  }
  // One block per token: the grid's x dimension holds at most 2^31 - 1 blocks.
  if (n * output_size * output_size > 0x7FFFFFFF) {
    snprintf(err, err_len, "%lld samples x %d tokens exceed one launch's 2^31 - 1 blocks", n,
             output_size * output_size);
    return RELABEL_BAD_ARGUMENT;
  }
  if (static_cast<long long>(h) + w > kPoolMaxAxes) {
    snprintf(err, err_len, "map %dx%d too large for the CUDA kernel (h + w must be <= %d)", h, w, kPoolMaxAxes);
    return RELABEL_BAD_ARGUMENT;
  }
  return RELABEL_OK;
}

}  // namespace relabel_dali
