// CUDA ops pgd_step_ and project_: checks, the 32/64-bit index choice and the launch of
// pgd_step_device.cuh's kernel.
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "validate.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/pgd_step_device.cuh"

namespace part_fast {
namespace {

using namespace pgd_device;

// Enough resident blocks to saturate every SM; the grid-stride loop covers the rest.
constexpr int kBlocksPerSm = 2048 / kThreads;

// Largest eps element offset + 1 the plan can reach: decides, with numel, whether 32-bit indices suffice.
int64_t eps_extent(const EpsPlan& plan, int64_t numel) {
  if (plan.kind != EpsPlan::kStrided) return plan.kind == EpsPlan::kDense ? numel : 0;
  int64_t extent = 1;
  for (int d = 0; d < plan.ndim; ++d) extent += (plan.sizes[d] - 1) * plan.strides[d];
  return extent;
}

template <bool HAS_STEP, EpsPlan::Kind KIND, typename scalar_t, typename eps_t, typename index_t>
void launch(const Inputs& in) {
  const auto a = make_args<HAS_STEP, KIND, scalar_t, eps_t, index_t>(in);
  const Walk walk = choose_walk<HAS_STEP, KIND>(a, in.plan);
  const int64_t work = (in.x_adv.numel() + walk.vec - 1) / walk.vec;
  const int32_t device = in.x_adv.get_device_index();
  const int64_t max_blocks = int64_t{device_attribute(cudaDevAttrMultiProcessorCount, device)} * kBlocksPerSm;
  const int blocks = static_cast<int>(std::min((work + kThreads - 1) / kThreads, max_blocks));
  const cudaStream_t stream = current_stream(device);
  run_walk<HAS_STEP, KIND>(a, walk, [&](auto kernel) { kernel<<<blocks, kThreads, 0, stream>>>(a); });
  PF_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool HAS_STEP, EpsPlan::Kind KIND, typename scalar_t, typename eps_t>
void launch_index(const Inputs& in) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  if (in.x_adv.numel() <= kMax32 && eps_extent(in.plan, in.x_adv.numel()) <= kMax32) {
    launch<HAS_STEP, KIND, scalar_t, eps_t, uint32_t>(in);
  } else {
    launch<HAS_STEP, KIND, scalar_t, eps_t, uint64_t>(in);
  }
}

template <bool HAS_STEP, typename scalar_t, typename eps_t>
void launch_eps_tensor(const Inputs& in) {
  if (in.plan.kind == EpsPlan::kDense) {
    launch_index<HAS_STEP, EpsPlan::kDense, scalar_t, eps_t>(in);
  } else {
    launch_index<HAS_STEP, EpsPlan::kStrided, scalar_t, eps_t>(in);
  }
}

template <bool HAS_STEP>
void pgd_cuda(const Tensor& x_adv, const Tensor* grad, const Tensor& x_nat, const std::optional<Tensor>& eps_map,
              double eps, double step_size, double lo, double hi) {
  const Inputs in = checked_inputs(x_adv, grad, x_nat, eps_map, eps, step_size, lo, hi);
  if (x_adv.numel() == 0) return;

  const DeviceGuard guard(x_adv.get_device_index());
  // float32, float16, bfloat16: float64 is CPU-only (a CUDA float64 step is never what training wants).
  dispatch_float</*kDouble=*/false>(x_adv.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    // eps_map is float32 or x's dtype (make_eps_plan checked); the scalar plan has no eps_t.
    if (in.plan.kind == EpsPlan::kScalar) {
      launch_index<HAS_STEP, EpsPlan::kScalar, scalar_t, scalar_t>(in);
    } else if (eps_map->scalar_type() == ScalarType::Float) {
      launch_eps_tensor<HAS_STEP, scalar_t, float>(in);
    } else {
      launch_eps_tensor<HAS_STEP, scalar_t, scalar_t>(in);
    }
  });
}

// The same signatures as csrc/cpu's kernels.
void pgd_step_cuda(Tensor x_adv, const Tensor& grad, const Tensor& x_nat, std::optional<Tensor> eps_map, double eps,
                   double step_size, double lo, double hi) {
  pgd_cuda</*HAS_STEP=*/true>(x_adv, &grad, x_nat, eps_map, eps, step_size, lo, hi);
}

void project_cuda(Tensor x_adv, const Tensor& x_nat, std::optional<Tensor> eps_map, double eps, double lo,
                  double hi) {
  pgd_cuda</*HAS_STEP=*/false>(x_adv, nullptr, x_nat, eps_map, eps, /*step_size=*/0.0, lo, hi);
}

}  // namespace
}  // namespace part_fast

STABLE_TORCH_LIBRARY_IMPL(part_fast, CUDA, m) {
  m.impl("pgd_step_", TORCH_BOX(&part_fast::pgd_step_cuda));
  m.impl("project_", TORCH_BOX(&part_fast::project_cuda));
}
