// CUDA entry of the C ABI: one kernel launch on the caller's stream, no allocation, no sync.
#include <cstdio>

#include "label_pool_capi.h"
#include "label_pool_kernel.cuh"

namespace {

__global__ void pool_batch_kernel(relabel_dali::BatchArgs args, int score_type, int num_classes, int mode) {
  relabel_dali::pool_batch_sample(args, blockIdx.x, score_type, num_classes, mode);
}

}  // namespace

extern "C" int relabel_pool_cuda(const void *scores, int score_type, const uint16_t *class_ids, const float *boxes,
                                 const float *scale, const float *offset, int64_t n, int k, int h, int w,
                                 int num_classes, int mode, int output_size, const uint8_t *mirror, void *stream,
                                 float *out, char *err, int err_len) {
  const int code = relabel_dali::check_batch_launch(n, k, h, w, num_classes, mode, output_size, err, err_len);
  if (code != RELABEL_OK) return code;
  if (n == 0) return RELABEL_OK;
  const int score_bytes = relabel_dali::score_bytes(score_type);
  relabel_dali::BatchArgs args{static_cast<const char *>(scores), class_ids, boxes, scale, offset, mirror, out,
                               score_bytes, k, h, w, output_size};
  pool_batch_kernel<<<static_cast<unsigned>(n * output_size * output_size), relabel_dali::kPoolBlock,
                      relabel_dali::pool_dynamic_shared_bytes(h, w),
                      static_cast<cudaStream_t>(stream)>>>(args, score_type, num_classes, mode);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    snprintf(err, err_len, "CUDA kernel launch failed: %s", cudaGetErrorString(status));
    return RELABEL_CUDA_ERROR;
  }
  return RELABEL_OK;
}

extern "C" int relabel_pool_has_cuda(void) { return 1; }
