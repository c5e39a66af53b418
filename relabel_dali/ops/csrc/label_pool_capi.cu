// CUDA entry of the C ABI: one kernel launch on the caller's stream, no allocation, no sync.
#include <cstdio>

#include "label_pool_capi.h"
#include "label_pool_kernel.cuh"

namespace {

struct BatchArgs {
  const char *scores;
  const uint16_t *class_ids;
  const float *boxes, *scale, *offset;
  float *out;
  int score_bytes, k, h, w;
};

__global__ void pool_batch_kernel(BatchArgs args, int score_type, int num_classes, int mode) {
  const int64_t i = blockIdx.x;
  const size_t entries = static_cast<size_t>(args.k) * args.h * args.w;
  relabel_dali::DeviceSample s;
  s.scores = args.scores + i * entries * args.score_bytes;
  s.class_ids = args.class_ids + i * entries;
  s.out = args.out + i * num_classes;
  for (int j = 0; j < 4; ++j) s.box[j] = args.boxes[4 * i + j];
  s.scale = args.scale ? args.scale[i] : 1.0f;
  s.offset = args.offset ? args.offset[i] : 0.0f;
  s.k = args.k;
  s.h = args.h;
  s.w = args.w;
  relabel_dali::pool_sample_device(s, score_type, num_classes, mode);
}

}  // namespace

extern "C" int relabel_pool_cuda(const void *scores, int score_type, const uint16_t *class_ids, const float *boxes,
                                 const float *scale, const float *offset, int64_t n, int k, int h, int w,
                                 int num_classes, int mode, void *stream, float *out, char *err, int err_len) {
  if (n == 0) return RELABEL_OK;
  if (n > 0x7FFFFFFF || k < 1 || h < 1 || w < 1 || num_classes < 1) {
    snprintf(err, err_len, "bad batch shape [n, k, h, w] = [%lld, %d, %d, %d] or num_classes %d",
             static_cast<long long>(n), k, h, w, num_classes);
    return RELABEL_BAD_ARGUMENT;
  }
  const size_t shared_bytes = static_cast<size_t>(h + w) * sizeof(float);
  if (shared_bytes > 48 * 1024) {
    snprintf(err, err_len, "map %dx%d too large for the CUDA kernel (h + w must be <= 12288)", h, w);
    return RELABEL_BAD_ARGUMENT;
  }
  const int score_bytes = score_type == relabel_dali::kScoreFloat32 ? 4 : score_type == relabel_dali::kScoreFloat16 ? 2 : 1;
  BatchArgs args{static_cast<const char *>(scores), class_ids, boxes, scale, offset, out, score_bytes, k, h, w};
  pool_batch_kernel<<<static_cast<unsigned>(n), relabel_dali::kPoolBlock, shared_bytes,
                      static_cast<cudaStream_t>(stream)>>>(args, score_type, num_classes, mode);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    snprintf(err, err_len, "CUDA kernel launch failed: %s", cudaGetErrorString(status));
    return RELABEL_CUDA_ERROR;
  }
  return RELABEL_OK;
}

extern "C" int relabel_pool_has_cuda(void) { return 1; }
