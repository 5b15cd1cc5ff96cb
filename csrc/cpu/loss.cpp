// Fused linear + cross-entropy: loss of logits = h @ weight^T (h: (N, C), weight: (V, C))
// against integer targets, without materialising the (N, V) logits or their gradient.
//
// Rows are processed in chunks of R rows (R * V floats, at most 256 MiB by default: every
// chunk reads and writes the whole dW once more, so fewer, larger chunks save memory traffic):
//   1. Z = h[chunk] @ weight^T into one reused (R, V) buffer (at::mm_out, the BLAS);
//   2. per row, in parallel and vectorised, in place over Z's row (which sits in L2), by the
//      kernel core of the SIMD level in use (csrc/cpu/kernels/loss.h):
//        m = max z, e_j = exp(z_j - m) (stored back), s = sum e_j, lse = m + log s,
//        loss = lse - z_t;  and, when gradients are wanted,
//        z_j <- scale_row * e_j / s  minus scale_row at j = t   (= scale * (softmax - onehot)),
//      a row whose target is ignore_index gets loss 0 and a zero gradient row;
//   3. dh[chunk] = Z @ weight (mm_out into dh's rows) and dW (+)= Z^T @ h[chunk] (addmm).
// The chunk is then dropped (its buffer reused), so the extra memory is one chunk plus
// dh and dW. Like Liger-Kernel, the forward computes the gradients for a unit grad_output
// when the loss is reduced ("mean": scale = 1/n_valid, "sum": 1), and the backward only
// scales them. For reduction "none" the backward op reruns the chunks with per-row scales
// (the incoming grad_output).
// bf16/fp16 inputs are computed in float32 (h chunks and weight converted), as the reference.
#include "common.h"

#include <string>

namespace fastlm {
namespace {

constexpr int64_t kChunkBytes = int64_t(256) << 20;

// Rows per chunk: as few chunks as kChunkBytes of logits allow, then evened out (N = 4096,
// V = 50257: 4 chunks of 1024 rows, 206 MB) so the last chunk is not a sliver.
int64_t pick_chunk(int64_t N, int64_t V, int64_t elt, int64_t chunk_size) {
  if (chunk_size > 0) return std::max<int64_t>(1, std::min(chunk_size, N));
  const int64_t most = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, V * elt));
  const int64_t chunks = (N + most - 1) / most;
  int64_t r = (N + chunks - 1) / chunks;
  if (r >= 64 && (r + 63) / 64 * 64 <= most) r = (r + 63) / 64 * 64;
  return std::max<int64_t>(1, std::min(r, N));
}

// The chunked core. row_scale: per-row gradient scale (nullptr: every row `scale`).
// Writes per-row losses into loss_rows (acc dtype, (N,)); when grad, fills dh (N, C) and
// dw (V, C) in the acc dtype.
void run_chunks(const at::Tensor& h, const at::Tensor& w, const int64_t* tg, int64_t ignore_index, int64_t chunk,
                bool grad, double scale, const at::Tensor& row_scale, at::Tensor& loss_rows, at::Tensor& dh,
                at::Tensor& dw) {
  const int64_t N = h.size(0), V = w.size(0);
  // Plain allocation (not the output pool): the buffer is dropped after the call, and a
  // cached copy would only add to the peak memory of the backward pass.
  at::Tensor buf = at::empty({std::min(chunk, N), V}, h.options());
  bool first = true;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t R = std::min(chunk, N - r0);
    at::Tensor z = buf.narrow(0, 0, R);
    at::Tensor hc = h.narrow(0, r0, R);
    at::mm_out(z, hc, w.t());
    // this chunk's rows of the per-row losses and scales
    char* lp = static_cast<char*>(loss_rows.data_ptr()) + r0 * loss_rows.element_size();
    const char* rs =
        row_scale.defined() ? static_cast<const char*>(row_scale.data_ptr()) + r0 * row_scale.element_size() : nullptr;
    cpu_kernels().loss_rows(
        LossRowsArgs{kernel_dtype(h.scalar_type()), z.data_ptr(), lp, tg + r0, rs, R, V, ignore_index, grad, scale});
    if (!grad) continue;
    at::Tensor dhc = dh.narrow(0, r0, R);
    at::mm_out(dhc, z, w);
    if (first) {
      at::mm_out(dw, z.t(), hc);
      first = false;
    } else {
      dw.addmm_(z.t(), hc);
    }
  }
  if (grad && first) dw.zero_();  // N == 0
}

struct Prepared {
  at::Tensor h, w, targets;
  int64_t N, C, V;
};

Prepared prepare(const at::Tensor& h_, const at::Tensor& w_, const at::Tensor& targets_, int64_t ignore_index) {
  FASTLM_CHECK_CPU(h_);
  FASTLM_CHECK_CPU(w_);
  FASTLM_CHECK_CPU(targets_);
  TORCH_CHECK(h_.dim() == 2, "linear_cross_entropy: h must have shape (N, C), got ", h_.sizes());
  TORCH_CHECK(w_.dim() == 2 && w_.size(1) == h_.size(1), "linear_cross_entropy: weight must have shape (V, ",
              h_.size(1), "), got ", w_.sizes());
  TORCH_CHECK(w_.scalar_type() == h_.scalar_type(), "linear_cross_entropy: weight dtype must match h");
  TORCH_CHECK(targets_.dim() == 1 && targets_.size(0) == h_.size(0),
              "linear_cross_entropy: targets must have shape (N,) with N = h.size(0)");
  TORCH_CHECK(targets_.scalar_type() == at::kLong || targets_.scalar_type() == at::kInt,
              "linear_cross_entropy: targets must be int64 or int32");
  TORCH_CHECK(w_.size(0) >= 1, "linear_cross_entropy: the vocabulary must not be empty");
  const at::ScalarType acc = stat_dtype(h_.scalar_type());
  Prepared p;
  p.h = h_.to(acc).contiguous();
  p.w = w_.to(acc).contiguous();
  p.targets = targets_.to(at::kLong).contiguous();
  p.N = p.h.size(0);
  p.C = p.h.size(1);
  p.V = p.w.size(0);
  const int64_t* tg = p.targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.N; ++i) {
    TORCH_CHECK(tg[i] == ignore_index || (tg[i] >= 0 && tg[i] < p.V), "linear_cross_entropy: target ", tg[i],
                " at row ", i, " is out of range [0, ", p.V, ") and is not ignore_index (", ignore_index, ")");
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(const at::Tensor& h_, const at::Tensor& w_,
                                                                        const at::Tensor& targets_,
                                                                        int64_t ignore_index,
                                                                        c10::string_view reduction, int64_t chunk_size,
                                                                        bool compute_grad) {
  const std::string red(reduction);
  TORCH_CHECK(red == "mean" || red == "sum" || red == "none",
              "linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got '", red, "'");
  Prepared p = prepare(h_, w_, targets_, ignore_index);
  const at::ScalarType acc = p.h.scalar_type();
  const bool grad = compute_grad && red != "none";
  int64_t n_valid = 0;
  {
    const int64_t* tg = p.targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < p.N; ++i) n_valid += tg[i] != ignore_index;
  }
  const double scale = red == "mean" ? 1.0 / static_cast<double>(n_valid) : 1.0;
  at::Tensor loss_rows = at::empty({p.N}, p.h.options());
  at::Tensor dh = grad ? at::empty({p.N, p.C}, p.h.options()) : at::empty({0}, h_.options());
  at::Tensor dw = grad ? at::empty({p.V, p.C}, p.h.options()) : at::empty({0}, w_.options());
  const int64_t chunk = pick_chunk(p.N, p.V, c10::elementSize(acc), chunk_size);
  if (p.N > 0)
    run_chunks(p.h, p.w, p.targets.data_ptr<int64_t>(), ignore_index, chunk, grad, scale, at::Tensor(), loss_rows, dh,
               dw);
  at::Tensor loss;
  if (red == "none") {
    loss = loss_rows;
  } else {
    loss = loss_rows.sum();
    if (red == "mean") loss = loss / static_cast<double>(n_valid);  // NaN when no row counts, as torch
  }
  if (grad) {
    dh = dh.to(h_.scalar_type());
    dw = dw.to(w_.scalar_type());
  }
  return {loss, dh, dw};
}

// Gradients for reduction "none": grad_loss (N,) is the per-row scale.
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& h_,
                                                            const at::Tensor& w_, const at::Tensor& targets_,
                                                            int64_t ignore_index, int64_t chunk_size) {
  Prepared p = prepare(h_, w_, targets_, ignore_index);
  FASTLM_CHECK_CPU(grad_loss);
  TORCH_CHECK(grad_loss.numel() == p.N, "linear_cross_entropy backward: grad_output must have N elements");
  const at::Tensor rs = grad_loss.reshape({p.N}).to(p.h.scalar_type()).contiguous();
  at::Tensor loss_rows = at::empty({p.N}, p.h.options());
  at::Tensor dh = at::empty({p.N, p.C}, p.h.options());
  at::Tensor dw = at::empty({p.V, p.C}, p.h.options());
  const int64_t chunk = pick_chunk(p.N, p.V, c10::elementSize(p.h.scalar_type()), chunk_size);
  if (p.N > 0) run_chunks(p.h, p.w, p.targets.data_ptr<int64_t>(), ignore_index, chunk, true, 1.0, rs, loss_rows, dh, dw);
  else dw.zero_();
  return {dh.to(h_.scalar_type()), dw.to(w_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
}

}  // namespace fastlm
