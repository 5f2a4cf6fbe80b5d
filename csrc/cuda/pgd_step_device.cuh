// Device code of pgd_step_ and project_: one fused, in-place, memory-bound pass over x_adv, and the host
// decisions that pick its instance (kernel arguments, vector width, eps walk). pgd_step.cu launches it;
// tests/test_cuda_emulation.py compiles this same header as C++ and runs it on the CPU.
//
// x_adv, grad and x_nat share one dense layout (contiguous or channels_last, see validate_attack_tensors),
// so they are streamed by linear memory index with 16-byte vector accesses when every pointer allows it.
// The per-element arithmetic is part_fast_math.h's, the same code the CPU kernels run.
#pragma once

#include <cstdint>
#include <optional>

#include "validate.h"
#include "cuda/int_divider.cuh"
#include "part_fast_math.h"

// A hook for tests/test_cuda_emulation.py, which defines it to fail on a misaligned vector access (the CPU
// would tolerate one the GPU faults on); nothing on the device.
#ifndef PF_CHECK_VECTOR_ALIGNMENT
#define PF_CHECK_VECTOR_ALIGNMENT(p)
#endif

namespace part_fast {
namespace pgd_device {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;

// One 16-byte access: the widest load/store every architecture supports (sm_100's 32-byte loads would
// demand a 32-byte alignment that slicing a tensor does not guarantee).
template <typename T>
struct alignas(kVecBytes) Chunk {
  T v[kVecBytes / sizeof(T)];
};

// Loads N consecutive elements: as 16-byte chunks when N fills whole chunks (the caller guarantees
// p is 16-byte aligned then), else one by one.
template <int N, typename T>
__device__ __forceinline__ void load_n(const T* p, T (&out)[N]) {
  if constexpr (N * sizeof(T) % kVecBytes == 0) {
    constexpr int kPer = kVecBytes / sizeof(T);
    PF_CHECK_VECTOR_ALIGNMENT(p);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const Chunk<T> chunk = reinterpret_cast<const Chunk<T>*>(p)[c];
#pragma unroll
      for (int j = 0; j < kPer; ++j) out[c * kPer + j] = chunk.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = p[j];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_n(T* p, const T (&in)[N]) {
  if constexpr (N * sizeof(T) % kVecBytes == 0) {
    constexpr int kPer = kVecBytes / sizeof(T);
    PF_CHECK_VECTOR_ALIGNMENT(p);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      Chunk<T> chunk;
#pragma unroll
      for (int j = 0; j < kPer; ++j) chunk.v[j] = in[c * kPer + j];
      reinterpret_cast<Chunk<T>*>(p)[c] = chunk;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = in[j];
  }
}

// EpsPlan::kStrided on the device: x's linear index -> eps element offset. index_t is unsigned, so the
// 32-bit case gets int_divider.cuh's multiply-shift division instead of a real one.
template <typename index_t>
struct StridedOffset {
  int ndim;
  IntDivider<index_t> sizes[4];  // sizes[0] is never divided by
  index_t strides[4];

  __device__ __forceinline__ index_t operator()(index_t i) const {
    index_t off = 0;
#pragma unroll
    for (int d = 3; d > 0; --d) {
      if (d < ndim) {
        const auto qr = sizes[d].divmod(i);
        off += qr.mod * strides[d];
        i = qr.div;
      }
    }
    return off + i * strides[0];
  }
};

template <typename scalar_t, typename eps_t, typename index_t>
struct PgdArgs {
  using scalar_type = scalar_t;
  using eps_type = eps_t;
  using index_type = index_t;
  using opmath_t = part_fast::opmath_t<scalar_t>;
  scalar_t* x_adv;
  const scalar_t* grad;  // null for project_
  const scalar_t* x_nat;
  const eps_t* eps_map;  // null for EpsPlan::kScalar
  StridedOffset<index_t> eps_offset;
  // EpsPlan::kStrided: the innermost coalesced dim's eps stride, a field of its own: reading
  // eps_offset.strides[ndim - 1] with a run-time ndim would move that array to local memory.
  index_t eps_row_stride;
  index_t numel;
  opmath_t eps, step, lo, hi;
};

template <EpsPlan::Kind KIND, typename Args, typename index_t>
__device__ __forceinline__ typename Args::opmath_t eps_at(const Args& a, index_t i) {
  using opmath_t = typename Args::opmath_t;
  if constexpr (KIND == EpsPlan::kScalar) {
    return a.eps;
  } else if constexpr (KIND == EpsPlan::kDense) {
    return static_cast<opmath_t>(a.eps_map[i]);
  } else {
    return static_cast<opmath_t>(a.eps_map[a.eps_offset(i)]);
  }
}

template <bool HAS_STEP, typename T>
__device__ __forceinline__ T update(T x, T grad, T x_nat, T eps, T step, T lo, T hi) {
  if constexpr (HAS_STEP) {
    return pgd_step_elem(x, grad, x_nat, eps, step, lo, hi);
  } else {
    return project_elem(x, x_nat, eps, lo, hi);
  }
}

// Elements i .. i + VEC - 1; VEC > 1 only when every pointer involved is 16-byte aligned. EPS_ROWS (see
// eps_rows_ok): the chunk lies in one innermost eps row, so one offset computation serves all VEC elements.
template <int VEC, bool HAS_STEP, EpsPlan::Kind KIND, bool EPS_ROWS, typename Args, typename index_t>
__device__ __forceinline__ void process(const Args& a, index_t i) {
  using scalar_t = typename Args::scalar_type;
  using eps_t = typename Args::eps_type;
  using opmath_t = typename Args::opmath_t;

  scalar_t x[VEC], x_nat[VEC];
  load_n<VEC>(a.x_adv + i, x);
  load_n<VEC>(a.x_nat + i, x_nat);
  opmath_t grad[VEC] = {};  // stays 0 for project_, which ignores it
  if constexpr (HAS_STEP) {
    scalar_t g[VEC];
    load_n<VEC>(a.grad + i, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) grad[j] = static_cast<opmath_t>(g[j]);
  }
  opmath_t eps[VEC];
  if constexpr (KIND == EpsPlan::kDense) {
    // Same linear index as x: a contiguous (vector) load too.
    eps_t e[VEC];
    load_n<VEC>(a.eps_map + i, e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) eps[j] = static_cast<opmath_t>(e[j]);
  } else if constexpr (KIND == EpsPlan::kStrided && EPS_ROWS) {
    const eps_t* row = a.eps_map + a.eps_offset(i);
    if (a.eps_row_stride == 0) {  // one value for the whole chunk (uniform branch: same for every thread)
      const opmath_t e = static_cast<opmath_t>(*row);
#pragma unroll
      for (int j = 0; j < VEC; ++j) eps[j] = e;
    } else {  // VEC consecutive values at a 16-byte aligned address: a vector load
      eps_t e[VEC];
      load_n<VEC>(row, e);
#pragma unroll
      for (int j = 0; j < VEC; ++j) eps[j] = static_cast<opmath_t>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) eps[j] = eps_at<KIND>(a, i + j);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    x[j] = static_cast<scalar_t>(update<HAS_STEP>(static_cast<opmath_t>(x[j]), grad[j],
                                                  static_cast<opmath_t>(x_nat[j]), eps[j], a.step, a.lo, a.hi));
  }
  store_n<VEC>(a.x_adv + i, x);
}

template <int VEC, bool HAS_STEP, EpsPlan::Kind KIND, bool EPS_ROWS, typename scalar_t, typename eps_t,
          typename index_t>
__global__ void __launch_bounds__(kThreads) pgd_kernel(const PgdArgs<scalar_t, eps_t, index_t> a) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t nvec = a.numel / VEC;
  for (index_t v = tid; v < nvec; v += stride) process<VEC, HAS_STEP, KIND, EPS_ROWS>(a, v * VEC);
  if constexpr (VEC > 1) {  // the last numel % VEC elements (none when EPS_ROWS: rows are whole chunks)
    for (index_t i = nvec * VEC + tid; i < a.numel; i += stride) process<1, HAS_STEP, KIND, false>(a, i);
  }
}

inline bool aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0;
}

// Whether a vectorised (VEC-element chunk) launch may read a strided eps a row at a time. Chunks start at
// multiples of VEC, so when the innermost coalesced dim's length is a multiple of VEC, every chunk lies in
// one row and the eps offsets of its elements are off, off + s, ..., off + (VEC - 1) s for the row stride s:
//  s == 0 (e.g. a (B, C, 1, 1) eps): one load per chunk;
//  s == 1 (e.g. the (B, 1, H, W) PART budget on a contiguous x): one vector load per chunk, which needs
//         every row start 16-byte aligned: the base pointer and every outer stride, in bytes.
// Otherwise each element decomposes its own index (a gather).
template <int VEC, typename eps_t>
bool eps_rows_ok(const EpsPlan& plan, const eps_t* eps_map) {
  if (plan.kind != EpsPlan::kStrided) return false;
  const int inner = plan.ndim - 1;
  if (plan.sizes[inner] % VEC != 0) return false;
  if (plan.strides[inner] == 0) return true;
  if (plan.strides[inner] != 1 || !aligned(eps_map) || VEC * sizeof(eps_t) % kVecBytes != 0) return false;
  for (int d = 0; d < inner; ++d) {
    if (plan.strides[d] * static_cast<int64_t>(sizeof(eps_t)) % kVecBytes != 0) return false;
  }
  return true;
}

template <typename index_t>
StridedOffset<index_t> strided_offset(const EpsPlan& plan) {
  const bool strided = plan.kind == EpsPlan::kStrided;
  StridedOffset<index_t> s;
  s.ndim = strided ? plan.ndim : 1;
  for (int d = 0; d < 4; ++d) {
    // Unused dims get divisor 1 (a divisor must be >= 1); the device skips them anyway.
    const bool used = strided && d < plan.ndim;
    s.sizes[d] = IntDivider<index_t>(static_cast<index_t>(used ? plan.sizes[d] : 1));
    s.strides[d] = static_cast<index_t>(used ? plan.strides[d] : 0);
  }
  return s;
}

struct Inputs {
  const Tensor& x_adv;
  const Tensor* grad;
  const Tensor& x_nat;
  const std::optional<Tensor>& eps_map;
  EpsPlan plan;
  double eps, step, lo, hi;
};

// The op's arguments, checked by validate.h, with the eps plan. grad is null for project_.
inline Inputs checked_inputs(const Tensor& x_adv, const Tensor* grad, const Tensor& x_nat,
                             const std::optional<Tensor>& eps_map, double eps, double step_size, double lo,
                             double hi) {
  const EpsPlan plan = validate_pgd_args(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi, /*allow_double=*/false);
  return Inputs{x_adv, grad, x_nat, eps_map, plan, eps, step_size, lo, hi};
}

template <bool HAS_STEP, EpsPlan::Kind KIND, typename scalar_t, typename eps_t, typename index_t>
PgdArgs<scalar_t, eps_t, index_t> make_args(const Inputs& in) {
  PgdArgs<scalar_t, eps_t, index_t> a;
  using opmath_t = typename decltype(a)::opmath_t;
  a.x_adv = in.x_adv.mutable_data_ptr<scalar_t>();
  a.grad = nullptr;
  if constexpr (HAS_STEP) a.grad = in.grad->const_data_ptr<scalar_t>();
  a.x_nat = in.x_nat.const_data_ptr<scalar_t>();
  a.eps_map = nullptr;
  // const_data_ptr already points at the storage offset, where the plan's strides start.
  if constexpr (KIND != EpsPlan::kScalar) a.eps_map = in.eps_map->const_data_ptr<eps_t>();
  a.eps_offset = strided_offset<index_t>(in.plan);
  a.eps_row_stride = 0;
  if constexpr (KIND == EpsPlan::kStrided) a.eps_row_stride = static_cast<index_t>(in.plan.strides[in.plan.ndim - 1]);
  a.numel = static_cast<index_t>(in.x_adv.numel());
  // Scalars are rounded to the compute type once, as PyTorch does for a Python scalar operand.
  a.eps = static_cast<opmath_t>(in.eps);
  a.step = static_cast<opmath_t>(in.step);
  a.lo = static_cast<opmath_t>(in.lo);
  a.hi = static_cast<opmath_t>(in.hi);
  return a;
}

// Which pgd_kernel instance a launch runs: VEC-element chunks when every streamed pointer is 16-byte
// aligned, and for a strided eps, row reads when eps_rows_ok allows them.
struct Walk {
  int vec;
  bool eps_rows;
};

template <bool HAS_STEP, EpsPlan::Kind KIND, typename Args>
Walk choose_walk(const Args& a, const EpsPlan& plan) {
  constexpr int kVec = kVecBytes / sizeof(typename Args::scalar_type);
  const bool vectorize = aligned(a.x_adv) && aligned(a.x_nat) && (!HAS_STEP || aligned(a.grad)) &&
                         (KIND != EpsPlan::kDense || aligned(a.eps_map));
  if (!vectorize) return {1, false};
  return {kVec, KIND == EpsPlan::kStrided && eps_rows_ok<kVec>(plan, a.eps_map)};
}

// Runs the kernel instance `walk` names with launch configuration (blocks, threads, stream); the test
// harness that emulates the device on the CPU calls it with its own `run`.
template <bool HAS_STEP, EpsPlan::Kind KIND, typename Args, typename Run>
void run_walk(const Args& a, const Walk& walk, Run&& run) {
  using scalar_t = typename Args::scalar_type;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  if (walk.vec == 1) {
    run(pgd_kernel<1, HAS_STEP, KIND, false, scalar_t, typename Args::eps_type, typename Args::index_type>);
    return;
  }
  if constexpr (KIND == EpsPlan::kStrided) {  // row instances exist for a strided eps only
    if (walk.eps_rows) {
      run(pgd_kernel<kVec, HAS_STEP, KIND, true, scalar_t, typename Args::eps_type, typename Args::index_type>);
      return;
    }
  }
  run(pgd_kernel<kVec, HAS_STEP, KIND, false, scalar_t, typename Args::eps_type, typename Args::index_type>);
}

}  // namespace pgd_device
}  // namespace part_fast
