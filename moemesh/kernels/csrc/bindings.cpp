// The Python module: one extension built from every .cpp in this folder (see ../cpu_ext.py).
#include <torch/extension.h>

namespace moemesh {
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w);
torch::Tensor linear_heads_bf16(torch::Tensor x, torch::Tensor w);
torch::Tensor mlp_bf16(torch::Tensor x, torch::Tensor gate, torch::Tensor up, torch::Tensor down);
torch::Tensor experts_bf16(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, std::vector<int64_t> expert_ids,
                           std::vector<torch::Tensor> gates, std::vector<torch::Tensor> ups,
                           std::vector<torch::Tensor> downs);
std::vector<torch::Tensor> route_bf16(torch::Tensor x, torch::Tensor router, torch::Tensor bias, int64_t n_group,
                                      int64_t topk_group, int64_t top_k, bool norm_topk_prob, double scaling);
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor mla_decode_bf16(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor rows, torch::Tensor cos,
                              torch::Tensor sin, torch::Tensor cache, int64_t start, torch::Tensor w_uk,
                              torch::Tensor w_uv, double scale, bool interleave);
}  // namespace moemesh

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &moemesh::linear_bf16, "y = x @ w.T for a few bf16 tokens");
  m.def("linear_heads_bf16", &moemesh::linear_heads_bf16, "per-head y[:, h] = w[h] @ x[:, h] for a few bf16 tokens");
  m.def("mlp_bf16", &moemesh::mlp_bf16, "SwiGLU MLP for a few bf16 tokens");
  m.def("experts_bf16", &moemesh::experts_bf16, "routed experts' weighted sum for a few bf16 tokens");
  m.def("route_bf16", &moemesh::route_bf16, "DeepSeek-V3 grouped sigmoid routing for a few bf16 tokens");
  m.def("rms_norm_bf16", &moemesh::rms_norm_bf16, "RMSNorm of bf16 rows");
  m.def("mla_decode_bf16", &moemesh::mla_decode_bf16, "MLA decode attention (absorbed form) for one request");
}
