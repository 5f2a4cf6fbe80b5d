// What the kernels need from torch, through the LibTorch stable ABI only (setup.py defines
// TORCH_TARGET_VERSION, which turns any ATen / c10 include into a compile error): the tensor handle, the
// dtypes, the compute type of each dtype, a dtype switch, and the errors the ops raise.
//
// Errors: torch's Python binding turns std::invalid_argument into ValueError (pybind11's rule), so a bad
// value raised here reaches Python as the ValueError the README promises, even from a direct
// torch.ops.part_fast.* call. The stable ABI has no TypeError: a wrong dtype is refused here as a
// ValueError, and part_fast.ops checks dtypes in Python first so its callers get the TypeError.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace part_fast {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// The type each element is computed in: half types in float32 (as PyTorch's own kernels do), float64 in
// float64.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// A check that names the argument: ValueError in Python.
#define PF_CHECK_VALUE(cond, ...)                                     \
  do {                                                                \
    if (!(cond)) throw std::invalid_argument(::part_fast::cat(__VA_ARGS__)); \
  } while (0)

// An internal failure (a CUDA error, an impossible state): RuntimeError in Python.
#define PF_CHECK_RUNTIME(cond, ...)                                 \
  do {                                                              \
    if (!(cond)) throw std::runtime_error(::part_fast::cat(__VA_ARGS__)); \
  } while (0)

// A dtype as Python's part_fast._validate names it (float32, not torch.float32 or Float).
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return "float32";
    case ScalarType::Half:
      return "float16";
    case ScalarType::BFloat16:
      return "bfloat16";
    case ScalarType::Double:
      return "float64";
    case ScalarType::Long:
      return "int64";
    case ScalarType::Int:
      return "int32";
    case ScalarType::Short:
      return "int16";
    case ScalarType::Char:
      return "int8";
    case ScalarType::Byte:
      return "uint8";
    case ScalarType::Bool:
      return "bool";
    default:
      return torch::headeronly::toString(t);
  }
}

// Calls f(T{}) with T the C++ type of dtype t: float32, float16, bfloat16, and float64 when kDouble (the
// CPU kernels; float64 is CPU-only). The caller has checked t (validate_float_tensor), so anything else is an
// internal error.
template <bool kDouble, typename F>
decltype(auto) dispatch_float(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float:
      return f(float{});
    case ScalarType::Half:
      return f(Half{});
    case ScalarType::BFloat16:
      return f(BFloat16{});
    case ScalarType::Double:
      if constexpr (kDouble) return f(double{});
      break;
    default:
      break;
  }
  throw std::runtime_error(cat("part_fast: no kernel for dtype ", dtype_name(t)));
}

}  // namespace part_fast
