// ResizeJitterNormalize: schema and CPU backend (python: nvidia.dali.fn.resize_jitter_normalize).
// The math is in resize_jitter_math.h.
#include <string>
#include <vector>

#include "dali/core/float16.h"
#include "dali/pipeline/operator/arg_helper.h"
#include "dali/pipeline/operator/operator.h"
#include "resize_jitter_math.h"

namespace dali {

DALI_SCHEMA(ResizeJitterNormalize)
    .DocStr(R"(Resizes decoded crops, jitters their colours, normalizes them and writes them CHW, in one operator.

Input: uint8 HWC images with 3 channels (RGB). Output: [3, H, W] float32 or float16, ``size = [H, W]``.

The resize is PIL's antialiased bilinear ``Image.resize`` bit for bit (what torchvision's
RandomResizedCrop runs on PIL images). Then, per sample, brightness ``b``, contrast ``c`` (about
the resized image's mean ITU-R 601 grey) and saturation ``s`` factors, a PCA lighting shift
``lighting_basis @ lighting`` on the 0..1 scale, and ``(x - mean) / std`` on the 0..255 scale, all
composed into one affine colour map (no clipping between the steps), and an optional horizontal
mirror.)")
    .NumInput(1)
    .NumOutput(1)
    .AddArg("size", "Output [H, W].", DALI_INT_VEC)
    .AddOptionalArg("brightness", "Per-sample brightness factor.", 1.0f, true)
    .AddOptionalArg("contrast", "Per-sample contrast factor (about the image's mean grey).", 1.0f, true)
    .AddOptionalArg("saturation", "Per-sample saturation factor.", 1.0f, true)
    .AddOptionalArg("lighting", "Per-sample PCA lighting coefficients [3] (0: none).",
                    std::vector<float>{0.f, 0.f, 0.f}, true)
    .AddOptionalArg("lighting_basis",
                    "Row-major [3 channels x 3 components] basis the lighting coefficients multiply "
                    "(eigenvectors scaled by eigenvalues, 0..1 scale).",
                    std::vector<float>(9, 0.f))
    .AddOptionalArg("mean", "Per-channel mean, 0..255 scale.", std::vector<float>{0.f, 0.f, 0.f})
    .AddOptionalArg("std", "Per-channel standard deviation, 0..255 scale.", std::vector<float>{1.f, 1.f, 1.f})
    .AddOptionalArg("pass_order",
                    "horizontal_first (PIL up to 12.x, what the official recipe ran with) or pillow13 "
                    "(vertical pass first when the height shrinks by more than twice as many pixels as the "
                    "width does).",
                    std::string("horizontal_first"))
    .AddOptionalArg("mirror", "Per-sample horizontal flip (0 or 1).", 0, true)
    .AddOptionalTypeArg("dtype", "Output type: FLOAT or FLOAT16.", DALI_FLOAT);

}  // namespace dali

namespace relabel_dali {

// DALI before dali/core/dali_data_type.h (1.35 and older) declares the type ids in namespace dali.
#if !__has_include("dali/core/dali_data_type.h")
using dali::DALI_BOOL, dali::DALI_FLOAT, dali::DALI_FLOAT16, dali::DALI_UINT16, dali::DALI_UINT8;
#endif

class ResizeJitterNormalize : public dali::Operator<dali::CPUBackend> {
 public:
  explicit ResizeJitterNormalize(const dali::OpSpec &spec)
      : dali::Operator<dali::CPUBackend>(spec),
        dtype_(spec.GetArgument<dali::DALIDataType>("dtype")),
        brightness_("brightness", spec),
        contrast_("contrast", spec),
        saturation_("saturation", spec),
        lighting_("lighting", spec),
        mirror_("mirror", spec) {
    const auto order = spec.GetArgument<std::string>("pass_order");
    DALI_ENFORCE(order == "horizontal_first" || order == "pillow13",
                 dali::make_string("ResizeJitterNormalize: pass_order \"", order,
                                   "\" is not one of horizontal_first, pillow13"));
    pass_order_ = order == "pillow13" ? kPillow13 : kHorizontalFirst;
    const auto size = spec.GetRepeatedArgument<int>("size");
    DALI_ENFORCE(size.size() == 2 && size[0] >= 1 && size[1] >= 1,
                 "ResizeJitterNormalize: size must be [H, W] with H, W >= 1");
    out_h_ = size[0];
    out_w_ = size[1];
    const auto basis = spec.GetRepeatedArgument<float>("lighting_basis");
    DALI_ENFORCE(basis.size() == 9, dali::make_string("ResizeJitterNormalize: lighting_basis has ", basis.size(),
                                                      " values, expected 9 (3 channels x 3 components)"));
    basis_.assign(basis.begin(), basis.end());
    const auto mean = spec.GetRepeatedArgument<float>("mean");
    const auto std = spec.GetRepeatedArgument<float>("std");
    DALI_ENFORCE(mean.size() == 3 && std.size() == 3,
                 dali::make_string("ResizeJitterNormalize: mean and std need 3 values each, got ", mean.size(),
                                   " and ", std.size()));
    for (int c = 0; c < 3; ++c) {
      DALI_ENFORCE(std[c] != 0.f, "ResizeJitterNormalize: std must not contain 0");
      mean_[c] = mean[c];
      std_[c] = std[c];
    }
    DALI_ENFORCE(dtype_ == DALI_FLOAT || dtype_ == DALI_FLOAT16,
                 dali::make_string("ResizeJitterNormalize: dtype must be FLOAT or FLOAT16, got ", dtype_));
  }

 protected:
  // DALI 1.35 and older ask whether SetupImpl declared the outputs (it does); later releases no
  // longer have the question, so this is not marked override.
  bool CanInferOutputs() const { return true; }

  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    const auto &shape = ws.GetInputShape(0);
    const int n = shape.num_samples();
    DALI_ENFORCE(ws.GetInputDataType(0) == DALI_UINT8,
                 dali::make_string("ResizeJitterNormalize: images must be uint8, got ", ws.GetInputDataType(0)));
    DALI_ENFORCE(shape.sample_dim() == 3, dali::make_string("ResizeJitterNormalize: images must be HWC, got ",
                                                            shape.sample_dim(), " dimensions"));
    for (int i = 0; i < n; ++i) {
      const auto s = shape.tensor_shape(i);
      DALI_ENFORCE(s[2] == 3 && s[0] >= 1 && s[1] >= 1,
                   dali::make_string("ResizeJitterNormalize: sample ", i, ": image shape ", s,
                                     ", expected [H, W, 3] with H, W >= 1"));
    }
    brightness_.Acquire(spec_, ws, n);
    contrast_.Acquire(spec_, ws, n);
    saturation_.Acquire(spec_, ws, n);
    mirror_.Acquire(spec_, ws, n);
    lighting_.Acquire(spec_, ws, n);
    for (int i = 0; i < n; ++i)
      DALI_ENFORCE(lighting_[i].num_elements() == 3,
                   dali::make_string("ResizeJitterNormalize: sample ", i, ": lighting has ",
                                     lighting_[i].num_elements(), " values, expected 3"));
    output_desc.resize(1);
    output_desc[0].type = dtype_;
    output_desc[0].shape = dali::uniform_list_shape(n, dali::TensorShape<3>{3, out_h_, out_w_});
    return true;
  }

  void RunImpl(dali::Workspace &ws) override {
    const auto &input = ws.Input<dali::CPUBackend>(0);
    auto &output = ws.Output<dali::CPUBackend>(0);
    output.SetLayout("CHW");
    auto &pool = ws.GetThreadPool();
    const int n = input.num_samples();
    scratch_.resize(pool.NumThreads());
    for (int i = 0; i < n; ++i) {
      const auto shape = input.shape().tensor_shape_span(i);
      pool.AddWork([&, i, h = static_cast<int>(shape[0]), w = static_cast<int>(shape[1])](int thread) {
        ResizeScratch &scratch = scratch_[thread];
        scratch.resized.resize(static_cast<size_t>(out_h_) * out_w_ * 3);
        resize_bilinear_pil(static_cast<const uint8_t *>(input.raw_tensor(i)), h, w, out_h_, out_w_, pass_order_,
                            scratch, scratch.resized.data());
        int64_t sums[3];
        channel_sums(scratch.resized.data(), out_h_, out_w_, sums);
        JitterParams p;
        p.brightness = brightness_[i].data[0];
        p.contrast = contrast_[i].data[0];
        p.saturation = saturation_[i].data[0];
        const float *alpha = lighting_[i].data;
        for (int c = 0; c < 3; ++c) {
          p.shift[c] = 0;
          for (int j = 0; j < 3; ++j) p.shift[c] += static_cast<double>(basis_[c * 3 + j]) * alpha[j];
          p.mean[c] = mean_[c];
          p.std[c] = std_[c];
        }
        const ColourMap map = colour_map(p, sums, static_cast<int64_t>(out_h_) * out_w_);
        const bool mirror = mirror_[i].data[0] != 0;
        if (dtype_ == DALI_FLOAT) {
          write_planar(scratch.resized.data(), out_h_, out_w_, map, mirror,
                       static_cast<float *>(output.raw_mutable_tensor(i)), [](float v) { return v; });
        } else {
          write_planar(scratch.resized.data(), out_h_, out_w_, map, mirror,
                       static_cast<dali::float16 *>(output.raw_mutable_tensor(i)),
                       [](float v) { return dali::float16(v); });
        }
      }, static_cast<int64_t>(shape[0]) * shape[1]);
    }
    pool.RunAll();
  }

 private:
  int out_h_ = 0, out_w_ = 0, pass_order_ = kHorizontalFirst;
  dali::DALIDataType dtype_;
  std::vector<float> basis_;
  float mean_[3] = {0, 0, 0}, std_[3] = {1, 1, 1};
  dali::ArgValue<float> brightness_, contrast_, saturation_;
  dali::ArgValue<float, 1> lighting_;
  dali::ArgValue<int> mirror_;
  std::vector<ResizeScratch> scratch_;  // one per CPU pool thread
};

}  // namespace relabel_dali

namespace dali {
DALI_REGISTER_OPERATOR(ResizeJitterNormalize, ::relabel_dali::ResizeJitterNormalize, CPU);
}  // namespace dali
