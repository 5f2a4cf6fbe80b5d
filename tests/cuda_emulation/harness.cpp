// Ops (torch.ops.part_fast_emulation.*) that run the device code of csrc/cuda/*.cu on the CPU (see emu.h),
// built on the same stable ABI as the kernels. The host decisions (kernel arguments, which instance runs)
// are the .cu files' own make_args / choose_walk / run_walk; only the launch itself is emulated.
namespace part_fast_emulation {
using namespace part_fast;

template <typename cam_t, bool JET>
void cam_blocks(const Tensor& cam, Tensor& out, const cam_device::Geometry& g, float eps, float eps_low) {
  PF_CHECK_RUNTIME(cam_device::smem_bytes(g) <= sizeof(g_dynamic_smem), "emulated shared memory too small");
  gridDim.x = static_cast<unsigned>(cam.size(0));
  for (int64_t b = 0; b < cam.size(0); ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    run_block(cam_device::kThreads, [&] {
      cam_device::cam_eps_map_kernel<cam_t, JET>(cam.const_data_ptr<cam_t>(), out.mutable_data_ptr<float>(), g, eps,
                                                 eps_low);
    });
  }
}

Tensor cam_eps_map(const Tensor& cam_in, int64_t H, int64_t W, double eps, double eps_low, bool jet) {
  validate_cam_args(cam_in, {H, W}, eps, eps_low, jet ? "jet" : "cam", /*allow_double=*/false);
  const Tensor cam = torch::stable::contiguous(cam_in);
  const cam_device::Geometry g = cam_device::make_geometry(cam.size(1), cam.size(2), H, W);
  // Poisoned: an element the kernel does not write stays NaN and fails the comparison.
  Tensor out = torch::stable::full({cam.size(0), jet ? 3 : 1, H, W}, NAN, ScalarType::Float);
  const float e = static_cast<float>(eps), el = static_cast<float>(eps_low);
  const auto run = [&](auto tag) {
    using cam_t = decltype(tag);
    jet ? cam_blocks<cam_t, true>(cam, out, g, e, el) : cam_blocks<cam_t, false>(cam, out, g, e, el);
  };
  dispatch_float</*kDouble=*/false>(cam.scalar_type(), run);
  return out;
}

// What ran: (VEC, eps read by rows, EpsPlan kind).
using Ran = std::tuple<int64_t, bool, int64_t>;

template <bool HAS_STEP, EpsPlan::Kind KIND, typename scalar_t, typename eps_t, typename index_t>
Ran pgd_grid(const pgd_device::Inputs& in, int64_t blocks) {
  using namespace pgd_device;
  const auto a = make_args<HAS_STEP, KIND, scalar_t, eps_t, index_t>(in);
  const Walk walk = choose_walk<HAS_STEP, KIND>(a, in.plan);
  // pgd_kernel has no barriers, so the threads of the grid may run one after another.
  run_walk<HAS_STEP, KIND>(a, walk, [&](auto kernel) {
    gridDim.x = static_cast<unsigned>(blocks);
    blockDim.x = kThreads;
    for (unsigned b = 0; b < gridDim.x; ++b) {
      blockIdx.x = b;
      for (unsigned t = 0; t < blockDim.x; ++t) {
        threadIdx.x = t;
        kernel(a);
      }
    }
  });
  return {walk.vec, walk.eps_rows, static_cast<int64_t>(KIND)};
}

template <bool HAS_STEP, typename scalar_t, typename eps_t, typename index_t>
Ran pgd_kind(const pgd_device::Inputs& in, int64_t blocks) {
  switch (in.plan.kind) {
    case EpsPlan::kScalar:
      return pgd_grid<HAS_STEP, EpsPlan::kScalar, scalar_t, eps_t, index_t>(in, blocks);
    case EpsPlan::kDense:
      return pgd_grid<HAS_STEP, EpsPlan::kDense, scalar_t, eps_t, index_t>(in, blocks);
    default:
      return pgd_grid<HAS_STEP, EpsPlan::kStrided, scalar_t, eps_t, index_t>(in, blocks);
  }
}

template <bool HAS_STEP, typename scalar_t>
Ran pgd_types(const pgd_device::Inputs& in, int64_t blocks, bool index64) {
  const bool eps_f32 = in.eps_map.has_value() && in.eps_map->scalar_type() == ScalarType::Float;
  if (index64) {
    return eps_f32 ? pgd_kind<HAS_STEP, scalar_t, float, uint64_t>(in, blocks)
                   : pgd_kind<HAS_STEP, scalar_t, scalar_t, uint64_t>(in, blocks);
  }
  return eps_f32 ? pgd_kind<HAS_STEP, scalar_t, float, uint32_t>(in, blocks)
                 : pgd_kind<HAS_STEP, scalar_t, scalar_t, uint32_t>(in, blocks);
}

// pgd_step_ (grad given) or project_ (grad None) on x_adv in place, as the CUDA op would run it on a grid
// of `blocks` blocks; index64 forces the 64-bit index instances.
Ran pgd(Tensor x_adv, std::optional<Tensor> grad, Tensor x_nat, std::optional<Tensor> eps_map,
        double eps, double step, double lo, double hi, int64_t blocks, bool index64) {
  const Tensor* g = grad.has_value() ? &*grad : nullptr;
  const pgd_device::Inputs in = pgd_device::checked_inputs(x_adv, g, x_nat, eps_map, eps, step, lo, hi);
  PF_CHECK_RUNTIME(x_adv.numel() > 0, "the harness runs non-empty tensors");
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    return g ? pgd_types<true, scalar_t>(in, blocks, index64) : pgd_types<false, scalar_t>(in, blocks, index64);
  };
  return dispatch_float</*kDouble=*/false>(x_adv.scalar_type(), run);
}

// Integer division as the device's strided eps walk does it (int_divider.cuh), for n in [0, n_end).
// Returns the number of n whose quotient or remainder differs from the plain division's.
int64_t divider_mismatches(int64_t divisor, int64_t n_begin, int64_t n_end) {
  const IntDivider<uint32_t> d(static_cast<uint32_t>(divisor));
  int64_t bad = 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const auto qr = d.divmod(static_cast<uint32_t>(n));
    bad += (qr.div != n / divisor) || (qr.mod != n % divisor);
  }
  return bad;
}
}  // namespace part_fast_emulation

STABLE_TORCH_LIBRARY(part_fast_emulation, m) {
  m.def("cam_eps_map(Tensor cam, int H, int W, float eps, float eps_low, bool jet) -> Tensor");
  m.def("pgd(Tensor(a!) x_adv, Tensor? grad, Tensor x_nat, Tensor? eps_map, float eps, float step, float lo, "
        "float hi, int blocks, bool index64) -> (int, bool, int)");
  m.def("divider_mismatches(int divisor, int n_begin, int n_end) -> int");
}

STABLE_TORCH_LIBRARY_IMPL(part_fast_emulation, CompositeExplicitAutograd, m) {
  m.impl("cam_eps_map", TORCH_BOX(&part_fast_emulation::cam_eps_map));
  m.impl("pgd", TORCH_BOX(&part_fast_emulation::pgd));
  m.impl("divider_mismatches", TORCH_BOX(&part_fast_emulation::divider_mismatches));
}
