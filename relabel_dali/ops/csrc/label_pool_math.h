// LabelPool math: pooling sparse top-k label maps over a crop box, with no DALI dependency.
//
// A sample is a top-k label map in canonical layout [k, y, x]: scores and class ids per cell. The
// official LabelPooling scatters it into a dense [C, H, W] map, RoIAligns the crop to 1x1 and takes
// a softmax. RoIAlign is linear in the map, so the pooled value of a class is the sum, over the cells
// holding that class, of (bilinear weight of the cell) x (score). The weights are separable: a cell's
// weight is row_weight[y] * col_weight[x], each axis reproducing torchvision's roi_align sampling
// (aligned=False, sampling_ratio=-1, output 1x1) operation by operation in float32, so sample
// positions, border clamps and cell indices are bit-identical to torchvision's CPU kernel.
//
// Everything marked RL_HD compiles for host and device; the host-only driver is at the end.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define RL_HD __host__ __device__
#else
#define RL_HD
#endif

namespace relabel_dali {

enum PoolMode : int { kSoftmax = 0, kArgmax = 1, kGlobalSoftmax = 2, kGlobalArgmax = 3 };
enum ScoreType : int { kScoreFloat32 = 0, kScoreFloat16 = 1, kScoreUint8 = 2 };

RL_HD inline bool is_global(int mode) { return mode == kGlobalSoftmax || mode == kGlobalArgmax; }
RL_HD inline bool is_argmax(int mode) { return mode == kArgmax || mode == kGlobalArgmax; }

// Products and sums are rounded one at a time: a fused multiply-add on the device would move sample
// points by an ulp and break bit-parity with torchvision's CPU kernel at cell borders.
RL_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RL_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// IEEE binary16 -> binary32 by bits, so host code needs no half type.
RL_HD inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1Fu) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal half: renormalise into a normal float.
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  union {
    uint32_t u;
    float f;
  } pun;
  pun.u = bits;
  return pun.f;
}

// Dequantization is the formula the label store documents: score = offset + scale * q.
RL_HD inline float load_score(const void *scores, int score_type, size_t i, float scale, float offset) {
  switch (score_type) {
    case kScoreFloat16:
      return half_to_float(static_cast<const uint16_t *>(scores)[i]);
    case kScoreUint8:
      return add_rn(mul_rn(static_cast<float>(static_cast<const uint8_t *>(scores)[i]), scale), offset);
    default:
      return static_cast<const float *>(scores)[i];
  }
}

// One axis of roi_align's sampling grid for a 1x1 output over [lo, hi) (normalized to the map).
struct AxisGrid {
  float start;  // roi start in map cells, after the -0.5 half-cell shift
  float bin;    // roi size, at least one cell (aligned=False clamps malformed rois)
  int grid;     // number of sample points: ceil(roi size)
  int size;     // map size along this axis
};

RL_HD inline AxisGrid make_axis_grid(float lo_norm, float hi_norm, int size) {
  AxisGrid g;
  const float n = static_cast<float>(size);
  g.start = mul_rn(lo_norm, n) - 0.5f;
  const float end = mul_rn(hi_norm, n) - 0.5f;
  float roi = end - g.start;
  if (!(roi >= 1.0f)) roi = 1.0f;
  g.bin = roi;
  g.grid = static_cast<int>(ceilf(roi));
  if (g.grid < 1) g.grid = 1;
  g.size = size;
  return g;
}

// Sample point i of the axis as (low cell, high cell, their weights); false when the point lies
// outside [-1, size], where roi_align drops the whole sample (it still counts in the average).
RL_HD inline bool axis_sample(const AxisGrid &g, int i, int &low, int &high, float &w_low, float &w_high) {
  const float step = mul_rn(static_cast<float>(i) + 0.5f, g.bin) / static_cast<float>(g.grid);
  float p = add_rn(g.start, step);
  if (!(p >= -1.0f && p <= static_cast<float>(g.size))) return false;
  if (p <= 0.0f) p = 0.0f;
  low = static_cast<int>(p);
  if (low >= g.size - 1) {
    low = high = g.size - 1;
    p = static_cast<float>(low);
  } else {
    high = low + 1;
  }
  w_high = p - static_cast<float>(low);
  w_low = 1.0f - w_high;
  return true;
}

// Weight of one cell index along the axis, already divided by the number of sample points.
// Summing in sample order makes this equal, bit for bit, to a scatter over the samples.
RL_HD inline float axis_weight(const AxisGrid &g, int index) {
  float sum = 0.0f;
  for (int i = 0; i < g.grid; ++i) {
    int low, high;
    float w_low, w_high;
    if (!axis_sample(g, i, low, high, w_low, w_high)) continue;
    if (low == index) sum = add_rn(sum, w_low);
    if (high == index) sum = add_rn(sum, w_high);
  }
  return sum / static_cast<float>(g.grid);
}

// All cell weights of the axis in one pass over the samples: O(grid) instead of axis_weight's
// O(size * grid). Each cell receives its contributions in the same order, so the values match.
inline void axis_weights(const AxisGrid &g, float *weights) {
  for (int i = 0; i < g.size; ++i) weights[i] = 0.0f;
  for (int i = 0; i < g.grid; ++i) {
    int low, high;
    float w_low, w_high;
    if (!axis_sample(g, i, low, high, w_low, w_high)) continue;
    weights[low] += w_low;
    weights[high] += w_high;
  }
  for (int i = 0; i < g.size; ++i) weights[i] /= static_cast<float>(g.grid);
}

// Why a box cannot be pooled, or nullptr. Boxes are (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1.
inline const char *box_problem(const float *box) {
  for (int i = 0; i < 4; ++i) {
    if (!std::isfinite(box[i])) return "has a NaN or infinite coordinate";
    if (box[i] < 0.0f || box[i] > 1.0f) return "has a coordinate outside [0, 1]";
  }
  if (box[2] == box[0] || box[3] == box[1]) return "is degenerate (zero width or height)";
  if (box[2] < box[0] || box[3] < box[1]) return "is inverted (x1 < x0 or y1 < y0)";
  return nullptr;
}

// ---- host driver ---------------------------------------------------------------------------------

// One sample's inputs as raw views: scores [k, h, w] of score_type, class ids [k, h, w].
struct SampleView {
  const void *scores;
  int score_type;
  const uint16_t *class_ids;
  int k, h, w;
  const float *box;  // 4 floats; ignored by the global modes
  float scale, offset;
};

// Per-thread scratch reused across samples so pooling allocates nothing in steady state.
struct HostScratch {
  float *row_w = nullptr, *col_w = nullptr;  // [h], [w]
  int *touched = nullptr;                    // class ids seen with a nonzero weight, [num_classes + 1]
  float *values = nullptr;                   // per touched class, [num_classes]
  uint8_t *seen = nullptr;                   // [num_classes], all zero between samples
};

// Owns a HostScratch; Reserve grows it for a map size and class count, never shrinks it.
struct HostScratchBuffers {
  std::vector<float> row_w, col_w;
  std::vector<int> touched;
  std::vector<float> values;
  std::vector<uint8_t> seen;
  HostScratch view;

  void Reserve(int h, int w, int num_classes) {
    if (static_cast<int>(row_w.size()) < h) row_w.resize(h);
    if (static_cast<int>(col_w.size()) < w) col_w.resize(w);
    if (static_cast<int>(seen.size()) < num_classes) {
      touched.resize(num_classes + 1);  // the branch-free append writes one past the last class
      values.resize(num_classes);
      seen.resize(num_classes, 0);
    }
    view = HostScratch{row_w.data(), col_w.data(), touched.data(), values.data(), seen.data()};
  }
};

// First class id that is >= num_classes, as an entry index, or -1.
inline long long first_bad_class_id(const uint16_t *ids, size_t count, int num_classes) {
  for (size_t i = 0; i < count; ++i)
    if (ids[i] >= num_classes) return static_cast<long long>(i);
  return -1;
}

// Pools one sample into out[num_classes]. Inputs must be validated (box, class ids) beforehand.
// Softmax and argmax are computed over the touched classes plus one shared value for the absent
// ones (pooled score 0), so the cost follows k*h*w rather than num_classes.
inline void pool_sample_host(const SampleView &s, int num_classes, int mode, float *out, HostScratch &scratch) {
  const int h = s.h, w = s.w;
  if (is_global(mode)) {
    // The plain mean over the whole map, as the dense reference's mean over H and W.
    for (int y = 0; y < h; ++y) scratch.row_w[y] = 1.0f / static_cast<float>(h);
    for (int x = 0; x < w; ++x) scratch.col_w[x] = 1.0f / static_cast<float>(w);
  } else {
    const AxisGrid gy = make_axis_grid(s.box[1], s.box[3], h);
    const AxisGrid gx = make_axis_grid(s.box[0], s.box[2], w);
    axis_weights(gy, scratch.row_w);
    axis_weights(gx, scratch.col_w);
  }
  for (int c = 0; c < num_classes; ++c) out[c] = 0.0f;

  int n_touched = 0;
  const size_t plane = static_cast<size_t>(h) * w;
  for (int y = 0; y < h; ++y) {
    const float wy = scratch.row_w[y];
    if (wy == 0.0f) continue;
    for (int x = 0; x < w; ++x) {
      const float weight = wy * scratch.col_w[x];
      if (weight == 0.0f) continue;
      const size_t cell = static_cast<size_t>(y) * w + x;
      for (int j = 0; j < s.k; ++j) {
        const size_t e = j * plane + cell;
        const int id = s.class_ids[e];
        // Branch-free first-touch bookkeeping: ids arrive in no predictable order.
        scratch.touched[n_touched] = id;
        n_touched += scratch.seen[id] ^ 1;
        scratch.seen[id] = 1;
        out[id] += weight * load_score(s.scores, s.score_type, e, s.scale, s.offset);
      }
    }
  }

  const int n_absent = num_classes - n_touched;
  if (is_argmax(mode)) {
    // torch.argmax semantics on the dense vector: the largest value, the lowest class id on ties.
    int best = -1;
    float best_value = 0.0f;
    for (int t = 0; t < n_touched; ++t) {
      const int id = scratch.touched[t];
      const float v = out[id];
      if (best < 0 || v > best_value || (v == best_value && id < best)) {
        best = id;
        best_value = v;
      }
    }
    if (n_absent > 0) {
      int first_absent = 0;
      while (scratch.seen[first_absent]) ++first_absent;
      if (best < 0 || 0.0f > best_value || (0.0f == best_value && first_absent < best)) {
        best = first_absent;
      }
    }
    for (int t = 0; t < n_touched; ++t) {
      out[scratch.touched[t]] = 0.0f;
      scratch.seen[scratch.touched[t]] = 0;
    }
    out[best] = 1.0f;
    return;
  }

  float max_value = n_absent > 0 ? 0.0f : -INFINITY;
  for (int t = 0; t < n_touched; ++t) max_value = fmaxf(max_value, out[scratch.touched[t]]);
  double sum = n_absent * static_cast<double>(expf(-max_value));
  for (int t = 0; t < n_touched; ++t) {
    const float e = expf(out[scratch.touched[t]] - max_value);
    scratch.values[t] = e;
    sum += e;
  }
  const float inv_sum = static_cast<float>(1.0 / sum);
  const float absent_value = expf(-max_value) * inv_sum;
  for (int c = 0; c < num_classes; ++c) out[c] = absent_value;
  for (int t = 0; t < n_touched; ++t) {
    out[scratch.touched[t]] = scratch.values[t] * inv_sum;
    scratch.seen[scratch.touched[t]] = 0;
  }
}

}  // namespace relabel_dali
