// CPU entry of the C ABI: validates the whole batch, then pools it over a few std::threads.
#include "label_pool_capi.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <thread>
#include <vector>

#include "label_pool_math.h"

namespace {

using relabel_dali::SampleView;

size_t score_size(int score_type) {
  return score_type == relabel_dali::kScoreFloat32 ? 4 : score_type == relabel_dali::kScoreFloat16 ? 2 : 1;
}

int fail(char *err, int err_len, int code, const char *format, ...) __attribute__((format(printf, 4, 5)));

int fail(char *err, int err_len, int code, const char *format, ...) {
  if (err && err_len > 0) {
    va_list args;
    va_start(args, format);
    vsnprintf(err, static_cast<size_t>(err_len), format, args);
    va_end(args);
  }
  return code;
}

}  // namespace

extern "C" int relabel_pool_cpu(const void *scores, int score_type, const uint16_t *class_ids, const float *boxes,
                                const float *scale, const float *offset, int64_t n, int k, int h, int w,
                                int num_classes, int mode, int num_threads, float *out, char *err, int err_len) {
  if (n < 0 || k < 1 || h < 1 || w < 1)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "map shape [n, k, h, w] = [%lld, %d, %d, %d] must be positive",
                static_cast<long long>(n), k, h, w);
  if (num_classes < 1 || num_classes > 65536)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "num_classes = %d, expected 1..65536", num_classes);
  if (mode < relabel_dali::kSoftmax || mode > relabel_dali::kGlobalArgmax)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "unknown mode code %d", mode);
  if (score_type < relabel_dali::kScoreFloat32 || score_type > relabel_dali::kScoreUint8)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "unknown score type code %d", score_type);

  const size_t entries = static_cast<size_t>(k) * h * w;
  for (int64_t i = 0; i < n; ++i) {
    const float *box = boxes + 4 * i;
    if (!relabel_dali::is_global(mode)) {
      if (const char *problem = relabel_dali::box_problem(box))
        return fail(err, err_len, RELABEL_BAD_BOX, "sample %lld: box (x0, y0, x1, y1) = (%g, %g, %g, %g) %s",
                    static_cast<long long>(i), box[0], box[1], box[2], box[3], problem);
    }
    const long long bad = relabel_dali::first_bad_class_id(class_ids + i * entries, entries, num_classes);
    if (bad >= 0)
      return fail(err, err_len, RELABEL_BAD_CLASS_ID,
                  "sample %lld: class id %d at [k, y, x] = [%lld, %lld, %lld] is >= num_classes %d",
                  static_cast<long long>(i), class_ids[i * entries + bad], bad / (h * w), (bad / w) % h, bad % w,
                  num_classes);
  }

  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n / 64)));
  auto run = [&](int64_t first, int64_t last) {
    relabel_dali::HostScratchBuffers scratch;
    scratch.Reserve(h, w, num_classes);
    for (int64_t i = first; i < last; ++i) {
      const SampleView sample{static_cast<const char *>(scores) + i * entries * score_size(score_type),
                              score_type,
                              class_ids + i * entries,
                              k,
                              h,
                              w,
                              boxes + 4 * i,
                              scale ? scale[i] : 1.0f,
                              offset ? offset[i] : 0.0f};
      relabel_dali::pool_sample_host(sample, num_classes, mode, out + i * num_classes, scratch.view);
    }
  };
  if (threads == 1) {
    run(0, n);
    return RELABEL_OK;
  }
  std::vector<std::thread> workers;
  const int64_t per_thread = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back(run, std::min(n, t * per_thread), std::min(n, (t + 1) * per_thread));
  for (auto &worker : workers) worker.join();
  return RELABEL_OK;
}

#ifndef RELABEL_WITH_CUDA
extern "C" int relabel_pool_cuda(const void *, int, const uint16_t *, const float *, const float *, const float *,
                                 int64_t, int, int, int, int, int, void *, float *, char *err, int err_len) {
  return fail(err, err_len, RELABEL_CUDA_ERROR, "this build of the pooling library has no CUDA support");
}

extern "C" int relabel_pool_has_cuda(void) { return 0; }
#endif
