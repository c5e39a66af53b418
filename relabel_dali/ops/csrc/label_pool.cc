// LabelPool schema, CPU backend and registration (python: nvidia.dali.fn.label_pool).
#include "label_pool.h"

#include <algorithm>
#include <string>
#include <vector>

namespace dali {

DALI_SCHEMA(LabelPool)
    .DocStr(R"(Pools top-k label maps over crop boxes into per-sample class targets (ReLabel's LabelPooling).

Inputs: ``scores`` [k, H, W] float32, float16 or uint8 (value = offset + scale * q); ``class_ids``
[k, H, W] uint16 in canonical [k, y, x] layout; ``boxes`` [4] float32 (x0, y0, x1, y1) normalized to the
whole image, always on the CPU. Output: [num_classes] float32, or with ``output_size`` S >= 1 the
token targets [S*S, num_classes]: the box RoIAligned to S x S (bin size box / S, ceil(box / S) sample
points per bin and axis), token ``r * S + c`` at row r, column c of the crop as the student sees it,
after the flip ``mirror`` (which reverses the columns).

``mode="softmax"`` RoIAligns the dense map over the box to 1x1 (torchvision semantics, aligned=False,
sampling_ratio=-1, roi = box * size - 0.5) and takes a softmax over all classes, absent ones scoring 0;
``argmax`` gives the one-hot of that pooled vector's argmax (lowest class id on ties); ``global_softmax``
and ``global_argmax`` use the mean over the whole map and ignore the box.)")
    .NumInput(3)
    .NumOutput(1)
    .OutputFn([](const OpSpec &spec) { return spec.GetArgument<bool>("compact") ? 3 : 1; })
    .InputDevice(2, InputDevice::CPU)
    .AddOptionalArg("num_classes", "Length of the output class vector; class ids >= num_classes are ignored.", 1000)
    .AddOptionalArg("mode", "softmax, argmax, global_softmax or global_argmax.", std::string("softmax"))
    .AddOptionalArg("scale", "Per-sample dequantization scale for uint8 scores.", 1.0f, true)
    .AddOptionalArg("offset", "Per-sample dequantization offset for uint8 scores.", 0.0f, true)
    .AddOptionalArg("output_size", "Tokens per side S of the token targets [S*S, num_classes] (softmax and "
                    "argmax modes); 0 gives one [num_classes] target per crop.", 0)
    .AddOptionalArg("mirror", "Per-sample horizontal flip of the crop (bool or integer, nonzero = flipped), the "
                    "one the image got: token columns are reversed. No effect without output_size.", 0, true)
    .AddOptionalArg("compact", "Token targets in compact form (needs output_size; CPU backend only): three outputs "
                    "per sample, ids [S*S, M] int32 (ascending, -1 as padding), values [S*S, M] float32 (each "
                    "id's probability, bit for bit the dense target's; 0 at the padding) and rest [S*S] float32 "
                    "(the probability of every class not among the token's ids). Softmax modes hold the classes "
                    "the token's window touches, argmax modes the one class (value 1, rest 0).", false)
    .AddOptionalArg("compact_slots", "M of the compact outputs: 0 takes the most classes any token of the batch "
                    "touches (at least 1), so M varies between batches; M >= 1 fixes it, and a token touching more "
                    "classes fails naming the sample and token.", 0);

}  // namespace dali

namespace relabel_dali {

template <>
void LabelPool<dali::CPUBackend>::RunCompact(dali::Workspace &ws) {
  const auto &scores = ws.Input<dali::CPUBackend>(0);
  const auto &class_ids = ws.Input<dali::CPUBackend>(1);
  const auto &boxes = ws.Input<dali::CPUBackend>(2);
  auto &ids = ws.Output<dali::CPUBackend>(0);
  auto &values = ws.Output<dali::CPUBackend>(1);
  auto &rest = ws.Output<dali::CPUBackend>(2);
  auto &pool = ws.GetThreadPool();
  const int n = scores.num_samples();
  ReserveScratch(scores, pool.NumThreads());
  for (int i = 0; i < n; ++i) {
    pool.AddWork([&, i](int thread) {
      const auto shape = scores.shape().tensor_shape_span(i);
      const SampleView sample{scores.raw_tensor(i), score_type_, static_cast<const uint16_t *>(class_ids.raw_tensor(i)),
                              static_cast<int>(shape[0]), static_cast<int>(shape[1]), static_cast<int>(shape[2]),
                              static_cast<const float *>(boxes.raw_tensor(i)), scale_[i].data[0], offset_[i].data[0]};
      int count = 0;
      const int token = pool_tokens_compact_host(sample, num_classes_, mode_, output_size_, mirror_[i] != 0, slots_,
                                                 static_cast<int32_t *>(ids.raw_mutable_tensor(i)),
                                                 static_cast<float *>(values.raw_mutable_tensor(i)),
                                                 static_cast<float *>(rest.raw_mutable_tensor(i)), &count,
                                                 scratch_[thread].view);
      // SetupImpl counted the same classes: reaching this is a bug, not bad input.
      DALI_ENFORCE(token < 0, dali::make_string("LabelPool: internal error: sample ", i, ", token ", token,
                                                " needs ", count, " compact slots, SetupImpl allowed ", slots_));
    }, -i);
  }
  pool.RunAll();
}

template <>
void LabelPool<dali::CPUBackend>::RunImpl(dali::Workspace &ws) {
  const auto &scores = ws.Input<dali::CPUBackend>(0);
  const auto &class_ids = ws.Input<dali::CPUBackend>(1);
  const auto &boxes = ws.Input<dali::CPUBackend>(2);
  auto &pool = ws.GetThreadPool();
  const int n = scores.num_samples();
  if (compact_) {
    RunCompact(ws);
    return;
  }
  auto &output = ws.Output<dali::CPUBackend>(0);

  ReserveScratch(scores, pool.NumThreads());
  const int grid = grid_size();

  // Class ids >= num_classes are skipped, as the GPU backend (which cannot raise) skips them.
  for (int i = 0; i < n; ++i) {
    pool.AddWork([&, i](int thread) {
      const auto shape = scores.shape().tensor_shape_span(i);
      const int k = shape[0], h = shape[1], w = shape[2];
      const auto *ids = static_cast<const uint16_t *>(class_ids.raw_tensor(i));
      const SampleView sample{scores.raw_tensor(i), score_type_, ids, k, h, w,
                              static_cast<const float *>(boxes.raw_tensor(i)), scale_[i].data[0], offset_[i].data[0]};
      pool_tokens_host(sample, num_classes_, mode_, grid, mirror_[i] != 0,
                       static_cast<float *>(output.raw_mutable_tensor(i)), scratch_[thread].view);
    }, -i);
  }
  pool.RunAll();
}

}  // namespace relabel_dali

namespace dali {
DALI_REGISTER_OPERATOR(LabelPool, ::relabel_dali::LabelPool<CPUBackend>, CPU);
}  // namespace dali
