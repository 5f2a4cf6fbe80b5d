// Argument checks and the eps iteration plan, shared by the CPU and CUDA kernels. Errors name the
// argument and the expected form in part_fast._validate's words: ValueError in Python (see stable_types.h).
#pragma once

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "stable_types.h"

namespace part_fast {

inline std::string shape_str(const int64_t* s, int64_t n) {
  std::string out = "(";
  for (int64_t i = 0; i < n; ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (n == 1 ? ",)" : ")");
}

inline std::string shape_str(torch::headeronly::IntHeaderOnlyArrayRef s) {
  return shape_str(s.data(), static_cast<int64_t>(s.size()));
}

// As torch.device prints: cpu, cuda:0.
inline std::string device_str(const torch::stable::Device& d) {
  using torch::headeronly::DeviceType;
  std::string type = d.type() == DeviceType::CPU ? "cpu" : d.type() == DeviceType::CUDA ? "cuda" : d.type() == DeviceType::Meta ? "meta" : "device";
  return d.has_index() ? type + ":" + std::to_string(d.index()) : type;
}

// The two dense layouts of a 4-D tensor. The stable tensor asks only about the default layout, so the
// channels_last rule is torch's own (is_contiguous(memory_format=torch.channels_last)) on sizes / strides:
// dims C, W, H, B innermost first, size-1 dims ignored.
enum class Layout4d { kContiguous, kChannelsLast };

inline bool is_channels_last(const Tensor& t) {
  if (t.dim() != 4) return false;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  int64_t expected = 1;
  for (const int d : {1, 3, 2, 0}) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

inline bool has_layout(const Tensor& t, Layout4d layout) {
  return layout == Layout4d::kContiguous ? t.is_contiguous() : is_channels_last(t);
}

// A scalar budget (eps, eps_low), as the Python checks word it: NaN fails the comparison, inf isfinite.
inline void validate_budget(double v, const char* name) {
  PF_CHECK_VALUE(v >= 0 && std::isfinite(v), name, " must be a finite number >= 0, got ", v);
}

// The CPU kernels read data pointers on the host; the other tensors' devices are then checked against t's.
inline void validate_cpu_tensor(const Tensor& t, const char* name) {
  PF_CHECK_VALUE(t.is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", device_str(t.device()));
}

inline void validate_float_tensor(const Tensor& t, const char* name, bool allow_double) {
  const ScalarType st = t.scalar_type();
  const bool ok = st == ScalarType::Float || st == ScalarType::Half || st == ScalarType::BFloat16 ||
                  (allow_double && st == ScalarType::Double);
  PF_CHECK_VALUE(ok, name, " must be a floating-point tensor (float32, float16, bfloat16",
                 allow_double ? ", float64" : "", allow_double ? "" : "; float64 is CPU-only", "), got ",
                 dtype_name(st));
}

// The dense layout shared by x_adv, grad and x_nat: contiguous or channels_last, identical for all.
inline Layout4d validate_attack_tensors(const Tensor& x_adv, const Tensor* grad, const Tensor& x_nat,
                                     bool allow_double) {
  validate_float_tensor(x_adv, "x_adv", allow_double);
  PF_CHECK_VALUE(x_adv.dim() == 4, "x_adv must be 4-D (B, C, H, W), got shape ", shape_str(x_adv.sizes()));
  Layout4d layout = Layout4d::kContiguous;
  if (!x_adv.is_contiguous()) {
    PF_CHECK_VALUE(is_channels_last(x_adv), "x_adv must be dense (contiguous or channels_last), got strides ",
                   shape_str(x_adv.strides()), "; call .contiguous() yourself if a copy is what you want");
    layout = Layout4d::kChannelsLast;
  }
  const auto x_sizes = x_adv.sizes();
  const ScalarType x_type = x_adv.scalar_type();
  const auto x_device = x_adv.device();
  auto validate_other = [&](const Tensor& t, const char* name) {
    validate_float_tensor(t, name, allow_double);
    PF_CHECK_VALUE(t.sizes().equals(x_sizes), name, " must have the same shape as x_adv ", shape_str(x_sizes),
                   ", got ", shape_str(t.sizes()));
    PF_CHECK_VALUE(t.scalar_type() == x_type, name, " must have x_adv's dtype ", dtype_name(x_type), ", got ",
                   dtype_name(t.scalar_type()));
    PF_CHECK_VALUE(t.device() == x_device, name, " must be on x_adv's device ", device_str(x_device), ", got ",
                   device_str(t.device()));
    PF_CHECK_VALUE(has_layout(t, layout), name, " must have x_adv's memory layout (",
                   layout == Layout4d::kContiguous ? "contiguous" : "channels_last", "), got strides ",
                   shape_str(t.strides()));
  };
  if (grad != nullptr) validate_other(*grad, "grad");
  validate_other(x_nat, "x_nat");
  return layout;
}

inline void validate_scalars(double eps, double step_size, double lo, double hi) {
  validate_budget(eps, "eps");
  PF_CHECK_VALUE(step_size >= 0, "step_size must be >= 0, got ", step_size);
  PF_CHECK_VALUE(!std::isnan(lo) && !std::isnan(hi), "lo and hi must not be NaN");
  PF_CHECK_VALUE(lo <= hi, "lo must be <= hi, got lo=", lo, ", hi=", hi);
}

// How a kernel walks eps while it streams x in memory order.
//  kScalar: no tensor, the float eps.
//  kDense:  eps has x's shape and memory layout: read eps[i] with x's linear index i.
//  kStrided: eps is broadcast / strided: up to 4 coalesced dims, in x's memory order (outermost first),
//            with eps's strides (0 where broadcast). x's linear index decomposes over `sizes`.
struct EpsPlan {
  enum Kind { kScalar = 0, kDense = 1, kStrided = 2 };
  Kind kind = kScalar;
  int ndim = 0;
  int64_t sizes[4] = {1, 1, 1, 1};
  int64_t strides[4] = {0, 0, 0, 0};
};

inline EpsPlan make_eps_plan(const std::optional<Tensor>& eps_map, const Tensor& x, Layout4d layout) {
  EpsPlan plan;
  if (!eps_map.has_value()) return plan;
  const Tensor& e = *eps_map;
  PF_CHECK_VALUE(e.scalar_type() == ScalarType::Float || e.scalar_type() == x.scalar_type(),
                 "eps must be a float32 tensor or have x_adv's dtype ", dtype_name(x.scalar_type()), ", got ",
                 dtype_name(e.scalar_type()));
  PF_CHECK_VALUE(e.device() == x.device(), "eps must be on x_adv's device ", device_str(x.device()), ", got ",
                 device_str(e.device()));
  const auto e_sizes = e.sizes();
  const auto e_strides = e.strides();
  const auto x_sizes = x.sizes();
  const int e_dim = static_cast<int>(e_sizes.size());
  PF_CHECK_VALUE(e_dim <= 4, "eps of shape ", shape_str(e_sizes), " is not broadcastable to x_adv's shape ",
                 shape_str(x_sizes));
  // Right-align e's dims with x's (numpy broadcasting), then check each is 1 or equal.
  int64_t es[4], est[4];
  const int off = 4 - e_dim;
  for (int d = 0; d < 4; ++d) {
    es[d] = d < off ? 1 : e_sizes[d - off];
    est[d] = d < off ? 0 : e_strides[d - off];
    PF_CHECK_VALUE(es[d] == 1 || es[d] == x_sizes[d], "eps of shape ", shape_str(e_sizes),
                   " is not broadcastable to x_adv's shape ", shape_str(x_sizes));
    if (es[d] == 1) est[d] = 0;  // broadcast dim
  }
  // x's memory order, outermost first.
  const int order_contig[4] = {0, 1, 2, 3};
  const int order_cl[4] = {0, 2, 3, 1};
  const int* order = layout == Layout4d::kChannelsLast ? order_cl : order_contig;
  // Coalesce adjacent dims (in memory order) whose eps strides merge, dropping size-1 dims.
  int n = 0;
  for (int i = 0; i < 4; ++i) {
    const int d = order[i];
    const int64_t size = x_sizes[d];
    if (size == 1) continue;
    if (n > 0 && plan.strides[n - 1] == est[d] * size) {
      plan.sizes[n - 1] *= size;
      plan.strides[n - 1] = est[d];
    } else {
      plan.sizes[n] = size;
      plan.strides[n] = est[d];
      ++n;
    }
  }
  if (n == 0) {  // a single element: one dim of size 1
    plan.sizes[0] = 1;
    plan.strides[0] = 1;
    n = 1;
  }
  plan.ndim = n;
  plan.kind = (n == 1 && plan.strides[0] == 1) ? EpsPlan::kDense : EpsPlan::kStrided;
  return plan;
}

// Every argument check of pgd_step_ / project_ (grad null for project_), the same for each device, and the
// plan the kernel walks eps by.
inline EpsPlan validate_pgd_args(const Tensor& x_adv, const Tensor* grad, const Tensor& x_nat,
                              const std::optional<Tensor>& eps_map, double eps, double step_size, double lo,
                              double hi, bool allow_double) {
  const Layout4d layout = validate_attack_tensors(x_adv, grad, x_nat, allow_double);
  // The scalar eps is only the budget when no eps_map is given (and a tensor eps is not scanned).
  validate_scalars(eps_map.has_value() ? 0.0 : eps, step_size, lo, hi);
  return make_eps_plan(eps_map, x_adv, layout);
}

inline void validate_cam_args(const Tensor& cam, const std::vector<int64_t>& size, double eps, double eps_low,
                           const std::string& mode, bool allow_double) {
  validate_float_tensor(cam, "cam", allow_double);
  PF_CHECK_VALUE(cam.dim() == 3, "cam must be 3-D (B, h, w), got shape ", shape_str(cam.sizes()));
  PF_CHECK_VALUE(cam.size(1) > 0 && cam.size(2) > 0, "cam must have a non-empty map, got shape ",
                 shape_str(cam.sizes()));
  PF_CHECK_VALUE(size.size() == 2, "size must be a pair (H, W)");
  PF_CHECK_VALUE(size[0] > 0 && size[1] > 0, "size must be positive, got (", size[0], ", ", size[1], ")");
  validate_budget(eps, "eps");
  validate_budget(eps_low, "eps_low");
  PF_CHECK_VALUE(eps_low <= eps, "eps_low must be <= eps, got eps_low=", eps_low, ", eps=", eps);
  PF_CHECK_VALUE(mode == "jet" || mode == "cam", "mode must be 'jet' or 'cam', got '", mode, "'");
}

}  // namespace part_fast
