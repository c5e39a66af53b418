// CPU entry of the C ABI: validates the whole batch, then pools it over a few std::threads.
#include "label_pool_capi.h"

#include <algorithm>
#include <climits>
#include <cstdarg>
#include <functional>
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

// Class ids of any integer dtype -> uint16, checking the range on the way (the entry point may be
// handed int64 tensors; converting here avoids a separate pass in the caller).
template <typename Id>
long long convert_ids(const void *ids, size_t count, int num_classes, uint16_t *out) {
  const Id *typed = static_cast<const Id *>(ids);
  for (size_t i = 0; i < count; ++i) {
    const long long id = static_cast<long long>(typed[i]);
    if (id < 0 || id >= num_classes) return static_cast<long long>(i);
    out[i] = static_cast<uint16_t>(id);
  }
  return -1;
}

long long checked_ids(const void *ids, int id_type, size_t count, int num_classes, uint16_t *buffer,
                      const uint16_t **result) {
  switch (id_type) {
    case RELABEL_ID_UINT16:
      *result = static_cast<const uint16_t *>(ids);
      return relabel_dali::first_bad_class_id(*result, count, num_classes);
    case RELABEL_ID_INT16:
      *result = buffer;
      return convert_ids<int16_t>(ids, count, num_classes, buffer);
    case RELABEL_ID_INT32:
      *result = buffer;
      return convert_ids<int32_t>(ids, count, num_classes, buffer);
    case RELABEL_ID_INT64:
      *result = buffer;
      return convert_ids<int64_t>(ids, count, num_classes, buffer);
    default:
      *result = buffer;
      return convert_ids<uint8_t>(ids, count, num_classes, buffer);
  }
}

long long id_value(const void *ids, int id_type, size_t i) {
  switch (id_type) {
    case RELABEL_ID_UINT16: return static_cast<const uint16_t *>(ids)[i];
    case RELABEL_ID_INT16: return static_cast<const int16_t *>(ids)[i];
    case RELABEL_ID_INT32: return static_cast<const int32_t *>(ids)[i];
    case RELABEL_ID_INT64: return static_cast<const int64_t *>(ids)[i];
    default: return static_cast<const uint8_t *>(ids)[i];
  }
}

size_t id_size(int id_type) {
  return id_type == RELABEL_ID_INT64 ? 8 : id_type == RELABEL_ID_INT32 ? 4 : id_type == RELABEL_ID_UINT8 ? 1 : 2;
}

// The CPU entries' shared part: checks the arguments, then runs pool_one(i, sample, scratch, message)
// on every sample over a few std::threads after validating its box and class ids; pool_one returns
// RELABEL_OK or a code with its reason in message. The lowest failing sample's error is returned.
template <typename PoolOne>
int run_cpu_batch(const void *scores, int score_type, const void *class_ids, int id_type, const float *boxes,
                  const float *scale, const float *offset, int64_t n, int k, int h, int w, int num_classes, int mode,
                  int output_size, int num_threads, char *err, int err_len, PoolOne pool_one) {
  if (n < 0 || k < 1 || h < 1 || w < 1)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "map shape [n, k, h, w] = [%lld, %d, %d, %d] must be positive",
                static_cast<long long>(n), k, h, w);
  if (num_classes < 1 || num_classes > 65536)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "num_classes = %d, expected 1..65536", num_classes);
  if (mode < relabel_dali::kSoftmax || mode > relabel_dali::kGlobalArgmax)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "unknown mode code %d", mode);
  if (const char *problem = relabel_dali::output_size_problem(mode, output_size))
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "output_size %d %s", output_size, problem);
  if (score_type < relabel_dali::kScoreFloat32 || score_type > relabel_dali::kScoreUint8)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "unknown score type code %d", score_type);
  if (id_type < RELABEL_ID_UINT16 || id_type > RELABEL_ID_UINT8)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "unknown class id type code %d", id_type);

  const size_t entries = static_cast<size_t>(k) * h * w;
  // Validation runs inside the workers; each reports its first bad sample and the lowest one wins,
  // so the error does not depend on the thread count.
  struct Failure {
    int64_t sample = INT64_MAX;
    int code = RELABEL_OK;
    char message[512] = {0};
  };
  auto run = [&](int64_t first, int64_t last, Failure &failure) {
    relabel_dali::HostScratchBuffers scratch;
    scratch.Reserve(k, h, w, num_classes);
    std::vector<uint16_t> converted(id_type == RELABEL_ID_UINT16 ? 0 : entries);
    for (int64_t i = first; i < last; ++i) {
      const float *box = boxes + 4 * i;
      if (!relabel_dali::is_global(mode)) {
        if (const char *problem = relabel_dali::box_problem(box)) {
          failure.sample = i;
          failure.code = fail(failure.message, sizeof(failure.message), RELABEL_BAD_BOX,
                              "sample %lld: box (x0, y0, x1, y1) = (%g, %g, %g, %g) %s", static_cast<long long>(i),
                              box[0], box[1], box[2], box[3], problem);
          return;
        }
      }
      const void *sample_ids = static_cast<const char *>(class_ids) + i * entries * id_size(id_type);
      const uint16_t *ids = nullptr;
      const long long bad = checked_ids(sample_ids, id_type, entries, num_classes, converted.data(), &ids);
      if (bad >= 0) {
        failure.sample = i;
        failure.code = fail(failure.message, sizeof(failure.message), RELABEL_BAD_CLASS_ID,
                            "sample %lld: class id %lld at [k, y, x] = [%lld, %lld, %lld] is outside "
                            "[0, num_classes - 1 = %d]",
                            static_cast<long long>(i), id_value(sample_ids, id_type, bad), bad / (h * w),
                            (bad / w) % h, bad % w, num_classes - 1);
        return;
      }
      const SampleView sample{static_cast<const char *>(scores) + i * entries * score_size(score_type),
                              score_type,
                              ids,
                              k,
                              h,
                              w,
                              box,
                              scale ? scale[i] : 1.0f,
                              offset ? offset[i] : 0.0f};
      const int code = pool_one(i, sample, scratch.view, failure.message, static_cast<int>(sizeof(failure.message)));
      if (code != RELABEL_OK) {
        failure.sample = i;
        failure.code = code;
        return;
      }
    }
  };
  // Threads for at least 64 targets each: a sample of S x S tokens is S^2 times the work of one.
  const int64_t work = n * output_size * output_size;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, work / 64)));
  std::vector<Failure> failures(threads);
  if (threads == 1) {
    run(0, n, failures[0]);
  } else {
    std::vector<std::thread> workers;
    const int64_t per_thread = (n + threads - 1) / threads;
    for (int t = 0; t < threads; ++t)
      workers.emplace_back(run, std::min(n, t * per_thread), std::min(n, (t + 1) * per_thread), std::ref(failures[t]));
    for (auto &worker : workers) worker.join();
  }
  const Failure *first = nullptr;
  for (const auto &failure : failures)
    if (failure.code != RELABEL_OK && (!first || failure.sample < first->sample)) first = &failure;
  if (first) return fail(err, err_len, first->code, "%s", first->message);
  return RELABEL_OK;
}

}  // namespace

extern "C" int relabel_pool_cpu(const void *scores, int score_type, const void *class_ids, int id_type,
                                const float *boxes, const float *scale, const float *offset, int64_t n, int k, int h,
                                int w, int num_classes, int mode, int output_size, const uint8_t *mirror,
                                int num_threads, float *out, char *err, int err_len) {
  const size_t targets = static_cast<size_t>(output_size) * output_size * num_classes;  // per sample
  return run_cpu_batch(scores, score_type, class_ids, id_type, boxes, scale, offset, n, k, h, w, num_classes, mode,
                       output_size, num_threads, err, err_len,
                       [&](int64_t i, const SampleView &sample, relabel_dali::HostScratch &scratch, char *, int) {
                         relabel_dali::pool_tokens_host(sample, num_classes, mode, output_size, mirror && mirror[i],
                                                        out + i * targets, scratch);
                         return static_cast<int>(RELABEL_OK);
                       });
}

extern "C" int relabel_pool_cpu_compact(const void *scores, int score_type, const void *class_ids, int id_type,
                                        const float *boxes, const float *scale, const float *offset, int64_t n, int k,
                                        int h, int w, int num_classes, int mode, int output_size,
                                        const uint8_t *mirror, int num_threads, int slots, int32_t *ids,
                                        float *values, float *rest, int32_t *needed, char *err, int err_len) {
  if (ids && slots < 1)
    return fail(err, err_len, RELABEL_BAD_ARGUMENT, "compact slots = %d, expected >= 1", slots);
  const int64_t tokens = static_cast<int64_t>(output_size) * output_size;
  return run_cpu_batch(
      scores, score_type, class_ids, id_type, boxes, scale, offset, n, k, h, w, num_classes, mode, output_size,
      num_threads, err, err_len,
      [&](int64_t i, const SampleView &sample, relabel_dali::HostScratch &scratch, char *message, int message_len) {
        const bool flipped = mirror && mirror[i];
        if (!ids) {
          needed[i] = relabel_dali::compact_sample_needs(sample, num_classes, mode, output_size, flipped, scratch);
          return static_cast<int>(RELABEL_OK);
        }
        int count = 0;
        const int64_t first = i * tokens * slots;
        const int token = relabel_dali::pool_tokens_compact_host(sample, num_classes, mode, output_size, flipped,
                                                                 slots, ids + first, values + first, rest + i * tokens,
                                                                 &count, scratch);
        if (token < 0) return static_cast<int>(RELABEL_OK);
        return fail(message, message_len, RELABEL_TOO_MANY_CLASSES,
                    "sample %lld, token %d (row %d, column %d): %d classes, more than the %d compact slots",
                    static_cast<long long>(i), token, token / output_size, token % output_size, count, slots);
      });
}

#ifndef RELABEL_WITH_CUDA
extern "C" int relabel_pool_cuda(const void *, int, const uint16_t *, const float *, const float *, const float *,
                                 int64_t, int, int, int, int, int, int, const uint8_t *, void *, float *, char *err,
                                 int err_len) {
  return fail(err, err_len, RELABEL_CUDA_ERROR, "this build of the pooling library has no CUDA support");
}

extern "C" int relabel_pool_has_cuda(void) { return 0; }
#endif
