// Per-element math shared by the CPU and CUDA kernels, so the CPU tests exercise the exact arithmetic the
// GPU runs. Every function is the rule the reference (part_fast/reference.py) writes in PyTorch.
#pragma once

#include <cmath>
#include <cstdint>

#include "jet_lut.h"

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline
#endif

#if defined(__GNUC__)
#define PF_ALWAYS_INLINE __attribute__((always_inline))
#else
#define PF_ALWAYS_INLINE
#endif

namespace part_fast {

// ---------------------------------------------------------------------------------------- PGD step
// sign with sign(NaN) = 0, so a NaN gradient element takes no step.
template <typename T>
PF_HD T sign_nan_zero(T g) {
  return T(g > T(0)) - T(g < T(0));
}

// Clamp to [lo, hi] with torch.maximum / torch.minimum's NaN rule: a NaN in v or in a bound gives NaN.
template <typename T>
PF_HD T clamp_keep_nan(T v, T lo, T hi) {
  v = (v < lo || lo != lo) ? lo : v;
  return (v > hi || hi != hi) ? hi : v;
}

// clip(clamp(x, x_nat - eps, x_nat + eps), lo, hi). With eps = 0 this is clip(x_nat, lo, hi) exactly.
template <typename T>
PF_HD T project_elem(T x, T x_nat, T eps, T lo, T hi) {
  return clamp_keep_nan(clamp_keep_nan(x, x_nat - eps, x_nat + eps), lo, hi);
}

// One PGD update; step * sign is exact (sign is -1, 0 or 1), so FMA contraction cannot change it.
template <typename T>
PF_HD T pgd_step_elem(T x, T grad, T x_nat, T eps, T step, T lo, T hi) {
  return project_elem(x + step * sign_nan_zero(grad), x_nat, eps, lo, hi);
}

// ------------------------------------------------------------------------------- PIL bicubic resize
// PIL's resample (Resample.c, BICUBIC, a = -0.5) in double precision, exactly as PIL orders it, so the
// budget map is bit-identical to the released pipeline (PIL "F" image, horizontal pass first, float32
// intermediate). The compiler must not contract a*b+c into FMA here (-ffp-contract=off on the host;
// the CUDA kernels use the _rn intrinsics through pf_dmul / pf_dadd).
PF_HD double pf_dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

PF_HD double pf_dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

PF_HD double pil_bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return pf_dadd(pf_dmul(pf_dmul(pf_dadd(pf_dmul(a + 2.0, x), -(a + 3.0)), x), x), 1.0);
  if (x < 2.0) return pf_dmul(pf_dadd(pf_dmul(pf_dadd(pf_dmul(x - 5.0, x), 8.0), x), -4.0), a);
  return 0.0;
}

// The input window of one output index: taps first .. first + count - 1, with the filter evaluated at
// (first + k - center + 0.5) * inv_filterscale. Matches PIL's precompute_coeffs.
struct PilWindow {
  int first;
  int count;
  double center;
  double inv_filterscale;
};

PF_HD PilWindow pil_window(int out_index, int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  PilWindow w;
  w.center = pf_dmul(out_index + 0.5, scale);
  int xmin = static_cast<int>(w.center - support + 0.5);
  if (xmin < 0) xmin = 0;
  int xmax = static_cast<int>(w.center + support + 0.5);
  if (xmax > in_size) xmax = in_size;
  w.first = xmin;
  w.count = xmax - xmin;
  w.inv_filterscale = 1.0 / filterscale;
  return w;
}

// Largest window any output index can have (PIL's ksize): the width of a tap table.
PF_HD int pil_max_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  int c = static_cast<int>(support);
  if (static_cast<double>(c) < support) c += 1;  // ceil
  return 2 * c + 1;
}

// Unnormalised weight of tap k of a window.
PF_HD double pil_raw_weight(const PilWindow& w, int k) {
  return pil_bicubic_filter(pf_dmul((k + w.first) - w.center + 0.5, w.inv_filterscale));
}

// Sum of the window's raw weights, accumulated in tap order (PIL's ww).
PF_HD double pil_weight_sum(const PilWindow& w) {
  double ww = 0.0;
  for (int k = 0; k < w.count; ++k) ww = pf_dadd(ww, pil_raw_weight(w, k));
  return ww;
}

// Normalised weight of tap k (PIL divides every weight by ww unless ww is 0).
PF_HD double pil_weight(const PilWindow& w, int k, double ww) {
  const double raw = pil_raw_weight(w, k);
  return ww != 0.0 ? raw / ww : raw;
}

// ------------------------------------------------------------------------------------------- jet
// Host copy of the table; CUDA kernels keep their own __constant__ copy from the same initializer.
inline constexpr double kJetLut[PART_FAST_JET_N][3] = PART_FAST_JET_LUT_INITIALIZER;

// matplotlib's Colormap index rule for a float: floor(v * 256); v < 0 -> 0 (under), v >= 1 -> 255 (1.0
// itself is in range, larger values are "over", which jet maps to its last entry).
PF_HD int jet_index(float v) {
  const float scaled = v * static_cast<float>(PART_FAST_JET_N);  // exact: a power of two
  if (!(scaled >= 0.0f)) return 0;                               // negative (NaN never reaches here)
  if (scaled >= static_cast<float>(PART_FAST_JET_N - 1)) return PART_FAST_JET_N - 1;
  return static_cast<int>(scaled);  // truncation == floor for non-negative values
}

// The value the release colours: the upsampled normalised CAM, squared in float32.
PF_HD float jet_input(float upsampled) {
  return upsampled * upsampled;
}

// -------------------------------------------------------------------------- CAM min-max normalisation
// Per-image min-max normalisation as torchcam does it, in float32 and in its two steps:
// c = relu(c) - min(relu(c)), then c / max(c). The min and max are reductions the kernels run their own
// way (in order on the CPU, as a tree on the GPU); both are exact, so only these steps round.

// A NaN or +inf value stays non-finite through torch.relu and makes the whole map degenerate (the
// budget is then eps_low everywhere); -inf is not one: it becomes 0 like any negative value.
PF_HD bool cam_value_degenerates(float c) {
  return !(c < INFINITY);
}

// NaN gives 0 here, not NaN as in torch.relu: a map holding a NaN is degenerate before its values count.
PF_HD float relu_f(float c) {
  return c > 0.0f ? c : 0.0f;
}

PF_HD float minmax_shift(float relu_c, float map_min) {
  return relu_c - map_min;
}

// The division is correctly rounded on the device too (__fdiv_rn), whatever -prec-div says.
PF_HD float minmax_scale(float shifted, float shifted_max) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(shifted, shifted_max);
#else
  return shifted / shifted_max;
#endif
}

// ------------------------------------------------------------------------------- PIL resize, one value
// One output value of a PIL pass: the window's taps times their weights, accumulated in double in tap
// order and rounded to float32 (the "F" image between the two passes and after the second). src points
// at the window's first tap, stride elements apart; index_t is the caller's index type (int on the device).
template <typename index_t>
PF_HD float pil_resample(const float* src, index_t stride, const double* weight, int count) {
  double acc = 0.0;
  for (int k = 0; k < count; ++k) acc = pf_dadd(acc, pf_dmul(static_cast<double>(src[k * stride]), weight[k]));
  return static_cast<float>(acc);
}

// ------------------------------------------------------------------------- z-score and one-sigma cut
// The release's z-score uses the population statistics (numpy's std, ddof = 0) in double. The sums are
// the kernels' own (in order on the CPU; on the GPU a fixed tree, over a LUT histogram in mode "jet").
PF_HD double squared_deviation(double v, double mean) {
  const double d = v - mean;
  return d * d;
}

PF_HD double population_std(double sum_squared_deviations, double count) {
  return std::sqrt(sum_squared_deviations / count);
}

// float32(z) > 1 with z = (v - mean) / sd, written as the reference writes it (no rearranging: the
// rounding must match; the release casts its float64 z to float32 before comparing); a zero sd
// (constant values) selects nothing.
PF_HD bool above_one_sigma(double v, double mean, double sd) {
  return sd > 0.0 && static_cast<float>((v - mean) / sd) > 1.0f;
}

}  // namespace part_fast
