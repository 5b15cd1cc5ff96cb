// The fastlm operator library: one schema per op, implemented per device next to each
// kernel (csrc/cpu/*.cpp: TORCH_LIBRARY_IMPL(fastlm, CPU, m); csrc/cuda/*.cpp: CUDA).
// Fake (meta) kernels and autograd formulas are registered from Python (fastlm/ops/).
//
// Conventions: every *_fwd op returns what its *_bwd op needs (statistics in float32, or
// float64 for float64 inputs); an output that does not apply (h without a residual) is an
// empty tensor, because a custom op's output may not alias an input.
#include <Python.h>

#include <torch/library.h>

#include "cpu/common.h"

TORCH_LIBRARY(fastlm, m) {
  // ---- normalization (csrc/cpu/norms.cpp, csrc/cuda/norms.cu, kernels/norms.py) ----
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps)"
        " -> (Tensor out, Tensor h, Tensor mean, Tensor rstd)");
  m.def("layer_norm_bwd(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor weight, Tensor? bias,"
        " Tensor mean, Tensor rstd) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, float eps)"
        " -> (Tensor out, Tensor h, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor weight, Tensor rstd)"
        " -> (Tensor dx, Tensor dweight)");
  // ---- fused linear + cross-entropy (csrc/cpu/loss.cpp, csrc/cuda/loss.cu, kernels/loss.py) ----
  // h (N, C), weight (V, C), targets (N,). The forward returns the loss and, when
  // compute_grad and reduction != "none", the gradients for a unit grad_output (else empty).
  m.def("linear_cross_entropy_fwd(Tensor h, Tensor weight, Tensor targets, int ignore_index, str reduction,"
        " int chunk_size, bool compute_grad) -> (Tensor loss, Tensor grad_h, Tensor grad_weight)");
  // Gradients for per-row losses (reduction "none"): grad_loss (N,) scales each row.
  m.def("linear_cross_entropy_bwd(Tensor grad_loss, Tensor h, Tensor weight, Tensor targets, int ignore_index,"
        " int chunk_size) -> (Tensor grad_h, Tensor grad_weight)");
  // ---- attention (csrc/cpu/attention.cpp, csrc/cuda/attention.cu, kernels/attention.py) ----
  // lse: (B, H, Tq) float32 natural-log logsumexp of each query's scores (+inf for a query
  // that sees no key); the backward pass recomputes the probabilities from it.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal,"
        " float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float scale) -> Tensor");
  // A decode step's new keys and values, k and v (B, Hkv, D), written in place at
  // k_cache[b, :, positions[b]] and v_cache[b, :, positions[b]] (csrc/cpu/kv_cache.cpp).
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor positions) -> ()");
  // ---- the linear layer of a decode step (csrc/cpu/linear.cpp): x (M, K) times a weight (N, K)
  // packed into 48-column panels, weight_p (ceil(N / 48), K, 48), plus bias (N,) ----
  m.def("decode_linear(Tensor x, Tensor weight_p, Tensor? bias, int n) -> Tensor");
  // the same with the weight in reduced precision (fastlm.reference.pack_decode_weight_q):
  // format "bf16" / "f16" (panels of that dtype), "q8_0" or "q4_0" (uint8 blocks of 8- or
  // 4-bit values and float16 scales); x, bias and the output float32
  m.def("decode_linear_q(Tensor x, Tensor weight_q, Tensor? bias, int n, str format) -> Tensor");
  // ---- a whole decode step of a GPT (csrc/cpu/decode_step.cpp): tokens, positions and
  // attend_lens (B,); weights: 12 per layer (ln_1 w, b; attention in/out projections w, b;
  // ln_2 w, b; MLP in/out projections w, b; linear weights packed as for decode_linear in
  // `format`, "f32" or a decode_linear_q format) then the final norm's w, b; kv: each layer's
  // key and value cache (B, Hkv, L, D), written at positions; returns the logits (B, vocab) ----
  m.def("gpt_decode_step(Tensor tokens, Tensor positions, Tensor attend_lens, Tensor wte, Tensor? wpe,"
        " Tensor?[] weights, Tensor(a!)[] kv, int n_head, int n_kv_head, int hidden, bool rms, float eps,"
        " str format, Tensor head_weight, Tensor? head_bias, str head_format) -> Tensor");
  // ---- the optimizer step (csrc/cpu/optim.cpp): float32 CPU tensors, contiguous ----
  // sum over every tensor of its squared elements (a float64 result): the squared global norm
  m.def("sum_squares(Tensor[] xs) -> float");
  // AdamW in place on each (param, exp_avg, exp_avg_sq) with its gradient scaled by
  // grad_scale; steps[i]: tensor i's step count, this step included
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
        " float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale) -> ()");
  // ---- activation (csrc/cpu/gelu.cpp) ----
  m.def("gelu_fwd(Tensor x) -> Tensor");
  m.def("gelu_bwd(Tensor grad_out, Tensor x) -> Tensor");
}

// ---- the Python module fastlm._C: build facts and the CPU kernels' SIMD level; the ops live
// in torch.ops.fastlm ----
static PyObject* fastlm_build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:i,s:s}", "cpu_isa", fastlm::cpu_kernels().name, "openmp",
#ifdef _OPENMP
                       (int)_OPENMP,
#else
                       0,
#endif
                       "compiler", __VERSION__);
}

// [(name, supported by this CPU)] for every level compiled in, ascending.
static PyObject* fastlm_cpu_isa_levels(PyObject*, PyObject*) {
  const fastlm::IsaLevel* levels = nullptr;
  const int n = fastlm::isa_levels(&levels);
  PyObject* out = PyList_New(n);
  if (!out) return nullptr;
  for (int i = 0; i < n; ++i) {
    PyObject* item = Py_BuildValue("(sO)", levels[i].name, levels[i].supported ? Py_True : Py_False);
    if (!item) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, item);
  }
  return out;
}

static PyObject* fastlm_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fastlm::cpu_kernels().name); }

// Switch the level in use; False when it is unknown or this CPU lacks it.
static PyObject* fastlm_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  return PyBool_FromLong(fastlm::set_cpu_isa(name));
}

static PyMethodDef fastlm_methods[] = {
    {"build_info", fastlm_build_info, METH_NOARGS, "CPU SIMD level in use, OpenMP version and compiler of this build."},
    {"cpu_isa_levels", fastlm_cpu_isa_levels, METH_NOARGS, "[(level, supported)] for the SIMD levels built, ascending."},
    {"cpu_isa", fastlm_cpu_isa, METH_NOARGS, "The SIMD level the CPU kernels run at."},
    {"set_cpu_isa", fastlm_set_cpu_isa, METH_O, "Run the CPU kernels at this SIMD level; False if unavailable."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef fastlm_module = {PyModuleDef_HEAD_INIT, "_C",
                                           "fastlm's C++ CPU kernels (ops in torch.ops.fastlm).", -1,
                                           fastlm_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastlm_module); }
