// Division by a run-time constant divisor d, for the device's index arithmetic: with 32-bit indices, a
// multiply-high, an add and a shift instead of a hardware-less integer division (the classic
// multiply-shift method of Granlund & Montgomery, 1994). 64-bit indices divide plainly.
//
// For 1 <= d < 2^31 and 0 <= n < 2^31 (the op checks numel and the eps extent against INT32_MAX before it
// chooses 32-bit indices): s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1, and
// n / d = (umulhi(n, m) + n) >> s, where the sum fits in 32 bits because n < 2^31.
#pragma once

#include <cstdint>

#include "part_fast_math.h"

namespace part_fast {

template <typename index_t>
struct DivMod {
  index_t div, mod;
};

template <typename index_t>
struct IntDivider {
  IntDivider() = default;
  explicit IntDivider(index_t d) : divisor(d) {}
  PF_HD DivMod<index_t> divmod(index_t n) const {
    const index_t q = n / divisor;
    return {q, n - q * divisor};
  }
  index_t divisor = 1;
};

template <>
struct IntDivider<uint32_t> {
  IntDivider() = default;
  explicit IntDivider(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  PF_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }
  PF_HD DivMod<uint32_t> divmod(uint32_t n) const {
    const uint32_t q = div(n);
    return {q, n - q * divisor};
  }
  uint32_t divisor = 1, multiplier = 1;
  unsigned shift = 0;
};

}  // namespace part_fast
