// CPU kernel of cam_eps_map: raw CAM (B, h, w) -> per-pixel budget, one task per image, the whole chain
// (ReLU, min-max, PIL bicubic resize, square + jet LUT, z-score, threshold) on small per-task buffers.
//
// Every rounding point is the reference's (part_fast/reference.py), which is the released pipeline's:
// float32 min-max as torchcam, PIL's double-precision resize with a float32 intermediate, a float32 square,
// matplotlib's LUT index rule, and double-precision statistics.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <vector>

#include "validate.h"
#include "part_fast_math.h"

namespace part_fast {
namespace {

// PIL's tap table for one axis: per output index its first input index, its tap count, and its normalised
// weights (padded to a common width). Shared by all images of a call.
struct TapTable {
  int width = 0;
  std::vector<int> first, count;
  std::vector<double> weight;  // [out][width]

  TapTable(int in_size, int out_size) : width(pil_max_taps(in_size, out_size)) {
    first.resize(out_size);
    count.resize(out_size);
    weight.assign(static_cast<size_t>(out_size) * width, 0.0);
    for (int o = 0; o < out_size; ++o) {
      const PilWindow w = pil_window(o, in_size, out_size);
      const double ww = pil_weight_sum(w);
      first[o] = w.first;
      count[o] = w.count;
      for (int k = 0; k < w.count; ++k) weight[static_cast<size_t>(o) * width + k] = pil_weight(w, k, ww);
    }
  }

  // Output index o of a pass over src, whose taps lie stride elements apart.
  float apply(const float* src, int64_t stride, int o) const {
    return pil_resample(src + static_cast<int64_t>(first[o]) * stride, stride,
                        &weight[static_cast<size_t>(o) * width], count[o]);
  }
};

// part_fast_math.h's min-max normalisation, with its min and max taken in order. Returns false for a
// degenerate map (a NaN or +inf value, or a constant map).
bool normalize_cam(const float* cam, int64_t n, float* out) {
  float cmin = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (cam_value_degenerates(cam[i])) return false;
    const float r = relu_f(cam[i]);
    cmin = (i == 0 || r < cmin) ? r : cmin;
  }
  float cmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = minmax_shift(relu_f(cam[i]), cmin);
    cmax = out[i] > cmax ? out[i] : cmax;
  }
  if (cmax == 0.0f) return false;
  for (int64_t i = 0; i < n; ++i) out[i] = minmax_scale(out[i], cmax);
  return true;
}

// part_fast_math.h's one-sigma cut, with the statistics' sums taken in order.
struct Threshold {
  double mean = 0.0, sd = 0.0;
  bool keep(double v) const { return above_one_sigma(v, mean, sd); }
};

Threshold zscore_threshold(const double* values, int64_t n) {
  Threshold t;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += values[i];
  t.mean = sum / static_cast<double>(n);
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sq += squared_deviation(values[i], t.mean);
  t.sd = population_std(sq, static_cast<double>(n));
  return t;
}

Tensor cam_eps_map_cpu(const Tensor& cam_in, std::vector<int64_t> size, double eps, double eps_low, std::string mode) {
  validate_cam_args(cam_in, size, eps, eps_low, mode, /*allow_double=*/true);
  validate_cpu_tensor(cam_in, "cam");
  const bool jet = mode == "jet";
  const int64_t batch = cam_in.size(0), h = cam_in.size(1), w = cam_in.size(2);
  const int64_t out_h = size[0], out_w = size[1];
  const int64_t channels = jet ? 3 : 1, plane = out_h * out_w;
  Tensor out = torch::stable::new_empty(cam_in, {batch, channels, out_h, out_w}, ScalarType::Float);
  if (batch == 0) return out;

  // The release turned the CAM into a float32 image first; float64 CAMs are rounded the same way.
  const Tensor cam = torch::stable::contiguous(torch::stable::to(cam_in, ScalarType::Float));
  const TapTable taps_x(static_cast<int>(w), static_cast<int>(out_w));
  const TapTable taps_y(static_cast<int>(h), static_cast<int>(out_h));
  const float* cam_ptr = cam.const_data_ptr<float>();
  float* out_ptr = out.mutable_data_ptr<float>();
  const float hi = static_cast<float>(eps), lo = static_cast<float>(eps_low);

  torch::stable::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> norm(h * w), rows(h * out_w), up(plane);
    std::vector<double> values(channels * plane);
    for (int64_t b = begin; b < end; ++b) {
      float* dst = out_ptr + b * channels * plane;
      if (!normalize_cam(cam_ptr + b * h * w, h * w, norm.data())) {
        std::fill(dst, dst + channels * plane, lo);
        continue;
      }
      // PIL: horizontal pass into a float32 (h, W) image, then the vertical pass.
      for (int64_t r = 0; r < h; ++r)
        for (int x = 0; x < out_w; ++x) rows[r * out_w + x] = taps_x.apply(norm.data() + r * w, 1, x);
      for (int y = 0; y < out_h; ++y)
        for (int64_t x = 0; x < out_w; ++x) up[y * out_w + x] = taps_y.apply(rows.data() + x, out_w, y);

      // The values the z-score sees: the (3, H, W) jet colours of up^2, or the (H, W) map itself.
      if (jet) {
        for (int64_t p = 0; p < plane; ++p) {
          const double* rgb = kJetLut[jet_index(jet_input(up[p]))];
          for (int64_t c = 0; c < 3; ++c) values[c * plane + p] = rgb[c];
        }
      } else {
        for (int64_t p = 0; p < plane; ++p) values[p] = static_cast<double>(up[p]);
      }
      const Threshold t = zscore_threshold(values.data(), channels * plane);
      for (int64_t i = 0; i < channels * plane; ++i) dst[i] = t.keep(values[i]) ? hi : lo;
    }
  });
  return out;
}

}  // namespace
}  // namespace part_fast

STABLE_TORCH_LIBRARY_IMPL(part_fast, CPU, m) {
  m.impl("cam_eps_map", TORCH_BOX(&part_fast::cam_eps_map_cpu));
}
