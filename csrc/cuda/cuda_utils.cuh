// The CUDA side of the stable ABI: the current stream and the device guard through torch's stable C shim,
// CUDA error checks that raise RuntimeError, and the device attributes a launch reads.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "stable_types.h"

namespace part_fast {

#define PF_CUDA_CHECK(call)                                                                          \
  do {                                                                                               \
    const cudaError_t pf_err = (call);                                                               \
    PF_CHECK_RUNTIME(pf_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(pf_err), " (", #call, \
                     " at ", __FILE__, ":", __LINE__, ")");                                          \
  } while (0)

// After a <<<...>>> launch: a bad configuration surfaces here, not at the next synchronising call.
#define PF_CUDA_KERNEL_LAUNCH_CHECK() PF_CUDA_CHECK(cudaGetLastError())

// The stream PyTorch runs on for this device (torch.cuda.current_stream()), so the kernels order with
// the caller's work.
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  PF_CHECK_RUNTIME(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
                   "part_fast: could not read the current CUDA stream of device ", device_index);
  return static_cast<cudaStream_t>(stream);
}

// The tensor's device becomes the current one for the launch, and the previous one is restored after.
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline int device_attribute(cudaDeviceAttr attr, int32_t device_index) {
  int value = 0;
  PF_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device_index));
  return value;
}

}  // namespace part_fast
