// Dtype dispatch shared by the CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

// float32, float16 and bfloat16: float64 is CPU-only (a CUDA float64 step is never what training wants).
#define PF_DISPATCH_CUDA_FLOAT_TYPES(TYPE, NAME, ...)          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
