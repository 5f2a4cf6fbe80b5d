// CUDA op cam_eps_map: checks, the shared-memory budget and the launch of cam_eps_map_device.cuh's kernel
// (one thread block per image; the design is described there).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "validate.h"
#include "cuda/cam_eps_map_device.cuh"
#include "cuda/cuda_utils.cuh"

namespace part_fast {
namespace {

using namespace cam_device;

template <typename cam_t, bool JET>
void launch(const Tensor& cam, Tensor& out, const Geometry& g, double eps, double eps_low) {
  const auto kernel = cam_eps_map_kernel<cam_t, JET>;
  const int32_t device = cam.get_device_index();
  cudaFuncAttributes attr;
  PF_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t optin = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t per_block = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlock, device));
  const size_t dynamic = smem_bytes(g);
  const size_t total = attr.sharedSizeBytes + dynamic;
  PF_CHECK_VALUE(total <= optin, "cam_eps_map: resizing a ", g.h, "x", g.w, " CAM to ", g.H, "x", g.W, " needs ",
                 total, " bytes of shared memory per image, more than the ", optin,
                 " bytes this device allows per block; use a smaller CAM or size");
  if (total > per_block) {  // beyond the default 48 KB a kernel must opt in
    PF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic)));
  }
  kernel<<<static_cast<unsigned int>(cam.size(0)), kThreads, dynamic, current_stream(device)>>>(
      cam.const_data_ptr<cam_t>(), out.mutable_data_ptr<float>(), g, static_cast<float>(eps),
      static_cast<float>(eps_low));
  PF_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same signature as csrc/cpu's kernel.
Tensor cam_eps_map_cuda(const Tensor& cam, std::vector<int64_t> size, double eps, double eps_low, std::string mode) {
  validate_cam_args(cam, size, eps, eps_low, mode, /*allow_double=*/false);
  const bool jet = mode == "jet";
  const int64_t B = cam.size(0), h = cam.size(1), w = cam.size(2);
  const int64_t H = size[0], W = size[1];
  // The device indexes one image's maps with int; shared memory bounds them far below this anyway.
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  PF_CHECK_VALUE(h * w <= kMaxInt && H * W <= kMaxInt && h * W <= kMaxInt, "cam_eps_map: a ", h, "x", w,
                 " CAM resized to ", H, "x", W, " is too large for the CUDA kernel");

  Tensor out = torch::stable::new_empty(cam, {B, jet ? 3 : 1, H, W}, ScalarType::Float);
  if (B == 0) return out;

  const DeviceGuard guard(cam.get_device_index());
  const Tensor cam_c = torch::stable::contiguous(cam);  // a copy only if the caller passed a strided view
  const Geometry g = make_geometry(h, w, H, W);
  dispatch_float</*kDouble=*/false>(cam.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (jet) {
      launch<scalar_t, true>(cam_c, out, g, eps, eps_low);
    } else {
      launch<scalar_t, false>(cam_c, out, g, eps, eps_low);
    }
  });
  return out;
}

}  // namespace
}  // namespace part_fast

STABLE_TORCH_LIBRARY_IMPL(part_fast, CUDA, m) {
  m.impl("cam_eps_map", TORCH_BOX(&part_fast::cam_eps_map_cuda));
}
