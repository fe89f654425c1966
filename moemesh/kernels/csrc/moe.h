// A MoE layer held by the kernels (moe.cpp).
#pragma once
#include "quant.h"

#include <optional>

namespace moemesh {

// A MoE layer's weights as the kernels read them, made once per layer: views of the experts held here and of
// the shared expert. A decode step then passes three tensors rather than three weight tuples per chosen
// expert, whose Python objects would be walked every step, each time cold in cache after the layer's weights
// have streamed through it.
class MoeLayer {
 public:
  MoeLayer(std::vector<int64_t> ids, std::vector<QArgs> gates, std::vector<QArgs> ups, std::vector<QArgs> downs,
           std::vector<QArgs> shared);
  // For a few bf16 tokens x routed to ids with weights ([tokens, k]): the routed experts' weighted sum in
  // ascending expert order, then plus the shared expert (with_shared), every addition rounded to bf16 — the
  // reference's order and rounding.
  torch::Tensor forward(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, bool with_shared) const;

 private:
  void keep(const QArgs& a);
  std::vector<int64_t> ids_;                     // held expert ids, ascending
  std::vector<std::array<QLinear, 3>> experts_;  // gate, up, down of ids_[i]
  std::vector<int64_t> slot_;                    // expert id -> its index in ids_, -1 where not held
  std::optional<std::array<QLinear, 3>> shared_;
  std::vector<torch::Tensor> tensors_;           // what the views point into
};

}  // namespace moemesh
