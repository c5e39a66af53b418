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

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

RL_HD inline uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

RL_HD inline float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

RL_HD inline bool is_finite(float v) { return (float_bits(v) & 0x7F800000u) != 0x7F800000u; }

// The one NaN the pooling writes (host and device alike), whatever NaN produced it.
RL_HD inline float pooled_nan() { return bits_float(0x7FC00000u); }

// 2^e, built from its bits: e in [-126, 127] for float, [-1022, 1023] for double.
RL_HD inline float pow2f(int e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

RL_HD inline double pow2(int e) {
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// exp(x) from IEEE multiplies and adds only, so host and device give the same bits (CUDA's expf and
// glibc's differ in the last bit on some inputs); within about 1 ulp of the true value.
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that n * ln2_hi is exact), e^r from its Taylor
// series to degree 7 (truncation < 0.05 ulp), then scaled by 2^n (in two steps below 2^-126).
RL_HD inline float exp_rn(float x) {
  if (x != x) return x;
  if (x < -104.0f) return 0.0f;  // below half the smallest subnormal
  if (x > 89.0f) return INFINITY;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and removing it rounds to an integer
  const float n = add_rn(add_rn(mul_rn(x, 1.44269502f), shifter), -shifter);
  const float r = add_rn(add_rn(x, -mul_rn(n, 0.693145751953125f)), -mul_rn(n, 1.42860677e-6f));
  float q = 1.98412698e-4f;                  // 1/7!
  q = add_rn(mul_rn(q, r), 1.38888889e-3f);  // 1/6!
  q = add_rn(mul_rn(q, r), 8.33333377e-3f);  // 1/5!
  q = add_rn(mul_rn(q, r), 4.16666679e-2f);  // 1/4!
  q = add_rn(mul_rn(q, r), 1.66666672e-1f);  // 1/3!
  q = add_rn(mul_rn(q, r), 0.5f);
  const float m = add_rn(1.0f, add_rn(r, mul_rn(mul_rn(r, r), q)));
  const int e = static_cast<int>(n);
  if (e > 127) return mul_rn(mul_rn(m, pow2f(127)), pow2f(e - 127));
  if (e < -126) return mul_rn(mul_rn(m, pow2f(e + 64)), pow2f(-64));
  return mul_rn(m, pow2f(e));
}

// ---- exact sums ----
// Per-class sums and the softmax normaliser are exact up to one rounding per term: each term goes onto
// a fixed-point grid (an int64 count of 2^-s) fine enough for the sample, and the integers are added.
// Integer addition does not depend on the order, so the host's loop and the GPU's atomics give the
// same bits, run after run, and the float rounding of the result happens once, at the end.

struct FixedPoint {
  double to_fixed;  // 2^s
  double to_float;  // 2^-s
};

// The finest grid on which up to max_terms terms of magnitude <= max_abs (finite) sum below 2^62:
// a term's rounding error is at most 2^-s / 2, about max_abs * max_terms * 2^-63.
RL_HD inline FixedPoint fixed_point_for(float max_abs, long long max_terms) {
  int term_bits = 1;  // max_terms < 2^term_bits
  while (term_bits < 62 && (1LL << term_bits) <= max_terms) ++term_bits;
  const int biased = static_cast<int>((float_bits(max_abs) >> 23) & 0xFFu);
  const int max_exponent = (biased > 1 ? biased : 1) - 126;  // max_abs < 2^max_exponent
  const int s = 62 - term_bits - max_exponent;
  return FixedPoint{pow2(s), pow2(-s)};
}

RL_HD inline long long to_fixed(float v, const FixedPoint &grid) {
  const double scaled = static_cast<double>(v) * grid.to_fixed;  // exact: a power of two
#if defined(__CUDA_ARCH__)
  return __double2ll_rn(scaled);
#else
  return std::llrint(scaled);
#endif
}

RL_HD inline float from_fixed(long long sum, const FixedPoint &grid) {
  return static_cast<float>(static_cast<double>(sum) * grid.to_float);
}

// Terms that are not finite stay out of the integer sum; flags say which kinds a class received.
enum NonFinite : unsigned { kNaNTerm = 1, kPlusInfTerm = 2, kMinusInfTerm = 4 };

RL_HD inline unsigned nonfinite_flag(float v) { return v != v ? kNaNTerm : v > 0.0f ? kPlusInfTerm : kMinusInfTerm; }

// A class's pooled value from its exact sum and flags: NaN if a term was NaN or both infinities came.
RL_HD inline float pooled_value(long long sum, unsigned nonfinite, const FixedPoint &grid) {
  if ((nonfinite & kNaNTerm) || ((nonfinite & kPlusInfTerm) && (nonfinite & kMinusInfTerm))) return pooled_nan();
  if (nonfinite & kPlusInfTerm) return INFINITY;
  if (nonfinite & kMinusInfTerm) return -INFINITY;
  return from_fixed(sum, grid);
}

// torch.argmax order: NaN first (the lowest class id among NaNs), then the larger value, then the lower
// class id. A strict total order, so any reduction tree picks the same class.
RL_HD inline bool argmax_before(float a, int a_id, float b, int b_id) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || a_id < b_id);
  return a > b || (a == b && a_id < b_id);
}

// Softmax: e_c = exp(v_c - max) <= 1 for every class, summed exactly on the grid of num_classes terms
// of at most 1; the outputs are e_c * float(1 / sum).
RL_HD inline FixedPoint softmax_grid(int num_classes) { return fixed_point_for(1.0f, num_classes); }

RL_HD inline float softmax_term(float value, float max_value) { return exp_rn(add_rn(value, -max_value)); }

RL_HD inline float softmax_inverse(long long sum, const FixedPoint &grid) {
  return static_cast<float>(1.0 / (static_cast<double>(sum) * grid.to_float));
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

// One axis of roi_align's sampling grid for an output of `bins` cells over [lo, hi) (normalized to the
// map): bin b covers [start + b * bin, start + (b + 1) * bin) and samples it at `grid` points.
struct AxisGrid {
  float start;  // roi start in map cells, after the -0.5 half-cell shift
  float bin;    // bin size: the roi size (at least one cell: aligned=False clamps malformed rois) / bins
  int grid;     // sample points per bin: ceil(roi size / bins), torchvision's roi_bin_grid
  int size;     // map size along this axis
};

// bins = 1 is the 1x1 pooling: roi / 1.0f and start + 0.0f * bin are exact, so its sample points are
// the same bits as before output sizes existed (and as torchvision's).
RL_HD inline AxisGrid make_axis_grid(float lo_norm, float hi_norm, int size, int bins) {
  AxisGrid g;
  const float n = static_cast<float>(size);
  g.start = mul_rn(lo_norm, n) - 0.5f;
  const float end = mul_rn(hi_norm, n) - 0.5f;
  float roi = end - g.start;
  if (!(roi >= 1.0f)) roi = 1.0f;
  g.bin = roi / static_cast<float>(bins);
  g.grid = static_cast<int>(ceilf(g.bin));
  if (g.grid < 1) g.grid = 1;
  g.size = size;
  return g;
}

// Sample point i of bin b as (low cell, high cell, their weights); false when the point lies outside
// [-1, size], where roi_align drops the whole sample (it still counts in the average). The position is
// torchvision's: (start + b * bin) + (i + 0.5) * bin / grid, each operation rounded on its own.
RL_HD inline bool axis_sample(const AxisGrid &g, int b, int i, int &low, int &high, float &w_low, float &w_high) {
  const float origin = add_rn(g.start, mul_rn(static_cast<float>(b), g.bin));
  const float step = mul_rn(static_cast<float>(i) + 0.5f, g.bin) / static_cast<float>(g.grid);
  float p = add_rn(origin, step);
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

// Weight of one cell index in bin b, already divided by the number of sample points.
// Summing in sample order makes this equal, bit for bit, to a scatter over the samples.
RL_HD inline float axis_weight(const AxisGrid &g, int b, int index) {
  float sum = 0.0f;
  for (int i = 0; i < g.grid; ++i) {
    int low, high;
    float w_low, w_high;
    if (!axis_sample(g, b, i, low, high, w_low, w_high)) continue;
    if (low == index) sum = add_rn(sum, w_low);
    if (high == index) sum = add_rn(sum, w_high);
  }
  return sum / static_cast<float>(g.grid);
}

// All cell weights of bin b in one pass over its samples: O(grid) instead of axis_weight's
// O(size * grid). Each cell receives its contributions in the same order, so the values match.
inline void axis_weights(const AxisGrid &g, int b, float *weights) {
  for (int i = 0; i < g.size; ++i) weights[i] = 0.0f;
  for (int i = 0; i < g.grid; ++i) {
    int low, high;
    float w_low, w_high;
    if (!axis_sample(g, b, i, low, high, w_low, w_high)) continue;
    weights[low] += w_low;
    weights[high] += w_high;
  }
  for (int i = 0; i < g.size; ++i) weights[i] /= static_cast<float>(g.grid);
}

// Token t of an S x S output (row-major over the crop as the student sees it, after the flip) reads
// bin (t / S, t % S) of the box, or bin (t / S, S - 1 - t % S) when the crop is mirrored: the flip
// comes after the crop, and the box is in the unflipped image.
RL_HD inline int token_row_bin(int token, int output_size) { return token / output_size; }
RL_HD inline int token_col_bin(int token, int output_size, bool mirror) {
  const int col = token % output_size;
  return mirror ? output_size - 1 - col : col;
}

// Why an output size cannot be used with a mode, or nullptr. The token grid has at most 4096 tokens
// a side (2^24 tokens), which keeps every token index and bin position exact in float and int.
inline const char *output_size_problem(int mode, int output_size) {
  if (output_size < 1 || output_size > 4096) return "is outside 1..4096";
  if (output_size > 1 && is_global(mode))
    return "needs a box mode (softmax or argmax): the global modes pool the whole map into one target";
  return nullptr;
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
  long long *sums = nullptr;                 // exact per-class sums, [num_classes], all zero between samples
  uint8_t *nonfinite = nullptr;              // per-class NonFinite flags, [num_classes], all zero between samples
  int *entry_class = nullptr;                // the weighted entries' classes and products, [k * h * w]
  float *entry_product = nullptr;
  int *order = nullptr;                      // positions of touched classes sorted by id, [num_classes]
};

// Owns a HostScratch; Reserve grows it for a map size and class count, never shrinks it.
struct HostScratchBuffers {
  std::vector<float> row_w, col_w;
  std::vector<int> touched;
  std::vector<float> values;
  std::vector<uint8_t> seen;
  std::vector<long long> sums;
  std::vector<uint8_t> nonfinite;
  std::vector<int> entry_class;
  std::vector<float> entry_product;
  std::vector<int> order;
  HostScratch view;

  void Reserve(int k, int h, int w, int num_classes) {
    const size_t entries = static_cast<size_t>(k) * h * w;
    if (entry_class.size() < entries) {
      entry_class.resize(entries);
      entry_product.resize(entries);
    }
    if (static_cast<int>(row_w.size()) < h) row_w.resize(h);
    if (static_cast<int>(col_w.size()) < w) col_w.resize(w);
    if (static_cast<int>(seen.size()) < num_classes) {
      touched.resize(num_classes + 1);  // the branch-free append writes one past the last class
      values.resize(num_classes);
      seen.resize(num_classes, 0);
      sums.resize(num_classes, 0);
      nonfinite.resize(num_classes, 0);
      order.resize(num_classes);
    }
    view = HostScratch{row_w.data(), col_w.data(), touched.data(), values.data(), seen.data(), sums.data(),
                       nonfinite.data(), entry_class.data(), entry_product.data(), order.data()};
  }
};

// First class id that is >= num_classes, as an entry index, or -1.
inline long long first_bad_class_id(const uint16_t *ids, size_t count, int num_classes) {
  for (size_t i = 0; i < count; ++i)
    if (ids[i] >= num_classes) return static_cast<long long>(i);
  return -1;
}

// The axis weights of bin (row_bin, col_bin) of an output_size x output_size RoIAlign grid over the
// box into scratch.row_w [h] and scratch.col_w [w]; the global modes take the plain mean of the map.
inline void token_axis_weights(const SampleView &s, int mode, int output_size, int row_bin, int col_bin,
                               HostScratch &scratch) {
  if (is_global(mode)) {
    // The plain mean over the whole map, as the dense reference's mean over H and W.
    for (int y = 0; y < s.h; ++y) scratch.row_w[y] = 1.0f / static_cast<float>(s.h);
    for (int x = 0; x < s.w; ++x) scratch.col_w[x] = 1.0f / static_cast<float>(s.w);
  } else {
    const AxisGrid gy = make_axis_grid(s.box[1], s.box[3], s.h, output_size);
    const AxisGrid gx = make_axis_grid(s.box[0], s.box[2], s.w, output_size);
    axis_weights(gy, row_bin, scratch.row_w);
    axis_weights(gx, col_bin, scratch.col_w);
  }
}

// The classes a token touches: those held (with an id below num_classes) by an entry whose cell has a
// nonzero weight, the very entries pool_token_values sums; every other class pools to 0. Their number.
inline int count_token_classes(const SampleView &s, int num_classes, int mode, int output_size, int row_bin,
                               int col_bin, HostScratch &scratch) {
  token_axis_weights(s, mode, output_size, row_bin, col_bin, scratch);
  int n_touched = 0;
  const size_t plane = static_cast<size_t>(s.h) * s.w;
  for (int y = 0; y < s.h; ++y) {
    const float wy = scratch.row_w[y];
    if (wy == 0.0f) continue;
    for (int x = 0; x < s.w; ++x) {
      if (mul_rn(wy, scratch.col_w[x]) == 0.0f) continue;
      const size_t cell = static_cast<size_t>(y) * s.w + x;
      for (int j = 0; j < s.k; ++j) {
        const int id = s.class_ids[j * plane + cell];
        if (id >= num_classes) continue;
        scratch.touched[n_touched] = id;
        n_touched += scratch.seen[id] ^ 1;
        scratch.seen[id] = 1;
      }
    }
  }
  for (int t = 0; t < n_touched; ++t) scratch.seen[scratch.touched[t]] = 0;
  return n_touched;
}

// Pools bin (row_bin, col_bin) of an output_size x output_size RoIAlign grid over the box (the box must
// be valid: box_problem) up to the pooled values: returns the number of touched classes, their ids in
// scratch.touched (first-touch order, scratch.seen set for each) and their pooled values in
// scratch.values. The same arithmetic as the GPU kernel (label_pool_kernel.cuh), so both give the same
// bits: per-class sums exact on a fixed-point grid. pool_token_host and pool_token_compact_host finish
// it (argmax or softmax over the touched classes plus one shared value for the absent ones, pooled
// score 0), so the cost follows k*h*w rather than num_classes.
inline int pool_token_values(const SampleView &s, int num_classes, int mode, int output_size, int row_bin,
                             int col_bin, HostScratch &scratch) {
  const int h = s.h, w = s.w;
  token_axis_weights(s, mode, output_size, row_bin, col_bin, scratch);

  // Pass 1, over the entries of the weighted cells in cell order (y, x, then j): their classes and
  // products, the touched classes (in first-touch order) and the largest finite |product|, which sets
  // the sample's fixed-point grid. Class ids >= num_classes are skipped, as the GPU kernel skips them.
  int n_entries = 0, n_touched = 0;
  uint32_t max_abs_bits = 0;
  const size_t plane = static_cast<size_t>(h) * w;
  for (int y = 0; y < h; ++y) {
    const float wy = scratch.row_w[y];
    if (wy == 0.0f) continue;
    for (int x = 0; x < w; ++x) {
      const float weight = mul_rn(wy, scratch.col_w[x]);
      if (weight == 0.0f) continue;
      const size_t cell = static_cast<size_t>(y) * w + x;
      for (int j = 0; j < s.k; ++j) {
        const size_t e = j * plane + cell;
        const int id = s.class_ids[e];
        if (id >= num_classes) continue;
        const float product = mul_rn(weight, load_score(s.scores, s.score_type, e, s.scale, s.offset));
        scratch.entry_class[n_entries] = id;
        scratch.entry_product[n_entries++] = product;
        // Branch-free first-touch bookkeeping: ids arrive in no predictable order.
        scratch.touched[n_touched] = id;
        n_touched += scratch.seen[id] ^ 1;
        scratch.seen[id] = 1;
        if (is_finite(product)) max_abs_bits = std::max(max_abs_bits, float_bits(product) & 0x7FFFFFFFu);
      }
    }
  }
  // Pass 2: the exact sums.
  const FixedPoint grid = fixed_point_for(bits_float(max_abs_bits), static_cast<long long>(s.k) * plane);
  for (int i = 0; i < n_entries; ++i) {
    const int id = scratch.entry_class[i];
    const float product = scratch.entry_product[i];
    if (is_finite(product))
      scratch.sums[id] += to_fixed(product, grid);
    else
      scratch.nonfinite[id] |= nonfinite_flag(product);
  }
  for (int t = 0; t < n_touched; ++t) {
    const int id = scratch.touched[t];
    scratch.values[t] = pooled_value(scratch.sums[id], scratch.nonfinite[id], grid);
    scratch.sums[id] = 0;
    scratch.nonfinite[id] = 0;
  }
  return n_touched;
}

// The argmax of a token's pooled values (pool_token_values): the touched classes and the absent ones
// (pooled score 0; the lowest absent id stands for them all), in argmax_before's order.
inline int token_argmax(int num_classes, int n_touched, const HostScratch &scratch) {
  int best = -1;
  if (n_touched < num_classes)
    for (best = 0; scratch.seen[best];) ++best;
  float best_value = 0.0f;
  for (int t = 0; t < n_touched; ++t) {
    const int id = scratch.touched[t];
    if (best < 0 || argmax_before(scratch.values[t], id, best_value, best)) {
      best = id;
      best_value = scratch.values[t];
    }
  }
  return best;
}

// The softmax of a token's pooled values (pool_token_values) over all num_classes classes, the absent
// ones scoring 0: scratch.values[t] becomes touched class t's probability; returns the probability
// every absent class has. The max passes NaNs over: a NaN class makes its own term NaN, and then
// every probability is NaN.
inline float token_softmax(int num_classes, int n_touched, HostScratch &scratch) {
  const int n_absent = num_classes - n_touched;
  float max_value = n_absent > 0 ? 0.0f : -INFINITY;
  for (int t = 0; t < n_touched; ++t)
    if (scratch.values[t] > max_value) max_value = scratch.values[t];
  const FixedPoint unit = softmax_grid(num_classes);
  const float absent_term = softmax_term(0.0f, max_value);
  long long sum = n_absent > 0 ? n_absent * to_fixed(absent_term, unit) : 0;
  bool any_nan = false;
  for (int t = 0; t < n_touched; ++t) {
    const float term = softmax_term(scratch.values[t], max_value);
    scratch.values[t] = term;
    if (term != term)
      any_nan = true;
    else
      sum += to_fixed(term, unit);
  }
  const float inv_sum = any_nan ? pooled_nan() : softmax_inverse(sum, unit);
  for (int t = 0; t < n_touched; ++t) scratch.values[t] = any_nan ? pooled_nan() : mul_rn(scratch.values[t], inv_sum);
  return any_nan ? pooled_nan() : mul_rn(absent_term, inv_sum);
}

// Pools bin (row_bin, col_bin) into the dense target out[num_classes]. pool_sample_host is its 1x1
// case; the global modes take the whole map and have no grid (output_size 1 only: the entry points
// refuse more).
inline void pool_token_host(const SampleView &s, int num_classes, int mode, int output_size, int row_bin,
                            int col_bin, float *out, HostScratch &scratch) {
  const int n_touched = pool_token_values(s, num_classes, mode, output_size, row_bin, col_bin, scratch);
  if (is_argmax(mode)) {
    const int best = token_argmax(num_classes, n_touched, scratch);
    for (int t = 0; t < n_touched; ++t) scratch.seen[scratch.touched[t]] = 0;
    for (int c = 0; c < num_classes; ++c) out[c] = 0.0f;
    out[best] = 1.0f;
    return;
  }
  const float absent_value = token_softmax(num_classes, n_touched, scratch);
  for (int c = 0; c < num_classes; ++c) out[c] = absent_value;
  for (int t = 0; t < n_touched; ++t) {
    out[scratch.touched[t]] = scratch.values[t];
    scratch.seen[scratch.touched[t]] = 0;
  }
}

// Classes a compact token target holds: the touched classes in the softmax modes, the argmax's one
// class in the argmax modes.
inline int compact_token_needs(int mode, int n_touched) { return is_argmax(mode) ? 1 : n_touched; }

// The same target as pool_token_host in compact form (docs/OPERATOR.md, "Compact token targets"):
// ids[slots] (int32, ascending, -1 as padding), values[slots] (each id's probability, bit for bit the
// dense target's; 0 at the padding) and *rest, the probability of every class not among the ids (0 when
// every class is among them). Softmax modes: the touched classes; argmax modes: the one class, value 1.
// Returns the number of classes the token needs; when that exceeds slots, the token gets padding
// only (and *rest is left as it was): the caller reports the error.
inline int pool_token_compact_host(const SampleView &s, int num_classes, int mode, int output_size, int row_bin,
                                   int col_bin, int slots, int32_t *ids, float *values, float *rest,
                                   HostScratch &scratch) {
  const int n_touched = pool_token_values(s, num_classes, mode, output_size, row_bin, col_bin, scratch);
  const int needed = compact_token_needs(mode, n_touched);
  const bool fits = needed <= slots;
  int written = 0;
  if (fits && is_argmax(mode)) {
    ids[0] = token_argmax(num_classes, n_touched, scratch);
    values[0] = 1.0f;
    *rest = 0.0f;
    written = 1;
  } else if (fits) {
    const float absent_value = token_softmax(num_classes, n_touched, scratch);
    *rest = n_touched < num_classes ? absent_value : 0.0f;
    // Ascending ids: sort the touched positions by class id.
    for (int t = 0; t < n_touched; ++t) scratch.order[t] = t;
    std::sort(scratch.order, scratch.order + n_touched,
              [&](int a, int b) { return scratch.touched[a] < scratch.touched[b]; });
    for (int t = 0; t < n_touched; ++t) {
      ids[t] = scratch.touched[scratch.order[t]];
      values[t] = scratch.values[scratch.order[t]];
    }
    written = n_touched;
  }
  for (int t = 0; t < n_touched; ++t) scratch.seen[scratch.touched[t]] = 0;
  for (int t = written; t < slots; ++t) {
    ids[t] = -1;
    values[t] = 0.0f;
  }
  return needed;
}

inline void pool_sample_host(const SampleView &s, int num_classes, int mode, float *out, HostScratch &scratch) {
  pool_token_host(s, num_classes, mode, 1, 0, 0, out, scratch);
}

// All output_size^2 tokens of one sample into out[output_size^2, num_classes], in token order.
inline void pool_tokens_host(const SampleView &s, int num_classes, int mode, int output_size, bool mirror,
                             float *out, HostScratch &scratch) {
  const int tokens = output_size * output_size;
  for (int t = 0; t < tokens; ++t)
    pool_token_host(s, num_classes, mode, output_size, token_row_bin(t, output_size),
                    token_col_bin(t, output_size, mirror), out + static_cast<size_t>(t) * num_classes, scratch);
}

// The most classes any of one sample's output_size^2 tokens needs in compact form (compact_token_needs).
inline int compact_sample_needs(const SampleView &s, int num_classes, int mode, int output_size, bool mirror,
                                HostScratch &scratch) {
  if (is_argmax(mode)) return 1;
  int most = 0;
  for (int t = 0; t < output_size * output_size; ++t)
    most = std::max(most, count_token_classes(s, num_classes, mode, output_size, token_row_bin(t, output_size),
                                              token_col_bin(t, output_size, mirror), scratch));
  return most;
}

// All output_size^2 tokens of one sample in compact form: ids [output_size^2, slots], values likewise,
// rest [output_size^2]. Returns -1, or the first token needing more than slots classes (its count in
// *needed; the tokens before it are written).
inline int pool_tokens_compact_host(const SampleView &s, int num_classes, int mode, int output_size, bool mirror,
                                    int slots, int32_t *ids, float *values, float *rest, int *needed,
                                    HostScratch &scratch) {
  const int tokens = output_size * output_size;
  for (int t = 0; t < tokens; ++t) {
    const size_t first = static_cast<size_t>(t) * slots;
    const int count = pool_token_compact_host(s, num_classes, mode, output_size, token_row_bin(t, output_size),
                                              token_col_bin(t, output_size, mirror), slots, ids + first,
                                              values + first, rest + t, scratch);
    if (count > slots) {
      *needed = count;
      return t;
    }
  }
  return -1;
}

}  // namespace relabel_dali
