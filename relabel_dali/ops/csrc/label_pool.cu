// LabelPool GPU backend: one kernel launch per batch on ws.stream(). Per-sample descriptors travel
// through DALI's scratchpad (pinned staging + device copy in stream order): no allocation of our
// own and no synchronisation. Boxes arrive on the CPU and are validated in SetupImpl.
#include <vector>

#include "dali/kernels/dynamic_scratchpad.h"
#include "label_pool.h"
#include "label_pool_kernel.cuh"

namespace relabel_dali {

namespace {

// Token t of sample i is block i * output_size^2 + t.
__global__ void pool_samples_kernel(const DeviceSample *samples, int score_type, int num_classes, int mode,
                                    int output_size) {
  const int tokens = output_size * output_size;
  // A local copy: read through a reference into global memory, every field would be reloaded
  // inside the loops, since the compiler must assume the output stores may alias the descriptor.
  const DeviceSample sample = samples[blockIdx.x / tokens];
  pool_sample_device(sample, score_type, num_classes, mode, output_size, static_cast<int>(blockIdx.x % tokens));
}

}  // namespace

template <>
void LabelPool<dali::GPUBackend>::RunImpl(dali::Workspace &ws) {
  const auto &scores = ws.Input<dali::GPUBackend>(0);
  const auto &class_ids = ws.Input<dali::GPUBackend>(1);
  const auto &boxes = ws.Input<dali::CPUBackend>(2);
  auto &output = ws.Output<dali::GPUBackend>(0);
  const int n = scores.num_samples();
  if (n == 0) return;

  dali::kernels::DynamicScratchpad scratchpad(ws.stream());
  DeviceSample *host_samples = scratchpad.AllocatePinned<DeviceSample>(n);
  int max_axes = 2;
  for (int i = 0; i < n; ++i) {
    const auto shape = scores.shape().tensor_shape_span(i);
    DeviceSample &s = host_samples[i];
    s.scores = scores.raw_tensor(i);
    s.class_ids = static_cast<const uint16_t *>(class_ids.raw_tensor(i));
    s.out = static_cast<float *>(output.raw_mutable_tensor(i));
    const float *box = static_cast<const float *>(boxes.raw_tensor(i));
    for (int j = 0; j < 4; ++j) s.box[j] = box[j];
    s.scale = scale_[i].data[0];
    s.offset = offset_[i].data[0];
    s.k = shape[0];
    s.h = shape[1];
    s.w = shape[2];
    s.mirror = mirror_[i];
    max_axes = std::max(max_axes, s.h + s.w);
  }
  DALI_ENFORCE(max_axes <= kPoolMaxAxes,
               dali::make_string("LabelPool: label maps with H + W = ", max_axes, " exceed the GPU limit of ",
                                 kPoolMaxAxes, " (the axis weights live in the block's shared memory)"));
  const size_t shared_bytes = static_cast<size_t>(max_axes) * sizeof(float);
  DeviceSample *device_samples = scratchpad.AllocateGPU<DeviceSample>(n);
  CUDA_CALL(cudaMemcpyAsync(device_samples, host_samples, n * sizeof(DeviceSample), cudaMemcpyHostToDevice,
                            ws.stream()));
  const long long blocks = static_cast<long long>(n) * tokens();
  DALI_ENFORCE(blocks <= 0x7FFFFFFF, dali::make_string("LabelPool: ", n, " samples x ", tokens(),
                                                       " tokens exceed one launch's 2^31 - 1 blocks"));
  // Every output element is written by the kernel (the pooled value, then the target): no memset.
  pool_samples_kernel<<<static_cast<unsigned>(blocks), kPoolBlock, shared_bytes, ws.stream()>>>(
      device_samples, score_type_, num_classes_, mode_, grid_size());
  CUDA_CALL(cudaGetLastError());
}

}  // namespace relabel_dali

namespace dali {
DALI_REGISTER_OPERATOR(LabelPool, ::relabel_dali::LabelPool<GPUBackend>, GPU);
}  // namespace dali
