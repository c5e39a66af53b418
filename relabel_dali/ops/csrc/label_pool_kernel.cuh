// The LabelPool CUDA kernel body, shared by the DALI GPU operator and the C ABI: one block pools
// one sample. The axis weights come from label_pool_math.h, so cell weights equal the host's.
#pragma once

#include <cuda_runtime.h>

#include <climits>

#include "label_pool_math.h"

namespace relabel_dali {

constexpr int kPoolBlock = 256;

struct DeviceSample {
  const void *scores;         // [k, h, w]
  const uint16_t *class_ids;  // [k, h, w]
  float *out;                 // [num_classes]
  float box[4];
  float scale, offset;
  int k, h, w;
};

struct ArgBest {
  float value;
  int index;
};

// torch.argmax order: larger value first, then the lower index.
__device__ inline bool better(ArgBest a, ArgBest b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

__device__ inline ArgBest block_argmax(ArgBest v, ArgBest *shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgBest other{__shfl_down_sync(0xffffffffu, v.value, offset), __shfl_down_sync(0xffffffffu, v.index, offset)};
    if (better(other, v)) v = other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kPoolBlock / 32; ++i)
      if (better(shared[i], v)) v = shared[i];
    shared[0] = v;
  }
  __syncthreads();
  ArgBest result = shared[0];
  __syncthreads();
  return result;
}

__device__ inline float block_sum(float v, float *shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kPoolBlock / 32; ++i) v += shared[i];
    shared[0] = v;
  }
  __syncthreads();
  float result = shared[0];
  __syncthreads();
  return result;
}

// Needs (s.h + s.w) floats of dynamic shared memory and blockDim.x == kPoolBlock.
// Class ids >= num_classes are skipped (memory safety): the host validates them where it can.
// The descriptor comes by value, so it lives in registers: the output stores cannot alias it.
__device__ inline void pool_sample_device(const DeviceSample s, int score_type, int num_classes, int mode) {
  // Not named axis_weights: that names the host function of label_pool_math.h in this namespace,
  // a conflicting redeclaration that nvcc lets through with only a warning (#159-D).
  extern __shared__ float shared_axis_weights[];
  __shared__ ArgBest best_shared[kPoolBlock / 32];
  __shared__ float sum_shared[kPoolBlock / 32];
  float *row_w = shared_axis_weights, *col_w = shared_axis_weights + s.h;
  const int tid = threadIdx.x;

  for (int c = tid; c < num_classes; c += kPoolBlock) s.out[c] = 0.0f;
  if (is_global(mode)) {
    for (int y = tid; y < s.h; y += kPoolBlock) row_w[y] = 1.0f / static_cast<float>(s.h);
    for (int x = tid; x < s.w; x += kPoolBlock) col_w[x] = 1.0f / static_cast<float>(s.w);
  } else {
    const AxisGrid gy = make_axis_grid(s.box[1], s.box[3], s.h);
    const AxisGrid gx = make_axis_grid(s.box[0], s.box[2], s.w);
    for (int y = tid; y < s.h; y += kPoolBlock) row_w[y] = axis_weight(gy, y);
    for (int x = tid; x < s.w; x += kPoolBlock) col_w[x] = axis_weight(gx, x);
  }
  __syncthreads();

  const int plane = s.h * s.w, total = s.k * plane;
  for (int e = tid; e < total; e += kPoolBlock) {
    const int cell = e % plane;
    const float weight = mul_rn(row_w[cell / s.w], col_w[cell % s.w]);
    if (weight == 0.0f) continue;
    const int id = s.class_ids[e];
    if (id >= num_classes) continue;
    atomicAdd(s.out + id, mul_rn(weight, load_score(s.scores, score_type, e, s.scale, s.offset)));
  }
  __syncthreads();

  // Reads bypass L1 (__ldcg): the sums were made by atomics in L2.
  ArgBest mine{-INFINITY, INT_MAX};
  for (int c = tid; c < num_classes; c += kPoolBlock) {
    ArgBest v{__ldcg(s.out + c), c};
    if (better(v, mine)) mine = v;
  }
  const ArgBest best = block_argmax(mine, best_shared);
  if (is_argmax(mode)) {
    for (int c = tid; c < num_classes; c += kPoolBlock) s.out[c] = c == best.index ? 1.0f : 0.0f;
    return;
  }
  float partial = 0.0f;
  for (int c = tid; c < num_classes; c += kPoolBlock) partial += expf(__ldcg(s.out + c) - best.value);
  const float inv_sum = 1.0f / block_sum(partial, sum_shared);
  for (int c = tid; c < num_classes; c += kPoolBlock) s.out[c] = expf(__ldcg(s.out + c) - best.value) * inv_sum;
}

}  // namespace relabel_dali
