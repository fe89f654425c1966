// The Python module: one extension built from every .cpp in this folder (see ../cpu_ext.py).
#include "mla.h"
#include "moe.h"

namespace moemesh {
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w);
std::vector<torch::Tensor> route_bf16(torch::Tensor x, torch::Tensor router, torch::Tensor bias, int64_t n_group,
                                      int64_t topk_group, int64_t top_k, bool norm_topk_prob, double scaling);
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor linear_q(torch::Tensor x, QArgs weight);
torch::Tensor linear_heads_q(torch::Tensor x, QArgs weight);
torch::Tensor mlp_q(torch::Tensor x, QArgs gate, QArgs up, QArgs down);
torch::Tensor dequantize_q(QArgs weight, int64_t row_begin, int64_t row_end, std::optional<torch::Tensor> out);
void to_lanes_q(torch::Tensor words, int64_t bits, int64_t group, torch::Tensor out);
}  // namespace moemesh

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = MOEMESH_ISA;  // the level these kernels were compiled for (vec.h)
  m.def("linear_bf16", &moemesh::linear_bf16, "y = x @ w.T for a few bf16 tokens");
  m.def("route_bf16", &moemesh::route_bf16, "DeepSeek-V3 grouped sigmoid routing for a few bf16 tokens");
  m.def("rms_norm_bf16", &moemesh::rms_norm_bf16, "RMSNorm of bf16 rows");
  m.def("linear_q", &moemesh::linear_q, "y = x @ w.T for a few bf16 tokens; w bf16, FP8 (128x128 blocks) or int4/int8 affine");
  m.def("linear_heads_q", &moemesh::linear_heads_q, "per-head y[:, h] = x[:, h] @ w_h.T for a few bf16 tokens; heads stacked in w");
  m.def("mlp_q", &moemesh::mlp_q, "SwiGLU MLP for a few bf16 tokens; weights in any linear_q format");
  py::class_<moemesh::MoeLayer>(m, "MoeLayer", py::module_local(), "a MoE layer's experts held for decode steps; weights in any linear_q format")
      .def(py::init<std::vector<int64_t>, std::vector<moemesh::QArgs>, std::vector<moemesh::QArgs>,
                    std::vector<moemesh::QArgs>, std::vector<moemesh::QArgs>>(),
           py::arg("ids"), py::arg("gates"), py::arg("ups"), py::arg("downs"), py::arg("shared"))
      .def("forward", &moemesh::MoeLayer::forward, "routed (+ shared) experts for a few bf16 tokens",
           py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("with_shared"));
  m.def("dequantize_q", &moemesh::dequantize_q, "rows of a linear_q weight as bf16, into out if given",
        py::arg("weight"), py::arg("row_begin"), py::arg("row_end"), py::arg("out") = py::none());
  m.def("to_lanes_q", &moemesh::to_lanes_q, "out = packed int4/int8 words in the kernels' lane-major layout");
  py::class_<moemesh::MlaLayer>(m, "MlaLayer", py::module_local(), "an attention block held for decode steps")
      .def(py::init<std::vector<moemesh::QArgs>, torch::Tensor, moemesh::QArgs, torch::Tensor, moemesh::QArgs,
                    moemesh::QArgs, moemesh::QArgs, int64_t, int64_t, double, double, bool>(),
           py::arg("q"), py::arg("q_a_norm"), py::arg("kv_a"), py::arg("kv_a_norm"), py::arg("w_uk"), py::arg("w_uv"),
           py::arg("o_proj"), py::arg("heads"), py::arg("rope"), py::arg("eps"), py::arg("scale"), py::arg("interleave"))
      .def("forward", &moemesh::MlaLayer::forward, "the block's output for a few bf16 tokens; writes the caches",
           py::arg("x"), py::arg("segments"), py::arg("cos"), py::arg("sin"));
}
