// Host emulation of the CUDA built-ins the part_fast kernels use, so tests/test_cuda_emulation.py can
// compile the device code of csrc/cuda/*.cu as plain C++ and run it on the CPU.
//
// One block runs at a time with one std::thread per CUDA thread: std::barrier stands in for
// __syncthreads, and a per-warp barrier for the warp shuffles. Kernels without barriers (pgd_kernel) may
// instead be called thread by thread (see harness.cpp). Only what the kernels call is defined here; a
// kernel that starts using another built-in fails to compile, which is the signal to add it.
#pragma once
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)

// pgd_step.cu's 16-byte vector accesses: x86 tolerates a misaligned one, the GPU faults, so fail here.
#define PF_CHECK_VECTOR_ALIGNMENT(p) \
  PF_CHECK_RUNTIME(reinterpret_cast<std::uintptr_t>(p) % 16 == 0, "misaligned 16-byte vector access at ", (const void*)(p))

struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_dim3 threadIdx;
inline emu_dim3 blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};

inline std::unique_ptr<std::barrier<>> g_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline std::atomic<int> g_or_flag{0};
inline double g_shuffle_slots[1024];
// The block's dynamic shared memory (1 MB, more than any GPU gives a block).
alignas(16) inline double g_dynamic_smem[1 << 17];

// After each barrier a quarter of the warps (a different, deterministic set each time) sleep 5 ms: on the device,
// warps leave a barrier at different times, and with 2 cores the OS scheduler rarely reproduces that on its
// own, so a missing barrier (a fast warp overwriting shared memory a slow one still reads) would go unseen.
inline thread_local unsigned g_barrier_count = 0;
inline void __syncthreads() {
  g_block_barrier->arrive_and_wait();
  const unsigned h = ((threadIdx.x / 32 + 1) * 2654435761u) ^ (++g_barrier_count * 40503u);
  if ((h >> 9) % 4 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
}

inline int __syncthreads_or(int predicate) {
  __syncthreads();
  if (predicate) g_or_flag.store(1);
  __syncthreads();
  const int result = g_or_flag.load();
  __syncthreads();
  if (threadIdx.x == 0) g_or_flag.store(0);
  return result;
}

// Lanes past the warp's end keep their own value, as on the device.
template <class T>
T __shfl_down_sync(unsigned, T v, int offset) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  g_shuffle_slots[threadIdx.x] = static_cast<double>(v);
  g_warp_barriers[warp]->arrive_and_wait();
  const T r = lane + offset < 32 ? static_cast<T>(g_shuffle_slots[threadIdx.x + offset]) : v;
  g_warp_barriers[warp]->arrive_and_wait();
  return r;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
// IEEE round-to-nearest on the host: what the _rn intrinsics do on the device.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __double2float_rn(double v) { return static_cast<float>(v); }
using std::isnan;

// Runs f() as one block of `threads` threads (the caller sets blockIdx and gridDim). Dynamic shared memory
// starts as garbage, as on the device: all bits set (NaN doubles and floats, -1 ints).
template <class F>
void run_block(int threads, F f) {
  std::memset(g_dynamic_smem, 0xFF, sizeof(g_dynamic_smem));
  blockDim.x = threads;
  g_block_barrier = std::make_unique<std::barrier<>>(threads);
  g_warp_barriers.clear();
  for (int w = 0; w < (threads + 31) / 32; ++w) g_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([t, &f] {
      threadIdx.x = t;
      f();
    });
  for (auto& t : pool) t.join();
}
