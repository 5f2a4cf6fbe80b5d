// `import part_fast._C_cuda` loads the CUDA kernels (csrc/cuda/*.cu), which register for the schemas that
// part_fast._C defines; part_fast.ops imports part_fast._C first. A library of its own so that a CUDA part
// that cannot load (another CUDA major, no driver) leaves the CPU kernels working.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
