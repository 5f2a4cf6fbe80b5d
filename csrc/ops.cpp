// The schemas of every part_fast op, in one place. Kernels register per device in csrc/cpu and csrc/cuda.
//
// This library (part_fast._C) holds the schemas and the CPU kernels; the CUDA kernels are a library of their
// own (part_fast._C_cuda, csrc/cuda/module.cpp), so a CUDA part that cannot load (another CUDA major, no
// driver) leaves the CPU kernels working. Both are built on the LibTorch stable ABI only, for torch >= 2.10.
#include <Python.h>
#include <torch/csrc/stable/library.h>

extern "C" {
// `import part_fast._C` loads this library, whose static initialisers register the ops with the
// dispatcher. The module itself is empty: the ops are reached through torch.ops.part_fast. Only the
// limited Python API is used (the wheel is abi3).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(part_fast, m) {
  // x_adv <- clip(clamp(x_adv + step_size * sign(grad), x_nat - eps, x_nat + eps), lo, hi), in place.
  // The budget is eps_map (broadcastable to x_adv) when given, else the scalar eps.
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_map, float eps, float step_size, "
      "float lo, float hi) -> ()");
  // x_adv <- clip(clamp(x_adv, x_nat - eps, x_nat + eps), lo, hi), in place.
  m.def("project_(Tensor(a!) x_adv, Tensor x_nat, Tensor? eps_map, float eps, float lo, float hi) -> ()");
  // Raw CAM (B, h, w) -> per-pixel budget (B, 3, H, W) for mode "jet", (B, 1, H, W) for mode "cam".
  m.def("cam_eps_map(Tensor cam, SymInt[2] size, float eps, float eps_low, str mode) -> Tensor");
}
