// The Python module fastlm._C_cuda: importing it runs the TORCH_LIBRARY_IMPL(fastlm, CUDA)
// registrations of the glue files (attention_glue.cpp, norms_glue.cpp, loss_glue.cpp); the
// module itself holds no functions. The op schemas are fastlm._C's (csrc/ops.cpp), so
// fastlm/ops/_native.py imports fastlm._C first.
#include <Python.h>

static struct PyModuleDef fastlm_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                                "fastlm's CUDA kernels (ops in torch.ops.fastlm).", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&fastlm_cuda_module); }
