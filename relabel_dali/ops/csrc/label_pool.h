// LabelPool DALI operator: pools top-k label maps over crop boxes into [num_classes] targets, or into
// [output_size^2, num_classes] token targets.
// The math is in label_pool_math.h; this file declares the operator and its shared input checks.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "dali/pipeline/operator/arg_helper.h"
#include "dali/pipeline/operator/operator.h"
#include "label_pool_math.h"

namespace relabel_dali {

// DALI before dali/core/dali_data_type.h (1.35 and older) declares the type ids in namespace dali.
#if !__has_include("dali/core/dali_data_type.h")
using dali::DALI_BOOL, dali::DALI_FLOAT, dali::DALI_FLOAT16, dali::DALI_INT32, dali::DALI_UINT16, dali::DALI_UINT8;
#endif

inline int parse_pool_mode(const std::string &mode) {
  if (mode == "softmax") return kSoftmax;
  if (mode == "argmax") return kArgmax;
  if (mode == "global_softmax") return kGlobalSoftmax;
  if (mode == "global_argmax") return kGlobalArgmax;
  DALI_FAIL(dali::make_string("LabelPool: mode \"", mode,
                              "\" is not one of softmax, argmax, global_softmax, global_argmax"));
}

template <typename Backend>
class LabelPool : public dali::Operator<Backend> {
 public:
  explicit LabelPool(const dali::OpSpec &spec)
      : dali::Operator<Backend>(spec),
        num_classes_(spec.GetArgument<int>("num_classes")),
        mode_(parse_pool_mode(spec.GetArgument<std::string>("mode"))),
        output_size_(spec.GetArgument<int>("output_size")),
        compact_(spec.GetArgument<bool>("compact")),
        compact_slots_(spec.GetArgument<int>("compact_slots")),
        scale_("scale", spec),
        offset_("offset", spec) {
    DALI_ENFORCE(num_classes_ >= 1 && num_classes_ <= 65536,
                 dali::make_string("LabelPool: num_classes = ", num_classes_, ", expected 1..65536 (uint16 ids)"));
    // output_size 0 (the default) is one [num_classes] target per crop: the 1x1 grid without its axis.
    if (output_size_ != 0)
      if (const char *problem = output_size_problem(mode_, output_size_))
        DALI_FAIL(dali::make_string("LabelPool: output_size ", output_size_, " ", problem));
    DALI_ENFORCE(compact_slots_ >= 0, dali::make_string("LabelPool: compact_slots = ", compact_slots_,
                                                        ", expected >= 1, or 0 (as many as the batch needs)"));
    DALI_ENFORCE(compact_ || compact_slots_ == 0,
                 dali::make_string("LabelPool: compact_slots = ", compact_slots_, " needs compact=True"));
    if (compact_) {
      DALI_ENFORCE(output_size_ >= 1, "LabelPool: compact=True needs token targets: set output_size >= 1");
      // The GPU kernel writes dense targets only; the compact form is pooled on the CPU backend.
      DALI_ENFORCE((std::is_same_v<Backend, dali::CPUBackend>),
                   "LabelPool: compact=True is implemented on the CPU backend only (device=\"cpu\"); the GPU "
                   "backend writes dense token targets (compact=False)");
    }
  }

 protected:
  // DALI 1.35 and older ask whether SetupImpl declared the outputs (it does); later releases no
  // longer have the question, so this is not marked override.
  bool CanInferOutputs() const { return true; }

  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    const auto &score_shape = ws.GetInputShape(0);
    const auto &id_shape = ws.GetInputShape(1);
    const int n = score_shape.num_samples();
    score_type_ = ScoreTypeOf(ws.GetInputDataType(0));
    DALI_ENFORCE(ws.GetInputDataType(1) == DALI_UINT16,
                 dali::make_string("LabelPool: class_ids (input 1) must be uint16, got ", ws.GetInputDataType(1)));
    DALI_ENFORCE(ws.GetInputDataType(2) == DALI_FLOAT,
                 dali::make_string("LabelPool: boxes (input 2) must be float32, got ", ws.GetInputDataType(2)));
    DALI_ENFORCE(score_shape.sample_dim() == 3,
                 dali::make_string("LabelPool: scores (input 0) must be [k, H, W], got ", score_shape.sample_dim(),
                                   " dimensions"));
    const auto &boxes = ws.template Input<dali::CPUBackend>(2);
    for (int i = 0; i < n; ++i) {
      const auto shape = score_shape.tensor_shape(i);
      DALI_ENFORCE(id_shape.tensor_shape(i) == shape,
                   dali::make_string("LabelPool: sample ", i, ": class_ids shape ", id_shape.tensor_shape(i),
                                     " differs from scores shape ", shape));
      DALI_ENFORCE(shape[0] >= 1 && shape[1] >= 1 && shape[2] >= 1,
                   dali::make_string("LabelPool: sample ", i, ": empty label map ", shape));
      const auto box_shape = boxes.shape().tensor_shape(i);
      DALI_ENFORCE(box_shape.size() == 1 && box_shape[0] == 4,
                   dali::make_string("LabelPool: sample ", i, ": box shape ", box_shape, ", expected [4]"));
      if (!is_global(mode_)) {
        const float *box = static_cast<const float *>(boxes.raw_tensor(i));
        if (const char *problem = box_problem(box))
          DALI_FAIL(dali::make_string("LabelPool: sample ", i, ": box (x0, y0, x1, y1) = (", box[0], ", ", box[1],
                                      ", ", box[2], ", ", box[3], ") ", problem,
                                      "; boxes must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"));
      }
    }
    scale_.Acquire(this->spec_, ws, n);
    offset_.Acquire(this->spec_, ws, n);
    AcquireMirror(ws, n);
    if (compact_) {
      if constexpr (std::is_same_v<Backend, dali::CPUBackend>) slots_ = CompactSlots(ws, n);
      const int tokens = output_size_ * output_size_;
      output_desc.resize(3);
      output_desc[0] = {dali::uniform_list_shape(n, dali::TensorShape<2>{tokens, slots_}), DALI_INT32};
      output_desc[1] = {dali::uniform_list_shape(n, dali::TensorShape<2>{tokens, slots_}), DALI_FLOAT};
      output_desc[2] = {dali::uniform_list_shape(n, dali::TensorShape<1>{tokens}), DALI_FLOAT};
      return true;
    }
    output_desc.resize(1);
    output_desc[0].type = DALI_FLOAT;
    if (output_size_ == 0)
      output_desc[0].shape = dali::uniform_list_shape(n, dali::TensorShape<1>{num_classes_});
    else
      output_desc[0].shape = dali::uniform_list_shape(n, dali::TensorShape<2>{output_size_ * output_size_, num_classes_});
    return true;
  }

  // The compact outputs' slots per token, one number for the batch (CPU backend): compact_slots when
  // set, else the most classes any token of the batch needs (at least 1). Counting the touched classes
  // reads the class ids and the boxes, not the scores; a token needing more than compact_slots fails
  // here, naming the sample and the token.
  int CompactSlots(const dali::Workspace &ws, int n) {
    const auto &class_ids = ws.template Input<dali::CPUBackend>(1);
    const auto &boxes = ws.template Input<dali::CPUBackend>(2);
    ReserveScratch(ws.template Input<dali::CPUBackend>(0), ws.GetThreadPool().NumThreads());
    needed_.assign(n, 0);
    auto &pool = ws.GetThreadPool();
    for (int i = 0; i < n; ++i) {
      pool.AddWork([&, i](int thread) {
        const auto shape = class_ids.shape().tensor_shape_span(i);
        const SampleView sample{nullptr, score_type_, static_cast<const uint16_t *>(class_ids.raw_tensor(i)),
                                static_cast<int>(shape[0]), static_cast<int>(shape[1]), static_cast<int>(shape[2]),
                                static_cast<const float *>(boxes.raw_tensor(i)), 1.0f, 0.0f};
        needed_[i] = compact_sample_needs(sample, num_classes_, mode_, output_size_, mirror_[i] != 0,
                                          scratch_[thread].view);
      }, -i);
    }
    pool.RunAll();
    const int most = std::max(1, n ? *std::max_element(needed_.begin(), needed_.end()) : 1);
    if (compact_slots_ == 0) return most;
    for (int i = 0; i < n; ++i) {
      if (needed_[i] <= compact_slots_) continue;
      const auto shape = class_ids.shape().tensor_shape_span(i);
      const SampleView sample{nullptr, score_type_, static_cast<const uint16_t *>(class_ids.raw_tensor(i)),
                              static_cast<int>(shape[0]), static_cast<int>(shape[1]), static_cast<int>(shape[2]),
                              static_cast<const float *>(boxes.raw_tensor(i)), 1.0f, 0.0f};
      for (int t = 0;; ++t) {
        const int count = count_token_classes(sample, num_classes_, mode_, output_size_, token_row_bin(t, output_size_),
                                              token_col_bin(t, output_size_, mirror_[i] != 0), scratch_[0].view);
        if (count > compact_slots_)
          DALI_FAIL(dali::make_string("LabelPool: sample ", i, ", token ", t, " (row ", t / output_size_,
                                      ", column ", t % output_size_, ") touches ", count,
                                      " classes, more than compact_slots = ", compact_slots_,
                                      ": raise compact_slots to at least ", most, " (this batch's most), or set it "
                                      "to 0 (as many as each batch needs)"));
      }
    }
    return compact_slots_;
  }

  // One scratch per pool thread, sized for the largest map of the batch.
  template <typename Input>
  void ReserveScratch(const Input &scores, int threads) {
    int max_k = 1, max_h = 1, max_w = 1;
    for (int i = 0; i < scores.num_samples(); ++i) {
      const auto shape = scores.shape().tensor_shape_span(i);
      max_k = std::max<int>(max_k, shape[0]);
      max_h = std::max<int>(max_h, shape[1]);
      max_w = std::max<int>(max_w, shape[2]);
    }
    scratch_.resize(threads);
    for (auto &s : scratch_) s.Reserve(max_k, max_h, max_w, num_classes_);
  }

  // The per-sample flips: a constant or an argument input of any integer or bool type, one value per
  // sample (nonzero = mirrored; an integer is nonzero exactly when one of its bytes is).
  void AcquireMirror(const dali::Workspace &ws, int n) {
    mirror_.assign(n, 0);
    if (!this->spec_.HasTensorArgument("mirror")) {
      const int constant = this->spec_.template GetArgument<int>("mirror");
      for (auto &m : mirror_) m = constant != 0;
      return;
    }
    const auto &input = ws.ArgumentInput("mirror");
    DALI_ENFORCE(input.num_samples() == n, dali::make_string("LabelPool: mirror has ", input.num_samples(),
                                                             " samples, expected ", n));
    const dali::DALIDataType type = input.type();
    DALI_ENFORCE(type == DALI_BOOL || dali::IsIntegral(type),
                 dali::make_string("LabelPool: mirror must be bool or an integer type, got ", type));
    const size_t bytes = dali::TypeTable::GetTypeInfo(type).size();
    for (int i = 0; i < n; ++i) {
      DALI_ENFORCE(dali::volume(input.tensor_shape(i)) == 1,
                   dali::make_string("LabelPool: sample ", i, ": mirror has shape ", input.tensor_shape(i),
                                     ", expected one value"));
      const auto *raw = static_cast<const uint8_t *>(input.raw_tensor(i));
      mirror_[i] = std::any_of(raw, raw + bytes, [](uint8_t b) { return b != 0; });
    }
  }

  int tokens() const { return output_size_ == 0 ? 1 : output_size_ * output_size_; }
  int grid_size() const { return output_size_ == 0 ? 1 : output_size_; }

  void RunImpl(dali::Workspace &ws) override;
  void RunCompact(dali::Workspace &ws);  // CPU backend only

  static int ScoreTypeOf(dali::DALIDataType type) {
    if (type == DALI_FLOAT) return kScoreFloat32;
    if (type == DALI_FLOAT16) return kScoreFloat16;
    if (type == DALI_UINT8) return kScoreUint8;
    DALI_FAIL(dali::make_string("LabelPool: scores (input 0) must be float32, float16 or uint8, got ", type));
  }

  int num_classes_;
  int mode_;
  int output_size_;  // 0: [num_classes] per sample; S >= 1: [S * S, num_classes]
  bool compact_;      // token targets as ids [S * S, slots], values [S * S, slots], rest [S * S]
  int compact_slots_;  // 0: as many slots as the batch needs
  int slots_ = 1;      // this iteration's slots per token (compact)
  std::vector<int> needed_;  // per sample, the most classes one of its tokens needs (compact)
  int score_type_ = kScoreFloat32;
  dali::ArgValue<float> scale_, offset_;
  std::vector<uint8_t> mirror_;  // per sample, this iteration
  std::vector<HostScratchBuffers> scratch_;  // one per CPU pool thread
};

}  // namespace relabel_dali
