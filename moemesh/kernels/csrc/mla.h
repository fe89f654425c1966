// MLA attention for decode steps (mla.cpp).
#pragma once
#include "quant.h"

namespace moemesh {

// An attention block's weights as the kernels read them, made once per layer: a decode step then runs the whole
// block — q (through q_a and its norm, or q_proj), kv_a and its norm, MLA over each request's cache, o_proj —
// in one call, rather than in a dozen Python calls and torch ops whose objects are cold by the time the layer's
// weights have streamed through.
class MlaLayer {
 public:
  // q: [q_proj] or [q_a_proj, q_b_proj] (then q_a_norm applies between them); weights in any linear_q format.
  MlaLayer(std::vector<QArgs> q, torch::Tensor q_a_norm, QArgs kv_a, torch::Tensor kv_a_norm, QArgs w_uk, QArgs w_uv,
           QArgs o_proj, int64_t heads, int64_t rope, double eps, double scale, bool interleave);
  // x [tokens, hidden] (normalized), the tokens of each request back to back: segments (cache [capacity, kv_lora +
  // rope], start, length). Writes each request's new cache rows; returns the attention output [tokens, hidden].
  torch::Tensor forward(torch::Tensor x, std::vector<std::tuple<torch::Tensor, int64_t, int64_t>> segments,
                        torch::Tensor cos, torch::Tensor sin) const;

 private:
  void keep(const QArgs& a);
  std::vector<QLinear> q_;
  QLinear kv_a_, w_uk_, w_uv_, o_;
  torch::Tensor q_a_norm_, kv_a_norm_;
  int64_t H_, dr_, dn_ = 0;
  double eps_, scale_;
  bool interleave_;
  std::vector<torch::Tensor> tensors_;  // what the views point into
};

}  // namespace moemesh
