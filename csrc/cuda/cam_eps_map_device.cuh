// Device code of cam_eps_map: raw CAM (B, h, w) -> per-pixel budget, bit-compatible with the released
// pipeline (torchcam min-max, PIL bicubic resize of a mode-"F" image, matplotlib jet; see
// part_fast/reference.py). cam_eps_map.cu launches it; tests/test_cuda_emulation.py compiles this same
// header as C++ and runs it on the CPU, which is why the host helpers the launch needs live here too.
//
// One thread block per image runs the whole chain in shared memory: the maps are small (a CAM is at
// feature resolution, the output at input resolution), and the budget of one image depends on the
// statistics of the whole image, so a block per image needs no second launch and no global scratch.
// The upsampled map itself (H*W floats, 200 KB at 224x224) is too large to keep, so each pixel pass
// recomputes its vertical resize taps from the h x W horizontal intermediate, which does fit.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "jet_lut.h"
#include "part_fast_math.h"

// A hook for tests/test_cuda_emulation.py, which points it at an array of its own: a host compiler has no
// extern __shared__. On the device, the dynamic shared memory the launch sized.
#ifndef PF_DYNAMIC_SHARED_DOUBLES
#define PF_DYNAMIC_SHARED_DOUBLES(name) extern __shared__ double name[]
#endif

namespace part_fast {
namespace cam_device {

// Many threads per block: with one block per image, a training batch (~128 images) gives about one
// block per SM, so the block itself must carry enough warps to hide latency.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// static: a definition in a header, so a second file including it would not clash with this one.
static __constant__ double kJetLutDevice[PART_FAST_JET_N][3] = PART_FAST_JET_LUT_INITIALIZER;

// Sizes of one image's problem. kx / ky: widths of the horizontal / vertical tap tables.
struct Geometry {
  int h, w, H, W, kx, ky;
};

// Dynamic shared memory of one block, doubles first so every array is naturally aligned.
//   wx[W][kx], wy[H][ky]: normalised PIL tap weights     fx/cx[W], fy/cy[H]: first tap, tap count
//   src[h][w]: the min-max normalised CAM                 tmp[h][W]: after the horizontal pass
struct Smem {
  double *wx, *wy;
  int *fx, *cx, *fy, *cy;
  float *src, *tmp;
};

// The caller has checked that every size fits in an int (cam_eps_map_cuda does).
inline Geometry make_geometry(int64_t h, int64_t w, int64_t H, int64_t W) {
  const int hi = static_cast<int>(h), wi = static_cast<int>(w), Hi = static_cast<int>(H), Wi = static_cast<int>(W);
  return Geometry{hi, wi, Hi, Wi, pil_max_taps(wi, Wi), pil_max_taps(hi, Hi)};
}

inline size_t smem_bytes(const Geometry& g) {
  const auto n = [](int64_t a, int64_t b) { return static_cast<size_t>(a * b); };
  return sizeof(double) * (n(g.W, g.kx) + n(g.H, g.ky)) + sizeof(int) * 2 * (n(g.W, 1) + n(g.H, 1)) +
         sizeof(float) * (n(g.h, g.w) + n(g.h, g.W));
}

__device__ inline Smem carve(double* base, const Geometry& g) {
  Smem s;
  s.wx = base;
  s.wy = s.wx + g.W * g.kx;
  s.fx = reinterpret_cast<int*>(s.wy + g.H * g.ky);
  s.cx = s.fx + g.W;
  s.fy = s.cx + g.W;
  s.cy = s.fy + g.H;
  s.src = reinterpret_cast<float*>(s.cy + g.H);
  s.tmp = s.src + g.h * g.w;
  return s;
}

// ------------------------------------------------------------------------------- block reductions
struct MinOp {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// Every thread gets the block's reduction. The tree is fixed (shuffles, then warp partials combined in
// warp order by every thread), so a sum is the same bits on every run and in every thread.
template <typename T, typename Op>
__device__ T block_allreduce(T v, Op op) {
  __shared__ T partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  T r = partial[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) r = op(r, partial[i]);
  __syncthreads();  // partial is reused by the next call
  return r;
}

// --------------------------------------------------------------------------- chain stages, per block
// PIL's precompute_coeffs for one axis: window and normalised double weights of every output index.
__device__ inline void build_taps(int in_size, int out_size, int width, double* weights, int* first, int* count) {
  for (int o = threadIdx.x; o < out_size; o += blockDim.x) {
    const PilWindow win = pil_window(o, in_size, out_size);
    const double ww = pil_weight_sum(win);
    first[o] = win.first;
    count[o] = win.count;
    for (int k = 0; k < win.count; ++k) weights[o * width + k] = pil_weight(win, k, ww);
  }
}

// part_fast_math.h's min-max normalisation, its min and max taken by block reductions. Returns false (the
// same in every thread) for a degenerate map: a NaN or +inf value, or max == 0 after the subtraction.
// Ends with a barrier, so src is ready for every thread.
template <typename cam_t>
__device__ bool normalize_cam(const cam_t* cam, int n, float* src) {
  bool non_finite = false;
  float lo = INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = static_cast<float>(cam[i]);
    non_finite |= cam_value_degenerates(v);
    src[i] = relu_f(v);
    lo = fminf(lo, src[i]);
  }
  if (__syncthreads_or(non_finite)) return false;
  lo = block_allreduce(lo, MinOp());
  float hi = 0.0f;  // every shifted value is >= 0
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    src[i] = minmax_shift(src[i], lo);
    hi = fmaxf(hi, src[i]);
  }
  hi = block_allreduce(hi, MaxOp());
  if (hi == 0.0f) return false;
  // Each thread rescales the elements it shifted, so no barrier is needed before this loop.
  for (int i = threadIdx.x; i < n; i += blockDim.x) src[i] = minmax_scale(src[i], hi);
  __syncthreads();
  return true;
}

// PIL's horizontal pass: src (h x w) -> tmp (h x W).
__device__ inline void resize_rows(const Smem& s, const Geometry& g) {
  for (int i = threadIdx.x; i < g.h * g.W; i += blockDim.x) {
    const int row = i / g.W, x = i % g.W;
    s.tmp[i] = pil_resample(s.src + row * g.w + s.fx[x], 1, s.wx + x * g.kx, s.cx[x]);
  }
  __syncthreads();
}

// PIL's vertical pass for one output pixel, recomputed on demand (see the file comment).
struct Upsampled {
  Smem s;
  Geometry g;

  __device__ float operator()(int pixel) const {
    const int y = pixel / g.W, x = pixel % g.W;
    return pil_resample(s.tmp + s.fy[y] * g.W + x, g.W, s.wy + y * g.ky, s.cy[y]);
  }
};

// Mode "jet": the 3*H*W values are LUT entries, so their statistics follow from a 256-bin histogram of
// LUT indices: two pixel passes (histogram, write) instead of three, and integer atomics keep it
// deterministic. The mean and variance are still the two-pass population formulas over all 3*H*W values.
__device__ inline void jet_budget(const Upsampled& up, float* out, float eps, float eps_low) {
  __shared__ unsigned int hist[PART_FAST_JET_N];
  __shared__ float bin_eps[PART_FAST_JET_N][3];
  const int n = up.g.H * up.g.W;
  const int64_t plane = n;
  const auto bin_of = [&](int pixel) { return jet_index(jet_input(up(pixel))); };

  for (int b = threadIdx.x; b < PART_FAST_JET_N; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < n; p += blockDim.x) atomicAdd(&hist[bin_of(p)], 1u);
  __syncthreads();

  const double count = 3.0 * n;
  double sum = 0.0;
  for (int b = threadIdx.x; b < PART_FAST_JET_N; b += blockDim.x) {
    sum += hist[b] * (kJetLutDevice[b][0] + kJetLutDevice[b][1] + kJetLutDevice[b][2]);
  }
  const double mean = block_allreduce(sum, SumOp()) / count;
  double sq = 0.0;
  for (int b = threadIdx.x; b < PART_FAST_JET_N; b += blockDim.x) {
    sq += hist[b] * (squared_deviation(kJetLutDevice[b][0], mean) + squared_deviation(kJetLutDevice[b][1], mean) +
                     squared_deviation(kJetLutDevice[b][2], mean));
  }
  const double sd = population_std(block_allreduce(sq, SumOp()), count);

  for (int b = threadIdx.x; b < PART_FAST_JET_N; b += blockDim.x) {
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) bin_eps[b][ch] = above_one_sigma(kJetLutDevice[b][ch], mean, sd) ? eps : eps_low;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    const int b = bin_of(p);
#pragma unroll
    for (int ch = 0; ch < 3; ++ch) out[ch * plane + p] = bin_eps[b][ch];
  }
}

// Mode "cam": the H*W upsampled values themselves, in double. Three pixel passes (mean, variance, write).
__device__ inline void cam_budget(const Upsampled& up, float* out, float eps, float eps_low) {
  const int n = up.g.H * up.g.W;
  double sum = 0.0;
  for (int p = threadIdx.x; p < n; p += blockDim.x) sum += static_cast<double>(up(p));
  const double mean = block_allreduce(sum, SumOp()) / n;
  double sq = 0.0;
  for (int p = threadIdx.x; p < n; p += blockDim.x) sq += squared_deviation(static_cast<double>(up(p)), mean);
  const double sd = population_std(block_allreduce(sq, SumOp()), n);
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    out[p] = above_one_sigma(static_cast<double>(up(p)), mean, sd) ? eps : eps_low;
  }
}

template <typename cam_t, bool JET>
__global__ void __launch_bounds__(kThreads)
    cam_eps_map_kernel(const cam_t* cams, float* outs, const Geometry g, const float eps, const float eps_low) {
  PF_DYNAMIC_SHARED_DOUBLES(smem_base);  // double: 8-byte alignment for the weight tables
  const Smem s = carve(smem_base, g);
  const int64_t image = blockIdx.x;
  const int64_t out_numel = int64_t{JET ? 3 : 1} * g.H * g.W;
  float* out = outs + image * out_numel;

  // The tap tables do not depend on the data; normalize_cam's barriers publish them.
  build_taps(g.w, g.W, g.kx, s.wx, s.fx, s.cx);
  build_taps(g.h, g.H, g.ky, s.wy, s.fy, s.cy);
  if (!normalize_cam(cams + image * g.h * g.w, g.h * g.w, s.src)) {
    for (int64_t i = threadIdx.x; i < out_numel; i += blockDim.x) out[i] = eps_low;
    return;
  }
  resize_rows(s, g);
  const Upsampled up{s, g};
  if constexpr (JET) {
    jet_budget(up, out, eps, eps_low);
  } else {
    cam_budget(up, out, eps, eps_low);
  }
}

}  // namespace cam_device
}  // namespace part_fast
