// C ABI of the DALI-free pooling library, loaded by relabel_dali/ops/pooling.py through ctypes.
//
// Batches are contiguous: scores [n, k, h, w] (score_type from label_pool_math.h), class_ids
// [n, k, h, w] uint16, boxes [n, 4] float32, scale/offset [n] float32 or null (1 and 0), mirror [n]
// uint8 or null (no flips), out [n, output_size^2, num_classes] float32: token targets, row-major over
// the crop as seen after the flip (label_pool_math.h, token_col_bin); output_size 1 is one target per
// crop. Return 0 on success; otherwise a nonzero code and a message in err.
#pragma once

#include <cstdint>

extern "C" {

enum {
  RELABEL_OK = 0,
  RELABEL_BAD_ARGUMENT = 1,
  RELABEL_BAD_BOX = 2,
  RELABEL_BAD_CLASS_ID = 3,
  RELABEL_CUDA_ERROR = 4,
  RELABEL_TOO_MANY_CLASSES = 5
};

enum { RELABEL_ID_UINT16 = 0, RELABEL_ID_INT16 = 1, RELABEL_ID_INT32 = 2, RELABEL_ID_INT64 = 3, RELABEL_ID_UINT8 = 4 };

// Validates every box and class id (any of the RELABEL_ID_* integer types), reporting the lowest bad sample.
int relabel_pool_cpu(const void *scores, int score_type, const void *class_ids, int id_type, const float *boxes,
                     const float *scale, const float *offset, int64_t n, int k, int h, int w, int num_classes,
                     int mode, int output_size, const uint8_t *mirror, int num_threads, float *out, char *err,
                     int err_len);

// relabel_pool_cpu's targets in compact form (label_pool_math.h, pool_token_compact_host): per sample
// ids [output_size^2, slots] int32, values [output_size^2, slots] float32, rest [output_size^2] float32.
// With ids null it pools nothing and writes needed [n] (int32): per sample the most classes any of its
// tokens needs (the number of slots that sample takes). A token needing more than slots fails with
// RELABEL_TOO_MANY_CLASSES, naming the lowest such sample and its first such token.
int relabel_pool_cpu_compact(const void *scores, int score_type, const void *class_ids, int id_type,
                             const float *boxes, const float *scale, const float *offset, int64_t n, int k, int h,
                             int w, int num_classes, int mode, int output_size, const uint8_t *mirror,
                             int num_threads, int slots, int32_t *ids, float *values, float *rest, int32_t *needed,
                             char *err, int err_len);

// Device pointers, uint16 class ids; validation of boxes and class ids is the caller's (it would need a sync here).
int relabel_pool_cuda(const void *scores, int score_type, const uint16_t *class_ids, const float *boxes,
                      const float *scale, const float *offset, int64_t n, int k, int h, int w, int num_classes,
                      int mode, int output_size, const uint8_t *mirror, void *stream, float *out, char *err,
                      int err_len);

// 1 when the library was built with the CUDA entry point.
int relabel_pool_has_cuda(void);
}
