// Dense bf16 decode ops: linear, per-head linear (MLA's absorbed products), SwiGLU MLP, RMSNorm.
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

// Per-head products of MLA's absorbed form: y[n, h, :] = w[h] @ x[n, h, :], x [n, H, K], w [H, N, K].
torch::Tensor linear_heads_bf16(torch::Tensor x, torch::Tensor w) {
  x = x.transpose(0, 1).contiguous();  // [H, n, K]: each head's tokens back to back
  check_bf16(x, "linear_heads_bf16 x");
  check_bf16(w, "linear_heads_bf16 w");
  const int64_t H = x.size(0), n = x.size(1), K = x.size(2), N = w.size(1);
  TORCH_CHECK(w.dim() == 3 && w.size(0) == H && w.size(2) == K, "linear_heads_bf16: shapes ", x.sizes(), " ", w.sizes());
  auto y = torch::empty({H, n, N}, x.options());
  linear_per_head(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), H, n, N, K, y.data_ptr<at::BFloat16>());
  return y.transpose(0, 1);
}

// down(silu(gate(x)) * up(x)) for a few tokens, with the reference's bf16 rounding points: gate and up
// outputs, silu, product. Gate and up rows are read in one parallel pass.
void mlp_into(const at::BFloat16* x, int64_t M, int64_t D, const torch::Tensor& gate, const torch::Tensor& up,
              const torch::Tensor& down, at::BFloat16* y) {
  const int64_t I = gate.size(0);
  std::vector<at::BFloat16> g(M * I), u(M * I);
  const int64_t items = (I + ROW_GRAIN - 1) / ROW_GRAIN;
  at::parallel_for(0, 2 * items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const bool is_up = item >= items;
      const int64_t r = (item % items) * ROW_GRAIN;
      linear_rows(x, (is_up ? up : gate).data_ptr<at::BFloat16>(), M, I, D, (is_up ? u : g).data(), r,
                  std::min(I, r + ROW_GRAIN));
    }
  });
  swiglu_bf16(g.data(), u.data(), M * I);
  linear_into(g.data(), down.data_ptr<at::BFloat16>(), M, D, I, y);
}

void check_mlp(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t D) {
  check_bf16(gate, "mlp gate");
  check_bf16(up, "mlp up");
  check_bf16(down, "mlp down");
  const int64_t I = gate.size(0);
  TORCH_CHECK(gate.size(1) == D && up.size(0) == I && up.size(1) == D && down.size(0) == D && down.size(1) == I,
              "mlp: weight shapes ", gate.sizes(), " ", up.sizes(), " ", down.sizes(), " for hidden ", D);
}

torch::Tensor mlp_bf16(torch::Tensor x, torch::Tensor gate, torch::Tensor up, torch::Tensor down) {
  x = x.contiguous();
  check_bf16(x, "mlp_bf16 x");
  check_mlp(gate, up, down, x.size(1));
  auto y = torch::empty_like(x);
  mlp_into(x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), gate, up, down, y.data_ptr<at::BFloat16>());
  return y;
}

namespace {

// One expert's share of a decode step: the tokens routed to it and their routing weights.
struct ExpertJob {
  const torch::Tensor *gate, *up, *down;
  std::vector<std::pair<int64_t, float>> rows;  // (token, weight)
  std::vector<at::BFloat16> x, g, u, y;         // gathered inputs, gate/up outputs, expert outputs
};

}  // namespace

// The MoE layer for a few tokens: routed experts and (if given) the shared expert. out[t] is the sum over t's
// routed experts, in ascending expert order, of bf16(mlp_e(x[t]) * weight), then plus the shared expert,
// every addition rounded to bf16 — the reference's order and rounding. Every expert's gate and up rows are
// read in one parallel pass, every down row in a second. expert_ids are sorted; gates[i] etc. belong to
// expert_ids[i]; shared is empty or (gate, up, down).
torch::Tensor experts_bf16(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, std::vector<int64_t> expert_ids,
                           std::vector<torch::Tensor> gates, std::vector<torch::Tensor> ups,
                           std::vector<torch::Tensor> downs, std::vector<torch::Tensor> shared) {
  x = x.contiguous();
  ids = ids.contiguous();
  weights = weights.contiguous();
  check_bf16(x, "experts_bf16 x");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat && ids.sizes() == weights.sizes(),
              "experts_bf16: ids int64 and weights fp32 of one shape");
  TORCH_CHECK(shared.empty() || shared.size() == 3, "experts_bf16: shared is (gate, up, down) or nothing");
  const int64_t n = x.size(0), D = x.size(1), k = ids.size(1);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();

  std::vector<ExpertJob> jobs;
  for (size_t e = 0; e < expert_ids.size(); ++e) {
    ExpertJob job{&gates[e], &ups[e], &downs[e], {}, {}, {}, {}, {}};
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (ip[t * k + j] == expert_ids[e]) job.rows.emplace_back(t, wp[t * k + j]);
    if (!job.rows.empty()) jobs.push_back(std::move(job));
  }
  if (!shared.empty()) {
    ExpertJob job{&shared[0], &shared[1], &shared[2], {}, {}, {}, {}, {}};
    for (int64_t t = 0; t < n; ++t) job.rows.emplace_back(t, 1.0f);
    jobs.push_back(std::move(job));
  }
  struct Item { size_t job; int part; int64_t row; };  // part 0: gate, 1: up, 2: down
  std::vector<Item> up_items, down_items;
  for (size_t j = 0; j < jobs.size(); ++j) {
    ExpertJob& job = jobs[j];
    check_mlp(*job.gate, *job.up, *job.down, D);
    const int64_t m = static_cast<int64_t>(job.rows.size()), I = job.gate->size(0);
    job.x.resize(m * D);
    job.g.resize(m * I);
    job.u.resize(m * I);
    job.y.resize(m * D);
    for (int64_t r = 0; r < m; ++r)
      std::memcpy(job.x.data() + r * D, xp + job.rows[r].first * D, D * sizeof(at::BFloat16));
    for (int64_t row = 0; row < I; row += ROW_GRAIN) {
      up_items.push_back({j, 0, row});
      up_items.push_back({j, 1, row});
    }
    for (int64_t row = 0; row < D; row += ROW_GRAIN) down_items.push_back({j, 2, row});
  }
  at::parallel_for(0, static_cast<int64_t>(up_items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ExpertJob& job = jobs[up_items[i].job];
      const int64_t m = static_cast<int64_t>(job.rows.size()), I = job.gate->size(0), r = up_items[i].row;
      const bool is_up = up_items[i].part == 1;
      linear_rows(job.x.data(), (is_up ? job.up : job.gate)->data_ptr<at::BFloat16>(), m, I, D,
                  (is_up ? job.u : job.g).data(), r, std::min(I, r + ROW_GRAIN));
    }
  });
  for (ExpertJob& job : jobs) swiglu_bf16(job.g.data(), job.u.data(), static_cast<int64_t>(job.g.size()));
  at::parallel_for(0, static_cast<int64_t>(down_items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ExpertJob& job = jobs[down_items[i].job];
      const int64_t m = static_cast<int64_t>(job.rows.size()), I = job.gate->size(0), r = down_items[i].row;
      linear_rows(job.g.data(), job.down->data_ptr<at::BFloat16>(), m, D, I, job.y.data(), r, std::min(D, r + ROW_GRAIN));
    }
  });
  auto out = torch::zeros_like(x);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (const ExpertJob& job : jobs)  // ascending expert, the shared expert last
    for (size_t r = 0; r < job.rows.size(); ++r) {
      at::BFloat16* dst = op + job.rows[r].first * D;
      const float weight = job.rows[r].second;
      for (int64_t i = 0; i < D; ++i)
        dst[i] = at::BFloat16(static_cast<float>(dst[i]) +
                              static_cast<float>(at::BFloat16(static_cast<float>(job.y[r * D + i]) * weight)));
    }
  return out;
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
        float logit = 0;
        for (int64_t i = 0; i < D; ++i) logit += xf[i] * r[i];
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

// weight * bf16(x * rsqrt(mean(x^2) + eps)), statistics in fp32, as the reference computes it.
torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps) {
  x = x.contiguous();
  check_bf16(x, "rms_norm_bf16 x");
  check_bf16(weight, "rms_norm_bf16 weight");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(weight.numel() == D, "rms_norm_bf16: weight size");
  auto y = torch::empty_like(x);
  auto xp = x.data_ptr<at::BFloat16>();
  auto wp = weight.data_ptr<at::BFloat16>();
  auto yp = y.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* xr = xp + r * D;
    float ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<float>(xr[i]) * static_cast<float>(xr[i]);
    const float scale = 1.0f / std::sqrt(ss / D + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i)
      yp[r * D + i] = at::BFloat16(static_cast<float>(wp[i]) * static_cast<float>(at::BFloat16(static_cast<float>(xr[i]) * scale)));
  }
  return y;
}

}  // namespace moemesh
