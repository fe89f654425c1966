// Dense bf16 decode ops: linear, routing, RMSNorm.
#include "common.h"

namespace moemesh {


torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w) {
  x = x.contiguous();
  check_bf16(x, "linear_bf16 x");
  check_bf16(w, "linear_bf16 w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bf16: shapes ", x.sizes(), " ", w.sizes());
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  linear_into(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), x.size(0), w.size(0), x.size(1),
              y.data_ptr<at::BFloat16>());
  return y;
}

// DeepSeek-V3 routing for a few tokens: sigmoid scores of the fp32 router; the correction bias shifts
// the choice only; keep the topk_group groups with the best top-2 sums, then the top_k experts among
// them (ties to the lower id). Returns ids [n, top_k] int64 and weights [n, top_k] fp32.
std::vector<torch::Tensor> route_bf16(torch::Tensor x, torch::Tensor router, torch::Tensor bias, int64_t n_group,
                                      int64_t topk_group, int64_t top_k, bool norm_topk_prob, double scaling) {
  x = x.contiguous();
  check_bf16(x, "route_bf16 x");
  TORCH_CHECK(router.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && router.is_contiguous(),
              "route_bf16: router and bias fp32");
  const int64_t n = x.size(0), D = x.size(1), E = router.size(0), per_group = E / n_group;
  auto ids = torch::empty({n, top_k}, x.options().dtype(at::kLong));
  auto weights = torch::empty({n, top_k}, x.options().dtype(at::kFloat));
  std::vector<float> xf(D), scores(E), choice(E), group_score(n_group);
  std::vector<int64_t> order(std::max(E, n_group));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < D; ++i) xf[i] = static_cast<float>(x.data_ptr<at::BFloat16>()[t * D + i]);
    at::parallel_for(0, E, 16, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const float* r = router.data_ptr<float>() + e * D;
        const float logit = dot(xf.data(), r, D);
        scores[e] = 1.0f / (1.0f + std::exp(-logit));
      }
    });
    for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + bias.data_ptr<float>()[e];
    if (n_group > 1) {
      for (int64_t g = 0; g < n_group; ++g) {
        float a = -INFINITY, b = -INFINITY;  // the two best in the group
        for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) {
          if (choice[e] > a) { b = a; a = choice[e]; } else if (choice[e] > b) { b = choice[e]; }
        }
        group_score[g] = a + b;
      }
      for (int64_t g = 0; g < n_group; ++g) order[g] = g;
      std::stable_sort(order.begin(), order.begin() + n_group,
                       [&](int64_t p, int64_t q) { return group_score[p] > group_score[q]; });
      std::vector<bool> keep(n_group, false);
      for (int64_t g = 0; g < topk_group; ++g) keep[order[g]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per_group]) choice[e] = -INFINITY;
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.begin() + E, [&](int64_t p, int64_t q) {
      return choice[p] > choice[q] || (choice[p] == choice[q] && p < q);
    });
    float total = 0;
    for (int64_t j = 0; j < top_k; ++j) total += scores[order[j]];
    for (int64_t j = 0; j < top_k; ++j) {
      ids.data_ptr<int64_t>()[t * top_k + j] = order[j];
      float w = scores[order[j]];
      if (norm_topk_prob) w = w / (total + 1e-20f);
      weights.data_ptr<float>()[t * top_k + j] = w * static_cast<float>(scaling);
    }
  }
  return {ids, weights};
}

void rms_norm_rows(const at::BFloat16* x, const at::BFloat16* weight, int64_t rows, int64_t D, double eps, at::BFloat16* y) {
  std::vector<float> xf(D);
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* xr = x + r * D;
    for (int64_t i = 0; i < D; ++i) xf[i] = static_cast<float>(xr[i]);
    const float scale = 1.0f / std::sqrt(dot(xf.data(), xf.data(), D) / D + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i)
      y[r * D + i] = at::BFloat16(static_cast<float>(weight[i]) * static_cast<float>(at::BFloat16(xf[i] * scale)));
  }
}

torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps) {
  x = x.contiguous();
  check_bf16(x, "rms_norm_bf16 x");
  check_bf16(weight, "rms_norm_bf16 weight");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm_bf16: weight size");
  auto y = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(), x.numel() / D, D, eps, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace moemesh
