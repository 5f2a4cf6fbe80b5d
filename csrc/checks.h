// Argument checks and the eps iteration plan, shared by the CPU and CUDA kernels. Errors name the
// argument and the expected form, and raise ValueError / TypeError like the Python backends do.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

namespace part_fast {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// A scalar budget (eps, eps_low), as the Python checks word it: NaN fails the comparison, inf isfinite.
inline void check_budget(double v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0 && std::isfinite(v), name, " must be a finite number >= 0, got ", v);
}

// The CPU kernels read data pointers on the host; the other tensors' devices are then checked against t's.
inline void check_cpu_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

inline void check_float_tensor(const at::Tensor& t, const char* name, bool allow_double) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (allow_double && st == at::kDouble);
  TORCH_CHECK_TYPE(ok, name, " must be a floating-point tensor (float32, float16, bfloat16",
                   allow_double ? ", float64" : "", (allow_double ? "" : "; float64 is CPU-only"), "), got ", st);
}

// The dense layout shared by x_adv, grad and x_nat: contiguous or channels_last, identical for all.
inline at::MemoryFormat check_attack_tensors(const at::Tensor& x_adv, const at::Tensor* grad, const at::Tensor& x_nat,
                                             bool allow_double) {
  check_float_tensor(x_adv, "x_adv", allow_double);
  TORCH_CHECK_VALUE(x_adv.dim() == 4, "x_adv must be 4-D (B, C, H, W), got shape ", shape_str(x_adv.sizes()));
  at::MemoryFormat fmt;
  if (x_adv.is_contiguous()) {
    fmt = at::MemoryFormat::Contiguous;
  } else {
    TORCH_CHECK_VALUE(x_adv.is_contiguous(at::MemoryFormat::ChannelsLast),
                      "x_adv must be dense (contiguous or channels_last), got strides ", shape_str(x_adv.strides()),
                      "; call .contiguous() yourself if a copy is what you want");
    fmt = at::MemoryFormat::ChannelsLast;
  }
  auto check_other = [&](const at::Tensor& t, const char* name) {
    check_float_tensor(t, name, allow_double);
    TORCH_CHECK_VALUE(t.sizes() == x_adv.sizes(), name, " must have the same shape as x_adv ", shape_str(x_adv.sizes()),
                      ", got ", shape_str(t.sizes()));
    TORCH_CHECK_TYPE(t.scalar_type() == x_adv.scalar_type(), name, " must have x_adv's dtype ", x_adv.scalar_type(),
                     ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x_adv.device(), name, " must be on x_adv's device ", x_adv.device(), ", got ",
                      t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(fmt), name, " must have x_adv's memory layout (",
                      fmt == at::MemoryFormat::Contiguous ? "contiguous" : "channels_last", "), got strides ",
                      shape_str(t.strides()));
  };
  if (grad != nullptr) check_other(*grad, "grad");
  check_other(x_nat, "x_nat");
  return fmt;
}

inline void check_scalars(double eps, double step_size, double lo, double hi) {
  check_budget(eps, "eps");
  TORCH_CHECK_VALUE(step_size >= 0, "step_size must be >= 0, got ", step_size);
  TORCH_CHECK_VALUE(!std::isnan(lo) && !std::isnan(hi), "lo and hi must not be NaN");
  TORCH_CHECK_VALUE(lo <= hi, "lo must be <= hi, got lo=", lo, ", hi=", hi);
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

inline EpsPlan make_eps_plan(const std::optional<at::Tensor>& eps_map, const at::Tensor& x, at::MemoryFormat fmt) {
  EpsPlan plan;
  if (!eps_map.has_value()) return plan;
  const at::Tensor& e = *eps_map;
  TORCH_CHECK_TYPE(e.scalar_type() == at::kFloat || e.scalar_type() == x.scalar_type(),
                   "eps must be a float32 tensor or have x_adv's dtype ", x.scalar_type(), ", got ", e.scalar_type());
  TORCH_CHECK_VALUE(e.device() == x.device(), "eps must be on x_adv's device ", x.device(), ", got ", e.device());
  TORCH_CHECK_VALUE(e.dim() <= 4, "eps of shape ", shape_str(e.sizes()), " is not broadcastable to x_adv's shape ",
                    shape_str(x.sizes()));
  // Right-align e's dims with x's (numpy broadcasting), then check each is 1 or equal.
  int64_t es[4], est[4];
  const int off = 4 - static_cast<int>(e.dim());
  for (int d = 0; d < 4; ++d) {
    if (d < off) {
      es[d] = 1;
      est[d] = 0;
    } else {
      es[d] = e.size(d - off);
      est[d] = e.stride(d - off);
    }
    TORCH_CHECK_VALUE(es[d] == 1 || es[d] == x.size(d), "eps of shape ", shape_str(e.sizes()),
                      " is not broadcastable to x_adv's shape ", shape_str(x.sizes()));
    if (es[d] == 1) est[d] = 0;  // broadcast dim
  }
  // x's memory order, outermost first.
  const int order_contig[4] = {0, 1, 2, 3};
  const int order_cl[4] = {0, 2, 3, 1};
  const int* order = fmt == at::MemoryFormat::ChannelsLast ? order_cl : order_contig;
  // Coalesce adjacent dims (in memory order) whose eps strides merge, dropping size-1 dims.
  int n = 0;
  for (int i = 0; i < 4; ++i) {
    const int d = order[i];
    const int64_t size = x.size(d);
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
inline EpsPlan check_pgd_args(const at::Tensor& x_adv, const at::Tensor* grad, const at::Tensor& x_nat,
                              const std::optional<at::Tensor>& eps_map, double eps, double step_size, double lo,
                              double hi, bool allow_double) {
  const at::MemoryFormat fmt = check_attack_tensors(x_adv, grad, x_nat, allow_double);
  // The scalar eps is only the budget when no eps_map is given (and a tensor eps is not scanned).
  check_scalars(eps_map.has_value() ? 0.0 : eps, step_size, lo, hi);
  return make_eps_plan(eps_map, x_adv, fmt);
}

inline void check_cam_args(const at::Tensor& cam, c10::SymIntArrayRef size, double eps, double eps_low,
                           const std::string& mode, bool allow_double) {
  check_float_tensor(cam, "cam", allow_double);
  TORCH_CHECK_VALUE(cam.dim() == 3, "cam must be 3-D (B, h, w), got shape ", shape_str(cam.sizes()));
  TORCH_CHECK_VALUE(cam.size(1) > 0 && cam.size(2) > 0, "cam must have a non-empty map, got shape ",
                    shape_str(cam.sizes()));
  TORCH_CHECK_VALUE(size.size() == 2, "size must be a pair (H, W)");
  TORCH_CHECK_VALUE(size[0] > 0 && size[1] > 0, "size must be positive, got (", size[0], ", ", size[1], ")");
  check_budget(eps, "eps");
  check_budget(eps_low, "eps_low");
  TORCH_CHECK_VALUE(eps_low <= eps, "eps_low must be <= eps, got eps_low=", eps_low, ", eps=", eps);
  TORCH_CHECK_VALUE(mode == "jet" || mode == "cam", "mode must be 'jet' or 'cam', got '", mode, "'");
}

}  // namespace part_fast
