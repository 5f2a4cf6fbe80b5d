// CPU kernels of pgd_step_ and project_: one pass over x_adv, grad, x_nat and eps, in place.
//
// x_adv, grad and x_nat share one dense layout, so they are streamed by linear memory index. eps is walked
// by the EpsPlan of validate.h: a scalar, a tensor laid out like x, or a broadcast/strided tensor visited
// row by row (a row being the innermost coalesced dim, where eps is constant, contiguous or strided).
// The inner loops are plain counted loops over float math that GCC auto-vectorises at -O3.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <optional>

#include "validate.h"
#include "part_fast_math.h"

namespace part_fast {
namespace {

// Elements per parallel task: large enough that a task outweighs its scheduling cost.
constexpr int64_t kGrainSize = 32768;

// The loop body. always_inline so that each ISA variant below gets its own copy compiled for its ISA.
template <bool kHasStep, typename scalar_t, typename EpsAt>
PF_ALWAYS_INLINE inline void update_loop(scalar_t* x, const scalar_t* grad, const scalar_t* x_nat, int64_t n,
                                         EpsAt eps_at, opmath_t<scalar_t> step, opmath_t<scalar_t> lo,
                                         opmath_t<scalar_t> hi) {
  using T = opmath_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const T e = eps_at(i);
    T v;
    if constexpr (kHasStep) {
      v = pgd_step_elem<T>(T(x[i]), T(grad[i]), T(x_nat[i]), e, step, lo, hi);
    } else {
      v = project_elem<T>(T(x[i]), T(x_nat[i]), e, lo, hi);
    }
    x[i] = static_cast<scalar_t>(v);
  }
}

// At CIFAR sizes the tensors sit in cache and the step is bound by arithmetic, not memory, so the width of
// the vector unit matters: the loop is compiled for AVX-512 and AVX2 too and picked at run time (the
// package itself is built for baseline x86-64). -ffp-contract=off holds for every variant: same results.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PF_X86_MULTIVERSION 1
#define PF_ISA_VARIANT(NAME, TARGET)                                                                        \
  template <bool kHasStep, typename scalar_t, typename EpsAt>                                               \
  __attribute__((target(TARGET))) void update_run_##NAME(scalar_t* x, const scalar_t* grad,                 \
                                                         const scalar_t* x_nat, int64_t n, EpsAt eps_at,    \
                                                         opmath_t<scalar_t> step,                    \
                                                         opmath_t<scalar_t> lo,                      \
                                                         opmath_t<scalar_t> hi) {                    \
    update_loop<kHasStep>(x, grad, x_nat, n, eps_at, step, lo, hi);                                         \
  }
PF_ISA_VARIANT(avx512, "avx512f,avx512bw,avx512vl,prefer-vector-width=512")
PF_ISA_VARIANT(avx2, "avx2")
#undef PF_ISA_VARIANT

enum class Isa { kBaseline, kAvx2, kAvx512 };

inline Isa detect_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  return isa;
}
#endif

template <bool kHasStep, typename scalar_t, typename EpsAt>
inline void update_run(scalar_t* x, const scalar_t* grad, const scalar_t* x_nat, int64_t n, EpsAt eps_at,
                       opmath_t<scalar_t> step, opmath_t<scalar_t> lo, opmath_t<scalar_t> hi) {
#ifdef PF_X86_MULTIVERSION
  switch (detect_isa()) {
    case Isa::kAvx512:
      return update_run_avx512<kHasStep>(x, grad, x_nat, n, eps_at, step, lo, hi);
    case Isa::kAvx2:
      return update_run_avx2<kHasStep>(x, grad, x_nat, n, eps_at, step, lo, hi);
    case Isa::kBaseline:
      break;
  }
#endif
  update_loop<kHasStep>(x, grad, x_nat, n, eps_at, step, lo, hi);
}

template <bool kHasStep, typename scalar_t, typename eps_t>
void update_strided(scalar_t* x, const scalar_t* grad, const scalar_t* x_nat, const eps_t* eps, const EpsPlan& plan,
                    int64_t begin, int64_t end, opmath_t<scalar_t> step, opmath_t<scalar_t> lo,
                    opmath_t<scalar_t> hi) {
  using T = opmath_t<scalar_t>;
  const int nd = plan.ndim;
  int64_t index[4] = {0, 0, 0, 0};
  int64_t eps_offset = 0;
  int64_t rem = begin;
  for (int d = nd - 1; d >= 0; --d) {
    index[d] = rem % plan.sizes[d];
    rem /= plan.sizes[d];
    eps_offset += index[d] * plan.strides[d];
  }
  const int64_t inner_stride = plan.strides[nd - 1];
  for (int64_t i = begin; i < end;) {
    const int64_t len = std::min(plan.sizes[nd - 1] - index[nd - 1], end - i);
    const eps_t* e = eps + eps_offset;
    const scalar_t* g = kHasStep ? grad + i : nullptr;
    if (inner_stride == 0) {
      const T e0 = T(e[0]);
      update_run<kHasStep>(x + i, g, x_nat + i, len, [e0](int64_t) { return e0; }, step, lo, hi);
    } else if (inner_stride == 1) {
      update_run<kHasStep>(x + i, g, x_nat + i, len, [e](int64_t j) { return T(e[j]); }, step, lo, hi);
    } else {
      update_run<kHasStep>(
          x + i, g, x_nat + i, len, [e, inner_stride](int64_t j) { return T(e[j * inner_stride]); }, step, lo, hi);
    }
    i += len;
    // Advance the multi-index by `len` (it ends a row or the range), carrying into outer dims.
    index[nd - 1] += len;
    eps_offset += len * inner_stride;
    for (int d = nd - 1; d > 0 && index[d] == plan.sizes[d]; --d) {
      eps_offset += plan.strides[d - 1] - index[d] * plan.strides[d];
      index[d] = 0;
      ++index[d - 1];
    }
  }
}

template <bool kHasStep, typename scalar_t, typename eps_t>
void update_cpu(const Tensor& x_adv, const Tensor* grad, const Tensor& x_nat, const std::optional<Tensor>& eps_map,
                const EpsPlan& plan, double eps, double step_size, double lo, double hi) {
  using T = opmath_t<scalar_t>;
  scalar_t* x = x_adv.mutable_data_ptr<scalar_t>();
  const scalar_t* g = kHasStep ? grad->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* xn = x_nat.const_data_ptr<scalar_t>();
  const eps_t* e = plan.kind == EpsPlan::kScalar ? nullptr : eps_map->const_data_ptr<eps_t>();
  const T step = T(step_size), tlo = T(lo), thi = T(hi), e0 = T(eps);
  torch::stable::parallel_for(0, x_adv.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    const scalar_t* gb = kHasStep ? g + begin : nullptr;
    const int64_t n = end - begin;
    switch (plan.kind) {
      case EpsPlan::kScalar:
        update_run<kHasStep>(x + begin, gb, xn + begin, n, [e0](int64_t) { return e0; }, step, tlo, thi);
        break;
      case EpsPlan::kDense: {
        const eps_t* eb = e + begin;
        update_run<kHasStep>(x + begin, gb, xn + begin, n, [eb](int64_t j) { return T(eb[j]); }, step, tlo, thi);
        break;
      }
      case EpsPlan::kStrided:
        update_strided<kHasStep>(x, g, xn, e, plan, begin, end, step, tlo, thi);
        break;
    }
  });
}

template <bool kHasStep>
void update_dispatch(const Tensor& x_adv, const Tensor* grad, const Tensor& x_nat,
                     const std::optional<Tensor>& eps_map, double eps, double step_size, double lo, double hi) {
  validate_cpu_tensor(x_adv, "x_adv");
  const EpsPlan plan = validate_pgd_args(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi, /*allow_double=*/true);
  if (x_adv.numel() == 0) return;
  const bool eps_is_float = eps_map.has_value() && eps_map->scalar_type() == ScalarType::Float;
  dispatch_float</*kDouble=*/true>(x_adv.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (eps_is_float) {
      update_cpu<kHasStep, scalar_t, float>(x_adv, grad, x_nat, eps_map, plan, eps, step_size, lo, hi);
    } else {
      update_cpu<kHasStep, scalar_t, scalar_t>(x_adv, grad, x_nat, eps_map, plan, eps, step_size, lo, hi);
    }
  });
}

// The stable ABI passes a Tensor(a!) as a handle: writes through it reach the caller's tensor.
void pgd_step_cpu(Tensor x_adv, const Tensor& grad, const Tensor& x_nat, std::optional<Tensor> eps_map, double eps,
                  double step_size, double lo, double hi) {
  update_dispatch<true>(x_adv, &grad, x_nat, eps_map, eps, step_size, lo, hi);
}

void project_cpu(Tensor x_adv, const Tensor& x_nat, std::optional<Tensor> eps_map, double eps, double lo,
                 double hi) {
  update_dispatch<false>(x_adv, nullptr, x_nat, eps_map, eps, 0.0, lo, hi);
}

}  // namespace
}  // namespace part_fast

STABLE_TORCH_LIBRARY_IMPL(part_fast, CPU, m) {
  m.impl("pgd_step_", TORCH_BOX(&part_fast::pgd_step_cpu));
  m.impl("project_", TORCH_BOX(&part_fast::project_cpu));
}
