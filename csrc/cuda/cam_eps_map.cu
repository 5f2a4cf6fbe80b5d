// CUDA op cam_eps_map: checks, the shared-memory budget and the launch of cam_eps_map_device.cuh's kernel
// (one thread block per image; the design is described there).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

#include "checks.h"
#include "cuda/cam_eps_map_device.cuh"
#include "cuda/dispatch.cuh"

namespace part_fast {
namespace {

using namespace cam_device;

template <typename cam_t, bool JET>
void launch(const at::Tensor& cam, at::Tensor& out, const Geometry& g, double eps, double eps_low) {
  const auto kernel = cam_eps_map_kernel<cam_t, JET>;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const size_t dynamic = smem_bytes(g);
  const size_t total = attr.sharedSizeBytes + dynamic;
  TORCH_CHECK_VALUE(total <= prop->sharedMemPerBlockOptin, "cam_eps_map: resizing a ", g.h, "x", g.w,
                    " CAM to ", g.H, "x", g.W, " needs ", total, " bytes of shared memory per image, more than the ",
                    prop->sharedMemPerBlockOptin, " bytes this device allows per block; use a smaller CAM or size");
  if (total > prop->sharedMemPerBlock) {  // beyond the default 48 KB a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic)));
  }
  kernel<<<static_cast<unsigned int>(cam.size(0)), kThreads, dynamic, at::cuda::getCurrentCUDAStream()>>>(
      cam.const_data_ptr<cam_t>(), out.mutable_data_ptr<float>(), g, static_cast<float>(eps),
      static_cast<float>(eps_low));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Same C++ signature as csrc/cpu's kernel, as the dispatcher requires.
at::Tensor cam_eps_map_cuda(const at::Tensor& cam, c10::SymIntArrayRef size, double eps, double eps_low,
                            c10::string_view mode) {
  const std::string mode_str(mode);
  check_cam_args(cam, size, eps, eps_low, mode_str, /*allow_double=*/false);
  const bool jet = mode_str == "jet";
  const int64_t B = cam.size(0), h = cam.size(1), w = cam.size(2);
  const int64_t H = size[0].guard_int(__FILE__, __LINE__), W = size[1].guard_int(__FILE__, __LINE__);
  // The device indexes one image's maps with int; shared memory bounds them far below this anyway.
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK_VALUE(h * w <= kMaxInt && H * W <= kMaxInt && h * W <= kMaxInt, "cam_eps_map: a ", h, "x", w,
                    " CAM resized to ", H, "x", W, " is too large for the CUDA kernel");

  at::Tensor out = at::empty({B, jet ? 3 : 1, H, W}, cam.options().dtype(at::kFloat));
  if (B == 0) return out;

  const c10::cuda::CUDAGuard guard(cam.device());
  const at::Tensor cam_c = cam.contiguous();  // a copy only if the caller passed a strided view
  const Geometry g = make_geometry(h, w, H, W);
  PF_DISPATCH_CUDA_FLOAT_TYPES(cam.scalar_type(), "cam_eps_map", [&] {
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

TORCH_LIBRARY_IMPL(part_fast, CUDA, m) {
  m.impl("cam_eps_map", &part_fast::cam_eps_map_cuda);
}
