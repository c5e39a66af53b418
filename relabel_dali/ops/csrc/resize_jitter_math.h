// ResizeJitterNormalize math, with no DALI dependency: the photometric half of the CPU training
// graph in one pass per axis plus one colour pass.
//
// 1. Resize. A decoded crop (uint8 HWC, 3 channels) is resized with the antialiased bilinear
//    ("triangle") filter exactly as PIL's Image.resize(BILINEAR) does it, which is what the official
//    torchvision recipe runs (RandomResizedCrop on a PIL image): coefficients computed in double and
//    rounded to 22-bit fixed point, a horizontal pass over the rows the vertical pass needs, rounded
//    to uint8, then a vertical pass rounded to uint8 (or the other way round, see PassOrder). The
//    result is bit-identical to PIL's.
// 2. Colour. Brightness b, contrast c (about the resized image's mean grey m), saturation s, a
//    per-channel shift (PCA lighting) and normalization are affine in the pixel; without clipping
//    between the steps their composition does not depend on their order (docs/PIPELINE.md):
//        y = b c (s x + (1 - s) (w.x) 1) + b (1 - c) m 1,   z_ch = (y_ch + 255 shift_ch - mean_ch) / std_ch
//    with w the ITU-R 601 luma weights. That is one 3x3 matrix and an offset per sample, applied while
//    the pixels are written out planar (CHW), mirrored or not.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace relabel_dali {

// PIL's 8-bit resampling precision: 32 bits minus 8 for the value and 2 for overshoot.
constexpr int kResampleBits = 22;
constexpr int32_t kResampleHalf = 1 << (kResampleBits - 1);
constexpr double kLuma[3] = {0.299, 0.587, 0.114};

inline uint8_t clip_fixed(int32_t sum) {
  const int32_t v = sum >> kResampleBits;  // arithmetic shift: floor, as PIL's lookup table does
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Resampling coefficients of one axis (in_size -> out_size), the whole input extent.
struct ResampleAxis {
  int in_size = 0, out_size = 0, stride = 0;  // stride: coefficients reserved per output index
  std::vector<int> first, count;              // first input index and number of taps, per output index
  std::vector<int32_t> weights;               // [out_size * stride], fixed point
  std::vector<double> taps;                   // one output's filter values before rounding

  void Compute(int in, int out) {
    in_size = in;
    out_size = out;
    const double scale = static_cast<double>(in) / out;
    const double filter_scale = std::max(scale, 1.0);
    const double support = filter_scale;  // the triangle filter's support is 1 input pixel
    const double inverse = 1.0 / filter_scale;
    stride = static_cast<int>(std::ceil(support)) * 2 + 1;
    first.assign(out, 0);
    count.assign(out, 0);
    weights.assign(static_cast<size_t>(out) * stride, 0);
    taps.resize(stride);
    double *w = taps.data();
    for (int o = 0; o < out; ++o) {
      const double center = (o + 0.5) * scale;
      const int lo = std::max(0, static_cast<int>(center - support + 0.5));
      const int hi = std::min(in, static_cast<int>(center + support + 0.5));
      const int n = hi - lo;
      double total = 0.0;
      for (int t = 0; t < n; ++t) {
        const double d = std::fabs((static_cast<double>(t + lo) - center + 0.5) * inverse);
        w[t] = d < 1.0 ? 1.0 - d : 0.0;
        total += w[t];
      }
      int32_t *fixed = &weights[static_cast<size_t>(o) * stride];
      for (int t = 0; t < n; ++t) {
        const double v = (total != 0.0 ? w[t] / total : w[t]) * (1 << kResampleBits);
        fixed[t] = static_cast<int32_t>(v < 0 ? v - 0.5 : v + 0.5);
      }
      first[o] = lo;
      count[o] = n;
    }
  }

  int rows_begin() const { return first.front(); }
  int rows_end() const { return first.back() + count.back(); }
};

// Per-thread buffers, grown to the largest sample seen and then reused.
struct ResizeScratch {
  ResampleAxis horizontal, vertical;
  std::vector<uint8_t> between;  // the image after the first pass
  std::vector<int32_t> sums;     // one row of vertical accumulators
  std::vector<uint8_t> resized;  // the resized image [out_h, out_w, 3]
};

// Which pass runs first. PIL up to 12.x always resamples horizontally first (what the official
// recipe ran with); Pillow 13 runs the vertical pass first when the height shrinks by more than
// twice as many pixels as the width does. The two orders differ by at most one grey level on a few
// pixels, since each pass rounds to uint8.
enum PassOrder : int { kHorizontalFirst = 0, kPillow13 = 1 };

inline bool vertical_first(int order, int in_h, int in_w, int out_h, int out_w) {
  return order == kPillow13 && in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2;
}

// dst[r] = rows [rows] of src (3 channels, src_stride bytes apart) resampled to axis.out_size pixels.
inline void horizontal_pass(const uint8_t *src, size_t src_stride, int rows, const ResampleAxis &axis,
                            uint8_t *dst) {
  const int out_w = axis.out_size;
  for (int r = 0; r < rows; ++r, src += src_stride, dst += static_cast<size_t>(out_w) * 3) {
    for (int o = 0; o < out_w; ++o) {
      const int32_t *k = &axis.weights[static_cast<size_t>(o) * axis.stride];
      const uint8_t *p = src + axis.first[o] * 3;
      int32_t s0 = kResampleHalf, s1 = kResampleHalf, s2 = kResampleHalf;
      for (int t = 0, n = axis.count[o]; t < n; ++t, p += 3) {
        s0 += p[0] * k[t];
        s1 += p[1] * k[t];
        s2 += p[2] * k[t];
      }
      dst[o * 3 + 0] = clip_fixed(s0);
      dst[o * 3 + 1] = clip_fixed(s1);
      dst[o * 3 + 2] = clip_fixed(s2);
    }
  }
}

// dst[o] = rows of src (row_len bytes each, src_stride apart; src holds input row first_row at
// its start) resampled along the columns, one whole output row at a time so the loops vectorize.
inline void vertical_pass(const uint8_t *src, size_t src_stride, int row_len, int first_row,
                          const ResampleAxis &axis, std::vector<int32_t> &sums, uint8_t *dst) {
  sums.resize(row_len);
  int32_t *acc = sums.data();
  for (int o = 0; o < axis.out_size; ++o, dst += row_len) {
    const int32_t *k = &axis.weights[static_cast<size_t>(o) * axis.stride];
    std::fill(acc, acc + row_len, kResampleHalf);
    for (int t = 0, n = axis.count[o]; t < n; ++t) {
      const uint8_t *row = src + static_cast<size_t>(axis.first[o] - first_row + t) * src_stride;
      const int32_t weight = k[t];
      for (int j = 0; j < row_len; ++j) acc[j] += row[j] * weight;
    }
    for (int j = 0; j < row_len; ++j) dst[j] = clip_fixed(acc[j]);
  }
}

// out [out_h, out_w, 3] = PIL's bilinear resize of in [in_h, in_w, 3], passes in ``order``.
inline void resize_bilinear_pil(const uint8_t *in, int in_h, int in_w, int out_h, int out_w, int order,
                                ResizeScratch &scratch, uint8_t *out) {
  ResampleAxis &hor = scratch.horizontal, &ver = scratch.vertical;
  hor.Compute(in_w, out_w);
  ver.Compute(in_h, out_h);
  const size_t in_stride = static_cast<size_t>(in_w) * 3, out_stride = static_cast<size_t>(out_w) * 3;
  if (vertical_first(order, in_h, in_w, out_h, out_w)) {
    scratch.between.resize(static_cast<size_t>(out_h) * in_stride);
    vertical_pass(in, in_stride, static_cast<int>(in_stride), 0, ver, scratch.sums, scratch.between.data());
    horizontal_pass(scratch.between.data(), in_stride, out_h, hor, out);
  } else {
    // Only the rows the vertical pass reads are resampled horizontally.
    const int row0 = ver.rows_begin(), rows = ver.rows_end() - row0;
    scratch.between.resize(static_cast<size_t>(rows) * out_stride);
    horizontal_pass(in + row0 * in_stride, in_stride, rows, hor, scratch.between.data());
    vertical_pass(scratch.between.data(), out_stride, static_cast<int>(out_stride), row0, ver, scratch.sums, out);
  }
}

// Sum of each channel of an [h, w, 3] image.
inline void channel_sums(const uint8_t *image, int h, int w, int64_t sums[3]) {
  int64_t totals[3] = {0, 0, 0};
  for (int y = 0; y < h; ++y, image += static_cast<size_t>(w) * 3) {
    int32_t row[3] = {0, 0, 0};
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) row[c] += image[3 * x + c];
    for (int c = 0; c < 3; ++c) totals[c] += row[c];
  }
  for (int c = 0; c < 3; ++c) sums[c] = totals[c];
}

// The per-sample photometric parameters: jitter factors, a shift on the 0..1 scale, and the
// normalization statistics on the 0..255 scale.
struct JitterParams {
  double brightness = 1, contrast = 1, saturation = 1;
  double shift[3] = {0, 0, 0};
  double mean[3] = {0, 0, 0}, std[3] = {1, 1, 1};
};

// out_ch = sum_j matrix[ch][j] x_j + offset[ch], for x on the 0..255 scale.
struct ColourMap {
  float matrix[3][3];
  float offset[3];
};

inline ColourMap colour_map(const JitterParams &p, const int64_t channel_sums[3], int64_t pixels) {
  double grey_mean = 0;
  for (int c = 0; c < 3; ++c) grey_mean += kLuma[c] * static_cast<double>(channel_sums[c]) / pixels;
  const double scale = p.brightness * p.contrast;
  ColourMap map;
  for (int c = 0; c < 3; ++c) {
    for (int j = 0; j < 3; ++j)
      map.matrix[c][j] = static_cast<float>(scale * ((c == j ? p.saturation : 0.0) + (1 - p.saturation) * kLuma[j]) /
                                            p.std[c]);
    map.offset[c] = static_cast<float>(
        (p.brightness * (1 - p.contrast) * grey_mean + 255.0 * p.shift[c] - p.mean[c]) / p.std[c]);
  }
  return map;
}

// Writes the colour-mapped image planar: out[ch][y][x], mirrored horizontally if asked.
template <typename Out, typename Convert>
void write_planar(const uint8_t *image, int h, int w, const ColourMap &map, bool mirror, Out *out,
                  Convert convert) {
  const size_t plane = static_cast<size_t>(h) * w;
  const float(*m)[3] = map.matrix;
  for (int y = 0; y < h; ++y) {
    const uint8_t *src = image + static_cast<size_t>(y) * w * 3;
    Out *r = out + static_cast<size_t>(y) * w, *g = r + plane, *b = g + plane;
    for (int x = 0; x < w; ++x) {
      const float x0 = src[3 * x], x1 = src[3 * x + 1], x2 = src[3 * x + 2];
      const int d = mirror ? w - 1 - x : x;
      r[d] = convert(m[0][0] * x0 + m[0][1] * x1 + m[0][2] * x2 + map.offset[0]);
      g[d] = convert(m[1][0] * x0 + m[1][1] * x1 + m[1][2] * x2 + map.offset[1]);
      b[d] = convert(m[2][0] * x0 + m[2][1] * x1 + m[2][2] * x2 + map.offset[2]);
    }
  }
}

}  // namespace relabel_dali
